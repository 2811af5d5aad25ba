"""Copying one shard of a cache into another backend and value dtype (``logit-cache convert``).

Reads the source in blocks of about :data:`BLOCK_BYTES`, narrows values only when every finite value
fits, and checks the source's bytes against the manifest's checksum as it goes, so a damaged source
is never converted into a cache that looks sound.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import CorruptShardError, NonFiniteLogitsError
from ..format.manifest import Manifest, ShardEntry
from ..io.reader import CacheReader
from ..store import ArraySpec, Backend, combine_checksum

#: Bytes read from the source per block (whole chunks of the target).
BLOCK_BYTES = 32 << 20
#: Rows named in an overflow error before "and N more".
SHOWN_ROWS = 20


def cast_block(block: np.ndarray, dtype: np.dtype, first_row: int, views: int, src: Path) -> np.ndarray:
    """``block`` in ``dtype`` (round to nearest even); narrowing refuses finite values that do not fit."""
    with np.errstate(over="ignore"):  # overflow is reported below, by row
        out = block.astype(dtype)
    if dtype.itemsize < block.dtype.itemsize:
        overflow = (np.isinf(out) & np.isfinite(block)).reshape(len(block), -1).any(axis=1)
        if overflow.any():
            rows = (np.flatnonzero(overflow) + first_row).tolist()
            shown = ", ".join(map(str, rows[:SHOWN_ROWS])) + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")
            where = f"rows {shown}"
            if views > 1:
                where += f" (dataset indices {', '.join(str(i) for i in sorted({r // views for r in rows[:SHOWN_ROWS]}))})"
            limit = float(np.finfo(dtype).max)
            raise NonFiniteLogitsError(
                f"{src}: {where} hold logits beyond {dtype.name}'s range (|logit| > {limit:g}), which {dtype.name} cannot store; "
                f"keep them in {block.dtype.name} (convert without --dtype {dtype.name})"
            )
    return out


def block_rows(spec: ArraySpec, source_dtype: np.dtype, chunk: int) -> int:
    row_bytes = max(spec.row_bytes, source_dtype.itemsize * int(np.prod(spec.row_shape, dtype=np.int64)), 1)
    return max(chunk, (BLOCK_BYTES // row_bytes) // chunk * chunk)


def source_bytes(m: Manifest) -> int:
    """The bytes of the source's per-row and per-sample arrays, uncompressed: the progress bar's total."""
    rows = {"row": m.num_rows, "sample": m.num_samples}
    return sum(rows.get(str(a.get("per", "row")), 0) * np.dtype(a["dtype"]).itemsize * int(np.prod(a["row_shape"]))
               for a in m.arrays.values())


def convert_shard(
    reader: CacheReader, position: int, backend: Backend, work: Path, specs: list[ArraySpec], chunk_rows: int, attrs: dict[str, Any],
    bar: tqdm | None = None,
) -> ShardEntry:
    """Copy one shard into ``work`` in the target backend and dtypes; check the source against its checksum.
    ``bar`` advances by the bytes read of the arrays :func:`source_bytes` counts."""
    entry = reader.manifest.shards[position]
    source = reader.shard(position)
    expected = {"row": entry.row_stop - entry.row_start, "sample": entry.sample_stop - entry.sample_start}
    rows = {}
    for spec in specs:
        info = reader.manifest.arrays[spec.name]
        shape = source.shape(spec.name)
        if source.dtype(spec.name) != np.dtype(info["dtype"]) or shape[1:] != tuple(info["row_shape"]):
            raise CorruptShardError(
                f"{source.path}: array {spec.name!r} is {source.dtype(spec.name)} {shape}, the manifest says "
                f"{info['dtype']} rows of {tuple(info['row_shape'])}; the shard is damaged"
            )
        want = expected.get(spec.per)
        if want is not None and shape[0] != want:
            raise CorruptShardError(
                f"{source.path}: array {spec.name!r} has {shape[0]} rows, the manifest says {want}; the shard is truncated"
            )
        rows[spec.name] = shape[0]
    changes_dtype = any(source.dtype(spec.name) != np.dtype(spec.dtype) for spec in specs)
    name = backend.shard_name(position)
    writer = backend.create(work / name, specs, chunk_rows, {**attrs, "shard_index": position, "row_start": entry.row_start,
                                                             "sample_start": entry.sample_start}, rows)
    source_parts: dict[str, tuple[str, tuple[int, ...], str]] = {}
    try:
        for spec in specs:
            source_dtype = source.dtype(spec.name)
            target_dtype = np.dtype(spec.dtype)
            digest = hashlib.sha256() if changes_dtype else None
            offset = 0
            for block in source.blocks(spec.name, block_rows(spec, source_dtype, writer.chunk_rows[spec.name])):
                if bar is not None and spec.per in expected:
                    bar.update(block.nbytes)
                if digest is not None:
                    digest.update(np.ascontiguousarray(block).tobytes())
                if block.dtype != target_dtype:
                    block = cast_block(block, target_dtype, entry.row_start + offset, reader.manifest.views, reader.path)
                writer.append({spec.name: block})
                offset += len(block)
            if digest is not None:
                source_parts[spec.name] = (source_dtype.name, source.shape(spec.name), digest.hexdigest())
    except BaseException:
        try:
            writer.close()
        except Exception:  # the work directory is removed anyway
            pass
        raise
    checksum = writer.close()
    source_checksum = combine_checksum(source_parts) if changes_dtype else checksum
    if source_checksum != entry.checksum:
        raise CorruptShardError(
            f"{source.path}: its content (checksum {source_checksum}) does not match the manifest's {entry.checksum}; "
            f"the source cache is damaged: re-dump it rather than convert it"
        )
    return ShardEntry(name, entry.row_start, entry.row_stop, entry.sample_start, entry.sample_stop, checksum)
