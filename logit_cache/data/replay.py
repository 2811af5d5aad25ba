"""Replayable augmentation: produce view ``v`` of sample ``i`` the same way at dump and at training.

A dataset's random transforms draw from the process-wide generators of torch (CPU), numpy
(``np.random``) and Python (``random``). Seeding all three from ``(seed, i, v)`` just before
``dataset[i]`` makes the item a function of ``(seed, i, v)``: the dump stores the teacher's targets
for exactly that input at row ``i * V + v``, and training replays the same input for that row. The
generators' states are saved before and restored after, so the caller's randomness is untouched.
A generator the dataset's items never draw from need not be seeded (an item is the same whatever the
state of a generator it does not read), and seeding one costs 1-5 us against items of a few dozen:
:func:`replay_items` learns which ones the items draw from, checking every batch (see there).

Limit: randomness from elsewhere cannot be replayed (a CUDA generator, ``os.urandom``, a generator
object the dataset owns, such as ``np.random.default_rng()`` made without a seed). The dump checks
a few items by producing them twice (:func:`check_replayable`) and refuses a dataset that differs.
An item that reads a global generator without advancing it (draws inside ``torch.random.fork_rng()``
without seeding there, ``get_state`` then ``set_state``, ``torch.initial_seed()``) is not seen to draw
from it, so :func:`replay_items` leaves that generator unseeded, in a fixed state: the item still
replays identically (dump and training both see that state, unless other items draw from that
generator, when which state it sees depends on what the process has learnt), but it is not the item of a cache dumped
before replay learnt its generators (2026-12), which seeded all three; the fingerprint check of
``cache.wrap`` (view 0 of every sample) reports such a cache as a dataset mismatch.

Which view a sample shows in an epoch (training): :func:`default_view` gives each sample its V
views in turn, from a per-sample starting point, so over V consecutive epochs every sample shows
every view once and, within one epoch, samples show different views. The epoch reaches the
datasets wrapped with a cache through the cache's sampler, which forwards ``set_epoch`` to those
:func:`remember_wrapper` recorded.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError
from ..format.identity import item_digest
from . import replay_globals
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
    states = replay_globals.snapshot()
    try:
        yield
    finally:
        replay_globals.restore(states)


#: Per dataset, the generators its items were seen to draw from (indices into ``replay_globals.NAMES``).
_DRAWS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def drawn_generators(dataset: Any) -> tuple[str, ...]:
    """The generators :func:`replay_items` has seen ``dataset``'s items draw from (in this process), by name."""
    return tuple(replay_globals.NAMES[k] for k in sorted(_seeded_for(dataset)))


def _seeded_for(dataset: Any) -> frozenset[int]:
    try:
        return _DRAWS.get(dataset, frozenset())
    except TypeError:  # not weakly referenceable or not hashable: nothing can be remembered, so seed all three
        return replay_globals.ALL


def _remember(dataset: Any, seeded: frozenset[int]) -> None:
    with contextlib.suppress(TypeError):
        _DRAWS[dataset] = seeded


def replay_items(dataset: Any, indices: Sequence[int], views: Sequence[int], seed: int) -> list[Any]:
    """``dataset[i]`` for each ``(i, v)``, each produced with the generators seeded from ``(seed, i, v)``.

    Only the generators the dataset's items draw from are seeded: a generator left unseeded is put in a
    fixed state for the batch and checked after it, and if any item drew from it the batch is produced
    again with it seeded too (and it stays seeded for this dataset, in this process). An item that draws
    nothing from a generator is the same whatever that generator's state, so the items are bit for bit
    those of seeding all three (:func:`item_seeds`), as dumps always did; a torchvision-style dataset
    (torch only) pays one seed an item instead of three. A new process learns again (its first batch
    that draws from a generator not yet seeded is produced twice). The batch's seeds come from one
    vectorised hash (:mod:`.seeds`); the caller's states are restored after the batch (:mod:`.replay_globals`).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    index_list, words = indices.tolist(), None
    seeded = _seeded_for(dataset)
    states = replay_globals.snapshot()
    try:
        while True:
            if seeded and words is None:
                words = batch_seed_words(seed, indices, views).tolist()
            canaries = replay_globals.arm(replay_globals.ALL - seeded)
            items = _produce(dataset, index_list, words, seeded)
            drawn = replay_globals.drew(canaries)
            if not drawn:
                return items
            seeded = seeded | drawn  # an item drew from a generator left unseeded: produce the batch again
            _remember(dataset, seeded)
    finally:
        replay_globals.restore(states)


def _produce(dataset: Any, indices: list[int], words: list[list[int]] | None, seeded: frozenset[int]) -> list[Any]:
    if not seeded:
        return [dataset[index] for index in indices]
    items = []
    if seeded == replay_globals.ALL:
        seed_torch, seed_numpy, seed_python = replay_globals.SEEDERS
        for index, (torch_seed, numpy_seed, python_seed) in zip(indices, words, strict=True):
            seed_torch(torch_seed)
            seed_numpy(numpy_seed)
            seed_python(python_seed)
            items.append(dataset[index])
        return items
    seeders = [(replay_globals.SEEDERS[k], k) for k in sorted(seeded)]
    for index, item_words in zip(indices, words, strict=True):
        for seed_one, k in seeders:
            seed_one(item_words[k])
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
