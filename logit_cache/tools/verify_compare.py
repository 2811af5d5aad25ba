"""Tolerances and row comparisons of ``verify``: a stored row against the teacher's logits now (pure
numpy, one row at a time; the tolerances are stated in :mod:`logit_cache.tools.verify`).

Which comparison a cache's rows get follows from the arrays its target kind stores (as the losses
dispatch on what a batch holds): every logit (a dense kind) or top-k ids with their values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..targets import TargetKind

#: Relative-and-absolute slack between the dump's teacher run and this one, by the dump's precision.
PRECISION_SLACK = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
#: Largest finite float16: beyond it the dump refuses to store (its ulp there is 32).
FLOAT16_MAX = 65504.0


def value_tolerance(teacher: np.ndarray, dtype: str, slack: float) -> np.ndarray:
    """Allowed ``|stored - teacher|`` for each teacher float32 logit, by storage dtype (module docstring)."""
    magnitude = np.abs(np.asarray(teacher, dtype=np.float64))
    tolerance = slack * (1.0 + magnitude)
    if dtype == "float16":
        ulp = np.spacing(np.minimum(magnitude, FLOAT16_MAX).astype(np.float16)).astype(np.float64)
        tolerance = tolerance + 0.5 * ulp
    return tolerance


def _worst(stored: np.ndarray, teacher: np.ndarray, tolerance: np.ndarray) -> tuple[np.ndarray, int]:
    """Mask of entries beyond tolerance (NaN counts as beyond) and the position of the worst excess."""
    diff = np.abs(stored.astype(np.float64) - teacher.astype(np.float64))
    bad = ~(diff <= tolerance)
    excess = np.where(np.isnan(diff), np.inf, diff - tolerance)
    return bad, int(np.argmax(excess))


def compare_full(stored: np.ndarray, teacher: np.ndarray, dtype: str, slack: float) -> str | None:
    """Why a stored row of full logits is not the teacher's, or None when it is (within tolerance)."""
    tolerance = value_tolerance(teacher, dtype, slack)
    bad, at = _worst(stored, teacher, tolerance)
    if not bad.any():
        return None
    return (
        f"logits differ from the teacher's at {int(bad.sum())} of {len(teacher)} classes; worst class {at}: "
        f"stored {float(stored[at]):.6g}, teacher {float(teacher[at]):.6g} (tolerance {float(tolerance[at]):.2g})"
    )


def compare_topk(
    ids: np.ndarray, values: np.ndarray, logsumexp: float | None, teacher: np.ndarray, dtype: str, slack: float
) -> str | None:
    """Why a stored top-k row is not the teacher's, or None when it is.

    Ids must be the teacher's top-k as a set, except for swaps among logits tied (within the noise
    of two runs) at the k-th place; values must match the teacher's logits at the stored ids.
    """
    num_classes, k = len(teacher), len(ids)
    ids = np.asarray(ids, dtype=np.int64)
    if (ids < 0).any() or (ids >= num_classes).any():
        return f"top-{k} ids {ids.tolist()} hold ids outside [0, {num_classes})"
    if len(np.unique(ids)) != k:
        return f"top-{k} ids {ids.tolist()} repeat an id"
    teacher = np.asarray(teacher, dtype=np.float32)
    noise = slack * (1.0 + np.abs(teacher.astype(np.float64)))
    order = np.argsort(-teacher, kind="stable")
    extra = np.setdiff1d(ids, order[:k])  # stored, but not among the teacher's k largest
    missing = np.setdiff1d(order[:k], ids)  # among the teacher's k largest, but not stored
    if len(extra):
        gap = float(teacher[missing].max()) - float(teacher[extra].min())
        allowed = float(noise[missing].max() + noise[extra].max())
        if not gap <= allowed:
            return (
                f"top-{k} ids {sorted(ids.tolist())} are not the teacher's {sorted(order[:k].tolist())}: class "
                f"{int(extra[np.argmin(teacher[extra])])} (teacher {float(teacher[extra].min()):.6g}) is stored, class "
                f"{int(missing[np.argmax(teacher[missing])])} (teacher {float(teacher[missing].max()):.6g}) is not "
                f"(beyond a tie within {allowed:.2g})"
            )
    expected = teacher[ids]
    tolerance = value_tolerance(expected, dtype, slack)
    bad, at = _worst(values, expected, tolerance)
    if bad.any():
        return (
            f"top-{k} values differ from the teacher's logits at {int(bad.sum())} of {k} ids; worst class {int(ids[at])}: "
            f"stored {float(values[at]):.6g}, teacher {float(expected[at]):.6g} (tolerance {float(tolerance[at]):.2g})"
        )
    if (np.diff(values.astype(np.float64)) > 0).any():
        return f"top-{k} values {values.tolist()} are not in descending order"
    if logsumexp is not None:
        want = float(torch.logsumexp(torch.from_numpy(teacher), dim=0))
        allowed = slack * (1.0 + abs(want))
        if not abs(float(logsumexp) - want) <= allowed:
            return f"logsumexp is {float(logsumexp):.6g}, the teacher's is {want:.6g} (tolerance {allowed:.2g})"
    return None


def comparable(kind: TargetKind) -> bool:
    """Whether rows of ``kind`` can be compared with the teacher's logits (:func:`compare_row`)."""
    return kind.dense or {"topk_indices", "topk_logits"} <= set(kind.target_arrays)


def compare_row(kind: TargetKind, read: Callable[[str], np.ndarray], has: Callable[[str], bool], teacher: np.ndarray,
                dtype: str, slack: float) -> str | None:
    """Why a stored row of ``kind`` is not the teacher's, or None; ``read(name)`` reads the row of an
    array, ``has(name)`` says whether the cache holds it. Only for a :func:`comparable` kind."""
    if kind.dense:
        return compare_full(read("logits"), teacher, dtype, slack)
    lse = read("logsumexp") if has("logsumexp") else None
    return compare_topk(read("topk_indices"), read("topk_logits"), None if lse is None else float(lse), teacher, dtype, slack)
