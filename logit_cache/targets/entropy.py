"""The ``entropy`` encoding: the logical arrays under their own names, each entropy-coded by a Zarr codec.

Unlike ``compact`` (stored arrays of other names that only our reader understands), an entropy cache
stores ``topk_indices``/``topk_logits`` or ``sampled_indices``/``sampled_counts`` under the logical
names, each with a codec of ``store/entropy_codec.py`` (its docstring has the bit layout), so a plain
``zarr.open_group(shard)["topk_indices"][:]`` gives the ids where logit-cache is installed. The other
arrays (``topk_log_tail``, the sampled kind's ``logsumexp`` and ``sampled_logits``) are stored as plain
stores them (float32 or the value dtype, Blosc-zstd): exact.

What changes against plain, and why:

* **Top-k rows are stored in ascending-id order**, ``topk_logits`` permuted alike, so a plain read
  still gives (id, value) pairs that belong together. A codec sees one array only, and the set of a
  row's ids coded as sorted gaps costs log2 K! bits less than the ids in value order (K=50: 27 bytes).
  :func:`decode` re-sorts each row descending (ties: ascending ids) before anything else sees it.
* **Values are quantized** (``logit_cache.quantized_logits``): the row's maximum (float16) and sqrt(p / p_max)
  in steps of 1 / L_r, L_r = :func:`levels` (a number that grows with K) scaled down for flatter rows, so
  that the decoding's KL to the float32 values stays near 9e-5 nats/token at T=1 (the goal is <= 1e-4,
  and each halving of the KL costs K/2 bits a row; ``scripts/bench_lm_storage.py`` measures it).
  Decoded values are float32; a cache of value dtype float16 gets them rounded to float16.
* **The top-k logsumexp is derived, not stored**: the tail's log-mass ``topk_log_tail`` is kept exact
  (float32, as the dump computed it; computed from the values and logsumexp where a caller gives
  none) and :func:`decode` returns logsumexp = log sum_k exp(v^_k) - log(1 - tail), the row total
  that makes the decoded top-k plus the exact tail sum to 1. That is what the loss computes from a
  stored tail anyway (``targets.topk_log_probs`` replaces the logsumexp by it), so no reader sees a
  difference; against the dumped logsumexp it differs by the values' rounding (~1e-3 at top-50) and
  saves its 3.3 B a row (4 B float32, which no compressor shrinks much).
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
from ..store.entropy_chunks import LEVEL_CLASS_MIN_WIDTH
from ..store.entropy_codec import CountsCodec, QuantizedLogitsCodec, SortedIdsCodec
from .batch import LOG_MASS_FLOOR
from .dtypes import count_dtype, index_dtype

#: The quantizer's KL per token at T=1, K p_max / (6 L_r^2) per row with the codec's per-row levels L_r (L_r^2
#: follows the row's p_max, so this holds whatever the teacher's confidence): measured on LM-like rows about
#: 0.8 of it (~8.5e-5 against the goal's 1e-4; the entries below the first level and the tail's mass make
#: up the rest), at T=2 ~2e-3 at top-128 against 1e-2. At most 1.19x it (every row at the top of its class).
KL_TARGET = 1.1e-4
#: Rows narrower than the codec's LEVEL_CLASS_MIN_WIDTH have L levels in every row, so their KL follows the
#: mean p_max: this estimate at p_max = 1 measures about half (~8e-5 at top-10 of 1,000 classes).
KL_TARGET_NARROW = 1.9e-4
#: The fewest quantization levels of sqrt(p / p_max), whatever K.
MIN_LEVELS = 63


def levels(width: int) -> int:
    """Levels for K values per row (the most confident rows'; flatter rows get fewer): an entry's KL at
    T=1 is about p_max / (6 L^2) (uniform error in the sqrt domain), K of them per row."""
    target = KL_TARGET if width >= LEVEL_CLASS_MIN_WIDTH else KL_TARGET_NARROW
    return max(MIN_LEVELS, math.ceil(math.sqrt(width / (6 * target))))


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
    topk = any(spec.name == "topk_indices" for spec in plain)
    for spec in plain:
        if topk and spec.name == "logsumexp":
            continue  # derived from the values and the exact tail (module docstring)
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
        if "topk_log_tail" not in arrays:
            if "logsumexp" not in arrays:
                raise UsageError("an entropy top-k row needs topk_log_tail, or logsumexp to derive it from")
            out["topk_log_tail"] = _log_tail(values, np.asarray(arrays["logsumexp"]))
        out["topk_log_tail"] = np.asarray(out["topk_log_tail"]).astype(np.float32, copy=False)
        out.pop("logsumexp", None)
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


def _logsumexp_rows(values: np.ndarray) -> np.ndarray:
    wide = values.astype(np.float64)
    top = wide.max(axis=1) if wide.shape[1] else np.zeros(len(wide))
    return top + np.log(np.exp(wide - top[:, None]).sum(axis=1))


def _logsumexp_sorted(values: np.ndarray) -> np.ndarray:
    """Per row of values sorted descending (the first is the maximum): log sum exp, the exponentials in
    float32 (~1e-7 relative on the sum: well inside the float32 logsumexp it gives; float64 took 40% of
    the decode)."""
    wide = values.astype(np.float32)
    if not wide.shape[1]:
        return np.full(len(wide), -np.inf)
    top = wide[:, :1]
    return top[:, 0].astype(np.float64) + np.log(np.exp(wide - top).sum(axis=1).astype(np.float64))


def _log_tail(values: np.ndarray, logsumexp: np.ndarray) -> np.ndarray:
    """The tail's log-mass from the values and logsumexp, as the loss derives it for a cache without one."""
    with np.errstate(divide="ignore"):
        log_top = np.minimum(_logsumexp_rows(values) - logsumexp.astype(np.float64), 0.0)
        return np.maximum(np.log(-np.expm1(log_top)), LOG_MASS_FLOOR).astype(np.float32)


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
        ordered = np.take_along_axis(values, order, axis=1)
        out["topk_logits"] = ordered.astype(dtype, copy=False)
        out["topk_indices"] = np.take_along_axis(ids, order, axis=1).astype(index_dtype(num_classes), copy=False)
        if "logsumexp" not in stored and "topk_log_tail" in stored:
            # the total that makes the decoded top-k plus the exact tail sum to 1 (targets.topk_log_probs' rule)
            log_tail = np.clip(np.asarray(stored["topk_log_tail"], np.float64), LOG_MASS_FLOOR, 0.0)
            with np.errstate(divide="ignore"):
                log_top = np.maximum(np.log(-np.expm1(log_tail)), LOG_MASS_FLOOR)
            out["logsumexp"] = (_logsumexp_sorted(ordered) - log_top).astype(np.float32)
    if "sampled_indices" in stored:
        out["sampled_indices"] = np.asarray(stored["sampled_indices"]).astype(index_dtype(num_classes), copy=False)
        counts = np.asarray(stored["sampled_counts"])
        out["sampled_counts"] = counts.astype(count_dtype(counts.shape[1]), copy=False)
    return out
