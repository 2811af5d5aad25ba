"""Replayable augmentation: produce view ``v`` of sample ``i`` the same way at dump and at training.

A dataset's random transforms draw from the process-wide generators of torch (CPU), numpy
(``np.random``) and Python (``random``). Seeding all three from ``(seed, i, v)`` just before
``dataset[i]`` makes the item a function of ``(seed, i, v)``: the dump stores the teacher's targets
for exactly that input at row ``i * V + v``, and training replays the same input for that row. The
generators' states are saved before and restored after, so the caller's randomness is untouched.

Limit: randomness from elsewhere cannot be replayed (a CUDA generator, ``os.urandom``, a generator
object the dataset owns, such as ``np.random.default_rng()`` made without a seed). The dump checks
a few items by producing them twice (:func:`check_replayable`) and refuses a dataset that differs.

Which view a sample shows in an epoch (training): :func:`default_view` gives each sample its V
views in turn, from a per-sample starting point, so over V consecutive epochs every sample shows
every view once and, within one epoch, samples show different views. The epoch reaches the
datasets wrapped with a cache through the cache's sampler, which forwards ``set_epoch`` to those
:func:`remember_wrapper` recorded.
"""

from __future__ import annotations

import contextlib
import random
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError
from ..format.identity import item_digest
from .seeds import batch_seed_words

#: How many items the dump produces twice to check that they replay.
CHECK_ITEMS = 4

#: ``view_fn(epoch, indices, views) -> views``: which view each sample shows in an epoch.
ViewFn = Callable[[int, np.ndarray, int], np.ndarray]


def item_seeds(seed: int, index: int, view: int) -> tuple[int, int, int]:
    """Seeds for torch, numpy and Python's ``random`` from ``(seed, index, view)``: independent streams.

    ``SeedSequence([seed, index, view]).generate_state(3, uint32)``; :func:`replay_items` computes the
    same words for a whole batch at once (:mod:`.seeds`).
    """
    words = np.random.SeedSequence([seed, index, view]).generate_state(3, dtype=np.uint32)
    return int(words[0]), int(words[1]), int(words[2])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU), numpy and Python generators to their states on entry."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _seed_generators(torch_seed: int, numpy_seed: int, python_seed: int) -> None:
    torch.default_generator.manual_seed(torch_seed)  # the CPU generator only: torch.manual_seed costs ~100 us (all devices)
    np.random.seed(numpy_seed)
    random.seed(python_seed)


def replay_items(dataset: Any, indices: Sequence[int], views: Sequence[int], seed: int) -> list[Any]:
    """``dataset[i]`` for each ``(i, v)``, each produced with the generators seeded from ``(seed, i, v)``.

    The batch's seeds come from one vectorised hash (:func:`~.seeds.batch_seed_words`, equal to
    :func:`item_seeds` word for word): what is left per item is seeding the three generators (~10 us).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    words = batch_seed_words(seed, indices, views).tolist()
    items = []
    with preserved_rng():
        for index, (torch_seed, numpy_seed, python_seed) in zip(indices.tolist(), words, strict=True):
            _seed_generators(torch_seed, numpy_seed, python_seed)
            items.append(dataset[index])
    return items


class ReplayViews(torch.utils.data.Dataset):
    """``V`` views of every sample, as rows: item ``r`` is view ``r % V`` of sample ``r // V``.

    What the dump iterates when it caches several views (or one seeded view) per sample.
    """

    def __init__(self, dataset: Any, views: int, seed: int) -> None:
        self.dataset, self.views, self.seed = dataset, int(views), int(seed)

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, row: int) -> Any:
        index, view = divmod(int(row), self.views)
        return replay_items(self.dataset, [index], [view], self.seed)[0]

    def __getitems__(self, rows: Sequence[int]) -> list[Any]:
        rows = np.asarray(rows, dtype=np.int64)
        return replay_items(self.dataset, rows // self.views, rows % self.views, self.seed)


class FirstViews(torch.utils.data.Dataset):
    """Sample ``i`` as view 0 replays it: what a replay cache's dataset fingerprint is computed over."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return replay_items(self.dataset, [index], [0], self.seed)[0]


def check_replayable(dataset: Any, views: int, seed: int, spec: str) -> None:
    """Produce a few (sample, view) items twice; refuse the dataset if any differs, naming it."""
    length = len(dataset)
    picks = sorted({0, length - 1, length // 2, length // 3})[:CHECK_ITEMS]
    for index in picks:
        for view in sorted({0, views - 1}):
            first, again = (item_digest(replay_items(dataset, [index], [view], seed)[0], f"dataset item {index}") for _ in range(2))
            if first != again:
                raise DatasetError(
                    f"--dataset {spec!r}: item {index} (view {view}) differs when produced twice with the same seeds, so "
                    f"its views cannot be replayed in training. Its randomness must come from torch's, numpy's "
                    f"(np.random) or Python's (random) global generators, not a CUDA generator, os.urandom or a "
                    f"generator object of its own"
                )


def default_view(epoch: int, indices: np.ndarray, views: int) -> np.ndarray:
    """View of each sample in ``epoch``: ``(epoch + h(i)) mod V`` with ``h`` a fixed integer hash.

    Over V consecutive epochs every sample shows each of its V views once; in one epoch the samples
    start from different views. Deterministic: the same (epoch, i) always gives the same view.
    """
    indices = np.asarray(indices, dtype=np.uint64)
    mixed = (indices * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)  # Fibonacci hashing: spreads consecutive ids
    return ((mixed + np.uint64(epoch)) % np.uint64(views)).astype(np.int64)


#: The datasets wrapped with each cache, weakly on both sides, so the cache's sampler can forward
#: ``set_epoch`` to them. Per process: a spawned worker's copy of a cache has none (it needs none).
_WRAPPED: weakref.WeakKeyDictionary[Any, list[weakref.ref]] = weakref.WeakKeyDictionary()


def remember_wrapper(cache: Any, wrapper: Any) -> None:
    """Remember that ``wrapper`` (a dataset) wraps ``cache``, for :func:`wrappers_of`."""
    _WRAPPED[cache] = [ref for ref in _WRAPPED.get(cache, []) if ref() is not None] + [weakref.ref(wrapper)]


def wrappers_of(cache: Any) -> list[Any]:
    """The datasets still alive that wrap ``cache`` (what its sampler forwards ``set_epoch`` to)."""
    return [w for w in (ref() for ref in _WRAPPED.get(cache, [])) if w is not None]


def warn_epochless_views(views: int, caches: Sequence[Any]) -> None:
    """Warn that a views cache is read with plain indices before any ``set_epoch``: every epoch would get
    the views of epoch 0 (with the default view_fn, each sample one fixed view), silently. Said once per wrapper."""
    warnings.warn(
        f"a cache of {views} views per sample ({', '.join(str(getattr(c, 'path', c)) for c in caches)}) is read with plain "
        f"integer indices and set_epoch was never called, so every epoch gets the views of epoch 0 instead of rotating "
        f"through them. Use the cache's sampler (DataLoader(ds, sampler=cache.sampler(shuffle=True), ...), which passes the "
        f"epoch with each index) or call ds.set_epoch(epoch) before each epoch.",
        UserWarning, stacklevel=4)
