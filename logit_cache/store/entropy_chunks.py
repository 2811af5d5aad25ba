"""The chunk coding behind ``entropy_codec.py``'s Zarr codecs: numpy arrays to entropy-coded bytes and back.

Kept apart from the codec classes so that it can be used (and measured) without zarr's codec plumbing;
``entropy_codec.py``'s docstring is the contract of each layout. Symbols: values below 2^exact are their
own symbol, larger ones a log-scale bucket plus raw low bits (:func:`split`); each group of symbols is
coded with a categorical model fitted to it (its histogram in the chunk header) or uniform, all in one
``constriction`` ANS stream per chunk.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from ..errors import MissingPackageError

MAGIC = b"LCE1"
#: Position classes of the sorted-id model: 0, 1, 2-3, 4-7, ..., >= 2^(_POSITION_CLASSES - 2).
_POSITION_CLASSES = 9
#: Values below 2^exact are their own symbol; above, a symbol per (bit length, top ``mant`` bits below
#: the leading one), and the remaining low bits are coded uniform.
_ID_BUCKETS = (3, 2)
_COUNT_BUCKETS = (4, 1)
_CODE_BUCKETS = (4, 2)
#: Frequencies of a histogram in the header are scaled to this total (uint16 each).
_FREQ_TOTAL = 1 << 15
#: Uniform raw bits are coded at most this many per symbol.
_RAW_BITS = 16


def constriction() -> Any:
    """The ``constriction`` module, or a MissingPackageError saying how to install it."""
    try:
        import constriction as module
    except ImportError:
        raise MissingPackageError(
            "entropy-coded caches (--encoding entropy) need the constriction package: pip install 'logit-cache[entropy]'"
        ) from None
    return module


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


def raw_bits(sym: np.ndarray, exact: int, mant: int) -> np.ndarray:
    """Number of raw bits that go with each bucket symbol."""
    k = sym.astype(np.int64) - (1 << exact)
    return np.where(k >= 0, (k >> mant) + exact - mant, 0)


def join(sym: np.ndarray, raw: np.ndarray, exact: int, mant: int) -> np.ndarray:
    """Inverse of :func:`split`."""
    sym = sym.astype(np.int64)
    k = sym - (1 << exact)
    big = k >= 0
    shift = np.where(big, (k >> mant) + exact - mant, 0)
    top = (k & ((1 << mant) - 1)) + (1 << mant)
    return np.where(big, (top << shift) | raw.astype(np.int64), sym)


# --------------------------------------------------------------------------------------------------
# Chunk container: a header and one ANS stream of several symbol groups
# --------------------------------------------------------------------------------------------------


def _model(freqs: np.ndarray) -> Any:
    return constriction().stream.model.Categorical(freqs.astype(np.float64), perfect=False)


class ChunkWriter:
    """Collects header fields and symbol groups; :meth:`finish` codes the groups in one ANS stream
    (in reverse, so that :class:`ChunkReader` decodes them in the order they were added)."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.groups: list[tuple[np.ndarray, Any, np.ndarray | None]] = []

    def ints(self, *values: int) -> None:
        self.head += struct.pack(f"<{len(values)}q", *values)

    def blob(self, data: bytes) -> None:
        self.ints(len(data))
        self.head += data

    def categorical(self, symbols: np.ndarray) -> None:
        """Symbols >= 0 with a histogram fitted to them (one present symbol: nothing is coded)."""
        symbols = np.asarray(symbols, np.int64).ravel()
        if symbols.size == 0:
            self.ints(0, 0)
            return
        low, high = int(symbols.min()), int(symbols.max())
        self.ints(low, high - low + 1)
        if high == low:
            return
        counts = np.bincount(symbols - low, minlength=high - low + 1)
        freqs = np.where(counts > 0, np.maximum(1, np.rint(counts * (_FREQ_TOTAL / counts.sum()))), 0).astype(np.uint16)
        self.blob(freqs.tobytes())
        self.groups.append(((symbols - low).astype(np.int32), _model(freqs), None))

    def uniform(self, values: np.ndarray, bits: np.ndarray) -> None:
        """Values below 2^bits (bits known to the reader), coded as they are, _RAW_BITS at a time."""
        values, bits = np.asarray(values, np.int64).ravel(), np.asarray(bits, np.int64).ravel()
        while bits.size and bits.max() > 0:
            take = np.minimum(bits, _RAW_BITS)
            used = take > 0
            sizes = (np.int64(1) << take[used]).astype(np.int32)
            self.groups.append(((values[used] & (sizes - 1)).astype(np.int32), constriction().stream.model.Uniform(), sizes))
            values, bits = values >> take, bits - take

    def finish(self) -> bytes:
        coder = constriction().stream.stack.AnsCoder()
        for symbols, model, params in reversed(self.groups):
            if params is None:
                coder.encode_reverse(symbols, model)
            else:
                coder.encode_reverse(symbols, model, params)
        header = zlib.compress(bytes(self.head), 6)
        words = coder.get_compressed().astype("<u4", copy=False)
        return MAGIC + struct.pack("<I", len(header)) + header + words.tobytes()


class ChunkReader:
    """Reads what :class:`ChunkWriter` wrote, in the same order."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != MAGIC:
            raise ValueError(f"not an entropy-coded logit-cache chunk (it starts {bytes(data[:4])!r}, expected {MAGIC!r})")
        (length,) = struct.unpack_from("<I", data, 4)
        self.head = zlib.decompress(data[8 : 8 + length])
        self.at = 0
        words = np.frombuffer(data, dtype="<u4", offset=8 + length).astype(np.uint32)
        self.coder = constriction().stream.stack.AnsCoder(words)

    def ints(self, count: int) -> tuple[int, ...]:
        values = struct.unpack_from(f"<{count}q", self.head, self.at)
        self.at += 8 * count
        return values

    def blob(self) -> bytes:
        (length,) = self.ints(1)
        self.at += length
        return self.head[self.at - length : self.at]

    def categorical(self, count: int) -> np.ndarray:
        low, span = self.ints(2)
        if span <= 1:
            return np.full(count, low, np.int64)
        freqs = np.frombuffer(self.blob(), np.uint16)
        if count == 0:
            return np.zeros(0, np.int64)
        return self.coder.decode(_model(freqs), count).astype(np.int64) + low

    def uniform(self, bits: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits, np.int64).ravel()
        values = np.zeros(bits.shape, np.int64)
        shift = 0
        while bits.size and bits.max() > 0:
            take = np.minimum(bits, _RAW_BITS)
            used = take > 0
            sizes = (np.int64(1) << take[used]).astype(np.int32)
            values[used] |= self.coder.decode(constriction().stream.model.Uniform(), sizes).astype(np.int64) << shift
            bits, shift = bits - take, shift + _RAW_BITS
        return values


# --------------------------------------------------------------------------------------------------
# Chunk coding, per codec (numpy in, bytes out and back)
# --------------------------------------------------------------------------------------------------


def _leading(mask: np.ndarray) -> np.ndarray:
    """Per row, how many leading entries of ``mask`` are true."""
    return np.cumprod(mask, axis=1, dtype=np.int64).sum(axis=1) if mask.shape[1] else np.zeros(len(mask), np.int64)


def _position_classes(width: int) -> np.ndarray:
    return np.minimum(_bit_length(np.arange(width, dtype=np.int64)), _POSITION_CLASSES - 1)


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
    classes = np.broadcast_to(_position_classes(width), ids.shape)
    for c in range(_POSITION_CLASSES):
        out.categorical(sym[valid & (classes == c)])
    out.uniform(raw[valid], bits[valid])
    return out.finish()


def decode_sorted_ids(data: bytes) -> np.ndarray:
    src = ChunkReader(data)
    rows, width = src.ints(2)
    n = src.categorical(rows)
    valid = np.arange(width) < n[:, None]
    classes = np.broadcast_to(_position_classes(width), (rows, width))
    sym = np.zeros((rows, width), np.int64)
    for c in range(_POSITION_CLASSES):
        where = valid & (classes == c)
        sym[where] = src.categorical(int(where.sum()))
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
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=typesize)


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
    others = weights.sum(axis=1) - 1.0  # exp(0) = 1 at the maximum
    with np.errstate(divide="ignore"):
        log_others = np.log(np.maximum(others, 0.0)).astype(np.float32)
    codes = np.rint(np.sqrt(weights) * levels).astype(np.int64) + 1  # 1..L+1; 0 marks the maximum
    codes[np.arange(rows), first] = 0
    out.blob(_blosc(4).encode(np.ascontiguousarray(top, dtype="<f4")))
    out.blob(_blosc(4).encode(np.ascontiguousarray(log_others, dtype="<f4")))
    sym, raw, bits = split(codes, *_CODE_BUCKETS)
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
    top = np.frombuffer(_blosc(4).decode(src.blob()), "<f4")
    log_others = np.frombuffer(_blosc(4).decode(src.blob()), "<f4").astype(np.float64)
    sym = src.categorical(rows * width)
    codes = join(sym, src.uniform(raw_bits(sym, *_CODE_BUCKETS)), *_CODE_BUCKETS).reshape(rows, width)
    is_top = codes == 0
    # sqrt(p / p_max) estimates; code 1 (sqrt ratio below 0.5 / L) decodes to 0.25 / L, never log(0)
    roots = np.maximum(codes - 1, 0.25).astype(np.float64) * (1.0 / levels)
    roots[is_top] = 0.0
    weights = np.square(roots)
    # S = 0: every other entry below exp(-745) of the maximum; kept finite, and negligible
    target = np.maximum(np.exp(log_others), 1e-300)
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
    out[is_top] = np.broadcast_to(top[:, None], out.shape)[is_top]
    return out
