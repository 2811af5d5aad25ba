"""Stored layouts of the target arrays: ``plain`` (the logical arrays as they are), ``compact`` and
``entropy`` (``targets/entropy.py``: the logical arrays entropy-coded by Zarr codecs; Zarr only).

Per-token (language-model) caches hold one row per token, so bytes per row decide what a cache of
billions of tokens costs. The manifest's ``encoding`` names how a cache's target arrays are stored;
readers turn stored rows back into the logical arrays of DESIGN.md section 3 (``topk_logits``,
``topk_indices``, ``logsumexp``; ``sampled_indices``, ``sampled_counts``, ``logsumexp`` and maybe
``sampled_logits``), so nothing past the reader knows which encoding a cache uses. Pure numpy:
:func:`encode_arrays` runs in the dump's writer thread on a batch of host rows, :func:`decode_arrays`
on the rows a reader gathered. Every stored row is encoded on its own (no state across rows), so
decoding any subset of rows, in any order, gives exactly the same rows as decoding all of them.

``plain``
    The logical arrays, names, dtypes and shapes unchanged (values float16/float32, ids uint16
    when C <= 65536 else int32, counts uint8 when M <= 255 else uint16, logsumexp float32).

``compact`` (contract; all arrays per row, Blosc-zstd + bit-shuffle in Zarr, see ``store/``)

    Top-k, K = k, ``idx`` = uint16 if C <= 65536 else int32 (the logical id dtype):

    ===================  =======  =======  ===================================================
    name                 shape    dtype    content of row i
    ===================  =======  =======  ===================================================
    ``topk_id_gaps``     [K]      idx      the row's ids sorted ascending, s_0 < ... < s_{K-1},
                                           stored as gaps g_0 = s_0, g_j = s_j - s_{j-1} - 1
    ``topk_codes``       [K]      uint8    c_j = round(255 * sqrt(p_j)) for the id s_j, where
                                           p_j = exp(v_j - logsumexp) (clipped to [0, 1]) is the
                                           value's probability at T=1 (round half to even)
    ``topk_log_tail``    []       float32  log(1 - sum_j p_j), the tail's log-mass: the logical
                                           array of the same name as the device computed it
                                           (exact, from every logit); from caches without it,
                                           computed in float64 from the values given.
                                           ``LOG_MASS_FLOOR`` (-80) when the tail is empty or the
                                           sum reaches 1 by rounding. (Caches written before
                                           2026-12-03 store it as float16; they read alike.)
    ``logsumexp``        []       float32  unchanged (exact)
    ===================  =======  =======  ===================================================

    A row is K * |idx| + K + 4 + 4 bytes before compression (K=128 with int32 ids: 646, against
    772 plain with float16 values). Arrays are C-order, little-endian as Zarr's ``bytes`` codec writes them.

    Decoding: ids s = cumsum(g + 1) - 1. Each code gives q_j = c_j / 255 (code 0 gives 0.25 / 255,
    inside its interval [0, 0.5 / 255)), and the row's q_j^2 are rescaled by one factor f so that
    they sum to 1 - exp(topk_log_tail): p^_j = f * q_j^2. The values are
    ``topk_logits = logsumexp + log(p^_j)`` in the logical dtype, re-sorted descending (ties keep
    ascending id order) with their ids permuted alike. Bound: |q_j - sqrt(p_j)| <= 1/510 for every
    entry, i.e. the decoded probabilities divided by their row's f are within 1/510 of the
    true ones in the square-root domain.

    Sampled, M = m, H = min(M, 16):

    ===========================  =========  ==================================================
    name                         shape      content of row i
    ===========================  =========  ==================================================
    ``sampled_id_gaps_head``     [H]        idx: gaps of the ascending unique ids as for top-k
    ``sampled_id_gaps_rest``     [M - H]    (only when M > H): the same row's gaps H..M-1;
                                            pads (count 0) store gap 0
    ``sampled_counts_head``      [H]        the counts (uint8 if M <= 255 else uint16), as they
    ``sampled_counts_rest``      [M - H]    are, split the same way (only when M > H)
    ``logsumexp``                []         float32, unchanged
    ``sampled_logits``           [M]        float16/float32 as stored plainly (only when the
                                            sampling temperature was not 1)
    ===========================  =========  ==================================================

    Decoding: ids = cumsum(g + 1) - 1 over the row, then id 0 wherever the count is 0 (pads sit
    after the row's ids, so their gaps never shift a real id). Lossless. A row is M * |idx| +
    M * |count| + 4 bytes (+ M * |value| with ``sampled_logits``) before compression, like plain:
    the gain is in what compresses.

Why this layout (measured by ``scripts/bench_lm_storage.py`` on synthetic LM-like logits, vocab
128k; BENCHMARKS.md has the tables):

* **Ids are most of the bytes**, and a generic compressor cannot see that a row's ids are a set.
  Sorted and stored as gaps, 17-bit ids become small numbers whose high bit planes are zero, which
  bit-shuffle + zstd store in almost nothing: 0.58x to 0.71x the bytes of the plain ids at K=128.
  With random ids that is within 8% of log2 C(V, K), the least any lossless code of a K-subset can take;
  with frequency-sorted ids (small ids likely, as in BPE vocabularies) it is below even a per-row
  Rice code, because the compressor adapts to gaps that grow along the row. Gap = difference - 1,
  so that dense runs of ids (K = C) are all zeros.
* **Values as 8-bit codes of sqrt(p).** At T=1 the KL cost of an error e in log p_j is about
  p_j e^2 / 2, so an entropy-coded quantizer does best with levels spaced evenly in sqrt(p): the
  same KL per entry, coarse where the probability is negligible. The many small entries of a large
  K take codes 0 to 10, which the compressor stores in a few bits: about half the bytes of 8-bit
  log-probabilities with a per-row float16 min/max (0.7x at K=50, 0.6x at K=128), for a KL of
  ~1e-4 (K=50) to ~3e-4 (K=128) to the plain reconstruction at T=1 instead of ~1e-5. The price is
  at T > 1, where small probabilities gain weight: the codes' relative error grows as 1/sqrt(p)
  (0.4% at p = 1, 40% at p = 1e-5). Against the truth it hardly shows, because the top-k and its
  evenly spread tail are themselves far from the full distribution at T = 2 (KL ~1 nat).
* **The tail's log-mass per row** (2 bytes). The loss gets the tail's mass from 1 - the sum of the
  top-k probabilities, which cancels catastrophically for a confident token (a tail of 1e-4 beside
  a top-1 of 0.9999). Codes alone would turn such tails into noise (KL ~5e-3 at T=1, ~1 at T=2);
  rescaling the decoded probabilities to the stored tail mass keeps it. Decoded to float32, the
  tail survives to the loss. Decoded to float16, rounding the top-1 logit (steps of 1/64 for
  |logit| in [16, 32)) loses tails below ~1% again, exactly as plain float16 caches lose them; so
  a compact cache should record float32 values (its stored bytes do not depend on that dtype) and
  be given float32 top-k values to encode.
* **Sampled rows are mostly padding** (13 to 15 distinct ids of M = 50 at realistic entropies).
  Splitting the columns at 16 puts the padding of most rows into ``*_rest`` arrays that are nearly
  all zeros, which compress to almost nothing: 15% fewer bytes than one padded [M] array. Counts
  stay as they are. ``sampled_logits`` are kept as stored plainly: the importance weights of
  sampling at Ts != 1 divide probabilities, which the sqrt(p) codes do not keep precise for the
  low-probability ids such sampling draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CacheFormatError, UsageError
from ..store.base import ArraySpec
from . import entropy as _entropy
from .batch import LOG_MASS_FLOOR
from .dtypes import VALUE_DTYPES, count_dtype, index_dtype
from .registry import TargetKind, get_kind, kind_names

ENCODINGS = ("plain", "compact", "entropy")
#: Encodings whose arrays are stored through codecs of their own (``store/entropy_codec.py``): Zarr only.
CODED_ENCODINGS = ("entropy",)

#: Quantization levels of sqrt(p): code c stands for sqrt(p) = c / CODE_LEVELS.
CODE_LEVELS = 255
#: What code 0 decodes to, in code units: sqrt(p) in [0, 0.5) / CODE_LEVELS, so never log(0).
ZERO_CODE = 0.25
#: Columns of the sampled ``*_head`` arrays; the rest of each row goes to ``*_rest`` arrays.
SAMPLED_HEAD = 16

_TOPK_COMPACT = ("topk_id_gaps", "topk_codes", "topk_log_tail", "logsumexp")
_TOPK_PLAIN = ("topk_logits", "topk_indices", "logsumexp")
_SAMPLED_PLAIN = ("sampled_indices", "sampled_counts", "logsumexp")


def __getattr__(name: str) -> Any:
    """``MODES`` (every kind) and ``COMPACT_MODES`` (kinds with a compact layout; full logits are
    always stored plain), derived from the registry when read."""
    if name == "MODES":
        return kind_names()
    if name == "COMPACT_MODES":
        return tuple(kind for kind in kind_names() if get_kind(kind).compact)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


def _check(mode: str, encoding: str, error: type[Exception] = UsageError) -> TargetKind:
    """The kind of ``mode``, once ``encoding`` is known and applies to it."""
    if encoding not in ENCODINGS:
        raise error(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    try:
        kind = get_kind(mode)
    except UsageError as exc:
        raise error(str(exc)) from None
    if encoding != "plain" and not kind.compact:
        compact = ", ".join(name for name in kind_names() if get_kind(name).compact)
        raise error(f"encoding {encoding!r} applies to modes {compact}, not {mode!r}; full logits are stored plain")
    return kind


def sampled_head(width: int) -> int:
    """Columns of a sampled row stored in the ``*_head`` arrays (all of them when M <= 16)."""
    return min(width, SAMPLED_HEAD)


def stored_specs(mode: str, width: int, num_classes: int, dtype: str, encoding: str, sampled_logits: bool = False) -> list[ArraySpec]:
    """The target arrays a shard stores for ``mode`` (``width`` = K or M) under ``encoding``.

    Plain gives exactly the logical arrays with their logical dtypes; compact gives the layout of
    the module docstring. Every array has a row per cache row and is compressed (except full
    logits, which barely compress). These are what :func:`encode_arrays` returns, so a
    ``ShardWriter`` created with them accepts its output.
    """
    kind = _check(mode, encoding)
    if dtype not in VALUE_DTYPES:
        raise UsageError(f"unknown value dtype {dtype!r}; expected one of {', '.join(VALUE_DTYPES)}")
    if kind.width_field is not None and width < 1:
        raise UsageError(f"the row width (k or m) must be >= 1, got {width}")
    if encoding == "plain":
        return kind.array_specs(width, num_classes, dtype, sampled_logits=sampled_logits)
    if encoding == "entropy":
        return _entropy.stored_specs(kind.array_specs(width, num_classes, dtype, sampled_logits=sampled_logits), width)
    return kind.compact_specs(width, num_classes, dtype, sampled_logits=sampled_logits)


def topk_specs(width: int, num_classes: int) -> list[ArraySpec]:
    """The compact top-k arrays (module docstring)."""
    ids = index_dtype(num_classes).name
    return [
        ArraySpec("topk_id_gaps", ids, (width,), compress=True),
        ArraySpec("topk_codes", "uint8", (width,), compress=True),
        ArraySpec("topk_log_tail", "float32", (), compress=True),
        ArraySpec("logsumexp", "float32", (), compress=True),
    ]


def sampled_specs(width: int, num_classes: int, dtype: str, sampled_logits: bool = False) -> list[ArraySpec]:
    """The compact sampled arrays (module docstring)."""
    ids, counts = index_dtype(num_classes).name, count_dtype(width).name
    head, rest = sampled_head(width), width - sampled_head(width)
    specs = [ArraySpec("sampled_id_gaps_head", ids, (head,), compress=True)]
    if rest:
        specs.append(ArraySpec("sampled_id_gaps_rest", ids, (rest,), compress=True))
    specs.append(ArraySpec("sampled_counts_head", counts, (head,), compress=True))
    if rest:
        specs.append(ArraySpec("sampled_counts_rest", counts, (rest,), compress=True))
    specs.append(ArraySpec("logsumexp", "float32", (), compress=True))
    if sampled_logits:
        specs.append(ArraySpec("sampled_logits", dtype, (width,), compress=True))
    return specs


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _require(arrays: Mapping[str, np.ndarray], names: tuple[str, ...], optional: tuple[str, ...], what: str,
             error: type[Exception]) -> None:
    missing = [name for name in names if name not in arrays]
    extra = [name for name in arrays if name not in names and name not in optional]
    if missing or extra:
        raise error(
            f"{what} needs arrays {', '.join(names)}" + (f" (optionally {', '.join(optional)})" if optional else "")
            + (f"; missing {', '.join(missing)}" if missing else "") + (f"; unexpected {', '.join(extra)}" if extra else "")
        )


def _gaps(sorted_ids: np.ndarray, valid: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Gaps of ascending ids per row (g_0 = s_0, g_j = s_j - s_{j-1} - 1), 0 where not ``valid``."""
    wide = sorted_ids.astype(np.int64)
    gaps = np.diff(wide, axis=1, prepend=-1) - 1
    if valid is not None:
        gaps[~valid] = 0
    if gaps.size and (int(gaps.min()) < 0 or int(wide.max(initial=0)) >= num_classes or int(wide.min(initial=0)) < 0):
        raise CacheFormatError(
            f"the ids of a row must be distinct, ascending where stored so (sampled rows), and in [0, {num_classes}); "
            "these are not, so they cannot be delta-coded"
        )
    return gaps.astype(index_dtype(num_classes))


def _flat_order(order: np.ndarray) -> np.ndarray:
    """Indices into a raveled [N, K] array that permute each row by ``order`` (np.take on them is
    about twice as fast as take_along_axis)."""
    return order + (np.arange(order.shape[0], dtype=order.dtype) * order.shape[1])[:, None]


def _ungap(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps.astype(np.int64) + 1, axis=1) - 1


def encode_arrays(mode: str, arrays: Mapping[str, np.ndarray], encoding: str, num_classes: int) -> dict[str, np.ndarray]:
    """Logical rows (host numpy, storage dtypes) to stored rows; plain returns them unchanged.

    Compact top-k expects ``topk_logits``, ``topk_indices``, ``logsumexp``; compact sampled
    expects ``sampled_indices``, ``sampled_counts``, ``logsumexp`` and optionally
    ``sampled_logits``, laid out as :func:`logit_cache.targets.encode` makes them.
    """
    kind = _check(mode, encoding)
    if encoding == "plain":
        return dict(arrays)
    if encoding == "entropy":
        return _entropy.encode(arrays, num_classes)
    return kind.compact_encode(arrays, num_classes)


def encode_topk(arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Compact top-k rows (module docstring) from the logical arrays."""
    _require(arrays, _TOPK_PLAIN, ("topk_log_tail",), "compact top-k encoding", UsageError)
    return _encode_topk(arrays["topk_logits"], arrays["topk_indices"], arrays["logsumexp"], num_classes,
                        arrays.get("topk_log_tail"))


def encode_sampled(arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Compact sampled rows (module docstring) from the logical arrays."""
    _require(arrays, _SAMPLED_PLAIN, ("sampled_logits",), "compact sampled encoding", UsageError)
    ids, counts = np.asarray(arrays["sampled_indices"]), np.asarray(arrays["sampled_counts"])
    if ids.shape != counts.shape or ids.ndim != 2:
        raise UsageError(f"sampled_indices {ids.shape} and sampled_counts {counts.shape} must be [rows, m] alike")
    valid = counts > 0
    if np.any(valid[:, 1:] & ~valid[:, :-1]):
        raise UsageError("sampled rows must be left-aligned: every pad (count 0) after the row's ids, as targets.encode makes them")
    gaps = _gaps(ids, valid, num_classes)
    head = sampled_head(ids.shape[1])
    out = {"sampled_id_gaps_head": np.ascontiguousarray(gaps[:, :head])}
    if ids.shape[1] > head:
        out["sampled_id_gaps_rest"] = np.ascontiguousarray(gaps[:, head:])
    out["sampled_counts_head"] = np.ascontiguousarray(counts[:, :head])
    if ids.shape[1] > head:
        out["sampled_counts_rest"] = np.ascontiguousarray(counts[:, head:])
    out["logsumexp"] = arrays["logsumexp"]
    if "sampled_logits" in arrays:
        out["sampled_logits"] = arrays["sampled_logits"]
    return out


def _encode_topk(values: np.ndarray, ids: np.ndarray, logsumexp: np.ndarray, num_classes: int,
                 device_tail: np.ndarray | None = None) -> dict[str, np.ndarray]:
    values, ids, logsumexp = np.asarray(values), np.asarray(ids), np.asarray(logsumexp)
    if values.shape != ids.shape or values.ndim != 2 or logsumexp.shape != values.shape[:1]:
        raise UsageError(f"topk_logits {values.shape}, topk_indices {ids.shape} and logsumexp {logsumexp.shape} "
                         "must be [rows, k], [rows, k] and [rows]")
    flat = _flat_order(np.argsort(ids, axis=1))  # ids are distinct (checked below), so any sort gives the one order
    sorted_ids = np.take(ids.ravel(), flat)
    log_probs = np.take(values.ravel(), flat).astype(np.float64) - logsumexp.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        probs = np.nan_to_num(np.exp(np.minimum(log_probs, 0.0)), nan=0.0)  # (N, K) in [0, 1]
        codes = np.rint(np.sqrt(probs) * CODE_LEVELS).astype(np.uint8)
        # the tail's log-mass as the plain arrays imply it: log(1 - sum p), in float64 (no cancellation
        # from float16 sums), floored like targets.topk_log_probs floors it
        top_mass = np.exp(log_probs).sum(axis=1)
        log_tail = np.log(np.clip(1.0 - top_mass, 0.0, None), where=top_mass < 1.0, out=np.full(len(top_mass), LOG_MASS_FLOOR))
    if device_tail is not None:  # exact (summed on the device); the values' own may cancel
        log_tail = np.asarray(device_tail, dtype=np.float64)
    log_tail = np.nan_to_num(np.maximum(log_tail, LOG_MASS_FLOOR), nan=LOG_MASS_FLOOR)
    return {
        "topk_id_gaps": _gaps(sorted_ids, None, num_classes),
        "topk_codes": codes,
        "topk_log_tail": log_tail.astype(np.float32),
        "logsumexp": logsumexp,
    }


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def decode_arrays(mode: str, stored: Mapping[str, np.ndarray], encoding: str, num_classes: int, dtype: str) -> dict[str, np.ndarray]:
    """Stored rows to the logical arrays, with their names, dtypes and conventions.

    Top-k values come back descending with their ids permuted alike; sampled ids ascending,
    left-aligned, pads id 0 with count 0. Rows decode independently, so the rows a reader gathers
    from anywhere in a cache decode to the same as the whole cache's rows at those positions.
    """
    kind = _check(mode, encoding, CacheFormatError)
    if encoding == "plain":
        return dict(stored)
    if dtype not in VALUE_DTYPES:
        raise CacheFormatError(f"unknown value dtype {dtype!r}; expected one of {', '.join(VALUE_DTYPES)}")
    if encoding == "entropy":
        return _entropy.decode(stored, num_classes, dtype)
    return kind.compact_decode(stored, num_classes, dtype)


def decode_topk(stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
    """The logical top-k arrays from compact rows."""
    _require(stored, _TOPK_COMPACT, (), "a compact top-k cache", CacheFormatError)
    return _decode_topk(stored, num_classes, dtype)


def decode_sampled(stored: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """The logical sampled arrays from compact rows (lossless)."""
    required = ("sampled_id_gaps_head", "sampled_counts_head", "logsumexp")
    _require(stored, required, ("sampled_id_gaps_rest", "sampled_counts_rest", "sampled_logits"), "a compact sampled cache",
             CacheFormatError)
    if ("sampled_id_gaps_rest" in stored) != ("sampled_counts_rest" in stored):
        raise CacheFormatError("a compact sampled cache stores sampled_id_gaps_rest and sampled_counts_rest together, or neither")
    gaps, counts = stored["sampled_id_gaps_head"], stored["sampled_counts_head"]
    if "sampled_id_gaps_rest" in stored:
        gaps = np.concatenate([gaps, stored["sampled_id_gaps_rest"]], axis=1)
        counts = np.concatenate([counts, stored["sampled_counts_rest"]], axis=1)
    ids = _ungap(gaps)
    ids[counts == 0] = 0
    out = {
        "sampled_indices": ids.astype(index_dtype(num_classes)),
        "sampled_counts": np.ascontiguousarray(counts, dtype=count_dtype(counts.shape[1])),
        "logsumexp": stored["logsumexp"],
    }
    if "sampled_logits" in stored:
        out["sampled_logits"] = stored["sampled_logits"]
    return out


def _decode_topk(stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
    codes = np.asarray(stored["topk_codes"])
    # decoded values grow with the code, so sorting the codes sorts the values: a stable radix sort of
    # uint8 (descending; ties keep ascending ids), far cheaper than sorting floats
    flat = _flat_order(np.argsort(CODE_LEVELS - codes, axis=1, kind="stable"))
    ids = np.take(_ungap(stored["topk_id_gaps"]).ravel(), flat)
    # sqrt(p) estimates (N, K); float32 is exact enough here (the result is float32 at best) and faster
    roots = np.maximum(np.take(codes.ravel(), flat), np.float32(ZERO_CODE)) * np.float32(1 / CODE_LEVELS)
    logsumexp = np.asarray(stored["logsumexp"])
    # rescale so the row's probabilities sum to 1 - tail mass (in log space: one shift per row, float64)
    # (a top-k mass below float16's reach, < 3e-8, would read as 0: floored so the logits stay finite)
    log_tail = np.asarray(stored["topk_log_tail"]).astype(np.float32)  # float16 in caches written before 2026-12-03
    log_top = np.log(np.maximum(-np.expm1(log_tail.astype(np.float64)), np.exp(LOG_MASS_FLOOR)))
    shift = log_top - np.log(np.square(roots).sum(axis=1, dtype=np.float64)) + logsumexp
    logits = np.log(roots)
    logits *= 2
    logits += shift.astype(np.float32)[:, None]
    return {
        "topk_logits": logits.astype(dtype, copy=False),
        "topk_indices": ids.astype(index_dtype(num_classes)),
        "logsumexp": logsumexp,
        "topk_log_tail": log_tail,  # the values are rescaled to it: the loss reads the same tail
    }
