"""Dataset and model factories the tests name in specs (``--dataset``/``--arch``).

Referenced by file path (``<tests>/data_factories.py:name``) so they import the same way in
pytest, in CliRunner and in subprocesses (torchrun, kill -9 tests).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
SPEC = f"{HERE / 'data_factories.py'}"


def spec(name: str) -> str:
    """``/abs/path/tests/data_factories.py:name``: a spec that imports from any working directory."""
    return f"{SPEC}:{name}"


class RandomImages(Dataset):
    """``n`` random (1, 8, 8) images with labels in [0, classes), fixed by ``seed``."""

    def __init__(self, n: int = 300, seed: int = 0, classes: int = 10, scale: float = 1.0, delay: float = 0.0,
                 labels: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 8, 8, generator=generator) * scale
        self.labels = torch.randint(0, classes, (n,), generator=generator)
        self.delay = delay
        self.with_labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if self.delay:
            time.sleep(self.delay)
        if self.with_labels:
            return self.images[index], int(self.labels[index])
        return self.images[index]


def random_images(n: int = 300, seed: int = 0, classes: int = 10, scale: float = 1.0) -> RandomImages:
    return RandomImages(n, seed, classes, scale)


def unlabeled_images(n: int = 100, seed: int = 0) -> RandomImages:
    return RandomImages(n, seed, labels=False)


def slow_images(n: int = 400, seed: int = 0, delay: float = 0.01) -> RandomImages:
    """Items that take ``delay`` seconds each, so a test can kill a dump midway."""
    return RandomImages(n, seed, delay=delay)


class DictImages(Dataset):
    """Items ``({"pixels": x, "bias": b}, label)``: inputs passed as keyword arguments."""

    def __init__(self, n: int = 120, seed: int = 0) -> None:
        self.inner = RandomImages(n, seed)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        image, label = self.inner[index]
        return {"pixels": image, "bias": torch.tensor(float(index % 3))}, label


def dict_images(n: int = 120, seed: int = 0) -> DictImages:
    return DictImages(n, seed)


class KeywordNet(nn.Module):
    """A teacher that takes keyword inputs ``pixels`` and ``bias``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, pixels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.body(pixels) + bias[:, None]


class NaNAt(nn.Module):
    """Wraps an MLP and returns NaN logits for inputs whose first pixel exceeds ``threshold``."""

    def __init__(self, threshold: float = 0.98) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        bad = x.flatten(1)[:, 0] > self.threshold
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def broken_dataset(**kwargs):
    raise RuntimeError("the data files are missing")


class RaiseAt(NaNAt):
    """Like NaNAt, but the forward pass raises (a failure in the dump's main thread)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.flatten(1)[:, 0] > self.threshold).any():
            raise RuntimeError("teacher crashed on a bad input")
        return self.body(x)


class FailingItem(RandomImages):
    """Item ``fail_at`` raises: a data set that breaks midway through a dump."""

    def __init__(self, n: int = 100, fail_at: int = 70) -> None:
        super().__init__(n)
        self.fail_at = fail_at

    def __getitem__(self, index: int):
        if index == self.fail_at:
            raise OSError(f"cannot decode image {index}")
        return super().__getitem__(index)


class WithTable(nn.Module):
    """A non-persistent buffer computed in __init__ (not in state dicts): meta init must not lose it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.register_buffer("offsets", torch.arange(10, dtype=torch.float32) / 10, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) + self.offsets


def needs_real_tensors() -> nn.Module:
    """A factory that reads a tensor's value while building: impossible on the meta device."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    if float(model[1].weight.abs().sum().item()) < 0:
        raise AssertionError("unreachable")
    return model


def read_plain(out: Path, name: str) -> np.ndarray:
    """Concatenate an array over the shards with plain zarr / h5py, as a non-user of our code would."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        path = out / shard["path"]
        if manifest["backend"] == "zarr":
            parts.append(zarr.open_group(str(path), mode="r")[name][:])
        else:
            with h5py.File(path, "r") as handle:
                parts.append(handle[name][:])
    return np.concatenate(parts)


class ThreeRngImages(RandomImages):
    """RandomImages augmented with draws from all three global generators (torch, numpy, random)."""

    def __getitem__(self, index: int):
        import random

        image, label = super().__getitem__(index)
        image = image + torch.rand(image.shape)  # torch's CPU generator
        image = image * float(np.random.uniform(0.5, 1.5))  # numpy's global generator
        if random.random() < 0.5:  # Python's generator
            image = image.flip(2)
        return image, label


def three_rng_images(n: int = 120, seed: int = 0) -> ThreeRngImages:
    return ThreeRngImages(n, seed)


class PrivateRngImages(RandomImages):
    """Augmentation from a generator the dataset owns and never seeds: cannot be replayed."""

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image + torch.from_numpy(np.random.default_rng().random(image.shape).astype(np.float32)), label


def private_rng_images(n: int = 60, seed: int = 0) -> PrivateRngImages:
    return PrivateRngImages(n, seed)


def dump_digits(root: Path, teacher: Path, name: str, dataset: str = "digits", dataset_kwargs: dict | None = None,
                shard_rows: int = 512, **options) -> Path:
    """Dump the seeded test teacher (``digits_mlp(hidden=32)``) over ``dataset`` into ``root/name``."""
    import logit_cache

    out = root / name
    logit_cache.dump(logit_cache.DumpConfig(teacher=str(teacher), arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32},
                                            dataset=dataset, dataset_kwargs=dataset_kwargs or {}, out=str(out), shard_rows=shard_rows,
                                            quiet=True, **options))
    return out


# -- token sequences (language-model caches) ------------------------------------------------------------


class RaggedTokens(Dataset):
    """Sequences of 1..max_len random ids. ``style``: "ids" (a 1-D tensor), "pair" ((ids, labels) with
    some labels -100) or "dict" ({input_ids, attention_mask} padded with zeros to max_len)."""

    def __init__(self, n: int = 40, vocab: int = 50, max_len: int = 12, seed: int = 0, style: str = "ids") -> None:
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(1, max_len + 1, size=n)
        self.seqs = [torch.from_numpy(rng.integers(0, vocab, size=int(length))) for length in self.lengths]
        self.max_len, self.style = max_len, style

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, index: int):
        ids = self.seqs[index]
        if self.style == "pair":
            labels = ids.clone()
            labels[: len(ids) // 3] = -100
            return ids, labels
        if self.style == "dict":
            padded = torch.zeros(self.max_len, dtype=torch.int64)
            padded[: len(ids)] = ids
            mask = torch.zeros(self.max_len, dtype=torch.int64)
            mask[: len(ids)] = 1
            return {"input_ids": padded, "attention_mask": mask}
        return ids


def ragged_tokens(**kwargs) -> RaggedTokens:
    return RaggedTokens(**kwargs)


class CausalBag(nn.Module):
    """A tiny causal LM whose logits at t depend on ids[:t+1] only (a running mean of embeddings), so
    right padding cannot change a real token's logits; accepts ids positionally or as input_ids=."""

    def __init__(self, vocab: int = 50, dim: int = 8, scale: float = 3.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.scale = scale

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids).cumsum(dim=1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return self.head(hidden) * self.scale  # (B, T, V)


def causal_bag(vocab: int = 50, dim: int = 8, scale: float = 3.0) -> CausalBag:
    return CausalBag(vocab, dim, scale)


class FlakyBag(CausalBag):
    """:class:`CausalBag` that raises on its N-th forward call when ``FLAKY_BAG_CALLS=N`` is set: a dump
    that dies midway, for resume tests (the environment is not part of the cache key)."""

    calls = 0

    def forward(self, input_ids, attention_mask=None):
        FlakyBag.calls += 1
        limit = os.environ.get("FLAKY_BAG_CALLS")
        if limit is not None and FlakyBag.calls >= int(limit):
            raise RuntimeError(f"flaky teacher: call {FlakyBag.calls}")
        return super().forward(input_ids, attention_mask)


def flaky_bag(vocab: int = 50, dim: int = 8, scale: float = 3.0) -> FlakyBag:
    FlakyBag.calls = 0
    return FlakyBag(vocab, dim, scale)


class LargestFloat32(TorchFunctionMode):
    """Records the largest float32 storage any torch call returns in its scope (views count their whole storage).

    It sees the forward, inside an autograd.Function too; the autograd engine runs the backward without modes,
    so a backward is checked through what is saved for it (test_token_losses.SavedTensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // 4)
        return out
