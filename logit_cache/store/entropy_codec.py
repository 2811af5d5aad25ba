"""Zarr v3 codecs of the ``entropy`` encoding: each chunk entropy-coded with models fitted to it.

Why codecs and not stored byte layouts: with logit-cache installed, ``zarr.open_group(shard)[name][:]``
returns the decoded array in any process (zarr finds the classes through the ``zarr.codecs`` entry
points in pyproject.toml, and :func:`register_codecs` registers them when ``logit_cache.store`` is
imported), so other tools read an entropy cache without our reader. Without logit-cache, zarr refuses
the array naming the codec (``logit_cache.sorted_ids``...), i.e. the package to install. Each codec is
followed by ``crc32c`` in the array's pipeline: a damaged chunk fails its checksum before it is
decoded, never decoding into wrong values.

A codec sees one chunk of one array, so every array is self-contained:

``logit_cache.sorted_ids`` (integer [rows, W])
    Each row: strictly ascending ids, then zero padding (top-k rows as ``targets/entropy.py`` stores
    them; sampled rows as they are). Coded per row: the row's length n, then its gaps g_0 = s_0,
    g_j = s_j - s_{j-1} - 1 as log-scale buckets (categorical, one model per position class: half
    octaves 0, 1, 2, 3, 4-5, 6-7, 8-10, ... where every row is full (top-k), octaves 0, 1, 2-3, 4-7,
    ... where rows are ragged (sampled); gaps grow along a row, and with frequency-sorted
    vocabularies the first ids are small) plus the bits below each bucket's leading bits, uniform.
``logit_cache.counts`` (integer [rows, W])
    Each row: positive counts then zeros. A row's kind (its count n, and whether it sums to W, as
    sampled counts do, which makes its last count implied) is one categorical symbol; counts - 1
    are bucketed like gaps.
``logit_cache.quantized_logits`` (float [rows, W], configuration ``levels`` L)
    Lossy, self-contained per row: the row's maximum v_max as float16 (exact for float16 values; float32
    values are shifted by its rounding, < 2^-11 relative, which changes no probability; float32 for a
    chunk where a maximum overflows float16; its first position marked by code 0), and codes
    c_j = round(L_r * exp((v_j - v_max) / 2)) + 1: levels spaced evenly in sqrt(p / p_max), the spacing
    that costs the same KL per entry at T=1 (``targets/compact.py`` explains why), bucketed like gaps.
    L_r = L 2^(-g/8), g = floor(4 log2(1 + S)) (S = sum over the other entries of exp(v_j - v_max), so
    1 / (1 + S) is the row's top-k-normalised maximum): an entry's KL, p_max / (6 L_r^2), is then alike
    in every row. Each row's symbol names g and its class, floor(3 log2 of its median code); the codes
    of the rows of one class form one stream (a flat row's codes and a peaked row's have different
    models). log S is kept to 2^-8 as a zigzag-coded correction to the codes' own sum, and decoding gives
    v_max + 2 log((c_j - 1) / L_r) + that correction (code 1: 0.25 for c_j - 1), never above v_max.
    The row's top-k mass is *not* kept to float32 here: the top-k encoding keeps the tail exact in
    ``topk_log_tail`` and derives the logsumexp from it and these values (``targets/entropy.py``), so
    the values' own sum needs little side data (layout ``LCE2`` stored log S to 2^-24: 2.4 B a row).

Symbol streams (row lengths, bucket symbols per group) are one byte a symbol (two where a stream spans more
than 256 values) compressed by zstd (numcodecs, which zarr depends on; level 3, the value streams 11): its
Huffman literal coder is the per-chunk static model (within 1-3% of the histogram's entropy on id streams;
5-10% on the value streams, with their Huffman tables and skewed symbols, the one-bit floor of a code: ~2 B
a row at top-50) and its matches catch repeats. The raw low bits are packed as they are. Both decode
vectorised (zstd in C, the bits by one unaligned 64-bit load per field), ~10x faster than the first layout's
ANS streams (``constriction``, one binary search a symbol). A chunk is decoded whole; its rows are then
independent (any subset, any order, are the same rows).

Chunk bytes: ``b"LCE3"`` (the layout version, ``entropy_bits.MAGIC``; other versions are refused naming
it), uint32 header length, the zlib-compressed header (int64 fields: shapes, per stream its smallest symbol, span, mode
and byte length), then the sections in order. zstd frames are a stable format (RFC 8878), so a chunk
reads the same with any zstd version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer

from .entropy_bits import pack_bits, unpack_bits
from .entropy_chunks import (
    decode_counts,
    decode_quantized_logits,
    decode_sorted_ids,
    encode_counts,
    encode_quantized_logits,
    encode_sorted_ids,
)

__all__ = ["CODECS", "LOSSY_CODECS", "CountsCodec", "QuantizedLogitsCodec", "SortedIdsCodec", "decode_counts",
           "decode_quantized_logits", "decode_sorted_ids", "encode_counts", "encode_quantized_logits", "encode_sorted_ids",
           "make_codec", "pack_bits", "register_codecs", "unpack_bits"]


# --------------------------------------------------------------------------------------------------
# Zarr v3 codecs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EntropyCodec(ArrayBytesCodec):
    """Shared plumbing: to and from the chunk's numpy array, name and configuration in metadata."""

    is_fixed_size = False
    codec_name = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _EntropyCodec:
        return cls(**dict(data.get("configuration") or {}))

    def to_dict(self) -> dict[str, Any]:
        config = self._config()
        return {"name": self.codec_name, "configuration": config} if config else {"name": self.codec_name}

    def _config(self) -> dict[str, Any]:
        return {}

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
        raise NotImplementedError(f"{self.codec_name} output sizes depend on the data")

    def _encode_array(self, array: np.ndarray) -> bytes:
        raise NotImplementedError

    def _decode_array(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: Any) -> Buffer | None:
        array = np.asarray(chunk_array.as_ndarray_like())
        if array.ndim != 2:
            raise ValueError(f"{self.codec_name} codes 2-D chunks [rows, width], got shape {array.shape}")
        return chunk_spec.prototype.buffer.from_bytes(self._encode_array(array))

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: Any) -> NDBuffer:
        decoded = self._decode_array(chunk_bytes.to_bytes())
        dtype = chunk_spec.dtype.to_native_dtype()
        if decoded.shape != tuple(chunk_spec.shape):
            raise ValueError(f"{self.codec_name}: a chunk decoded to shape {decoded.shape}, expected {tuple(chunk_spec.shape)}")
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(decoded.astype(dtype))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: Any) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: Any) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)


@dataclass(frozen=True)
class SortedIdsCodec(_EntropyCodec):
    codec_name = "logit_cache.sorted_ids"

    def _encode_array(self, array: np.ndarray) -> bytes:
        return encode_sorted_ids(array)

    def _decode_array(self, data: bytes) -> np.ndarray:
        return decode_sorted_ids(data)


@dataclass(frozen=True)
class CountsCodec(_EntropyCodec):
    codec_name = "logit_cache.counts"

    def _encode_array(self, array: np.ndarray) -> bytes:
        return encode_counts(array)

    def _decode_array(self, data: bytes) -> np.ndarray:
        return decode_counts(data)


@dataclass(frozen=True)
class QuantizedLogitsCodec(_EntropyCodec):
    levels: int = 255

    codec_name = "logit_cache.quantized_logits"

    def __post_init__(self) -> None:
        if not isinstance(self.levels, int) or not 1 <= self.levels < (1 << 20):
            raise ValueError(f"logit_cache.quantized_logits: levels must be an integer in [1, 2^20), got {self.levels!r}")

    def _config(self) -> dict[str, Any]:
        return {"levels": self.levels}

    def _encode_array(self, array: np.ndarray) -> bytes:
        return encode_quantized_logits(array, self.levels)

    def _decode_array(self, data: bytes) -> np.ndarray:
        return decode_quantized_logits(data)


#: Codec name -> class; the names in pyproject.toml's ``zarr.codecs`` entry points.
CODECS: dict[str, type[_EntropyCodec]] = {cls.codec_name: cls for cls in (SortedIdsCodec, CountsCodec, QuantizedLogitsCodec)}
#: Codecs whose decoded values differ from the values written: a shard's checksum of such an array is over
#: what it reads back (the writer reads each written block back), so verify and readers check what they get.
LOSSY_CODECS = frozenset({QuantizedLogitsCodec.codec_name})


def make_codec(name: str, config: tuple[tuple[str, Any], ...] = ()) -> _EntropyCodec:
    """The codec instance an :class:`~logit_cache.store.base.ArraySpec`'s ``codec`` names."""
    if name not in CODECS:
        raise ValueError(f"unknown logit-cache codec {name!r}; known: {', '.join(CODECS)}")
    return CODECS[name](**dict(config))


def register_codecs() -> None:
    """Register the codecs with zarr (the entry points do the same lazily in processes that never
    import logit_cache.store)."""
    from zarr.registry import register_codec

    for name, cls in CODECS.items():
        register_codec(name, cls)
