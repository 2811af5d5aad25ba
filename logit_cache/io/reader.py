"""Read-only access to a cache: the manifest, its shards, whole arrays, checksums.

Opening a cache writes nothing. An incomplete cache is refused unless ``allow_incomplete=True``
(what resumption and ``info`` use). Serving rows for training is :mod:`.rows`' job
(:class:`~logit_cache.io.rows.TargetReader`, a :class:`CacheReader`), through the decoded-chunk
LRU of :mod:`.chunk_cache`; the DataLoader side (wrap, sampler, collate) is :mod:`logit_cache.data`'s.

Processes: shard handles are opened lazily and dropped when the process id changes (a forked
DataLoader worker) or the object is pickled (spawned workers), so each process opens its own.

Damage is detected as it is read (DESIGN.md section 4), each failure a :class:`CorruptShardError`
naming the cache, the shard and the array or chunk, and suggesting ``logit-cache verify``:

* a chunk whose bytes changed fails its checksum as it is decoded (crc32c in Zarr, fletcher32 in
  HDF5, see :mod:`logit_cache.store.base`); a chunk missing from storage is refused, never read as
  zeros. Shards written before chunk checksums existed read unchecked (said once, at debug level).
* a shard is checked against its manifest entry when opened: the cache key, shard index, first row
  and first sample it recorded at creation must be the entry's, so swapped shards or a shard of
  another cache are named (and :func:`shard_location` refuses a shard outside the cache directory).

Read-only: shards are opened with mode ``"r"`` (Zarr and HDF5) and nothing is created, renamed or
touched, so a cache can be read from a read-only mount, by a user with read permission only, and by
many processes at once.

Remote caches: a ``str`` location with a protocol (``s3://bucket/cache``, ``gs://...``,
``memory://...``, ``file:///abs/path``) is read through fsspec, imported only then, with
``storage_options`` passed to it (credentials, endpoints). ``self.path`` is then a
:class:`~logit_cache.store.base.URLPath`, so messages show the URL. Zarr and HDF5 caches both
work over URLs; fsspec and the protocol's package (s3fs, gcsfs...) must be installed. The
``memory://`` filesystem belongs to one process, so DataLoader workers cannot see it; other
protocols work in workers (each process opens its own store).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptShardError, IncompleteCacheError
from ..format.completeness import unfinished_work
from ..format.manifest import Manifest, path_exists, read_manifest
from ..store import ShardReader, get_backend
from ..store.base import URLPath, as_location

log = logging.getLogger(__name__)


class CacheReader:
    """A cache on disk or at an fsspec URL: its manifest and lazily opened shard readers (read-only)."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False, storage_options: dict[str, Any] | None = None) -> None:
        self.path: Path | URLPath = as_location(path, storage_options)
        self.storage_options: dict[str, Any] | None = dict(storage_options) if isinstance(self.path, URLPath) and storage_options else None
        work = unfinished_work(self.path, exists=lambda location: path_exists(location, self.storage_options))
        if work is not None:
            raise IncompleteCacheError(
                f"{self.path}: the dump has not finished; its unfinished data is in {work} "
                f"(rerun the dump with --resume to complete it)"
            )
        self.manifest: Manifest = read_manifest(self.path, self.storage_options)
        if not self.manifest.complete and not allow_incomplete:
            raise IncompleteCacheError(
                f"{self.path}: manifest says complete=false: the dump that writes it has not finished "
                f"(rerun it with --resume to complete it)"
            )
        self.backend = get_backend(self.manifest.backend)
        self._shards: dict[int, ShardReader] = {}
        self._pid = os.getpid()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def shard(self, position: int) -> ShardReader:
        """The reader of the manifest's ``position``-th shard (opened on first use, once per process)."""
        if self._pid != os.getpid():
            # A forked child: the parent's handles are not ours to use (HDF5) or close.
            self._shards = {}
            self._pid = os.getpid()
        if position not in self._shards:
            shard = self.backend.open(shard_location(self.path, self.manifest.shards[position].path), self.storage_options)
            try:
                self._check_identity(position, shard)
            except BaseException:
                shard.close()
                raise
            self._shards[position] = shard
        return self._shards[position]

    def _check_identity(self, position: int, shard: ShardReader) -> None:
        """Refuse a shard that is not the one the manifest lists at ``position``: swapped with another,
        renamed, or copied from another cache. Shards record their cache's key, their index, first row
        and first sample as attributes when created; an attribute a shard lacks is not checked."""
        entry = self.manifest.shards[position]
        attrs = shard.attrs()
        expected = {"key": self.manifest.key, "shard_index": position, "row_start": entry.row_start, "sample_start": entry.sample_start}
        wrong = [f"its {name} is {attrs[name]!r}, the manifest's entry says {want!r}"
                 for name, want in expected.items() if name in attrs and attrs[name] != want]
        if wrong:
            raise CorruptShardError(
                f"{self.path}: shard {entry.path} (entry {position} of the manifest) is not the shard the manifest lists there: "
                f"{'; '.join(wrong)}. Shards were swapped, renamed or copied from another cache; run `logit-cache verify "
                f"{self.path}`, and dump the cache again if it cannot be put right"
            )
        names = shard.names()
        if names and not shard.checksummed(names[0]):
            log.debug("%s: shard %s was written without chunk checksums (an older logit-cache): its bytes are not checked as "
                      "they are read; `logit-cache verify` still compares its checksum with the manifest's", self.path, entry.path)

    def read(self, name: str) -> np.ndarray:
        """One logical array across all shards, concatenated (for tests, tools and small caches)."""
        parts = [self.shard(i).read(name) for i in range(len(self.manifest.shards))]
        return np.concatenate(parts) if parts else np.empty((0,))

    def verify_checksums(self) -> list[str]:
        """Re-read every shard and compare with its manifest checksum; return the failures."""
        failures = []
        for position, entry in enumerate(self.manifest.shards):
            try:
                actual = self.shard(position).checksum()
            except CorruptShardError as exc:
                failures.append(str(exc))
                continue
            if actual != entry.checksum:
                failures.append(f"{self.path / entry.path}: checksum {actual} does not match the manifest's {entry.checksum}")
        return failures


def shard_location(cache: Path | URLPath, shard_path: str) -> Path | URLPath:
    """Where the shard of manifest path ``shard_path`` is, refusing one outside the cache directory.

    The manifest's validation already refuses absolute paths and ``..``; here a local shard path is
    resolved (symlinks followed) and must stay inside the resolved cache directory, so a symlink
    planted in a cache cannot make a reader open files elsewhere.
    """
    location = cache / shard_path
    if isinstance(location, URLPath):
        return location
    root = Path(cache).resolve()
    resolved = Path(location).resolve()
    if root not in resolved.parents:
        raise CorruptShardError(
            f"{cache}: shard {shard_path} resolves to {resolved}, outside the cache directory {root} (a symlink?); "
            f"refusing to read it. A cache's shards live inside its directory: run `logit-cache verify {cache}`"
        )
    return location


def open_reader(path: str | Path, allow_incomplete: bool = False, storage_options: dict[str, Any] | None = None) -> CacheReader:
    """Open a cache for reading; refuses an incomplete one unless asked.

    ``path``: a local directory, or an fsspec URL (``storage_options`` go to fsspec).
    """
    return CacheReader(path, allow_incomplete=allow_incomplete, storage_options=storage_options)
