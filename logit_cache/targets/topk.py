"""The ``topk`` kind: the K largest raw logits of each row, descending (``topk_logits`` [B, K]), their
class ids (``topk_indices`` [B, K]: uint16 when C <= 65536, else int32; sent as int32 and narrowed on
the host) and ``logsumexp`` [B] float32 over all C raw logits, which gives the exact probability mass
of the top-k at T=1: ``sum(exp(topk_logits - logsumexp))``. Compact layout: ``targets/compact.py``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..store.base import ArraySpec
from .batch import Targets, lengths_field
from .compact import decode_topk, encode_topk, topk_specs
from .dtypes import index_dtype
from .encoded import EncodedBatch, inspect_logits
from .registry import TargetKind


class TopK(TargetKind):
    name = "topk"
    width_field = "k"
    target_arrays = ("topk_logits", "topk_indices", "logsumexp")
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
        seen = inspect_logits(raw, dtype)
        if width is None or not 1 <= width <= seen.raw.shape[1]:
            raise ValueError(f"k must be in [1, {seen.raw.shape[1]}], got {width}")
        top_values, top_ids = torch.topk(seen.raw, width, dim=1, largest=True, sorted=True)  # (B, K) each
        lse = torch.logsumexp(seen.raw, dim=1)  # (B,)
        overflow = seen.overflows(top_values[:, [0, -1]])  # only the stored values must fit
        mass = torch.exp(top_values - lse[:, None]).sum(dim=1).sum()
        arrays = {"topk_logits": top_values.to(seen.store_dtype), "topk_indices": top_ids.to(torch.int32), "logsumexp": lse}
        return EncodedBatch(arrays, seen.nonfinite, overflow, mass)

    def row_mass(self, arrays: Mapping[str, torch.Tensor], rows: int, like: torch.Tensor) -> torch.Tensor:
        return torch.exp(arrays["topk_logits"].float() - arrays["logsumexp"][:, None]).sum()

    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return [
            ArraySpec("topk_logits", dtype, (width,), compress=True),
            ArraySpec("topk_indices", index_dtype(num_classes).name, (width,), compress=True),
            ArraySpec("logsumexp", "float32", (), compress=True),
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
            **lengths_field(lengths),
        )


KIND = TopK()
