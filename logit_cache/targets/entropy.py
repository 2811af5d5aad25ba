"""The ``entropy`` encoding: the logical arrays under their own names, each entropy-coded by a Zarr codec.

Unlike ``compact`` (stored arrays of other names that only our reader understands), an entropy cache
stores ``topk_indices``/``topk_logits`` or ``sampled_indices``/``sampled_counts`` under the logical
names, each with a codec of ``store/entropy_codec.py`` (its docstring has the bit layout), so a plain
``zarr.open_group(shard)["topk_indices"][:]`` gives the ids where logit-cache is installed. The other
arrays (``logsumexp``, ``topk_log_tail``, ``sampled_logits``) are stored as plain stores them (float32
or the value dtype, Blosc-zstd): exact.

What changes against plain, and why:

* **Top-k rows are stored in ascending-id order**, ``topk_logits`` permuted alike, so a plain read
  still gives (id, value) pairs that belong together. A codec sees one array only, and the set of a
  row's ids coded as sorted gaps costs log2 K! bits less than the ids in value order (K=50: 27 bytes).
  :func:`decode` re-sorts each row descending (ties: ascending ids) before anything else sees it.
* **Values are quantized** (``logit_cache.quantized_logits``): the row's maximum exact, S = the other
  entries' summed exp(v - v_max) to float32 precision, and sqrt(p / p_max) in :func:`levels` steps, a
  number that grows with K so that the decoding's KL to the float32 values stays near 8e-5
  nats/token at T=1 (the goal is <= 1e-4, and each halving of the KL costs K/2 bits a row;
  ``scripts/bench_lm_storage.py`` measures it). Decoded values are float32; a cache of value dtype
  float16 gets them rounded to float16.
* **Sampled rows are lossless**: ids, counts and logsumexp decode to exactly what was dumped.

Pure numpy on the host, rows independent: the dump's writer thread calls :func:`encode`, the reader
:func:`decode` on any gathered rows. The entropy coding itself runs in the codecs, per chunk, when zarr
writes and reads (numpy and zstd, which zarr's numcodecs brings: no extra package); HDF5 has no such
codecs (a filter plugin would be compiled C per platform), so an entropy cache is Zarr only (the
backend refuses the specs otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import CacheFormatError, UsageError
from ..store.base import ArraySpec
from ..store.entropy_codec import CountsCodec, QuantizedLogitsCodec, SortedIdsCodec
from .dtypes import count_dtype, index_dtype

#: The quantizer's KL per token at T=1 by the p_max = 1 estimate; measured on LM-like rows it is about half
#: (~8e-5 against the goal's 1e-4; at T=2 ~2e-3 against 1e-2).
KL_TARGET = 1.6e-4
#: The fewest quantization levels of sqrt(p / p_max), whatever K.
MIN_LEVELS = 63


def levels(width: int) -> int:
    """Levels for K values per row: an entry's KL at T=1 is about p_max / (6 L^2) (uniform error in the
    sqrt domain), K of them per row."""
    return max(MIN_LEVELS, math.ceil(math.sqrt(width / (6 * KL_TARGET))))


def _codec(name: str, width: int) -> tuple[str | None, tuple]:
    if name in ("topk_indices", "sampled_indices"):
        return SortedIdsCodec.codec_name, ()
    if name == "sampled_counts":
        return CountsCodec.codec_name, ()
    if name == "topk_logits":
        return QuantizedLogitsCodec.codec_name, (("levels", levels(width)),)
    return None, ()


def stored_specs(plain: list[ArraySpec], width: int) -> list[ArraySpec]:
    """The entropy layout of a kind's plain specs: the same arrays, the coded ones with their codec
    (top-k values stored float32, whatever the value dtype: that is what they decode to)."""
    out = []
    for spec in plain:
        codec, config = _codec(spec.name, width)
        if codec is None:
            out.append(spec)
            continue
        dtype = "float32" if spec.name == "topk_logits" else spec.dtype
        out.append(ArraySpec(spec.name, dtype, spec.row_shape, spec.per, compress=True, chunk_rows=spec.chunk_rows,
                             codec=codec, codec_config=config))
    return out


def encode(arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Logical rows to stored rows: top-k rows to ascending ids (values alike, float32); sampled rows,
    already ascending and left-aligned, checked and passed on."""
    out = dict(arrays)
    if "topk_indices" in arrays:
        ids, values = np.asarray(arrays["topk_indices"]), np.asarray(arrays.get("topk_logits"))
        if values.shape != ids.shape or ids.ndim != 2:
            raise UsageError(f"topk_logits {values.shape} and topk_indices {ids.shape} must be [rows, k] alike")
        _check_ids(ids, num_classes)
        order = np.argsort(ids, axis=1)
        out["topk_indices"] = np.take_along_axis(ids, order, axis=1)
        out["topk_logits"] = np.take_along_axis(values, order, axis=1).astype(np.float32, copy=False)
        if np.any(out["topk_indices"][:, 1:] == out["topk_indices"][:, :-1]):
            raise UsageError("the ids of a top-k row must be distinct; these repeat an id")
    if "sampled_indices" in arrays:
        ids, counts = np.asarray(arrays["sampled_indices"]), np.asarray(arrays["sampled_counts"])
        if ids.shape != counts.shape or ids.ndim != 2:
            raise UsageError(f"sampled_indices {ids.shape} and sampled_counts {counts.shape} must be [rows, m] alike")
        _check_ids(ids, num_classes)
        valid = counts > 0
        if np.any(valid[:, 1:] & ~valid[:, :-1]):
            raise UsageError("sampled rows must be left-aligned: every pad (count 0) after the row's ids, as targets.encode makes them")
        if np.any((ids[:, 1:] <= ids[:, :-1]) & valid[:, 1:]) or np.any(ids[~valid]):
            raise UsageError("sampled rows must hold ascending distinct ids, pads id 0, as targets.encode makes them")
    return out


def _check_ids(ids: np.ndarray, num_classes: int) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise UsageError(f"ids must lie in [0, {num_classes}); these reach {int(ids.min())}..{int(ids.max())}")


def decode(stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
    """Stored rows (as the codecs decode them) to the logical arrays: top-k rows re-sorted descending."""
    out = dict(stored)
    if "topk_indices" in stored:
        if "topk_logits" not in stored:
            raise CacheFormatError("an entropy top-k cache stores topk_logits beside topk_indices; it is missing")
        values, ids = np.asarray(stored["topk_logits"]), np.asarray(stored["topk_indices"])
        order = np.argsort(-values, axis=1, kind="stable")  # ties keep ascending ids, as stored
        out["topk_logits"] = np.take_along_axis(values, order, axis=1).astype(dtype, copy=False)
        out["topk_indices"] = np.take_along_axis(ids, order, axis=1).astype(index_dtype(num_classes), copy=False)
    if "sampled_indices" in stored:
        out["sampled_indices"] = np.asarray(stored["sampled_indices"]).astype(index_dtype(num_classes), copy=False)
        counts = np.asarray(stored["sampled_counts"])
        out["sampled_counts"] = counts.astype(count_dtype(counts.shape[1]), copy=False)
    return out
