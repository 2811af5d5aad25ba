"""What encoding a batch on the device gives (:class:`EncodedBatch`), and the checks every kind's
encoding starts with (:func:`inspect_logits`: NaN/inf rows, values that overflow the storage dtype)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dtypes import torch_dtype


@dataclass
class EncodedBatch:
    """A batch encoded on the device.

    ``arrays`` are tensors ready to copy to the host (still on the device). ``nonfinite`` [B] marks
    rows whose raw logits hold NaN or inf; ``overflow`` [B] marks rows that were finite but do not
    fit the storage dtype (e.g. |logit| > 65504 in float16). ``topk_mass`` is the sum over rows of
    the top-k probability mass at T=1 (a 0-d tensor; the row count for full mode).
    """

    arrays: dict[str, torch.Tensor]
    nonfinite: torch.Tensor
    overflow: torch.Tensor
    topk_mass: torch.Tensor


@dataclass
class InspectedLogits:
    """A batch of logits [B, C] as float32 (``raw``), with its rows' extremes [B, 2] and NaN/inf rows [B]."""

    raw: torch.Tensor
    store_dtype: torch.dtype
    extremes: torch.Tensor
    nonfinite: torch.Tensor

    def overflows(self, stored_extremes: torch.Tensor) -> torch.Tensor:
        """[B]: finite rows whose ``stored_extremes`` [B, n] do not fit the storage dtype."""
        return ~torch.isfinite(stored_extremes.to(self.store_dtype)).all(dim=1) & ~self.nonfinite


def inspect_logits(logits: torch.Tensor, dtype: str) -> InspectedLogits:
    """Check the shape and find the rows that cannot be stored; no synchronisation with the device.

    Logsumexp and top-k selection run in float32 whatever the autocast dtype. A row is finite iff its
    max and min are (amax/amin propagate NaN), and the stored values fit the storage dtype iff their
    extremes do after the cast: [B] reductions, not isfinite over [B, C].
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    raw = logits.float()  # (B, C)
    extremes = torch.stack([raw.amax(dim=1), raw.amin(dim=1)], dim=1)  # (B, 2)
    return InspectedLogits(raw, torch_dtype(dtype), extremes, ~torch.isfinite(extremes).all(dim=1))


def concat_encoded(parts: list[EncodedBatch]) -> EncodedBatch:
    """Encoded batches one after the other (rows concatenated, masses summed)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return type(first)(
        {name: torch.cat([p.arrays[name] for p in parts]) for name in first.arrays},
        torch.cat([p.nonfinite for p in parts]),
        torch.cat([p.overflow for p in parts]),
        torch.stack([p.topk_mass.float() for p in parts]).sum(),
    )
