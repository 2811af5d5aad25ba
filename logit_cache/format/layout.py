"""How a cache is cut: the arrays every shard holds, rows per chunk and per shard, and the shard plans.

One place for the layout, because the dump writes it, ``convert`` rewrites it, ``verify`` checks it and
the benchmarks replay it. Shard boundaries depend only on the data (dataset length, views, token
counts) and ``shard_rows``, never on ranks or batch size: that is what makes resumed and multi-rank
dumps identical to a single uninterrupted one. The target arrays come from the kind
(:func:`logit_cache.targets.compact.stored_specs`, plain or compact); this module adds labels or
per-token offsets and sizes the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store.base import ArraySpec
from ..targets.compact import stored_specs

#: A chunk (the reader's unit of I/O) holds about this many bytes of its widest array: big enough
#: that per-chunk costs (~2 ms a Zarr chunk file) stay small, small enough that the partly filled
#: last chunk of a shard (stored whole by HDF5 and by uncompressed Zarr) wastes little.
CHUNK_TARGET_BYTES = 256 << 10
#: Per-sample labels (8 bytes a row) get chunks of their own size, not hundreds of tiny files.
LABEL_CHUNK_ROWS = 16384
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 1 << 16
#: Default shard size: few enough files for big caches, small enough to resume cheaply.
SHARD_TARGET_BYTES = 256 << 20


@dataclass(frozen=True)
class ShardPlan:
    """Where one shard sits in the cache: samples ``[sample_start, sample_stop)``, rows likewise."""

    index: int
    sample_start: int
    sample_stop: int
    row_start: int
    row_stop: int

    @property
    def num_samples(self) -> int:
        return self.sample_stop - self.sample_start

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    def planned_rows(self, specs: list[ArraySpec]) -> dict[str, int]:
        """How many rows each array of this shard holds: per cache row, or per sample."""
        planned = {"row": self.num_rows, "sample": self.num_samples, "offsets": self.num_samples + 1}
        return {spec.name: planned[spec.per] for spec in specs if spec.per in planned}


def plan_shards(num_samples: int, views: int, shard_rows: int) -> list[ShardPlan]:
    """Cut ``num_samples`` per-sample items (``views`` rows each) into shards of at most
    ``shard_rows`` rows, at sample boundaries."""
    samples_per_shard = max(1, shard_rows // views)
    plans = []
    for index, start in enumerate(range(0, num_samples, samples_per_shard)):
        stop = min(num_samples, start + samples_per_shard)
        plans.append(ShardPlan(index, start, stop, start * views, stop * views))
    return plans


def plan_token_shards(lengths: np.ndarray, shard_rows: int) -> list[ShardPlan]:
    """Cut samples of ``lengths`` rows each (tokens) into shards of at most ``shard_rows`` rows, at
    sample boundaries; a sample longer than ``shard_rows`` gets a shard of its own."""
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    starts = ends - lengths
    plans: list[ShardPlan] = []
    first = 0
    while first < len(ends):
        stop = max(first + 1, int(np.searchsorted(ends, starts[first] + shard_rows, side="right")))
        plans.append(ShardPlan(len(plans), first, stop, int(starts[first]), int(ends[stop - 1])))
        first = stop
    return plans


def split_for_rank(plans: list[ShardPlan], rank: int, world_size: int) -> list[ShardPlan]:
    """A contiguous run of shards for ``rank``; runs differ in length by at most one shard."""
    count = len(plans)
    return plans[rank * count // world_size : (rank + 1) * count // world_size]


def _pow2_at_least(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()


def array_specs(mode: str, k: int | None, num_classes: int, dtype: str, has_labels: bool, num_samples: int,
                per_token: bool = False, encoding: str = "plain", sampled_logits: bool = False) -> list[ArraySpec]:
    """The arrays every shard holds, with names, dtypes and row shapes of the cache format.

    ``k`` is the kind's row width (K in top-k mode, M in sampled mode, None for full logits). Per-token
    caches add the shard-local ``offsets`` and store no labels (the dataset's ids are the labels).
    """
    specs = stored_specs(mode, k, num_classes, dtype, encoding, sampled_logits=sampled_logits)
    if per_token:
        offsets_chunk = min(LABEL_CHUNK_ROWS, max(MIN_CHUNK_ROWS, _pow2_at_least(num_samples + 1)))
        return [*specs, ArraySpec("offsets", "int64", (), per="offsets", compress=True, chunk_rows=offsets_chunk)]
    if has_labels:
        label_chunk = min(LABEL_CHUNK_ROWS, max(MIN_CHUNK_ROWS, _pow2_at_least(num_samples)))
        specs.append(ArraySpec("labels", "int64", (), per="sample", compress=True, chunk_rows=label_chunk))
    return specs


def chunk_and_shard_rows(specs: list[ArraySpec], shard_rows: int | None, views: int, num_rows: int) -> tuple[int, int]:
    """Rows per chunk and rows per shard.

    A chunk holds about CHUNK_TARGET_BYTES of the widest per-row array (a power of two of rows),
    but never much more rows than the cache has.
    """
    row_specs = [spec for spec in specs if spec.per == "row"]
    widest = max(spec.row_bytes for spec in row_specs)
    chunk = 1 << max(0, (CHUNK_TARGET_BYTES // widest).bit_length() - 1)
    chunk = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, chunk), max(MIN_CHUNK_ROWS, _pow2_at_least(num_rows)))
    if shard_rows is None:
        per_row = sum(spec.row_bytes for spec in row_specs)
        shard_rows = max(chunk, (SHARD_TARGET_BYTES // per_row) // chunk * chunk)
    shard_rows -= shard_rows % views
    return min(chunk, shard_rows), shard_rows


@dataclass(frozen=True)
class Layout:
    """How a cache is cut: its arrays, rows per chunk and per shard, and the shard plans."""

    specs: list[ArraySpec]
    chunk_rows: int
    shard_rows: int
    plans: list[ShardPlan]


def plan_layout(mode: str, k: int | None, num_classes: int, dtype: str, has_labels: bool, num_samples: int,
                views: int = 1, shard_rows: int | None = None, lengths: np.ndarray | None = None,
                encoding: str = "plain", sampled_logits: bool = False) -> Layout:
    """The layout a dump of these settings writes (the benchmark replays its batches from it).

    ``lengths``: tokens per sample for a per-token cache (rows are tokens; shards cut at sample ends).
    """
    per_token = lengths is not None
    specs = array_specs(mode, k, num_classes, dtype, has_labels and not per_token, num_samples, per_token, encoding, sampled_logits)
    num_rows = int(lengths.sum()) if per_token else num_samples * views
    chunk_rows, shard_rows = chunk_and_shard_rows(specs, shard_rows, views, num_rows)
    plans = plan_token_shards(lengths, shard_rows) if per_token else plan_shards(num_samples, views, shard_rows)
    return Layout(specs, chunk_rows, shard_rows, plans)
