"""Datasets, students and caches for the Hugging Face Trainer tests (tests/test_integration_transformers.py).

Named by file path (``<tests>/hf_factories.py:name``) in dump specs, and imported by the scripts the
DDP test writes, so they load the same way in pytest and in torchrun's workers. The datasets record
the indices each batch read asks for (``served``, one list per batch) from ``__getitems__``, which
only a DataLoader calls (the fingerprint check reads single items through ``__getitem__``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import transformers
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # in torchrun's workers too: data_factories sits beside this file
from data_factories import DictImages, KeywordNet, RaggedTokens  # noqa: E402

import logit_cache  # noqa: E402

VOCAB = 64
SEQUENCES = 36
IMAGES = 40
CLASSES = 10


def spec(name: str) -> str:
    """``/abs/path/tests/hf_factories.py:name``."""
    return f"{HERE / 'hf_factories.py'}:{name}"


class RecordsServed:
    """Records the indices of every batch read (``served``): what the tests count per epoch and rank."""

    served: list[list[int]]

    def __getitems__(self, indices: list[int]) -> list:
        self.served.append([int(i) for i in indices])
        return [self[i] for i in indices]  # type: ignore[index]


class ServedTokens(RecordsServed, RaggedTokens):
    """Dict items ``{input_ids, attention_mask}`` (padded by the dataset itself) whose batch reads are recorded."""

    def __init__(self, n: int = SEQUENCES, seed: int = 0) -> None:
        super().__init__(n=n, vocab=VOCAB, max_len=12, seed=seed, style="dict")
        self.served = []


def served_tokens(n: int = SEQUENCES, seed: int = 0) -> ServedTokens:
    return ServedTokens(n, seed)


class ServedImages(RecordsServed, DictImages):
    """Items ``({"pixels", "bias"}, label)``, batch reads recorded; the students take ``pixels`` only."""

    def __init__(self, n: int = IMAGES, seed: int = 0) -> None:
        super().__init__(n, seed)
        self.served = []


def served_images(n: int = IMAGES, seed: int = 0) -> ServedImages:
    return ServedImages(n, seed)


def gpt2_config() -> transformers.GPT2Config:
    # no dropout: the Trainer and a hand-written loop must compute the same thing; bos/eos inside the vocabulary
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt2(seed: int = 1) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config())


class TinyClassifier(nn.Module):
    """A per-sample student: ``forward(pixels)`` -> (B, 10) logits (no ``bias`` argument: that column is unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels)


def tiny_classifier(seed: int = 1) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def dump_token_cache(root: Path, n: int = SEQUENCES) -> Path:
    """A per-token top-8 cache of :class:`ServedTokens` from an ``hf:DIR`` teacher (a tiny random GPT-2)."""
    torch.manual_seed(0)
    teacher = root / "teacher-gpt2"
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(teacher)
    config = logit_cache.DumpConfig(teacher=f"hf:{teacher}", dataset=spec("served_tokens"), dataset_kwargs={"n": n},
                                    out=str(root / "tokens-top8"), mode="topk", k=8, dtype="float32", shard_rows=64,
                                    batch_size=8, quiet=True, device="cpu")
    return Path(logit_cache.dump(config).out)


def dump_image_cache(root: Path, n: int = IMAGES) -> Path:
    """A per-sample top-4 cache of :class:`ServedImages` from a keyword teacher (``pixels``, ``bias``)."""
    torch.manual_seed(0)
    path = root / "teacher-keyword.pt"
    torch.save(KeywordNet(CLASSES).state_dict(), path)
    config = logit_cache.DumpConfig(teacher=str(path), arch=f"{HERE / 'data_factories.py'}:KeywordNet", dataset=spec("served_images"),
                                    dataset_kwargs={"n": n}, out=str(root / "images-top4"), mode="topk", k=4, dtype="float32",
                                    shard_rows=16, batch_size=8, quiet=True, device="cpu")
    return Path(logit_cache.dump(config).out)


def dump_views_cache(root: Path, n: int = IMAGES, views: int = 2, seed: int = 5) -> Path:
    """A per-sample top-4 cache of ``views`` replayed augmentations of each image (``three_rng_images``, tensor inputs)."""
    from logit_cache.models import digits_mlp

    torch.manual_seed(0)
    path = root / "teacher-mlp.pt"
    torch.save(digits_mlp(hidden=32).state_dict(), path)
    config = logit_cache.DumpConfig(teacher=str(path), arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32},
                                    dataset=f"{HERE / 'data_factories.py'}:three_rng_images", dataset_kwargs={"n": n},
                                    out=str(root / "views-top4"), mode="topk", k=4, dtype="float32", views=views, seed=seed,
                                    shard_rows=32, batch_size=16, quiet=True, device="cpu")
    return Path(logit_cache.dump(config).out)


def initial_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def tiny_llama(vocab: int = 96, hidden: int = 32, layers: int = 2, tie: bool = False) -> transformers.LlamaForCausalLM:
    """A random Llama-style causal LM small enough for CPU tests (GQA: 4 heads, 2 key/value heads)."""
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                                      eos_token_id=1, pad_token_id=0, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)
