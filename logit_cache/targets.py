"""Target representations: encode teacher logits on the device, decode them for losses.

Pure tensor code. Encoding runs where the logits are (the GPU when there is one), so that only
the K values and ids of each row cross to the host in top-k mode.

Modes and the arrays they produce (names are the cache format's, DESIGN.md section 3):

* ``full``: ``logits`` [B, C], the raw logits in the storage dtype.
* ``topk``: ``topk_logits`` [B, K] (descending), ``topk_indices`` [B, K] (uint16 when C <= 65536,
  else int32; sent as int32 and narrowed on the host) and ``logsumexp`` [B] float32 over all C
  raw logits, which gives the exact probability mass of the top-k at T=1:
  ``sum(exp(topk_logits - logsumexp))``.

Raw logits are stored, not probabilities: the temperature is applied when reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("full", "topk")
#: Largest class count whose ids fit uint16 (ids 0..65535).
UINT16_CLASSES = 1 << 16


def index_dtype(num_classes: int) -> np.dtype:
    """Storage dtype of class/token ids: uint16 when they fit, else int32 (never int16: it wraps)."""
    return np.dtype(np.uint16) if num_classes <= UINT16_CLASSES else np.dtype(np.int32)


def torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "float32": torch.float32}[name]


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


def encode(logits: torch.Tensor, mode: str, k: int | None, dtype: str) -> EncodedBatch:
    """Encode logits [B, C] for storage. Nothing here synchronises with the device."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    raw = logits.float()  # (B, C): logsumexp and top-k selection in float32 whatever the autocast dtype
    store_dtype = torch_dtype(dtype)
    # A row is finite iff its max and min are (amax/amin propagate NaN), and the stored values fit
    # the storage dtype iff their extremes do after the cast: [B] reductions, not isfinite over [B, C].
    extremes = torch.stack([raw.amax(dim=1), raw.amin(dim=1)], dim=1)  # (B, 2)
    nonfinite = ~torch.isfinite(extremes).all(dim=1)

    def overflows(stored_extremes: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(stored_extremes.to(store_dtype)).all(dim=1) & ~nonfinite

    if mode == "full":
        overflow = overflows(extremes)
        mass = raw.new_full((), float(len(raw)))  # a fill on the device, not a host copy
        return EncodedBatch({"logits": raw.to(store_dtype)}, nonfinite, overflow, mass)
    if mode == "topk":
        if k is None or not 1 <= k <= raw.shape[1]:
            raise ValueError(f"k must be in [1, {raw.shape[1]}], got {k}")
        top_values, top_ids = torch.topk(raw, k, dim=1, largest=True, sorted=True)  # (B, K) each
        lse = torch.logsumexp(raw, dim=1)  # (B,)
        values = top_values.to(store_dtype)
        overflow = overflows(top_values[:, [0, -1]])  # only the stored values must fit
        mass = torch.exp(top_values - lse[:, None]).sum(dim=1).sum()
        arrays = {"topk_logits": values, "topk_indices": top_ids.to(torch.int32), "logsumexp": lse}
        return EncodedBatch(arrays, nonfinite, overflow, mass)
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def topk_mass(topk_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Probability mass of the stored top-k at T=1, per row: ``sum_k exp(v_k - logsumexp)``."""
    return torch.exp(topk_logits.float() - logsumexp.float()[..., None]).sum(dim=-1)
