"""The ``full`` kind: every logit of every row, ``logits`` [B, C] in the storage dtype (stored plain)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..store.base import ArraySpec
from .batch import Targets, lengths_field
from .encoded import EncodedBatch, inspect_logits
from .registry import TargetKind


class FullLogits(TargetKind):
    name = "full"
    width_field = None
    target_arrays = ("logits",)
    value_arrays = ("logits",)
    option = "--full"
    dense = True
    rows_field = "logits"

    def describe(self, width: int | None) -> str:
        return "full logits"

    def encode(self, raw: torch.Tensor, width: int | None, dtype: str, *, sample_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> EncodedBatch:
        seen = inspect_logits(raw, dtype)
        mass = seen.raw.new_full((), float(len(seen.raw)))  # a fill on the device, not a host copy
        return EncodedBatch({"logits": seen.raw.to(seen.store_dtype)}, seen.nonfinite, seen.overflows(seen.extremes), mass)

    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return [ArraySpec("logits", dtype, (num_classes,))]

    def batch(self, num_classes: int, arrays: Mapping[str, np.ndarray], *, sample_temperature: float = 1.0,
              lengths: np.ndarray | None = None) -> Any:
        return Targets(self.name, num_classes, logits=torch.from_numpy(arrays["logits"]), **lengths_field(lengths))


KIND = FullLogits()
