"""The chunked LM head of ``hf:`` causal LM teachers (teachers/lm_head.py, targets/tokens.py): the same
rows as the forward path, never more than a chunk of tokens' logits at a time, and a fallback with one
warning for heads that do more than a linear layer.

Tiny random transformers models are built here and written with ``save_pretrained``. The forward path
is forced by replacing the dump's head decision with "no chunked head"; every comparison re-reads both
caches' shards with zarr/h5py. ``TOKEN_CHUNK`` is lowered to 16 so that sequences of up to 40 tokens
span several chunks and a batch of them many.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import transformers
import zarr
from data_factories import RaggedTokens, read_plain, spec
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from logit_cache import DumpConfig, dump
from logit_cache.pipeline import batches
from logit_cache.targets import tokens
from logit_cache.teachers import lm_head
from logit_cache.teachers.lm_head import ChunkedHead, choose_head, split_head

VOCAB = 512
CHUNK = 16
DATA = {"n": 20, "vocab": VOCAB, "max_len": 40, "seed": 3}


@pytest.fixture(autouse=True)
def small_chunks_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "TOKEN_CHUNK", CHUNK)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def build(arch: str, vocab: int = VOCAB) -> transformers.PreTrainedModel:
    """A tiny random causal LM; ids 1 as bos/eos/pad so the configs do not warn about their defaults."""
    torch.manual_seed(0)
    ids = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1}
    llama_like = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "max_position_embeddings": 64, **ids}
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                                                      bos_token_id=1, eos_token_id=1))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_like))
    elif arch == "gemma2":  # soft-capping at 2: random logits of about 1 change by several percent
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**llama_like, head_dim=16, final_logit_softcapping=2.0))
    elif arch == "cohere":  # logit_scale 0.0625 by default
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**llama_like))
    else:
        raise AssertionError(arch)
    with torch.no_grad():  # logits of a few units, so top-k and draws are not decided by rounding
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def save(tmp_path: Path, arch: str, vocab: int = VOCAB) -> str:
    directory = tmp_path / f"teacher-{arch}"
    if not directory.exists():
        build(arch, vocab).save_pretrained(directory)
    return f"hf:{directory}"


@contextmanager
def forward_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Dumps inside take the forward path: the dump's one decision answers "no chunked head"."""
    with monkeypatch.context() as patch:
        patch.setattr(batches, "choose_head", lambda *args, **kwargs: None)
        yield


def run_dump(tmp_path: Path, teacher: str, name: str, **options: object) -> Path:
    settings = {"mode": "topk", "k": 8, "dtype": "float32", "shard_rows": 100, "batch_size": 8, **options}
    config = DumpConfig(teacher=teacher, dataset=spec("ragged_tokens"), dataset_kwargs=dict(DATA), out=str(tmp_path / name),
                        quiet=True, device="cpu", **settings)
    return Path(dump(config).out)


def stored(out: Path) -> dict[str, bytes]:
    """Every array of every shard, read with zarr / h5py: ``shard/array`` -> dtype, shape and bytes."""
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, bytes] = {}
    for shard in manifest["shards"]:
        path = out / shard["path"]
        if manifest["backend"] == "zarr":
            group = zarr.open_group(str(path), mode="r")
            arrays = {name: group[name][:] for name in group.array_keys()}
        else:
            with h5py.File(path, "r") as handle:
                arrays = {name: handle[name][:] for name in handle}
        for name, array in arrays.items():
            found[f"{shard['path']}/{name}"] = f"{array.dtype}{array.shape}".encode() + array.tobytes()
    assert found
    return found


def assert_same_rows(one: Path, other: Path) -> None:
    a, b = stored(one), stored(other)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"arrays differ: {different}"


def head_output_shapes() -> tuple[list[tuple[int, ...]], object]:
    """A list that collects the shape of every output of a loaded teacher's lm_head (a forward hook), and
    the ``from_pretrained`` that installs the hook on each load."""
    shapes: list[tuple[int, ...]] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def load(*args: object, **kwargs: object) -> object:
        loaded = original(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
        return loaded

    return shapes, load


# --- the same rows ------------------------------------------------------------------------------------


CASES = [
    ("gpt2", {"mode": "topk", "k": 8}),
    ("gpt2", {"mode": "topk", "k": 8, "encoding": "compact"}),
    ("gpt2", {"mode": "sampled", "k": None, "m": 20, "seed": 4}),
    ("gpt2", {"mode": "sampled", "k": None, "m": 20, "encoding": "compact", "sample_temperature": 1.5}),
    ("gpt2", {"mode": "full", "k": None}),
    ("llama", {"mode": "topk", "k": 8, "backend": "hdf5"}),
    ("llama", {"mode": "sampled", "k": None, "m": 20, "backend": "hdf5", "encoding": "compact"}),
]


@pytest.mark.parametrize(("arch", "options"), CASES, ids=lambda value: value if isinstance(value, str) else "-".join(
    str(v) for v in value.values() if v is not None))
def test_chunked_head_gives_the_forward_paths_rows_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str,
                                                                   options: dict) -> None:
    teacher = save(tmp_path, arch)
    shapes, load = head_output_shapes()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    chunked = run_dump(tmp_path, teacher, "chunked", **options)
    # the chunked path was taken: after the first batch's check, the head only ever saw (<= CHUNK, V) blocks
    head_calls = [shape for shape in shapes if len(shape) == 2]
    assert head_calls and all(rows <= CHUNK and vocab == VOCAB for rows, vocab in head_calls)
    assert sum(rows for rows, _ in head_calls) >= sum(RaggedTokens(**DATA).lengths)
    with forward_path(monkeypatch):
        shapes.clear()
        forward = run_dump(tmp_path, teacher, "forward", **options)
        assert all(len(shape) == 3 for shape in shapes) and max(batch * steps for batch, steps, _ in shapes) > CHUNK  # [B, T, V]
    assert_same_rows(chunked, forward)


def test_chunked_rows_are_the_teachers_own_logits(tmp_path: Path) -> None:
    """Independently of either path: each sequence's top-8 and logsumexp from transformers' forward."""
    teacher = save(tmp_path, "llama")
    out = run_dump(tmp_path, teacher, "top8")
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher.removeprefix("hf:"), dtype=torch.float32).eval()
    data = RaggedTokens(**DATA)
    with torch.no_grad():
        logits = torch.cat([model(data[i][None]).logits[0] for i in range(len(data))])  # (N, V), one sequence at a time
    values, ids = torch.topk(logits, 8, dim=1)
    np.testing.assert_array_equal(read_plain(out, "topk_indices").astype(np.int64), ids.numpy())
    np.testing.assert_allclose(read_plain(out, "topk_logits"), values.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(read_plain(out, "logsumexp"), torch.logsumexp(logits, dim=1).numpy(), rtol=1e-5, atol=1e-4)


# --- memory: never more than a chunk of tokens' logits ------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """Sees every tensor op of this thread: the largest storage an op's outputs allocate (outputs that share
    an input's storage, views and in-place results, allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in given:
                size = tensor.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.op = size, f"{func} -> {tuple(tensor.shape)}"
        return out


def largest_allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher: str, name: str, **options: object) -> LargestAllocation:
    """The dump's batch loop (teacher, head, encoding, host copies) run under :class:`LargestAllocation`."""
    seen = LargestAllocation()
    original = batches.write_batches

    def observed(*args: object, **kwargs: object) -> object:
        with seen:
            return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(batches, "write_batches", observed)
        run_dump(tmp_path, teacher, name, **options)
    return seen


@pytest.mark.parametrize("options", [{"mode": "topk", "k": 8}, {"mode": "sampled", "k": None, "m": 20}], ids=["topk", "sampled"])
def test_no_allocation_exceeds_a_chunk_of_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    """At V=8192 a chunk's float32 logits (16 x V, 512 KiB) outweigh any of the tiny body's tensors, and a batch's
    [<=8, <=40, V] (several MiB) outweighs them: the largest single allocation says which was made."""
    vocab = 8192
    teacher = save(tmp_path, "gpt2", vocab)
    monkeypatch.setitem(DATA, "vocab", vocab)
    bound = max(CHUNK, lm_head.MIN_GEMM_ROWS) * vocab * 4
    chunked = largest_allocation(tmp_path, monkeypatch, teacher, "chunked", **options)
    assert chunked.largest <= bound, chunked.op
    with forward_path(monkeypatch):
        forward = largest_allocation(tmp_path, monkeypatch, teacher, "forward", **options)
    assert forward.largest > 8 * bound, forward.op  # a batch's [B, T, V], what the chunked path avoids, measured the same way


# --- heads that do more than a linear layer -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_heads_that_do_more_fall_back_to_the_forward_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture, arch: str) -> None:
    teacher = save(tmp_path, arch)
    with caplog.at_level(logging.WARNING, logger="logit_cache"):
        out = run_dump(tmp_path, teacher, "fallback")
    warned = [record for record in caplog.records if record.name == lm_head.__name__]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    message = warned[0].getMessage()
    assert "not a linear layer over its last hidden states" in message and "ForCausalLM" in message and "--batch-size" in message
    with forward_path(monkeypatch):
        forward = run_dump(tmp_path, teacher, "forward")
    assert_same_rows(out, forward)
    # and they are the model's own (soft-capped / scaled) logits
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher.removeprefix("hf:"), dtype=torch.float32).eval()
    data = RaggedTokens(**DATA)
    with torch.no_grad():
        logits = torch.cat([model(data[i][None]).logits[0] for i in range(len(data))])
    np.testing.assert_allclose(read_plain(out, "logsumexp"), torch.logsumexp(logits, dim=1).numpy(), rtol=1e-5, atol=1e-4)


class ScaledHead(transformers.GPT2LMHeadModel):
    """A custom causal LM whose forward scales the head's logits: nothing in its structure says so."""

    def forward(self, *args: object, **kwargs: object) -> object:
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 1.5
        return output


def forward_of(model: torch.nn.Module):
    return lambda inputs: model(**inputs).logits if isinstance(inputs, dict) else model(inputs).logits


def first_batch(lengths: list[int], vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_choose_head_splits_plain_heads_and_refuses_others(caplog: pytest.LogCaptureFixture) -> None:
    lengths = [9, 4, 7]
    inputs = first_batch(lengths)
    plain = build("llama")
    with caplog.at_level(logging.DEBUG, logger="logit_cache"), torch.no_grad():
        chosen = choose_head(plain, inputs, lengths, forward_of(plain))
        assert isinstance(chosen, ChunkedHead) and chosen.vocab == VOCAB and chosen.hidden_size == 32
        states = chosen.hidden(**inputs)
        np.testing.assert_array_equal(chosen(states[0, :5]).numpy(), plain(**inputs).logits[0, :5].numpy())  # padded to 16 rows
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

        torch.manual_seed(0)
        scaled = ScaledHead(build("gpt2").config).eval()
        assert split_head(scaled) is not None  # its structure looks plain: only the check finds it
        assert choose_head(scaled, inputs, lengths, forward_of(scaled)) is None
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "ScaledHead" in warned[0].getMessage() and "differ by up to" in warned[0].getMessage()

        # not a transformers model: the forward path, nothing said
        caplog.clear()
        other = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
        assert split_head(other) is None
        assert choose_head(other, inputs["input_ids"], lengths, lambda ids: other(ids)) is None
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_check_runs_on_at_most_a_chunk_of_the_first_sequence() -> None:
    """The first batch's check computes the forward on the first sequence's leading tokens only: [1, <=CHUNK, V]."""
    lengths = [40, 40, 30, 12]
    inputs = first_batch(lengths)
    model = build("gpt2")
    seen: list[tuple[int, ...]] = []

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(tuple(batch["input_ids"].shape))
        return model(**batch).logits

    with torch.no_grad():
        assert choose_head(model, inputs, lengths, forward) is not None
    assert seen == [(1, CHUNK)]


def test_reduced_precision_takes_the_chunked_path_with_the_forward_paths_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16: the head runs under the dump's autocast, as inside the forward, so the rows agree here too."""
    teacher = save(tmp_path, "gpt2")
    shapes, load = head_output_shapes()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    chunked = run_dump(tmp_path, teacher, "chunked", precision="bf16")
    assert [shape for shape in shapes if len(shape) == 2]
    with forward_path(monkeypatch):
        forward = run_dump(tmp_path, teacher, "forward", precision="bf16")
    assert_same_rows(chunked, forward)
