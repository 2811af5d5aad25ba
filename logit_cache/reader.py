"""Read-only access to a cache: the manifest, its shards, arrays across shards, checksums.

Opening a cache writes nothing. An incomplete cache is refused unless ``allow_incomplete=True``
(what resumption and ``info`` use). The reader's unit of I/O is a whole array slice, never a row
(DESIGN.md section 6).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CorruptShardError, IncompleteCacheError
from .manifest import Manifest, read_manifest
from .store import ShardReader, get_backend


class CacheReader:
    """A cache on disk: its manifest and lazily opened shard readers."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists() and Path(f"{self.path}.partial").exists():
            raise IncompleteCacheError(
                f"{self.path}: the dump has not finished; its unfinished data is in {self.path}.partial "
                f"(rerun the dump with --resume to complete it)"
            )
        self.manifest: Manifest = read_manifest(self.path)
        if not self.manifest.complete and not allow_incomplete:
            raise IncompleteCacheError(
                f"{self.path}: manifest says complete=false: the dump that writes it has not finished "
                f"(rerun it with --resume to complete it)"
            )
        self.backend = get_backend(self.manifest.backend)
        self._shards: dict[int, ShardReader] = {}

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def shard(self, position: int) -> ShardReader:
        """The reader of the manifest's ``position``-th shard (opened on first use)."""
        if position not in self._shards:
            self._shards[position] = self.backend.open(self.path / self.manifest.shards[position].path)
        return self._shards[position]

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


def open_reader(path: str | Path, allow_incomplete: bool = False) -> CacheReader:
    """Open a cache for reading; refuses an incomplete one unless asked."""
    return CacheReader(path, allow_incomplete=allow_incomplete)
