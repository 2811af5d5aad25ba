"""The ``topk`` kind: the K largest raw logits of each row, descending (``topk_logits`` [B, K]), their
class ids (``topk_indices`` [B, K]: uint16 when C <= 65536, else int32; sent as int32 and narrowed on
the host), ``logsumexp`` [B] float32 over all C raw logits, and ``topk_log_tail`` [B] float32, the log
of the probability mass outside the top k at T=1. Compact layout: ``targets/compact.py``.

Why the tail is its own array: ``1 - sum(exp(topk_logits - logsumexp))`` cancels for a confident row.
Its top-1 probability is 1 - r with r ~ 1e-4, and a float16 top logit near 20 is off by up to 1/128
(so p_1 by up to 0.4%), a float32 logsumexp near 30 by up to 1e-6: the difference is noise or
negative. ``encode`` sums the tail on its own instead (the exp of every logit outside the top k,
relative to the row's max, accumulated in float32: no cancellation, a relative error of ~1e-6 from
the float32 exponents), which costs nothing extra: it is the same pass that gives the logsumexp.
``topk_log_tail`` is optional: caches written before it read as before (the loss derives the tail).

Encoding reads the logits in their own dtype: ``torch.topk`` selects exactly in bfloat16, float16 or
float32 and its values are the logits themselves, widened afterwards; the logsumexp and the tail
come from one chunked pass (``encoded.exp_sums``), never a float32 copy of the whole [B, C] block.
A row is bad (``nonfinite``) iff one of its logits is NaN or infinite, as before: NaN and +inf show in
the max (the first top-k value: ``torch.topk`` puts NaN first), -inf in a sum of the same pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import UsageError
from ..store.base import ArraySpec
from .batch import LOG_MASS_FLOOR, Targets, lengths_field
from .compact import decode_topk, encode_topk, topk_specs
from .dtypes import index_dtype, torch_dtype
from .encoded import EncodedBatch, check_logits, exp_sums, overflows, shift_error, wide_dtype
from .registry import TargetKind
from .selection import block_topk, blocked


class TopK(TargetKind):
    name = "topk"
    width_field = "k"
    target_arrays = ("topk_logits", "topk_indices", "logsumexp")
    #: written by every dump since it was added; older caches lack it and read as before
    optional_arrays = ("topk_log_tail",)
    #: compact caches written before 2026-12-03 store the tail as float16
    older_dtypes: ClassVar[dict[str, tuple[str, ...]]] = {"topk_log_tail": ("float16",)}
    value_arrays = ("topk_logits",)
    compact = True
    option = "--topk K"
    rows_field = "values"

    def max_width(self, num_classes: int) -> int | None:
        return num_classes

    def label(self, width: int | None) -> str:
        return f"top{width}"

    def describe(self, width: int | None) -> str:
        return f"top-{width}"

    def validate(self, record: Any, bad: Callable[[str, str], Exception]) -> None:
        if not (isinstance(record.k, int) and 1 <= record.k <= record.num_classes):
            raise bad("k", f"is {record.k!r}, expected an integer in [1, num_classes={record.num_classes}]")

    def check_options(self, record: Any) -> None:
        if record.k is None:
            raise UsageError("choose what to store: --topk K (the K largest logits per row), --sample M or --full")
        if record.k < 1:
            raise UsageError(f"--topk must be >= 1, got {record.k}")

    def device_value_dtype(self, dtype: str, encoding: str) -> str:
        # the compact encoding stores 8-bit codes and the tail's log-mass computed from the values: float16
        # rounding of a confident token's top logit would turn a small tail into noise
        return "float32" if encoding != "plain" else dtype

    def encode(self, raw: torch.Tensor, width: int | None, dtype: str, *, sample_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> EncodedBatch:
        logits = check_logits(raw)
        if width is None or not 1 <= width <= logits.shape[1]:
            raise ValueError(f"k must be in [1, {logits.shape[1]}], got {width}")
        # (B, K) each, the logits' dtype; wide float32 rows on a CPU select through block maxima (selection.py)
        select = block_topk if blocked(logits, width) else _topk
        top_values, top_ids = select(logits, width)
        top = top_values.float()  # exact: the stored values are the logits themselves
        tail_sum, probe = exp_sums(logits, top[:, 0], exclude=top_ids)  # (B,) relative to the max, float32 accumulation
        lse, log_tail, top_mass = _row_masses(top, tail_sum)
        nonfinite = ~(torch.isfinite(top[:, 0]) & torch.isfinite(probe))
        store = torch_dtype(dtype)
        overflow = overflows(top[:, [0, -1]], store, nonfinite)  # only the stored values must fit
        arrays = {"topk_logits": top.to(store), "topk_indices": top_ids.to(torch.int32), "logsumexp": lse, "topk_log_tail": log_tail}
        return EncodedBatch(arrays, nonfinite, overflow, top_mass.sum().float())

    def row_mass(self, arrays: Mapping[str, torch.Tensor], rows: int, like: torch.Tensor) -> torch.Tensor:
        if "topk_log_tail" in arrays:  # 1 - tail, exact; the values may be float16
            return (-torch.expm1(arrays["topk_log_tail"].float())).sum()
        return torch.exp(arrays["topk_logits"].float() - arrays["logsumexp"][:, None]).sum()

    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return [
            ArraySpec("topk_logits", dtype, (width,), compress=True),
            ArraySpec("topk_indices", index_dtype(num_classes).name, (width,), compress=True),
            ArraySpec("logsumexp", "float32", (), compress=True),
            ArraySpec("topk_log_tail", "float32", (), compress=True),
        ]

    def compact_specs(self, width: int, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return topk_specs(width, num_classes)

    def compact_encode(self, arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
        return encode_topk(arrays, num_classes)

    def compact_decode(self, stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
        return decode_topk(stored, num_classes, dtype)

    def batch(self, num_classes: int, arrays: Mapping[str, np.ndarray], *, sample_temperature: float = 1.0,
              lengths: np.ndarray | None = None) -> Any:
        return Targets(
            self.name,
            num_classes,
            values=torch.from_numpy(arrays["topk_logits"]),
            indices=torch.from_numpy(arrays["topk_indices"]),
            logsumexp=torch.from_numpy(arrays["logsumexp"]),
            log_tail=torch.from_numpy(arrays["topk_log_tail"]) if "topk_log_tail" in arrays else None,
            **lengths_field(lengths),
        )


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(logits, k, dim=1, largest=True, sorted=True)


def _row_masses(top: torch.Tensor, tail_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, from the top-k values (B, K) float32 and the tail's exp-sum relative to the max (B,)
    (:func:`~.encoded.exp_sums`): the logsumexp (float32), the tail's log-mass at T=1 (float32, floored at
    ``LOG_MASS_FLOOR`` for an empty tail) and the top-k's mass, in float64 (K-wide: cheap)."""
    wide = wide_dtype(top.device)
    top_wide = top.to(wide)
    top_sum = torch.exp(top_wide - top_wide[:, :1]).sum(dim=1)  # >= 1: the max's own term
    tail = tail_sum.to(wide) * torch.exp(shift_error(top[:, 0], wide))  # relative to the max exactly
    total = top_sum + tail
    lse = top_wide[:, 0] + total.log()
    log_tail = (tail.log() - total.log()).clamp(min=LOG_MASS_FLOOR)  # an empty tail (k == C): log 0 = -inf, floored
    return lse.float(), log_tail.float(), top_sum / total


KIND = TopK()
