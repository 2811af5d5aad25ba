"""Dataset and student factories for ``logit-cache train`` under torchrun (tests/test_train_ddp.py).

Named by file path (``<tests>/ddp_factories.py:name``), so they import the same way in pytest and in
torchrun's worker processes. What a rank did is recorded only when the test asks, through environment
variables (the environment is not part of a cache's key or a dataset's fingerprint, so the dump, the
single-process reference and the ranks all see the same specs):

* ``LC_TEST_SERVED=DIR``: the datasets append the indices each batch read asks for to
  ``DIR/served.rank{RANK}.txt`` (one line per batch), from ``__getitems__``, which only the training
  DataLoader calls (the fingerprint and the width check read single items through ``__getitem__``).
* ``LC_TEST_WEIGHTS=DIR``: the students save their final ``state_dict`` to ``DIR/rank{RANK}.pt`` when the
  process exits (the trainer wraps the very module the factory built, so these are the trained weights).
* ``LC_TEST_FAIL_AT=I``: on rank 1, a batch read that asks for sample ``I`` raises.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import torch
from torch import nn

from logit_cache.models import digits_mlp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # loaded by file path in torchrun's workers: data_factories sits beside this file
from data_factories import CausalBag, RaggedTokens, RandomImages  # noqa: E402


def spec(name: str) -> str:
    """``/abs/path/tests/ddp_factories.py:name``."""
    return f"{HERE / 'ddp_factories.py'}:{name}"


def _served(indices: list[int]) -> None:
    folder = os.environ.get("LC_TEST_SERVED")
    if folder:
        with open(Path(folder) / f"served.rank{os.environ.get('RANK', '0')}.txt", "a") as handle:
            handle.write(" ".join(str(int(i)) for i in indices) + "\n")
    fail_at = os.environ.get("LC_TEST_FAIL_AT")
    if fail_at is not None and os.environ.get("RANK") == "1" and int(fail_at) in [int(i) for i in indices]:
        raise RuntimeError(f"injected failure reading sample {fail_at} on rank 1")


class CountedImages(RandomImages):
    """:class:`RandomImages` whose batch reads are recorded (module docstring)."""

    def __getitems__(self, indices: list[int]) -> list:
        _served(indices)
        return [self[i] for i in indices]


class CountedTokens(RaggedTokens):
    """:class:`RaggedTokens` (1-D id sequences) whose batch reads are recorded (module docstring)."""

    def __getitems__(self, indices: list[int]) -> list:
        _served(indices)
        return [self[i] for i in indices]


def counted_images(n: int = 200, seed: int = 0) -> CountedImages:
    return CountedImages(n, seed)


def counted_tokens(n: int = 120, vocab: int = 50, max_len: int = 12, seed: int = 0) -> CountedTokens:
    return CountedTokens(n=n, vocab=vocab, max_len=max_len, seed=seed)


def _saved_at_exit(model: nn.Module) -> nn.Module:
    folder = os.environ.get("LC_TEST_WEIGHTS")
    if folder:
        path = Path(folder) / f"rank{os.environ.get('RANK', '0')}.pt"
        atexit.register(lambda: torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path))
    return model


def recorded_mlp(hidden: int = 16, depth: int = 1) -> nn.Module:
    """``digits_mlp`` (a classifier of (1, 8, 8) images), its final weights saved at exit when asked."""
    return _saved_at_exit(digits_mlp(hidden=hidden, depth=depth))


def recorded_bag(vocab: int = 50, dim: int = 8) -> CausalBag:
    """``CausalBag`` (a tiny causal LM), its final weights saved at exit when asked."""
    return _saved_at_exit(CausalBag(vocab, dim))
