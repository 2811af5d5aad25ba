"""Read-only access to a cache: the manifest, its shards, rows by index, checksums.

Opening a cache writes nothing. An incomplete cache is refused unless ``allow_incomplete=True``
(what resumption and ``info`` use). The unit of I/O is a whole chunk, never a row: one Zarr call
costs about a millisecond whatever it returns (DESIGN.md section 6), so :class:`LogitCache` reads
the chunks a batch touches, in chunk order, and serves rows from the decoded chunks. A small cache
is read whole into memory once; a large one goes through a bounded LRU of decoded chunks (a slab
of chunk-sized slots, so a batch is gathered with one numpy index per array).

Processes: shard handles are opened lazily and dropped when the process id changes (a forked
DataLoader worker) or the object is pickled (spawned workers), so each process opens its own.
Arrays already in memory survive a fork (shared copy-on-write) but not a pickle (each spawned
worker re-reads them rather than receiving them through a pipe).

Damage is detected as it is read (DESIGN.md section 4), each failure a :class:`CorruptShardError`
naming the cache, the shard and the array or chunk, and suggesting ``logit-cache verify``:

* a chunk whose bytes changed fails its checksum as it is decoded (crc32c in Zarr, fletcher32 in
  HDF5, see :mod:`logit_cache.store.base`); a chunk missing from storage is refused, never read as
  zeros. Shards written before chunk checksums existed read unchecked (said once, at debug level).
* a shard is checked against its manifest entry when opened: the cache key, shard index, first row
  and first sample it recorded at creation must be the entry's, so swapped shards or a shard of
  another cache are named; a chunk with fewer rows than the manifest promises is refused.
* :class:`LogitCache` refuses NaN or infinite stored values (a dump never stores them: it fails on
  them instead), once per chunk decoded or array loaded, unless opened with ``allow_nonfinite=True``
  (``logit-cache train --allow-nonfinite-targets``). A checksum does not catch values rewritten through
  zarr or h5py (the library recomputes it); this check does, for non-finite ones.

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
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptShardError, IncompleteCacheError, TargetMismatchError, UsageError
from ..format.manifest import Manifest, path_exists, read_manifest
from ..store import ShardReader, get_backend
from ..store.base import URLPath, as_location
from ..targets.batch import OPTIONAL_TARGET_ARRAYS, TARGET_ARRAYS, Targets
from ..targets.compact import ENCODINGS, decode_arrays

if TYPE_CHECKING:
    from ..data.loader import CachedDataset, ChunkShuffleSampler

log = logging.getLogger(__name__)

#: Caches whose target arrays decode to at most this many bytes are held in memory by default.
IN_MEMORY_BYTES = 512 << 20
#: Default bound of the decoded-chunk LRU (per process) for caches read from disk.
CHUNK_CACHE_BYTES = 128 << 20


class CacheReader:
    """A cache on disk or at an fsspec URL: its manifest and lazily opened shard readers (read-only)."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False, storage_options: dict[str, Any] | None = None) -> None:
        self.path: Path | URLPath = as_location(path, storage_options)
        self.storage_options: dict[str, Any] | None = dict(storage_options) if isinstance(self.path, URLPath) and storage_options else None
        if not path_exists(self.path, self.storage_options) and path_exists(f"{self.path}.partial", self.storage_options):
            raise IncompleteCacheError(
                f"{self.path}: the dump has not finished; its unfinished data is in {self.path}.partial "
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


class LogitCache(CacheReader):
    """A complete cache, read-only, serving teacher targets by row for training.

    >>> cache = open_cache("caches/digits-top10")
    >>> cache.targets([3, 1, 2])          # a Targets batch of rows 3, 1, 2
    >>> ds = cache.wrap(train_dataset)    # items (input, label, target), see loader.py
    """

    def __init__(
        self, path: str | Path, in_memory: bool | None = None, chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
        storage_options: dict[str, Any] | None = None, allow_nonfinite: bool = False,
    ) -> None:
        super().__init__(path, storage_options=storage_options)
        manifest = self.manifest
        #: Serve NaN or infinite stored values instead of refusing them (see the module docstring).
        self.allow_nonfinite = bool(allow_nonfinite)
        if manifest.mode not in TARGET_ARRAYS:
            raise TargetMismatchError(f"{self.path}: mode {manifest.mode!r} caches cannot be read as training targets by this version")
        if manifest.encoding not in ENCODINGS:
            raise TargetMismatchError(f"{self.path}: encoding {manifest.encoding!r} is not one this version reads ({', '.join(ENCODINGS)})")
        if manifest.encoding == "plain":
            for name in TARGET_ARRAYS[manifest.mode]:
                if name not in manifest.arrays:
                    raise CorruptShardError(f"{self.path}: the manifest lists no array {name!r}, which a {manifest.mode} cache must hold")
            optional = [name for name in OPTIONAL_TARGET_ARRAYS.get(manifest.mode, ()) if name in manifest.arrays]
            self.names: tuple[str, ...] = (*TARGET_ARRAYS[manifest.mode], *optional)
        else:  # the stored arrays of the compact layout; rows() decodes them to the logical ones
            self.names = tuple(name for name in manifest.arrays if name not in ("labels", "offsets"))
        self._row_shapes = {name: tuple(manifest.arrays[name]["row_shape"]) for name in self.names}
        self._dtypes = {name: np.dtype(manifest.arrays[name]["dtype"]) for name in self.names}
        self.in_memory = self.nbytes <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._memory: dict[str, np.ndarray] | None = None
        self._wrappers: list[weakref.ref] = []  # datasets wrapped with this cache (for set_epoch forwarding)
        self.chunk_starts = self._chunk_table()
        #: Per-token caches: the global offsets, rows offsets[j]..offsets[j+1] for sample j (DESIGN.md).
        self.offsets: np.ndarray | None = self._global_offsets() if manifest.per_token else None
        self._reset_slab()

    # -- shape of the cache ------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def row_bytes(self) -> int:
        return sum(self._dtypes[n].itemsize * int(np.prod(self._row_shapes[n], dtype=np.int64)) for n in self.names)

    @property
    def nbytes(self) -> int:
        """Bytes of the target arrays decoded (what in-memory mode holds)."""
        return self.num_rows * self.row_bytes

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_starts) - 1

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest.chunk_rows) or self.shard(0).chunk_rows(self.names[0])

    def _chunk_table(self) -> np.ndarray:
        """First row of every chunk, in row order; chunks restart at each shard's first row."""
        chunk = self.chunk_rows
        starts = [np.arange(entry.row_start, entry.row_stop, chunk, dtype=np.int64) for entry in self.manifest.shards]
        table = np.concatenate([*starts, np.array([self.num_rows], dtype=np.int64)])
        self._shard_of_chunk = np.concatenate(
            [np.full(len(s), position, dtype=np.int64) for position, s in enumerate(starts)] + [np.zeros(0, np.int64)]
        )
        return table

    def _global_offsets(self) -> np.ndarray:
        """Each shard's local offsets shifted by its first row, in shard order, then ``num_rows``."""
        parts = []
        for position, entry in enumerate(self.manifest.shards):
            local = self.shard(position).read("offsets")
            expected = (entry.sample_stop - entry.sample_start) * self.manifest.views + 1
            if len(local) != expected or local[0] != 0 or local[-1] != entry.row_stop - entry.row_start:
                raise CorruptShardError(
                    f"{self.path / entry.path}: offsets hold {len(local)} entries from {local[:1]} to {local[-1:]}; expected "
                    f"{expected} from 0 to {entry.row_stop - entry.row_start}: the shard is damaged"
                )
            parts.append(local[:-1] + entry.row_start)
        return np.concatenate([*parts, np.array([self.num_rows], dtype=np.int64)]).astype(np.int64)

    @property
    def per_token(self) -> bool:
        return self.offsets is not None

    def sample_rows(self, samples: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-token caches: the rows of ``samples`` (their tokens, sample after sample) and each one's row count."""
        if self.offsets is None:
            raise UsageError(f"{self.path}: sample_rows() is for per-token caches; this one has one row per sample and view")
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        if len(samples) and (samples.min() < 0 or samples.max() >= self.num_samples):
            bad = samples[(samples < 0) | (samples >= self.num_samples)][0]
            raise UsageError(f"{self.path}: sample {int(bad)} is out of range; the cache has {self.num_samples} samples")
        starts, lengths = self.offsets[samples], self.offsets[samples + 1] - self.offsets[samples]
        # rows: for each sample, starts[i] + 0..lengths[i]-1, built without a Python loop
        before = np.cumsum(lengths) - lengths
        rows = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
        return rows, lengths

    def sample_targets(self, samples: Sequence[int] | np.ndarray) -> Targets:
        """Per-token caches: a flat :class:`Targets` of the tokens of ``samples``, with their ``lengths``."""
        rows, lengths = self.sample_rows(samples)
        return Targets.from_arrays(self.mode, self.num_classes, self.rows(rows), self.manifest.sample_temperature, lengths)

    @property
    def samples_per_chunk(self) -> int:
        """About how many samples one chunk holds (a chunk-aware sampler's block)."""
        rows_per_sample = self.num_rows / max(1, self.num_samples)
        return max(1, round(self.chunk_rows / max(rows_per_sample, 1e-9)))

    # -- pickling and processes ---------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_memory"] = None
        state["_slab"] = None
        state["_wrappers"] = []  # weak references do not pickle; workers need no forwarding
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_slab()

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> LogitCache:
        """Read the target arrays whole into memory (in-memory mode; a no-op otherwise or if done).

        Call it before DataLoader workers fork so they share one copy.
        """
        if self.in_memory and self._memory is None:
            memory = {}
            for name in self.names:
                parts = []
                for position, entry in enumerate(self.manifest.shards):
                    part = self.shard(position).read(name)
                    self._check_part(name, position, part, entry.row_start, entry.row_stop)
                    parts.append(part)
                memory[name] = np.concatenate(parts) if parts else np.empty((0, *self._row_shapes[name]), dtype=self._dtypes[name])
            self._memory = memory
        return self

    def _check_part(self, name: str, position: int, part: np.ndarray, first: int, stop: int) -> None:
        """Refuse rows ``first:stop`` (cache rows) of ``name`` read from shard ``position`` when the shard
        gave another number of rows, or (unless ``allow_nonfinite``) when they hold NaN or infinite values."""
        entry = self.manifest.shards[position]
        if len(part) != stop - first:
            raise CorruptShardError(
                f"{self.path}: shard {entry.path}, array {name!r}: rows {first - entry.row_start}:{stop - entry.row_start} gave "
                f"{len(part)} rows, the manifest promises {stop - first}; the shard is truncated or not this cache's: "
                f"run `logit-cache verify {self.path}`"
            )
        if self.allow_nonfinite or part.dtype.kind != "f" or _all_finite(part):
            return
        bad = np.flatnonzero(~np.isfinite(part.reshape(len(part), -1)).all(axis=1)) + first
        shown = ", ".join(map(str, bad[:10].tolist())) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        chunk = (first - entry.row_start) // self.chunk_rows
        where = f"chunk {chunk}" if stop - first <= self.chunk_rows else "rows"
        raise CorruptShardError(
            f"{self.path}: shard {entry.path}, array {name!r}, {where} (cache rows {first}:{stop}) holds NaN or infinite values "
            f"at cache rows {shown}. A dump never stores them, so the shard was damaged or altered: run `logit-cache verify "
            f"{self.path}`. To read it anyway, pass allow_nonfinite=True to open_cache (logit-cache train --allow-nonfinite-targets)"
        )

    # The chunk cache is a slab: ``slots`` chunk-sized slots per array, a chunk -> slot map and a
    # last-use clock per slot (LRU). Rows are then gathered with one fancy index per array, whatever
    # the number of chunks a batch touches: a loop over chunks would cost microseconds per chunk,
    # and a shuffled batch touches up to one chunk per row.

    def _reset_slab(self) -> None:
        chunk_bytes = max(1, self.chunk_rows * self.row_bytes)
        self.slots = max(2, min(self.num_chunks, self.chunk_cache_bytes // chunk_bytes))
        self._slab: dict[str, np.ndarray] | None = None
        self._slot_of_chunk = np.full(self.num_chunks, -1, dtype=np.int64)
        self._chunk_in_slot = np.full(self.slots, -1, dtype=np.int64)
        self._last_used = np.zeros(self.slots, dtype=np.int64)
        self._clock = 0
        self._decodes = self._rows_served = 0
        self._warned = False

    def _fill(self, chunks: np.ndarray) -> None:
        """Make sure ``chunks`` (sorted, at most ``slots`` of them) are in the slab, reading the missing ones in order."""
        if self._slab is None:
            rows = self.slots * self.chunk_rows
            self._slab = {name: np.empty((rows, *self._row_shapes[name]), dtype=self._dtypes[name]) for name in self.names}
        self._clock += 1
        present = self._slot_of_chunk[chunks]
        self._last_used[present[present >= 0]] = self._clock
        for chunk in chunks[present < 0].tolist():
            slot = int(np.argmin(self._last_used))  # least recently used; this batch's slots are newest
            if self._chunk_in_slot[slot] >= 0:
                self._slot_of_chunk[self._chunk_in_slot[slot]] = -1
            position = int(self._shard_of_chunk[chunk])
            offset = self.manifest.shards[position].row_start
            start, stop = int(self.chunk_starts[chunk]) - offset, int(self.chunk_starts[chunk + 1]) - offset
            shard = self.shard(position)
            base = slot * self.chunk_rows
            for name in self.names:
                part = shard.read(name, start, stop)
                self._check_part(name, position, part, start + offset, stop + offset)
                self._slab[name][base : base + stop - start] = part
            self._slot_of_chunk[chunk], self._chunk_in_slot[slot] = slot, chunk
            self._last_used[slot] = self._clock
            self._decodes += 1
        self._warn_if_thrashing()

    def _warn_if_thrashing(self) -> None:
        """Say so, once, when chunks are decoded for a few rows each: a sampler that ignores chunks.

        Chunk-aware reading serves about ``chunk_rows`` rows per decode; a plain random permutation
        over a cache larger than the chunk cache serves about one, 50x to 100x slower (BENCHMARKS.md).
        """
        if self._warned or self._decodes < 4 * self.slots + 64:
            return
        rows_per_decode = self._rows_served / self._decodes
        if rows_per_decode < self.chunk_rows / 16:
            self._warned = True
            log.warning(
                "%s: %d chunk reads served %d rows (%.1f rows each, of %d per chunk): the sampler's order ignores the "
                "cache's chunks, so they are read again and again. Use cache.sampler(...) (chunk-aware), "
                "open_cache(..., in_memory=True) if the targets fit in memory, or a larger chunk_cache_bytes",
                self.path, self._decodes, self._rows_served, rows_per_decode, self.chunk_rows,
            )

    def rows(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The target arrays at ``rows`` (in the order given), storage dtypes, decoded to the format's
        logical arrays when the cache uses a compact encoding.

        Each chunk the rows touch is read once, in chunk order, and the rows are gathered from it.
        """
        stored = self._stored_rows(rows)
        if self.manifest.encoding == "plain":
            return stored
        return decode_arrays(self.mode, stored, self.manifest.encoding, self.num_classes, self.manifest.dtype)

    def _stored_rows(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][0]
            raise UsageError(f"{self.path}: row {int(bad)} is out of range; the cache has {self.num_rows} rows")
        if self.in_memory:
            memory = self.load()._memory
            return {name: memory[name][rows] for name in self.names}
        chunk_of_row = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        needed = np.unique(chunk_of_row)
        if len(needed) > self.slots:  # more chunks than the slab holds: in pieces of whole chunks
            out = {name: np.empty((len(rows), *self._row_shapes[name]), dtype=self._dtypes[name]) for name in self.names}
            for first in range(0, len(needed), self.slots):
                piece = np.isin(chunk_of_row, needed[first : first + self.slots])
                for name, values in self._stored_rows(rows[piece]).items():
                    out[name][piece] = values
            return out
        self._rows_served += len(rows)
        self._fill(needed)
        flat = self._slot_of_chunk[chunk_of_row] * self.chunk_rows + (rows - self.chunk_starts[chunk_of_row])
        return {name: self._slab[name][flat] for name in self.names}

    def targets(self, rows: Sequence[int] | np.ndarray) -> Targets:
        """A :class:`Targets` batch of ``rows`` (host tensors in the storage dtypes)."""
        return Targets.from_arrays(self.mode, self.num_classes, self.rows(rows), self.manifest.sample_temperature)

    def register(self, wrapper: Any) -> None:
        """Remember a dataset wrapped with this cache, so the cache's sampler can forward ``set_epoch``."""
        self._wrappers = [ref for ref in self._wrappers if ref() is not None] + [weakref.ref(wrapper)]

    def wrappers(self) -> list[Any]:
        return [w for w in (ref() for ref in self._wrappers) if w is not None]

    # -- training helpers (loader.py) -----------------------------------------------------------

    def wrap(self, dataset: Any, verify: str = "fingerprint") -> CachedDataset:
        """The dataset with this cache's target appended to each item; see :class:`CachedDataset`."""
        from ..data.loader import CachedDataset

        return CachedDataset(dataset, [self], verify=verify)

    def sampler(self, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> ChunkShuffleSampler:
        """A seeded, epoch-aware, chunk-aware sampler over this cache's samples; see :class:`ChunkShuffleSampler`."""
        from ..data.loader import ChunkShuffleSampler

        return ChunkShuffleSampler.for_caches([self], shuffle=shuffle, seed=seed, **kwargs)

    @staticmethod
    def collate(batch: Any) -> Any:
        """``collate_fn`` for a DataLoader over :meth:`wrap`: (inputs, labels, Targets)."""
        from ..data.loader import collate

        return collate(batch)


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity. float16 by its bits: |x| below 0x7C00 (an exponent of
    all ones is inf or NaN), 20x faster than ``np.isfinite``, whose float16 loop is not vectorised."""
    if values.dtype == np.float16 and values.flags.c_contiguous:
        return not values.size or int((values.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(values).all())


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
