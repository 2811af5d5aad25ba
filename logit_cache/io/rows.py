"""Teacher targets by row: the training side's reader of a complete cache.

The unit of I/O is a whole chunk, never a row: one Zarr call costs about a millisecond whatever it
returns (DESIGN.md section 6), so :class:`TargetReader` reads the chunks a batch touches, in chunk
order, and serves rows from the decoded chunks. A small cache is read whole into memory once; a
large one goes through a bounded LRU of decoded chunks (:mod:`.chunk_cache`). Per-token caches map
samples to their rows through the shards' offsets.

Processes: as :class:`~logit_cache.io.reader.CacheReader`. Arrays already in memory survive a fork
(shared copy-on-write) but not a pickle (each spawned worker re-reads them rather than receiving
them through a pipe); the chunk cache starts empty in each process.

Damage: besides the reader's checks, a chunk with fewer rows than the manifest promises is refused,
and so are NaN or infinite stored values (a dump never stores them: it fails on them instead), once
per chunk decoded or array loaded, unless opened with ``allow_nonfinite=True`` (``logit-cache train
--allow-nonfinite-targets``). A checksum does not catch values rewritten through zarr or h5py (the
library recomputes it); this check does, for non-finite ones.

This module knows nothing of datasets or DataLoaders: :class:`logit_cache.data.cache.LogitCache`
(what ``open_cache`` returns) is a :class:`TargetReader` that adds ``wrap``, ``sampler`` and ``collate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptShardError, TargetMismatchError, UsageError
from ..targets import KINDS
from ..targets.batch import Targets
from ..targets.compact import ENCODINGS, decode_arrays
from .chunk_cache import ChunkCache, decoded_row_bytes
from .reader import CacheReader

#: Caches whose target arrays decode to at most this many bytes are held in memory by default.
IN_MEMORY_BYTES = 512 << 20
#: Default bound of the decoded-chunk LRU (per process) for caches read from disk.
CHUNK_CACHE_BYTES = 128 << 20


class TargetReader(CacheReader):
    """A complete cache, read-only, serving teacher targets by row (the training side's reader).

    >>> reader = TargetReader("caches/digits-top10")
    >>> reader.targets([3, 1, 2])          # a Targets batch of rows 3, 1, 2

    :class:`logit_cache.data.cache.LogitCache` (what ``open_cache`` returns) adds the DataLoader side.
    """

    def __init__(
        self, path: str | Path, in_memory: bool | None = None, chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
        storage_options: dict[str, Any] | None = None, allow_nonfinite: bool = False,
    ) -> None:
        super().__init__(path, storage_options=storage_options)
        manifest = self.manifest
        #: Serve NaN or infinite stored values instead of refusing them (see the module docstring).
        self.allow_nonfinite = bool(allow_nonfinite)
        kind = KINDS.get(manifest.mode)  # the registry says which arrays a kind's loader reads
        if kind is None:
            raise TargetMismatchError(f"{self.path}: mode {manifest.mode!r} caches cannot be read as training targets by this version")
        if manifest.encoding not in ENCODINGS:
            raise TargetMismatchError(f"{self.path}: encoding {manifest.encoding!r} is not one this version reads ({', '.join(ENCODINGS)})")
        if manifest.encoding == "plain":
            for name in kind.target_arrays:
                if name not in manifest.arrays:
                    raise CorruptShardError(f"{self.path}: the manifest lists no array {name!r}, which a {manifest.mode} cache must hold")
            optional = [name for name in kind.optional_arrays if name in manifest.arrays]
            self.names: tuple[str, ...] = (*kind.target_arrays, *optional)
        else:  # the stored arrays of the compact layout; rows() decodes them to the logical ones
            self.names = tuple(name for name in manifest.arrays if name not in ("labels", "offsets"))
        self._row_shapes = {name: tuple(manifest.arrays[name]["row_shape"]) for name in self.names}
        self._dtypes = {name: np.dtype(manifest.arrays[name]["dtype"]) for name in self.names}
        self.in_memory = self.nbytes <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._memory: dict[str, np.ndarray] | None = None
        self.chunk_starts = self._chunk_table()
        #: Per-token caches: the global offsets, rows offsets[j]..offsets[j+1] for sample j (DESIGN.md).
        self.offsets: np.ndarray | None = self._global_offsets() if manifest.per_token else None
        self._reset_chunks()

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
        return decoded_row_bytes(self._row_shapes, self._dtypes)

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
        state["_chunks"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_chunks()

    # -- reading -------------------------------------------------------------------------------

    def load(self) -> TargetReader:
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

    def _reset_chunks(self) -> None:
        """An empty chunk cache (see :mod:`.chunk_cache`)."""
        self._chunks = ChunkCache(self.chunk_starts, self.chunk_rows, self._row_shapes, self._dtypes, self.chunk_cache_bytes, self.path)

    @property
    def slots(self) -> int:
        """How many chunks the chunk cache holds at once."""
        return self._chunks.slots

    def _read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        """Chunk ``chunk`` of every target array, read from its shard and checked."""
        position = int(self._shard_of_chunk[chunk])
        offset = self.manifest.shards[position].row_start
        start, stop = int(self.chunk_starts[chunk]) - offset, int(self.chunk_starts[chunk + 1]) - offset
        shard = self.shard(position)
        parts = {}
        for name in self.names:
            parts[name] = shard.read(name, start, stop)
            self._check_part(name, position, parts[name], start + offset, stop + offset)
        return parts

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
        return self._chunks.gather(rows, chunk_of_row, needed, self._read_chunk)

    def targets(self, rows: Sequence[int] | np.ndarray) -> Targets:
        """A :class:`Targets` batch of ``rows`` (host tensors in the storage dtypes)."""
        return Targets.from_arrays(self.mode, self.num_classes, self.rows(rows), self.manifest.sample_temperature)


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity. float16 by its bits: |x| below 0x7C00 (an exponent of
    all ones is inf or NaN), 20x faster than ``np.isfinite``, whose float16 loop is not vectorised."""
    if values.dtype == np.float16 and values.flags.c_contiguous:
        return not values.size or int((values.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(values).all())
