"""Stream cached targets next to a dataset's items: the wrapper, the sampler, the collate function.

    cache = open_cache("caches/digits-top10")
    ds = cache.wrap(train_dataset)                          # items: (input, label, target)
    loader = DataLoader(ds, batch_size=256, sampler=cache.sampler(shuffle=True, seed=0),
                        collate_fn=cache.collate, num_workers=4)
    for inputs, labels, target in loader: ...                # target: a Targets batch

Alignment is by index: item ``i`` of the dataset gets the cache's row for sample ``i``. The wrapper
checks the pairing before anything runs (length, and the dataset fingerprint recorded at dump
time), so a cache is never silently paired with other data.

Speed comes from three things (DESIGN.md section 6): the DataLoader hands the wrapper a whole
batch of indices (``__getitems__``), so targets are read once per batch, a chunk at a time, not
once per item; the sampler shuffles blocks of consecutive samples (a chunk each) and then rows
within a window of blocks that the reader's chunk cache holds, so each chunk is decoded about once
per epoch; and targets stay in their storage dtypes (float16, uint16) until they reach the
consumer's device.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler, default_collate

from ..errors import DatasetMismatchError, UsageError
from ..format.identity import canonical_json
from ..io.rows import TargetReader
from ..targets.batch import Targets
from .datasets import recorded_fingerprint
from .distributed import sampler_ranks
from .replay import ViewFn, default_view, remember_wrapper, replay_items, warn_epochless_views, wrappers_of
from .tokens import collate_token_targets, concat_sequences, slice_sequence

VERIFY_CHOICES = ("fingerprint", "length")

class _TargetRow(Mapping):
    """One item's target: a view of row ``j`` of a batch read (no copy until collated)."""

    __slots__ = ("arrays", "j", "mode", "num_classes")

    def __init__(self, arrays: dict[str, np.ndarray], j: int, mode: str, num_classes: int) -> None:
        self.arrays, self.j, self.mode, self.num_classes = arrays, j, mode, num_classes

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name][self.j]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


class _Fetched:
    """One batch from :meth:`CachedDataset.__getitems__`: the dataset's items and the targets, stacked.

    :func:`collate` takes both parts as they are, with no per-item work. Anything else (torch's
    ``default_collate``, a user's collate) sees a sequence of ``(input, label, target)`` items,
    built on first access.
    """

    __slots__ = ("_items", "arrays", "caches", "items", "targets")

    def __init__(self, items: list, arrays: list[dict[str, np.ndarray]], caches: list[TargetReader]) -> None:
        self.items, self.arrays, self.caches = items, arrays, caches
        self.targets = [Targets.from_arrays(c.mode, c.num_classes, a) for c, a in zip(caches, arrays, strict=True)]
        self._items: list[tuple] | None = None

    def _attached(self) -> list[tuple]:
        if self._items is None:
            attached = []
            for j, item in enumerate(self.items):
                rows = [_TargetRow(a, j, c.mode, c.num_classes) for c, a in zip(self.caches, self.arrays, strict=True)]
                attached.append(_attach(item, rows[0] if len(rows) == 1 else rows))
            self._items = attached
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        return self._attached()[index]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._attached())


class _FetchedTokens(_Fetched):
    """A per-token batch: the sequences and, per cache, a flat Targets of their tokens with ``lengths``."""

    def __init__(self, items: list, targets: list[Targets], caches: list[TargetReader]) -> None:
        self.items, self.arrays, self.caches, self.targets = items, [], caches, targets
        self._items = None

    def _attached(self) -> list[tuple]:
        if self._items is None:
            self._items = []
            for j, item in enumerate(self.items):
                rows = [slice_sequence(t, j) for t in self.targets]
                self._items.append(_attach(item, rows[0] if len(rows) == 1 else rows))
        return self._items


def _attach(item: Any, target: Any) -> tuple:
    """``(input, label)`` -> ``(input, label, target)``; a lone input -> ``(input, target)``."""
    return (*item, target) if isinstance(item, (tuple, list)) else (item, target)


class CachedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items carry the cached targets of one or more caches.

    With one cache the target is that cache's row; with several (teachers), a list of rows in the
    order the caches were given. ``verify="fingerprint"`` (default) recomputes the dataset
    fingerprint the dump recorded (spec, kwargs, length and 16 sampled items) and refuses a
    mismatch; ``verify="length"`` checks only the length, for data that is deliberately not the
    same bytes as at dump time (random augmentation applied on top of the dumped inputs).

    Replayed views (caches dumped with ``--views V`` or ``--seed S``): item ``i`` is produced as
    view ``v`` exactly as the dump produced it (the generators seeded from ``(S, i, v)``, see
    ``replay.py``) and paired with row ``i * V + v``. ``view_fn(epoch, indices, V)`` picks the
    views (default :func:`~logit_cache.replay.default_view`); the epoch is the one the cache's
    sampler passes with each index, or the one set by :meth:`set_epoch` for plain integer indices
    (read with plain indices before any ``set_epoch``, a views cache warns once: epochs would not rotate views).
    """

    def __init__(self, dataset: Any, caches: Sequence[TargetReader], verify: str = "fingerprint",
                 view_fn: ViewFn | None = None) -> None:
        if verify not in VERIFY_CHOICES:
            raise UsageError(f"verify={verify!r}: expected one of {', '.join(VERIFY_CHOICES)}")
        if not caches:
            raise UsageError("CachedDataset needs at least one cache")
        self.dataset = dataset
        self.caches = list(caches)
        replays = {(c.manifest.views, c.manifest.seed) for c in self.caches}
        if len(replays) > 1:
            raise DatasetMismatchError(
                "the caches were dumped with different --views/--seed ("
                + ", ".join(f"{c.path}: views {c.manifest.views}, seed {c.manifest.seed}" for c in self.caches)
                + "): one input per item cannot match them all; use caches dumped with the same views and seed"
            )
        ((self.views, self.seed),) = replays
        self.per_token = self.caches[0].per_token
        if any(c.per_token != self.per_token for c in self.caches):
            raise DatasetMismatchError("per-token and per-sample caches cannot be combined: their rows do not correspond")
        if self.per_token:
            self.seed = None  # a per-token cache's seed is its sampling seed, not a replay of the inputs
        self.view_fn: ViewFn = view_fn or default_view
        self.epoch = 0
        self._epoch_known = False  # set_epoch called, or the epochless warning given (replay.warn_epochless_views)
        length = len(dataset)
        fingerprints: dict[str, str] = {}  # by the recorded spec and kwargs: several caches of one dataset hash it once
        for cache in self.caches:
            recorded = cache.manifest.dataset
            if length != cache.num_samples:
                raise DatasetMismatchError(
                    f"{cache.path}: the dataset has {length} items but the cache holds {cache.num_samples} samples "
                    f"(dumped from --dataset {recorded.get('spec')!r} with kwargs {recorded.get('kwargs', {})}); "
                    f"pair the cache with the dataset it was dumped from"
                )
            if verify == "fingerprint":
                spec, kwargs = recorded.get("spec"), recorded.get("kwargs") or {}
                # the identity too: an old cache (spelled spec) and a new one (normalised) hash by different rules
                token = canonical_json([spec, kwargs, recorded.get("identity")])
                if token not in fingerprints:
                    fingerprints[token] = recorded_fingerprint(dataset, cache.manifest)
                if fingerprints[token] != recorded.get("fingerprint"):
                    raise DatasetMismatchError(
                        f"{cache.path}: the dataset's content differs from what the cache was dumped from "
                        f"(--dataset {spec!r} with kwargs {kwargs}; fingerprints {fingerprints[token][:12]} here, "
                        f"{str(recorded.get('fingerprint'))[:12]} in the manifest): a different split, order or "
                        f"transform. Use the same dataset; if the difference is random augmentation you apply on "
                        f"purpose, pass verify='length' (CLI: --verify length)"
                    )
            cache.load()  # in-memory caches: read now, so forked workers share one copy
            remember_wrapper(cache, self)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views plain integer indices get (the cache's sampler forwards its own)."""
        self.epoch = int(epoch)
        self._epoch_known = True

    def _views_of(self, indices: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices and their views; an index is an int or an ``(index, epoch)`` pair from the sampler."""
        if len(indices) and isinstance(indices[0], (tuple, list)):
            samples = np.fromiter((int(i) for i, _ in indices), dtype=np.int64, count=len(indices))
            epochs = np.fromiter((int(e) for _, e in indices), dtype=np.int64, count=len(indices))
        else:
            samples = np.asarray(indices, dtype=np.int64).reshape(-1)
            epochs = np.full(len(samples), self.epoch, dtype=np.int64)
            if self.views > 1 and not self._epoch_known:
                self._epoch_known = True
                warn_epochless_views(self.views, self.caches)
        if self.views == 1:
            return samples, np.zeros(len(samples), dtype=np.int64)
        views = np.empty(len(samples), dtype=np.int64)
        for epoch in np.unique(epochs):  # one epoch per batch, except at an epoch's edge
            chosen = epochs == epoch
            views[chosen] = np.asarray(self.view_fn(int(epoch), samples[chosen], self.views), dtype=np.int64)
        if len(views) and (views.min() < 0 or views.max() >= self.views):
            raise UsageError(f"view_fn returned views outside [0, {self.views})")
        return samples, views

    def _items(self, samples: np.ndarray, views: np.ndarray) -> list[Any]:
        if self.seed is not None:
            return replay_items(self.dataset, samples, views, self.seed)
        indices = samples.tolist()  # plain ints, converted once
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if callable(getitems) else [self.dataset[i] for i in indices]

    def __getitem__(self, index: Any) -> tuple:
        """One item (slow path: prefer a DataLoader with a batch size, which calls :meth:`__getitems__`)."""
        samples, views = self._views_of([index])
        if self.per_token:
            targets = [c.sample_targets(samples) for c in self.caches]
            return _attach(self._items(samples, views)[0], targets[0] if len(targets) == 1 else targets)
        rows = samples * self.views + views
        targets = [_TargetRow(cache.rows(rows), 0, cache.mode, cache.num_classes) for cache in self.caches]
        return _attach(self._items(samples, views)[0], targets[0] if len(targets) == 1 else targets)

    def __getitems__(self, indices: Sequence[Any]) -> _Fetched:
        """A batch of items, reading each cache's rows once, chunk by chunk."""
        samples, views = self._views_of(list(indices))
        if self.per_token:
            return _FetchedTokens(self._items(samples, views), [c.sample_targets(samples) for c in self.caches], self.caches)
        rows = samples * self.views + views  # DESIGN.md: the row of sample i, view v
        return _Fetched(self._items(samples, views), [cache.rows(rows) for cache in self.caches], self.caches)


def _stack_rows(rows: Sequence[_TargetRow]) -> Targets:
    first = rows[0]
    arrays = {name: np.stack([row[name] for row in rows]) for name in first}
    return Targets.from_arrays(first.mode, first.num_classes, arrays)


def collate(batch: Sequence[tuple]) -> tuple:
    """Collate ``(input, label, target)`` items to ``(inputs, labels, Targets)``.

    Inputs and labels go through torch's ``default_collate``; targets come stacked from the batch
    read (or are stacked here for items fetched one at a time). Several caches give a list of
    Targets; items without labels give ``(inputs, Targets)``.
    """
    if not len(batch):
        raise UsageError("cannot collate an empty batch")
    if isinstance(batch, _FetchedTokens) or (not isinstance(batch, _Fetched) and _is_token_target(batch[0][-1])):
        return _collate_tokens(batch)
    if isinstance(batch, _Fetched):  # the batched path: no per-item work
        head = default_collate(batch.items)
        targets = batch.targets
        single = len(targets) == 1
        paired = isinstance(batch.items[0], (tuple, list))
    else:
        head = default_collate([tuple(item[:-1]) for item in batch])
        last = [item[-1] for item in batch]
        single = isinstance(last[0], _TargetRow)
        targets = [_stack_rows(last)] if single else [_stack_rows([item[p] for item in last]) for p in range(len(last[0]))]
        paired = True
    target = targets[0] if single else targets
    return (*head, target) if paired else (head, target)


def _is_token_target(target: Any) -> bool:
    """A per-token item's target: a Targets (or a list of them, several caches), not a per-sample row."""
    return isinstance(target, Targets) or (isinstance(target, list) and bool(target) and isinstance(target[0], Targets))


def _collate_tokens(batch: Any) -> tuple:
    """Per-token batches: ``(inputs, labels, Targets)``; see :func:`~logit_cache.data.tokens.collate_token_targets`."""
    if isinstance(batch, _FetchedTokens):
        items, targets = batch.items, batch.targets
    else:
        items = [item[0] if len(item) == 2 else tuple(item[:-1]) for item in batch]
        last = [item[-1] for item in batch]
        many = isinstance(last[0], list)
        targets = [concat_sequences([t[p] for t in last]) for p in range(len(last[0]))] if many else [concat_sequences(last)]
    inputs, labels, targets = collate_token_targets(items, targets)
    return inputs, labels, targets[0] if len(targets) == 1 else targets


class ChunkShuffleSampler(Sampler[int]):
    """Seeded, epoch-aware, chunk-aware shuffling, partitioned across distributed ranks.

    Each epoch: the samples are cut into blocks of ``block_size`` consecutive indices (one cache
    chunk each), the blocks are permuted, and the samples of each run of ``window`` samples (whole
    blocks) are shuffled together. When the window covers everything (``window=None`` with no
    block structure, or an in-memory cache) this is one plain permutation. The order depends only
    on ``(seed, epoch)``: call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``.

    Ranks: the epoch's order is padded (repeating its start) to a multiple of ``num_replicas``, or
    cut with ``drop_last``, and rank ``r`` takes the ``r``-th contiguous share, so every rank gets
    the same number of samples and, without padding, the shares are disjoint and cover the data.
    Contiguous shares keep each rank's reads within its own chunks.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        block_size: int = 1,
        window: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        with_epoch: bool = False,
        forward_to: Sequence[Any] = (),
    ) -> None:
        if num_samples < 1:
            raise UsageError(f"num_samples must be positive, got {num_samples}")
        if block_size < 1:
            raise UsageError(f"block_size must be positive, got {block_size}")
        self.num_samples, self.shuffle, self.seed = int(num_samples), bool(shuffle), int(seed)
        self.block_size = int(block_size)
        self.window = None if window is None else max(self.block_size, int(window))
        self.num_replicas, self.rank = sampler_ranks(num_replicas, rank)
        self.drop_last = bool(drop_last)
        #: Yield ``(index, epoch)`` pairs: how a replay cache's wrapper learns the epoch in worker processes
        #: (a ``set_epoch`` on the main process's wrapper does not reach persistent workers' copies).
        self.with_epoch = bool(with_epoch)
        self._forward = [weakref.ref(target) for target in forward_to]
        self.epoch = 0
        if self.drop_last:
            self.per_rank = self.num_samples // self.num_replicas
            if self.per_rank == 0:
                raise UsageError(f"{self.num_samples} samples cannot give each of {self.num_replicas} ranks one with drop_last")
        else:
            self.per_rank = math.ceil(self.num_samples / self.num_replicas)

    @classmethod
    def for_caches(cls, caches: Sequence[TargetReader], shuffle: bool = True, seed: int = 0, **kwargs: Any) -> ChunkShuffleSampler:
        """Blocks of one chunk and a window of half the chunk cache's slots; a plain permutation when
        the caches are in memory or their chunk caches hold every chunk."""
        cache = caches[0]
        block = cache.samples_per_chunk
        kwargs.setdefault("with_epoch", any(c.manifest.views > 1 for c in caches))
        kwargs.setdefault("forward_to", [w for c in caches for w in wrappers_of(c)])
        if all(c.in_memory or c.slots >= c.num_chunks for c in caches):  # every chunk fits at once: any order is cheap
            kwargs.setdefault("window", None)
            kwargs.setdefault("block_size", 1)
        else:
            # Half the slots: a batch straddling two windows touches chunks of both, and all of them
            # must fit at once, or that batch is read in pieces and chunks are decoded again.
            kwargs.setdefault("window", max(1, min(c.slots for c in caches) // 2) * block)
            kwargs.setdefault("block_size", block)
        return cls(cache.num_samples, shuffle=shuffle, seed=seed, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order (and views) to give; forwarded to the wrapped datasets it was made for."""
        self.epoch = int(epoch)
        for ref in self._forward:
            target = ref()
            if target is not None:
                target.set_epoch(self.epoch)

    def order(self) -> np.ndarray:
        """This epoch's order of all samples (before the split across ranks)."""
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        if (self.window is None and self.block_size == 1) or (self.window is not None and self.window >= n):
            return rng.permutation(n).astype(np.int64)
        block_starts = np.arange(0, n, self.block_size, dtype=np.int64)
        blocks = [np.arange(s, min(n, s + self.block_size), dtype=np.int64) for s in rng.permutation(block_starts)]
        if self.window is None:
            return np.concatenate(blocks)
        per_window = max(1, self.window // self.block_size)
        out = []
        for first in range(0, len(blocks), per_window):
            pooled = np.concatenate(blocks[first : first + per_window])
            out.append(pooled[rng.permutation(len(pooled))])
        return np.concatenate(out)

    def indices(self) -> np.ndarray:
        """This rank's share of this epoch's order."""
        order = self.order()
        total = self.per_rank * self.num_replicas
        if total > len(order):
            order = np.resize(order, total)  # repeats the start, like DistributedSampler's padding
        start = self.rank * self.per_rank
        return order[start : start + self.per_rank]

    def __iter__(self) -> Iterator[Any]:
        indices = self.indices().tolist()
        return iter([(i, self.epoch) for i in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return self.per_rank
