"""The bounded LRU of decoded chunks a reader serves rows from when a cache is not held in memory.

A split of :mod:`logit_cache.io.reader` by job: the reader knows the cache (manifest, shards,
checks); this knows only chunk-sized slots. The cache is a slab: ``slots`` chunk-sized slots per
array, a chunk -> slot map and a last-use clock per slot (LRU). Rows are then gathered with one
fancy index per array, whatever the number of chunks a batch touches: a loop over chunks would
cost microseconds per chunk, and a shuffled batch touches up to one chunk per row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def decoded_row_bytes(row_shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]) -> int:
    """Bytes of one row of every array named in ``row_shapes``, decoded."""
    return sum(dtypes[n].itemsize * int(np.prod(row_shapes[n], dtype=np.int64)) for n in row_shapes)


class ChunkCache:
    """Decoded chunks of one cache's arrays, at most ``slots`` of them (least recently used goes first).

    ``chunk_starts``: the first row of every chunk, then the row count (chunks restart at each
    shard's first row, so the last chunk of a shard may be short). ``row_shapes`` and ``dtypes``: per
    array name. ``capacity_bytes`` bounds the slab (at least two slots, at most one per chunk).
    """

    def __init__(self, chunk_starts: np.ndarray, chunk_rows: int, row_shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, np.dtype], capacity_bytes: int, where: Any = "") -> None:
        self.chunk_starts, self.chunk_rows = chunk_starts, int(chunk_rows)
        self.row_shapes, self.dtypes, self.where = row_shapes, dtypes, where
        num_chunks = len(chunk_starts) - 1
        self.slots = max(2, min(num_chunks, int(capacity_bytes) // max(1, self.chunk_rows * decoded_row_bytes(row_shapes, dtypes))))
        self.slab: dict[str, np.ndarray] | None = None  # allocated on first use
        self.slot_of_chunk = np.full(num_chunks, -1, dtype=np.int64)
        self.chunk_in_slot = np.full(self.slots, -1, dtype=np.int64)
        self.last_used = np.zeros(self.slots, dtype=np.int64)
        self.clock = 0
        self.decodes = self.rows_served = 0
        self.warned = False

    def gather(self, rows: np.ndarray, chunk_of_row: np.ndarray, chunks: np.ndarray,
               read_chunk: Callable[[int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays at ``rows`` (each in chunk ``chunk_of_row``); ``chunks``: their sorted unique chunks,
        at most ``slots``. Missing chunks are read, in order, through ``read_chunk(chunk)``."""
        self.rows_served += len(rows)
        self._fill(chunks, read_chunk)
        flat = self.slot_of_chunk[chunk_of_row] * self.chunk_rows + (rows - self.chunk_starts[chunk_of_row])
        return {name: slab[flat] for name, slab in self.slab.items()}

    def _fill(self, chunks: np.ndarray, read_chunk: Callable[[int], dict[str, np.ndarray]]) -> None:
        if self.slab is None:
            rows = self.slots * self.chunk_rows
            self.slab = {name: np.empty((rows, *shape), dtype=self.dtypes[name]) for name, shape in self.row_shapes.items()}
        self.clock += 1
        present = self.slot_of_chunk[chunks]
        self.last_used[present[present >= 0]] = self.clock
        for chunk in chunks[present < 0].tolist():
            slot = int(np.argmin(self.last_used))  # least recently used; this batch's slots are newest
            if self.chunk_in_slot[slot] >= 0:
                self.slot_of_chunk[self.chunk_in_slot[slot]] = -1
            base = slot * self.chunk_rows
            for name, part in read_chunk(chunk).items():
                self.slab[name][base : base + len(part)] = part
            self.slot_of_chunk[chunk], self.chunk_in_slot[slot] = slot, chunk
            self.last_used[slot] = self.clock
            self.decodes += 1
        self._warn_if_thrashing()

    def _warn_if_thrashing(self) -> None:
        """Say so, once, when chunks are decoded for a few rows each: a sampler that ignores chunks.

        Chunk-aware reading serves about ``chunk_rows`` rows per decode; a plain random permutation
        over a cache larger than the chunk cache serves about one, 50x to 100x slower (BENCHMARKS.md).
        """
        if self.warned or self.decodes < 4 * self.slots + 64:
            return
        rows_per_decode = self.rows_served / self.decodes
        if rows_per_decode < self.chunk_rows / 16:
            self.warned = True
            log.warning(
                "%s: %d chunk reads served %d rows (%.1f rows each, of %d per chunk): the sampler's order ignores the "
                "cache's chunks, so they are read again and again. Use cache.sampler(...) (chunk-aware), "
                "open_cache(..., in_memory=True) if the targets fit in memory, or a larger chunk_cache_bytes",
                self.where, self.decodes, self.rows_served, rows_per_decode, self.chunk_rows,
            )
