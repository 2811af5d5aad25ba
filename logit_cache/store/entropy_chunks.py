"""The per-array chunk layouts behind ``entropy_codec.py``'s Zarr codecs: numpy arrays to entropy-coded bytes and back.

Kept apart from the codec classes so that it can be used (and measured) without zarr's codec plumbing;
``entropy_codec.py``'s docstring is the contract of each layout, ``entropy_bits.py`` the symbol and
container layer they share (buckets, raw bits, zstd streams, the chunk header).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from numcodecs import Blosc

from .entropy_bits import ChunkReader, ChunkWriter, join, raw_bits, split

#: Position classes of the sorted-id model (half octaves of the column), the last holding every column from 2^8.5 on.
_POSITION_CLASSES = 18
#: Values below 2^exact are their own symbol; above, a symbol per (bit length, top ``mant`` bits below
#: the leading one), and the remaining low bits are stored as they are (they are close to uniform).
_ID_BUCKETS = (3, 2)
_COUNT_BUCKETS = (4, 1)
_CODE_BUCKETS = (5, 3)


# --------------------------------------------------------------------------------------------------
# Chunk coding, per codec (numpy in, bytes out and back)
# --------------------------------------------------------------------------------------------------


def _leading(mask: np.ndarray) -> np.ndarray:
    """Per row, how many leading entries of ``mask`` are true."""
    return np.cumprod(mask, axis=1, dtype=np.int64).sum(axis=1) if mask.shape[1] else np.zeros(len(mask), np.int64)


def _class_columns(width: int, full: bool) -> list[tuple[int, int]]:
    """The column range of each position class. Full rows (top-k): half octaves, floor(2 log2(j + 1)) (0, 1,
    2, 3, 4-5, 6-7, 8-10, ...: -1 B a row at top-50 and -4 at top-128 on Zipf ids against octaves). Ragged
    rows (sampled: ~14 ids of 50 columns): octaves 0, 1, 2-3, 4-7, ... (half octaves add streams too
    thin for their tables: +0.2 B a row). The last class holds every column beyond."""
    j = np.arange(width, dtype=np.float64)
    classes = np.floor(2 * np.log2(j + 1)) if full else np.where(j > 0, np.floor(np.log2(np.maximum(j, 1))) + 1, 0)
    classes = np.minimum(classes.astype(np.int64), _POSITION_CLASSES - 1)
    edges = np.searchsorted(classes, np.arange(_POSITION_CLASSES + 1))
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]


def encode_sorted_ids(ids: np.ndarray) -> bytes:
    """[rows, W] non-negative ids, each row strictly ascending then zero padding."""
    ids = np.asarray(ids).astype(np.int64, copy=False)
    rows, width = ids.shape
    if ids.size and ids.min() < 0:
        raise ValueError("logit_cache.sorted_ids: ids must be >= 0")
    n = 1 + _leading(ids[:, 1:] > ids[:, :-1]) if width else np.zeros(rows, np.int64)
    valid = np.arange(width) < n[:, None]
    if np.any(ids[~valid]):
        raise ValueError("logit_cache.sorted_ids: each row must hold strictly ascending ids followed by zero padding")
    out = ChunkWriter()
    out.ints(rows, width)
    out.categorical(n)
    gaps = np.diff(ids, axis=1, prepend=-1) - 1
    sym, raw, bits = split(gaps, *_ID_BUCKETS)
    for lo, hi in _class_columns(width, bool(n.size) and n.min() == width):
        out.categorical(sym[:, lo:hi][valid[:, lo:hi]])
    out.uniform(raw[valid], bits[valid])
    return out.finish()


def decode_sorted_ids(data: bytes) -> np.ndarray:
    src = ChunkReader(data)
    rows, width = src.ints(2)
    n = src.categorical(rows)
    valid = np.arange(width) < n[:, None]
    if n.size and n.min() == width:  # full rows (top-k): each class stream fills its columns
        sym = np.empty((rows, width), np.int64)
        for lo, hi in _class_columns(width, True):
            sym[:, lo:hi] = src.categorical(rows * (hi - lo)).reshape(rows, hi - lo)
        gaps = join(sym, src.uniform(raw_bits(sym, *_ID_BUCKETS)).reshape(rows, width), *_ID_BUCKETS)
        return np.cumsum(gaps + 1, axis=1) - 1
    sym = np.zeros((rows, width), np.int64)
    for lo, hi in _class_columns(width, False):
        part = valid[:, lo:hi]
        sym[:, lo:hi][part] = src.categorical(int(np.count_nonzero(part)))
    raw = np.zeros((rows, width), np.int64)
    raw[valid] = src.uniform(raw_bits(sym[valid], *_ID_BUCKETS))
    gaps = np.where(valid, join(sym, raw, *_ID_BUCKETS) + 1, 0)
    return np.where(valid, np.cumsum(gaps, axis=1) - 1, 0)


def encode_counts(counts: np.ndarray) -> bytes:
    """[rows, W] counts, each row positive counts then zeros."""
    counts = np.asarray(counts).astype(np.int64, copy=False)
    rows, width = counts.shape
    n = _leading(counts > 0)
    valid = np.arange(width) < n[:, None]
    if np.any(counts[~valid]):
        raise ValueError("logit_cache.counts: each row must hold positive counts followed by zeros")
    implied = (n > 0) & (counts.sum(axis=1) == width)  # sampled rows: M draws, so the last count follows
    out = ChunkWriter()
    out.ints(rows, width)
    out.categorical(np.where(implied, n, n + width + 1))
    coded = valid & ~(implied[:, None] & (np.arange(width) == (n - 1)[:, None]))
    sym, raw, bits = split(counts[coded] - 1, *_COUNT_BUCKETS)
    out.categorical(sym)
    out.uniform(raw, bits)
    return out.finish()


def decode_counts(data: bytes) -> np.ndarray:
    src = ChunkReader(data)
    rows, width = src.ints(2)
    kind = src.categorical(rows)
    implied = kind <= width
    n = np.where(implied, kind, kind - width - 1)
    columns = np.arange(width)
    valid = columns < n[:, None]
    last = implied[:, None] & (columns == (n - 1)[:, None])
    coded = valid & ~last
    sym = src.categorical(int(coded.sum()))
    out = np.zeros((rows, width), np.int64)
    out[coded] = join(sym, src.uniform(raw_bits(sym, *_COUNT_BUCKETS)), *_COUNT_BUCKETS) + 1
    out[last] = (width - out.sum(axis=1))[implied & (n > 0)]
    return out


def _blosc(typesize: int) -> Any:
    return Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=typesize)


#: Row classes of the value codes: floor(_CLASS_STEPS * log2(the row's median code)): rows of one class share
#: a zstd stream, so each stream's model fits rows of one flatness (-7 B a row at top-50 against one stream).
_CLASS_STEPS = 3
_CORRECTION_BUCKETS = (2, 1)
#: zstd level of the value streams: 11 (the first level that gains: 12-19 add <0.1%) takes 4% off them (-1.4 B
#: a row at top-50, -4 at top-128) for ~1.35x their encode time; the id streams gain <1% from it and stay at 3.
_VALUE_ZSTD_LEVEL = 11
#: log S (S = the other entries' summed exp(v - v_max)) is stored as its difference to the log of the
#: codes' own sum, in steps of 2^-_CORRECTION_BITS: a small integer (0.5 B a row). It bounds the mass the
#: entries below the first level (code 1, decoded as 0.25 / L) can take from the maximum in a confident
#: row (9 of them at 103 levels: 5e-5 of it). The tail's exactness no longer rests on it (``topk_log_tail``).
_CORRECTION_BITS = 8
#: Per-row levels: a row whose top-k-normalised maximum p_m = 1 / (1 + S) lies in [2^-(g+1)/4, 2^-g/4) uses
#: L * 2^(-g/8) levels (g <= _MAX_LEVEL_CLASS), so L_r^2 follows p_m: an entry's KL is about p_max / (6 L_r^2),
#: equal in every row (the allocation that minimises bits at a given mean KL: -0.1 bit an entry here) and
#: the mean KL no longer grows with how confident a teacher is.
_MAX_LEVEL_CLASS = 31
#: Narrower rows keep g = 0 (L levels in every row): their few entries gain less than g's symbol costs.
LEVEL_CLASS_MIN_WIDTH = 24


def _row_levels(levels: int, level_class: np.ndarray) -> np.ndarray:
    return levels * np.exp2(level_class * -0.125)


def _code_weights(codes: np.ndarray, row_levels: np.ndarray) -> np.ndarray:
    """exp(v^ - v_max) estimates of the codes, before the rescale (0 at the maximum, marked by code 0):
    sqrt(p / p_max) estimates; code 1 (sqrt ratio below 0.5 / L_r) decodes to 0.25 / L_r, never log(0)."""
    roots = np.maximum(codes - 1, 0.25) / row_levels[:, None]
    roots[codes == 0] = 0.0
    return np.square(roots)


def _row_classes(codes: np.ndarray) -> np.ndarray:
    """Per row, its class: the bucket of its (lower) median code, in 1/_CLASS_STEPS octaves."""
    median = np.partition(codes, (codes.shape[1] - 1) // 2, axis=1)[:, (codes.shape[1] - 1) // 2]
    return np.floor(_CLASS_STEPS * np.log2(np.maximum(median, 1))).astype(np.int64)


def encode_quantized_logits(values: np.ndarray, levels: int) -> bytes:
    """[rows, W] finite logits, quantized as the module docstring says."""
    v = np.asarray(values, dtype=np.float32)
    rows, width = v.shape
    if not np.all(np.isfinite(v)):
        raise ValueError("logit_cache.quantized_logits: values must be finite (the dump refuses non-finite rows)")
    out = ChunkWriter(_VALUE_ZSTD_LEVEL)
    out.ints(rows, width, levels)
    if rows == 0 or width == 0:
        return out.finish()
    first = np.argmax(v, axis=1)
    top = v[np.arange(rows), first]
    weights = np.exp(v.astype(np.float64) - top.astype(np.float64)[:, None])
    weights[np.arange(rows), first] = 0.0
    others = weights.sum(axis=1)
    level_class = np.minimum(np.floor(4 * np.log2(1 + others)), _MAX_LEVEL_CLASS).astype(np.int64)
    level_class *= width >= LEVEL_CLASS_MIN_WIDTH
    row_levels = _row_levels(levels, level_class)
    codes = np.rint(np.sqrt(weights) * row_levels[:, None]).astype(np.int64) + 1  # 1..L_r+1; 0 marks the maximum
    codes[np.arange(rows), first] = 0
    # the maxima as float16 (exact for a float16 cache's values; a float32 row is shifted by the rounding,
    # below 2^-11 of the maximum, which changes no probability), float32 where one would overflow
    with np.errstate(over="ignore"):
        half = bool(np.all(np.isfinite(top.astype(np.float16))))
    out.ints(int(half))
    out.section(_blosc(2 if half else 4).encode(np.ascontiguousarray(top, dtype="<f2" if half else "<f4")))
    classes = _row_classes(codes)
    out.categorical(classes)
    out.categorical(level_class)  # all 0 (narrow rows): nothing stored
    sym, raw, bits = split(codes, *_CODE_BUCKETS)
    order = np.argsort(classes, kind="stable")  # rows grouped by class: one stream each, raw bits alike
    sym, raw, bits = sym[order], raw[order], bits[order]
    for lo, hi in _runs(classes[order]):
        out.categorical(sym[lo:hi])
    out.uniform(raw, bits)
    if width > 1:
        # S as a correction to the codes' sum, zigzag-coded; S = 0 (every other entry below exp(-745) of the maximum) is its own symbol 0
        with np.errstate(divide="ignore"):
            step = np.rint((np.log(others) - np.log(_code_weights(codes, row_levels).sum(axis=1))) * (1 << _CORRECTION_BITS))
        zigzag = np.where(others > 0, np.where(step >= 0, 2 * step + 1, -2 * step), 0).astype(np.int64)
        sym, raw, bits = split(zigzag, *_CORRECTION_BUCKETS)
        out.categorical(sym)
        out.uniform(raw, bits)
    return out.finish()


def _runs(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of equal keys in a sorted array."""
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    bounds = [0, *edges.tolist(), len(sorted_keys)]
    return list(itertools.pairwise(bounds))


def decode_quantized_logits(data: bytes) -> np.ndarray:
    src = ChunkReader(data)
    rows, width, levels = src.ints(3)
    if rows == 0 or width == 0:
        return np.zeros((rows, width), np.float32)
    (half,) = src.ints(1)
    top = np.frombuffer(_blosc(2 if half else 4).decode(src.section()), "<f2" if half else "<f4").astype(np.float32)
    classes = src.categorical(rows)
    level_class = src.categorical(rows)
    if level_class.min(initial=0) < 0 or level_class.max(initial=0) > _MAX_LEVEL_CLASS:
        raise ValueError("logit_cache.quantized_logits: a chunk with row level classes out of range (a damaged chunk)")
    order = np.argsort(classes, kind="stable")
    sym = np.empty((rows, width), np.int64)
    for lo, hi in _runs(classes[order]):
        sym[lo:hi] = src.categorical((hi - lo) * width).reshape(hi - lo, width)
    grouped = join(sym, src.uniform(raw_bits(sym, *_CODE_BUCKETS)).reshape(rows, width), *_CODE_BUCKETS)
    codes = np.empty_like(grouped)
    codes[order] = grouped
    is_top = codes == 0
    marked = np.count_nonzero(is_top) == rows and is_top.any(axis=1).all()
    if len(top) != rows or not marked or codes.max() > levels + 1:
        raise ValueError("logit_cache.quantized_logits: a chunk whose rows do not each mark one maximum, or with codes "
                         "above its levels (a damaged chunk)")
    if width == 1:
        return top[:, None].copy()
    sym = src.categorical(rows)
    zigzag = join(sym, src.uniform(raw_bits(sym, *_CORRECTION_BUCKETS)), *_CORRECTION_BUCKETS)
    step = np.where(zigzag % 2 == 1, (zigzag - 1) // 2, -(zigzag // 2))
    # log of each entry's rescaled weight: the code's log weight plus the row's log S correction (S = 0:
    # -700, finite and negligible); never above the maximum (a tie with it rescaled up is set to it)
    logs = _LOG_ROOTS[codes] if levels + 1 < len(_LOG_ROOTS) else _log_roots(codes)
    correction = np.where(zigzag > 0, step * (1.0 / (1 << _CORRECTION_BITS)), -700.0)
    logs += (correction - 2 * np.log(_row_levels(levels, level_class)))[:, None]
    np.minimum(logs, 0.0, out=logs)
    logs[is_top] = 0.0
    return (top.astype(np.float64)[:, None] + logs).astype(np.float32)


def _log_roots(codes: np.ndarray) -> np.ndarray:
    """2 log of each code's root in units of 1 / L_r, before the rescale: 0 for the maximum (code 0)."""
    out = 2 * np.log(np.maximum(codes - 1, 0.25))
    out[codes == 0] = 0.0
    return out


#: :func:`_log_roots` of codes up to 4095, a table (the row's -2 log L_r and log S correction are added per row).
_LOG_ROOTS = _log_roots(np.arange(4096))
