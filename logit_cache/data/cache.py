"""The cache as training code sees it: :func:`open_cache` and :class:`LogitCache`.

A :class:`LogitCache` is the io layer's :class:`~logit_cache.io.rows.TargetReader` (rows by index,
chunk-aware, checked) plus the DataLoader side, which :mod:`.loader` owns: :meth:`~LogitCache.wrap`,
:meth:`~LogitCache.sampler` and :meth:`~LogitCache.collate` only hand over to it. It lives here, above
the reader, so that io/ knows nothing of datasets and data/ imports io/, never the other way round.

The old module ``logit_cache.reader`` is this one (see ``logit_cache._legacy``), so the reader's
names are re-exported here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.reader import CacheReader, open_reader, shard_location
from ..io.rows import CHUNK_CACHE_BYTES, IN_MEMORY_BYTES, TargetReader
from .loader import CachedDataset, ChunkShuffleSampler, collate
from .replay import remember_wrapper, wrappers_of

__all__ = ["CHUNK_CACHE_BYTES", "IN_MEMORY_BYTES", "CacheReader", "LogitCache", "TargetReader", "open_cache", "open_reader",
           "shard_location"]


class LogitCache(TargetReader):
    """A complete cache, read-only, serving teacher targets by row for training.

    >>> cache = open_cache("caches/digits-top10")
    >>> cache.targets([3, 1, 2])          # a Targets batch of rows 3, 1, 2
    >>> ds = cache.wrap(train_dataset)    # items (input, label, target), see loader.py
    """

    def wrap(self, dataset: Any, verify: str = "fingerprint") -> CachedDataset:
        """The dataset with this cache's target appended to each item; see :class:`CachedDataset`."""
        return CachedDataset(dataset, [self], verify=verify)

    def sampler(self, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> ChunkShuffleSampler:
        """A seeded, epoch-aware, chunk-aware sampler over this cache's samples; see :class:`ChunkShuffleSampler`."""
        return ChunkShuffleSampler.for_caches([self], shuffle=shuffle, seed=seed, **kwargs)

    @staticmethod
    def collate(batch: Any) -> Any:
        """``collate_fn`` for a DataLoader over :meth:`wrap`: (inputs, labels, Targets)."""
        return collate(batch)

    def register(self, wrapper: Any) -> None:
        """Remember a dataset wrapped with this cache, so the cache's sampler can forward ``set_epoch``."""
        remember_wrapper(self, wrapper)

    def wrappers(self) -> list[Any]:
        """The datasets wrapped with this cache that are still alive (in this process)."""
        return wrappers_of(self)


def open_cache(
    path: str | Path, in_memory: bool | None = None, chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
    storage_options: dict[str, Any] | None = None, allow_nonfinite: bool = False,
) -> LogitCache:
    """Open a complete cache for training (read-only; an incomplete cache is refused).

    ``path``: a local directory, or an fsspec URL such as ``s3://bucket/caches/digits-top10``
    (needs fsspec and the protocol's package; ``storage_options`` go to fsspec).
    ``in_memory``: None (default) holds the targets in memory when they decode to at most 512 MiB,
    else reads chunks through an LRU of ``chunk_cache_bytes`` per process; True/False force it.
    ``allow_nonfinite``: serve NaN or infinite stored values instead of raising :class:`CorruptShardError`
    (a dump never stores them, so they mean a damaged cache).
    """
    return LogitCache(path, in_memory=in_memory, chunk_cache_bytes=chunk_cache_bytes, storage_options=storage_options,
                      allow_nonfinite=allow_nonfinite)
