"""The chunk coding behind ``entropy_codec.py``'s Zarr codecs: numpy arrays to entropy-coded bytes and back.

Kept apart from the codec classes so that it can be used (and measured) without zarr's codec plumbing;
``entropy_codec.py``'s docstring is the contract of each layout. Symbols: values below 2^exact are their
own symbol, larger ones a log-scale bucket plus raw low bits (:func:`split`); each group of bucket
symbols is one zstd stream (its entropy stage fitted to that group), the raw bits are packed as they
are. Everything is whole-array numpy: a table look-up per symbol, no loop over rows or entries.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from typing import Any

import numpy as np
from numcodecs import Blosc, Zstd

#: Chunk layout version: b"LCE1" chunks (constriction ANS streams) were never shipped and are refused.
MAGIC = b"LCE2"
#: Position classes of the sorted-id model: 0, 1, 2-3, 4-7, ..., >= 2^(_POSITION_CLASSES - 2).
_POSITION_CLASSES = 9
#: Values below 2^exact are their own symbol; above, a symbol per (bit length, top ``mant`` bits below
#: the leading one), and the remaining low bits are stored as they are (they are close to uniform).
_ID_BUCKETS = (3, 2)
_COUNT_BUCKETS = (4, 1)
_CODE_BUCKETS = (5, 3)
_CORRECTION_BUCKETS = (2, 1)
#: Raw low bits of one value, at most (the bit reader loads 64-bit words at byte offsets).
_MAX_RAW_BITS = 56
#: zstd level of the symbol streams (Huffman literals plus matches): 19 buys ~1% over 3 at 5x the encode time.
_ZSTD_LEVEL = 3
#: Stream modes in the header: symbols as bytes / uint16, zstd-compressed or stored as they are.
_RAW8, _RAW16, _ZSTD8, _ZSTD16 = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------------
# Symbols: log-scale buckets + raw low bits
# --------------------------------------------------------------------------------------------------


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values (0 for 0); exact for all values below 2^53."""
    out = np.zeros(x.shape, np.int64)
    positive = x > 0
    out[positive] = np.frexp(x[positive].astype(np.float64))[1]
    return out


def split(x: np.ndarray, exact: int, mant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values >= 0 to (bucket symbol, raw low bits, number of raw bits)."""
    x = x.astype(np.int64)
    big = x >= (1 << exact)
    nb = _bit_length(x)
    shift = np.where(big, nb - 1 - mant, 0)
    top = x >> shift
    sym = np.where(big, (1 << exact) + (nb - exact - 1) * (1 << mant) + top - (1 << mant), x)
    raw = np.where(big, x & ((np.int64(1) << shift) - 1), 0)
    return sym, raw, shift


def _tables(exact: int, mant: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket symbol: its smallest value and its number of raw bits (every symbol of 63-bit values)."""
    key = (exact, mant)
    if key not in _TABLES:
        sym = np.arange((1 << exact) + (63 - exact) * (1 << mant), dtype=np.int64)
        k = sym - (1 << exact)
        shift = np.where(k >= 0, (k >> mant) + exact - mant, 0)
        base = np.where(k >= 0, ((k & ((1 << mant) - 1)) + (1 << mant)) << shift, sym)
        _TABLES[key] = (base, shift)
    return _TABLES[key]


_TABLES: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def raw_bits(sym: np.ndarray, exact: int, mant: int) -> np.ndarray:
    """Number of raw bits that go with each bucket symbol."""
    return _tables(exact, mant)[1][sym]


def join(sym: np.ndarray, raw: np.ndarray, exact: int, mant: int) -> np.ndarray:
    """Inverse of :func:`split` (a table look-up and an add: the raw bits lie below the bucket's base)."""
    return _tables(exact, mant)[0][sym] + raw


def pack_bits(values: np.ndarray, bits: np.ndarray) -> bytes:
    """Values below 2^bits, concatenated little-endian bit by bit (vectorised: no overlap, so OR-reduce per word)."""
    values, bits = np.asarray(values, np.int64).ravel(), np.asarray(bits, np.int64).ravel()
    used = bits > 0
    values, bits = values[used].astype(np.uint64), bits[used]
    if bits.size == 0:
        return b""
    if bits.max() > _MAX_RAW_BITS:
        raise ValueError(f"raw fields are at most {_MAX_RAW_BITS} bits, got {int(bits.max())}")
    ends = np.cumsum(bits)
    pos = ends - bits
    word, off = pos >> 6, (pos & 63).astype(np.uint64)
    lo = values << off
    hi = (values >> np.uint64(1)) >> (np.uint64(63) - off)  # the bits that spill into the next word (0 at off 0)
    out = np.zeros(int(ends[-1] >> 6) + 2, np.uint64)
    starts = np.flatnonzero(np.diff(word, prepend=-1))
    out[word[starts]] |= np.bitwise_or.reduceat(lo, starts)
    out[word[starts] + 1] |= np.bitwise_or.reduceat(hi, starts)
    return out.astype("<u8").tobytes()[: (int(ends[-1]) + 7) // 8]


def unpack_bits(data: bytes, bits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits`: one unaligned 64-bit load per field (a strided view at byte offsets;
    fields end at bit 62 of a load at most, so int64's sign never reaches them)."""
    bits = np.asarray(bits, np.int64).ravel()
    ends = np.cumsum(bits)
    total = int(ends[-1]) if bits.size else 0
    if (total + 7) // 8 != len(data):
        raise ValueError("an entropy-coded chunk's raw bits do not match its symbols (a damaged or foreign chunk)")
    if total == 0:
        return np.zeros(bits.shape, np.int64)
    pos = ends - bits
    buf = np.frombuffer(bytes(data) + bytes(8), np.uint8)
    words = np.ndarray((len(buf) - 7,), "<i8", buffer=buf, strides=(1,))[pos >> 3]
    return (words >> (pos & 7)) & ((np.int64(1) << bits) - 1)


# --------------------------------------------------------------------------------------------------
# Chunk container: a header and byte sections (zstd symbol streams, packed raw bits)
# --------------------------------------------------------------------------------------------------


class ChunkWriter:
    """Collects header fields and sections; :meth:`finish` lays them out (:class:`ChunkReader` reads
    them back in the order they were added)."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.sections: list[bytes] = []

    def ints(self, *values: int) -> None:
        self.head += struct.pack(f"<{len(values)}q", *values)

    def section(self, data: bytes) -> None:
        self.ints(len(data))
        self.sections.append(data)

    def categorical(self, symbols: np.ndarray) -> None:
        """Symbols >= 0, one byte (or two) each, zstd-compressed: its Huffman/FSE stage is the model,
        fitted per stream (one present symbol: nothing is stored)."""
        symbols = np.asarray(symbols, np.int64).ravel()
        if symbols.size == 0:
            self.ints(0, 0)
            return
        low, high = int(symbols.min()), int(symbols.max())
        self.ints(low, high - low + 1)
        if high == low:
            return
        wide = high - low >= 256
        plain = (symbols - low).astype("<u2" if wide else np.uint8).tobytes()
        packed = Zstd(level=_ZSTD_LEVEL).encode(plain)
        mode = (_ZSTD16 if wide else _ZSTD8) if len(packed) < len(plain) else (_RAW16 if wide else _RAW8)
        self.ints(mode)
        self.section(packed if mode >= _ZSTD8 else plain)

    def uniform(self, values: np.ndarray, bits: np.ndarray) -> None:
        """Values below 2^bits (bits known to the reader), packed as they are."""
        self.section(pack_bits(values, bits))

    def finish(self) -> bytes:
        header = zlib.compress(bytes(self.head), 6)
        return b"".join([MAGIC, struct.pack("<I", len(header)), header, *self.sections])


class ChunkReader:
    """Reads what :class:`ChunkWriter` wrote, in the same order."""

    def __init__(self, data: bytes) -> None:
        data = memoryview(data)
        if bytes(data[:4]) != MAGIC:
            if bytes(data[:3]) == MAGIC[:3]:
                raise ValueError(f"an entropy-coded chunk of layout version {bytes(data[:4])!r}; this logit-cache reads "
                                 f"{MAGIC!r} only (rewrite the cache with this version: logit-cache dump --encoding entropy)")
            raise ValueError(f"not an entropy-coded logit-cache chunk (it starts {bytes(data[:4])!r}, expected {MAGIC!r})")
        (length,) = struct.unpack_from("<I", data, 4)
        self.head = zlib.decompress(data[8 : 8 + length])
        self.at = 0
        self.data, self.body = data, 8 + length

    def ints(self, count: int) -> tuple[int, ...]:
        values = struct.unpack_from(f"<{count}q", self.head, self.at)
        self.at += 8 * count
        return values

    def section(self) -> memoryview:
        (length,) = self.ints(1)
        self.body += length
        if self.body > len(self.data):
            raise ValueError("an entropy-coded chunk ends before its sections do (a damaged chunk)")
        return self.data[self.body - length : self.body]

    def categorical(self, count: int) -> np.ndarray:
        low, span = self.ints(2)
        if span <= 1:
            return np.full(count, low, np.int64)
        (mode,) = self.ints(1)
        data = self.section()
        plain = Zstd().decode(data) if mode >= _ZSTD8 else data
        symbols = np.frombuffer(plain, "<u2" if mode in (_RAW16, _ZSTD16) else np.uint8)
        if len(symbols) != count:
            raise ValueError(f"an entropy-coded chunk holds {len(symbols)} symbols where {count} were expected (a damaged chunk)")
        return symbols.astype(np.int64) + low

    def uniform(self, bits: np.ndarray) -> np.ndarray:
        return unpack_bits(self.section(), bits)


# --------------------------------------------------------------------------------------------------
# Chunk coding, per codec (numpy in, bytes out and back)
# --------------------------------------------------------------------------------------------------


def _leading(mask: np.ndarray) -> np.ndarray:
    """Per row, how many leading entries of ``mask`` are true."""
    return np.cumprod(mask, axis=1, dtype=np.int64).sum(axis=1) if mask.shape[1] else np.zeros(len(mask), np.int64)


def _class_columns(width: int) -> list[tuple[int, int]]:
    """The column range of each position class (0, 1, 2-3, 4-7, ..., the rest), empty ones included."""
    edges = [0] + [min(width, 1 << c) for c in range(_POSITION_CLASSES - 1)] + [width]
    return [(min(lo, width), max(min(lo, width), hi)) for lo, hi in itertools.pairwise(edges)]


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
    for lo, hi in _class_columns(width):
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
        for lo, hi in _class_columns(width):
            sym[:, lo:hi] = src.categorical(rows * (hi - lo)).reshape(rows, hi - lo)
        gaps = join(sym, src.uniform(raw_bits(sym, *_ID_BUCKETS)).reshape(rows, width), *_ID_BUCKETS)
        return np.cumsum(gaps + 1, axis=1) - 1
    sym = np.zeros((rows, width), np.int64)
    for lo, hi in _class_columns(width):
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


#: log S is stored as its difference to the log of the codes' own sum, in steps of 2^-24 (float32's
#: precision of a log near 1): a small integer, where float32 log S took 4 bytes.
_CORRECTION_STEP = 2.0**-24


def _code_weights(codes: np.ndarray, levels: int) -> np.ndarray:
    """exp(v^ - v_max) estimates of the codes, before the rescale (0 at the maximum, marked by code 0):
    sqrt(p / p_max) estimates; code 1 (sqrt ratio below 0.5 / L) decodes to 0.25 / L, never log(0)."""
    roots = np.maximum(codes - 1, 0.25) * (1.0 / levels)
    roots[codes == 0] = 0.0
    return np.square(roots)


def encode_quantized_logits(values: np.ndarray, levels: int) -> bytes:
    """[rows, W] finite logits, quantized as the module docstring says."""
    v = np.asarray(values, dtype=np.float32)
    rows, width = v.shape
    if not np.all(np.isfinite(v)):
        raise ValueError("logit_cache.quantized_logits: values must be finite (the dump refuses non-finite rows)")
    out = ChunkWriter()
    out.ints(rows, width, levels)
    if rows == 0 or width == 0:
        return out.finish()
    first = np.argmax(v, axis=1)
    top = v[np.arange(rows), first]
    rel = v.astype(np.float64) - top.astype(np.float64)[:, None]
    weights = np.exp(rel)
    codes = np.rint(np.sqrt(weights) * levels).astype(np.int64) + 1  # 1..L+1; 0 marks the maximum
    codes[np.arange(rows), first] = 0
    weights[np.arange(rows), first] = 0.0
    others = weights.sum(axis=1)
    # the maxima: float16 where that is exact (a float16 cache's values are), else float32
    half = bool(np.all(top.astype(np.float16).astype(np.float32) == top))
    out.ints(int(half))
    out.section(_blosc(2 if half else 4).encode(np.ascontiguousarray(top, dtype="<f2" if half else "<f4")))
    sym, raw, bits = split(codes, *_CODE_BUCKETS)
    out.categorical(sym)
    out.uniform(raw, bits)
    if width > 1:
        # S as a correction to the codes' sum, zigzag-coded; S = 0 (every other entry below exp(-745) of the maximum) is its own symbol 0
        with np.errstate(divide="ignore"):
            step = np.rint((np.log(others) - np.log(_code_weights(codes, levels).sum(axis=1))) / _CORRECTION_STEP)
        zigzag = np.where(others > 0, np.where(step >= 0, 2 * step + 1, -2 * step), 0).astype(np.int64)
        sym, raw, bits = split(zigzag, *_CORRECTION_BUCKETS)
        out.categorical(sym)
        out.uniform(raw, bits)
    return out.finish()


def _scale(weights: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row, the factor that makes ``weights`` sum to ``target`` (1 where they sum to 0 or it is not finite)."""
    total = weights.sum(axis=1)
    return np.where((total > 0) & np.isfinite(target), target / np.where(total > 0, total, 1.0), 1.0)


def decode_quantized_logits(data: bytes) -> np.ndarray:
    src = ChunkReader(data)
    rows, width, levels = src.ints(3)
    if rows == 0 or width == 0:
        return np.zeros((rows, width), np.float32)
    (half,) = src.ints(1)
    top = np.frombuffer(_blosc(2 if half else 4).decode(src.section()), "<f2" if half else "<f4").astype(np.float32)
    sym = src.categorical(rows * width)
    codes = join(sym, src.uniform(raw_bits(sym, *_CODE_BUCKETS)), *_CODE_BUCKETS).reshape(rows, width)
    is_top = codes == 0
    if len(top) != rows or np.count_nonzero(is_top) != rows or not is_top.any(axis=1).all():
        raise ValueError("logit_cache.quantized_logits: a chunk whose rows do not each mark one maximum (a damaged chunk)")
    weights = _code_weights(codes, levels)
    if width == 1:
        return top[:, None].copy()
    sym = src.categorical(rows)
    zigzag = join(sym, src.uniform(raw_bits(sym, *_CORRECTION_BUCKETS)), *_CORRECTION_BUCKETS)
    step = np.where(zigzag % 2 == 1, (zigzag - 1) // 2, -(zigzag // 2))
    total = weights.sum(axis=1)
    # S = 0: kept finite, and negligible
    target = np.where(zigzag > 0, total * np.exp(step * _CORRECTION_STEP), 1e-300)
    weights *= _scale(weights, target)[:, None]
    # never above the maximum (ties with it, rescaled to S, could pass it): those are set
    # to it, and the rest rescaled once more to keep S
    capped = weights >= 1.0
    if capped.any():
        weights = np.minimum(weights, 1.0)
        free = np.where(capped, 0.0, weights)
        weights = np.where(capped, 1.0, free * _scale(free, np.maximum(target - capped.sum(axis=1), 1e-300))[:, None])
        weights = np.minimum(weights, 1.0)
    with np.errstate(divide="ignore"):
        out = (top.astype(np.float64)[:, None] + np.log(weights)).astype(np.float32)
    out[is_top] = top  # one per row, in row order
    return out
