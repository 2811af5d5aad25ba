"""The symbol and container layer of the ``entropy`` chunks: log-scale buckets with raw low bits, bit packing,
and the chunk's header and sections.

Split from ``entropy_chunks.py`` (the per-array layouts) so that each job reads on its own: this module
knows nothing of ids or logits, only integers >= 0. Values below 2^exact are their own symbol, larger
ones a log-scale bucket plus raw low bits (:func:`split`); each group of bucket symbols is one zstd
stream (its entropy stage fitted to that group), the raw bits are packed as they are. Everything is
whole-array numpy: a table look-up per symbol, no loop over rows or entries.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from numcodecs import Zstd

#: Chunk layout version. b"LCE1" (constriction ANS streams) was never shipped; b"LCE2" (top-k values with
#: their own tail sum, a separate logsumexp array) was never released (0.2.0): both are refused by name.
MAGIC = b"LCE3"
#: Raw low bits of one value, at most (the bit reader loads 64-bit words at byte offsets).
_MAX_RAW_BITS = 56
#: zstd level of the symbol streams (Huffman literals plus matches), unless a layout asks for another:
#: 19 buys ~1% over 3 on id streams at 5x the encode time.
ZSTD_LEVEL = 3
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

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = level
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
        packed = Zstd(level=self.level).encode(plain)
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
