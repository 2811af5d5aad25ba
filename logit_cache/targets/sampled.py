"""The ``sampled`` kind (random-sampling KD, Anshumann et al., ACL 2025): M ids drawn per row, with
replacement, from ``softmax(logits / Ts)``; stored as the row's unique ids ascending,
``sampled_indices`` [B, M], with their counts ``sampled_counts`` [B, M] (uint8 when M <= 255, else
uint16), left-aligned, the rest padded with id 0 and count 0 (so counts sum to M). At ``Ts = 1``,
``counts / M`` is an unbiased estimate of the teacher's probabilities. At ``Ts != 1`` the raw logits of
the drawn ids are stored too (``sampled_logits`` [B, M]) so that a loss can apply the importance
weights ``p_T(x) / q_Ts(x)``; ``logsumexp`` [B] is stored in both cases. Per-token caches only.

Encoding reads the logits in their own dtype: one ``aminmax`` (bad rows, the overflow check), the
logsumexp in one chunked pass from the max (``encoded.logsumexp_rows``), and the softmax the draws
need, in float32, made straight from the logits (no float32 copy of the block before it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..store.base import ArraySpec
from .batch import Targets, lengths_field, sample_unique
from .compact import decode_sampled, encode_sampled, sampled_specs
from .dtypes import count_dtype, index_dtype, torch_dtype
from .encoded import EncodedBatch, check_logits, logsumexp_rows, overflows, row_extremes
from .registry import TargetKind


class Sampled(TargetKind):
    name = "sampled"
    width_field = "m"
    target_arrays = ("sampled_indices", "sampled_counts", "logsumexp")
    optional_arrays = ("sampled_logits",)
    value_arrays = ("sampled_logits",)
    compact = True
    option = "--sample M"
    draws = True
    per_token_only = True
    rows_field = "indices"
    #: a per-sample KD loss has no estimator for drawn ids; the per-token loss does
    losses = frozenset({"token_kd_loss"})

    def label(self, width: int | None) -> str:
        return f"sample{width}"

    def describe(self, width: int | None) -> str:
        return f"sample-{width}"

    def validate(self, record: Any, bad: Callable[[str, str], Exception]) -> None:
        if not (isinstance(record.m, int) and record.m >= 1):
            raise bad("m", f"is {record.m!r}, expected a positive integer (draws per row) in a sampled cache")

    def check_options(self, record: Any) -> None:
        if record.m is None or not 1 <= record.m <= 65535:
            raise UsageError(f"--sample M draws M ids per row: M must be in [1, 65535], got {record.m}")

    def key_fields(self, record: Any) -> dict[str, Any]:
        return {"m": record.m, "sample_temperature": float(record.sample_temperature)}

    def encode(self, raw: torch.Tensor, width: int | None, dtype: str, *, sample_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> EncodedBatch:
        logits = check_logits(raw)
        if width is None or width < 1:
            raise ValueError(f"m must be >= 1, got {width}")
        extremes, nonfinite = row_extremes(logits)  # (B, 2), (B,): one pass in the logits' dtype
        lse = logsumexp_rows(logits, extremes[:, 0])  # (B,)
        ids, counts = sample_unique(logits, width, sample_temperature, generator, finite=~nonfinite)
        arrays = {"sampled_indices": ids.to(torch.int32), "sampled_counts": counts, "logsumexp": lse}
        overflow = torch.zeros_like(nonfinite)
        drawn = logits.gather(1, ids.long()).float()  # (B, M) the drawn ids' logits, exact
        if sample_temperature != 1.0:
            store = torch_dtype(dtype)
            arrays["sampled_logits"] = drawn.masked_fill(counts == 0, 0.0).to(store)  # pads 0
            overflow = overflows(extremes, store, nonfinite)  # a drawn logit lies within the row's extremes
        # the sampled estimate's mass of distinct ids at T=1 (what `dump` reports as coverage)
        probs = torch.exp(drawn - lse[:, None]).masked_fill(counts == 0, 0.0)
        return EncodedBatch(arrays, nonfinite, overflow, probs.sum())

    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        specs = [
            ArraySpec("sampled_indices", index_dtype(num_classes).name, (width,), compress=True),
            ArraySpec("sampled_counts", count_dtype(width).name, (width,), compress=True),
            ArraySpec("logsumexp", "float32", (), compress=True),
        ]
        if sampled_logits:
            specs.append(ArraySpec("sampled_logits", dtype, (width,), compress=True))
        return specs

    def compact_specs(self, width: int, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return sampled_specs(width, num_classes, dtype, sampled_logits)

    def compact_encode(self, arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
        return encode_sampled(arrays, num_classes)

    def compact_decode(self, stored: Mapping[str, np.ndarray], num_classes: int, dtype: str) -> dict[str, np.ndarray]:
        return decode_sampled(stored, num_classes)

    def batch(self, num_classes: int, arrays: Mapping[str, np.ndarray], *, sample_temperature: float = 1.0,
              lengths: np.ndarray | None = None) -> Any:
        drawn = arrays.get("sampled_logits")
        return Targets(
            self.name,
            num_classes,
            values=None if drawn is None else torch.from_numpy(drawn),
            indices=torch.from_numpy(arrays["sampled_indices"]),
            counts=torch.from_numpy(arrays["sampled_counts"]),
            logsumexp=torch.from_numpy(arrays["logsumexp"]),
            sample_temperature=float(sample_temperature),
            **lengths_field(lengths),
        )


KIND = Sampled()
