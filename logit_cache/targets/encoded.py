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
        return overflows(stored_extremes, self.store_dtype, self.nonfinite)


def overflows(stored_extremes: torch.Tensor, store_dtype: torch.dtype, nonfinite: torch.Tensor) -> torch.Tensor:
    """[B]: rows not flagged ``nonfinite`` whose ``stored_extremes`` [B, n] (the largest and smallest
    values a row stores) do not fit ``store_dtype`` (|logit| > 65504 in float16)."""
    return ~torch.isfinite(stored_extremes.to(store_dtype)).all(dim=1) & ~nonfinite


def row_extremes(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's [max, min] (B, 2) float32 from one ``aminmax`` pass in the logits' own dtype, and the rows
    holding NaN or inf (B,): a row is finite iff its extremes are (NaN propagates into both)."""
    low, high = torch.aminmax(logits, dim=1)
    extremes = torch.stack([high, low], dim=1).float()
    return extremes, ~torch.isfinite(extremes).all(dim=1)


def inspect_logits(logits: torch.Tensor, dtype: str) -> InspectedLogits:
    """Check the shape and find the rows that cannot be stored; no synchronisation with the device.

    Logsumexp and top-k selection run in float32 whatever the autocast dtype. A row is finite iff its
    max and min are (amax/amin propagate NaN), and the stored values fit the storage dtype iff their
    extremes do after the cast: [B] reductions, not isfinite over [B, C].
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    raw = logits.float()  # (B, C)
    return InspectedLogits(raw, torch_dtype(dtype), *row_extremes(raw))


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


# -- encoding at memory speed -------------------------------------------------------------------------
#
# ``inspect_logits`` widens a whole [B, C] block to float32 and reads it twice more (amax, amin) before
# a kind's own passes. The helpers below read the logits in their own dtype (top-k selection, min and max
# are exact in any dtype) and make float32 only of one chunk of rows at a time, small enough on a CPU
# to stay in its cache between the few operations over it (measured: 2-4x faster than the same
# operations over a whole block) and large enough on an accelerator that each operation fills it.

#: Elements of one chunk's float32 temporary on a CPU (1 MiB) and on an accelerator (256 MiB).
CPU_CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNK_ELEMENTS = 1 << 26
#: exp(x) = exp2(x * log2(e)); exp2 is about twice as fast as exp on a CPU (Sleef) and no slower elsewhere.
LOG2E = 1.4426950408889634


def check_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, C] as given (no copy): a floating dtype, two dimensions."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"expected floating-point logits, got {logits.dtype}")
    return logits


def chunk_rows(logits: torch.Tensor) -> int:
    """Rows per chunk of :func:`exp_sums` for ``logits`` [B, C] on their device."""
    budget = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(1, budget // max(1, logits.shape[1]))


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the K-wide and [B] arithmetic (cheap; float32 would cancel), float32 where a device has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def exp_sums(logits: torch.Tensor, shift: torch.Tensor, exclude: torch.Tensor | None = None,
             probe: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: ``sum_j exp(x_j - shift)`` over the columns not in ``exclude`` [B, K] (ids), float32
    accumulation (B,), and a finiteness probe (B,): finite iff every logit of the row is (given a
    finite ``shift``; it is the sum of the scaled differences, so NaN and -inf propagate into it).

    ``shift`` [B] float32 (the row's max). One chunk of rows at a time: ``x * log2(e) - shift * log2(e)``
    in float32, a finiteness sum over it, its ``exp2`` in place, the excluded columns zeroed (a K-wide
    scatter), a sum. The sums are relative to ``fl(shift * log2(e)) / log2(e)``, not ``shift``:
    :func:`shift_error` [B] is the log-factor that puts them back. Without ``probe`` (the caller knows
    the bad rows already) the finiteness sum is skipped and None returned for it.
    """
    rows = chunk_rows(logits)
    base = shift.float() * LOG2E  # (B,) float32, rounded: exp_sums are relative to it
    sums, probes = [], []
    for lo in range(0, logits.shape[0], rows):
        part = logits[lo : lo + rows]
        # scale (widening narrow dtypes first), then shift in place: torch.add(base, part, alpha=...) with its
        # broadcast input is 4x slower on a CPU
        work = part * LOG2E if part.dtype in (torch.float32, torch.float64) else part.float().mul_(LOG2E)
        work.sub_(base[lo : lo + rows, None])  # (r, C)
        if probe:  # NaN and -inf propagate (a finite row would need |logits| > 1e33 to overflow it)
            probes.append(work.sum(dim=1))
        work.exp2_()
        if exclude is not None:
            work.scatter_(1, exclude[lo : lo + rows], 0.0)
        sums.append(work.sum(dim=1))
    if not sums:
        empty = shift.new_zeros((0,), dtype=torch.float32)
        return empty, empty if probe else None
    return torch.cat(sums), torch.cat(probes) if probe else None


def shift_error(shift: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """[B] in ``wide``: ``log`` of the factor by which :func:`exp_sums`' sums differ from sums relative to
    ``shift`` exactly (``fl32(shift * log2 e) / log2 e - shift``, a few 1e-7 for logits near 30)."""
    base = (shift.float() * LOG2E).to(wide)
    return base / LOG2E - shift.to(wide)


def logsumexp_rows(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Float32 logsumexp [B] of ``logits`` [B, C] given each row's max ``top`` [B] (bad rows are the
    caller's to find: :func:`row_extremes`): one chunked pass, never a float32 copy of the whole block."""
    sums, _ = exp_sums(logits, top, probe=False)
    wide = wide_dtype(logits.device)
    return (top.to(wide) + shift_error(top, wide) + sums.to(wide).log()).float()
