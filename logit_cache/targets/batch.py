"""Target representations: encode teacher logits on the device, decode them for losses.

Pure tensor code. Encoding runs where the logits are (the GPU when there is one), so that only
the K values and ids of each row cross to the host in top-k mode.

Modes and the arrays they produce (names are the cache format's, DESIGN.md section 3):

* ``full``: ``logits`` [B, C], the raw logits in the storage dtype.
* ``topk``: ``topk_logits`` [B, K] (descending), ``topk_indices`` [B, K] (uint16 when C <= 65536,
  else int32; sent as int32 and narrowed on the host) and ``logsumexp`` [B] float32 over all C
  raw logits, which gives the exact probability mass of the top-k at T=1:
  ``sum(exp(topk_logits - logsumexp))``.
* ``sampled`` (random-sampling KD, Anshumann et al., ACL 2025): M ids drawn per row, with
  replacement, from ``softmax(logits / Ts)``; stored as the row's unique ids ascending,
  ``sampled_indices`` [B, M], with their counts ``sampled_counts`` [B, M] (uint8 when M <= 255,
  else uint16), left-aligned, the rest padded with id 0 and count 0 (so counts sum to M). At
  ``Ts = 1``, ``counts / M`` is an unbiased estimate of the teacher's probabilities. At ``Ts != 1``
  the raw logits of the drawn ids are stored too (``sampled_logits`` [B, M]) so that a loss can
  apply the importance weights ``p_T(x) / q_Ts(x)``; ``logsumexp`` [B] is stored in both cases.

Raw logits are stored, not probabilities: the temperature is applied when reading.
:class:`Targets` is a batch of them as the loader delivers it, and :func:`topk_log_probs` turns
top-k rows back into the teacher's log-probabilities at any temperature.

The tail model (what top-k does not store). ``logsumexp`` gives the tail's exact mass at T=1,
``r = 1 - sum_k exp(v_k - logsumexp)``, but not how it is spread over the other ``C - K`` classes,
which matters at T != 1. We take it as spread evenly: every tail logit equal to ``u`` with
``(C - K) * exp(u) = exp(logsumexp) * r``. That is exact at T=1 for any tail, exact at every T when
the tail is flat, and otherwise (by the power-mean inequality) over-estimates the tail's mass at
T > 1 and under-estimates it at T < 1. ``u`` never exceeds the smallest stored logit, since it is
a mean of smaller values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

MODES = ("full", "topk", "sampled")
#: Largest class count whose ids fit uint16 (ids 0..65535).
UINT16_CLASSES = 1 << 16


def index_dtype(num_classes: int) -> np.dtype:
    """Storage dtype of class/token ids: uint16 when they fit, else int32 (never int16: it wraps)."""
    return np.dtype(np.uint16) if num_classes <= UINT16_CLASSES else np.dtype(np.int32)


def count_dtype(m: int) -> np.dtype:
    """Storage dtype of sampled counts: a count is at most M."""
    return np.dtype(np.uint8) if m <= 255 else np.dtype(np.uint16)


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


def encode(logits: torch.Tensor, mode: str, k: int | None, dtype: str, *, m: int | None = None,
           sample_temperature: float = 1.0, generator: torch.Generator | None = None) -> EncodedBatch:
    """Encode logits [B, C] for storage. Nothing here synchronises with the device.

    ``m``, ``sample_temperature`` and ``generator`` are for ``sampled`` mode (see the module docstring).
    """
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
    if mode == "sampled":
        if m is None or m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        lse = torch.logsumexp(raw, dim=1)  # (B,)
        ids, counts = sample_unique(raw, m, sample_temperature, generator, finite=~nonfinite)
        arrays = {"sampled_indices": ids.to(torch.int32), "sampled_counts": counts, "logsumexp": lse}
        overflow = torch.zeros_like(nonfinite)
        if sample_temperature != 1.0:
            drawn = raw.gather(1, ids.long()).masked_fill(counts == 0, 0.0)  # (B, M), pads 0
            arrays["sampled_logits"] = drawn.to(store_dtype)
            overflow = overflows(extremes)  # a drawn logit lies within the row's extremes
        # the sampled estimate's mass of distinct ids at T=1 (what `dump` reports as coverage)
        probs = torch.exp(raw.gather(1, ids.long()) - lse[:, None]).masked_fill(counts == 0, 0.0)
        return EncodedBatch(arrays, nonfinite, overflow, probs.sum())
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def sample_unique(raw: torch.Tensor, m: int, sample_temperature: float, generator: torch.Generator | None,
                  finite: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``m`` ids per row from ``softmax(raw / Ts)`` with replacement; return the unique ids
    (ascending, left-aligned, 0-padded) and their counts, both (B, M).

    Rows flagged not ``finite`` draw from a uniform stand-in (they are reported and never stored).
    """
    scaled = raw / sample_temperature if sample_temperature != 1.0 else raw
    if finite is not None:
        scaled = torch.where(finite[:, None], scaled, torch.zeros_like(scaled))
    probs = torch.softmax(scaled, dim=1)  # (B, C)
    draws = torch.multinomial(probs, m, replacement=True, generator=generator)  # (B, M)
    ordered = draws.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # where a run of equal ids begins
    slot = first.cumsum(dim=1) - 1  # (B, M): the unique id's left-aligned position
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)  # every draw of a run writes the same id
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    return ids, counts.to(torch.uint8 if m <= 255 else torch.int32)


def topk_mass(topk_logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Probability mass of the stored top-k at T=1, per row: ``sum_k exp(v_k - logsumexp)``."""
    return torch.exp(topk_logits.float() - logsumexp.float()[..., None]).sum(dim=-1)


#: log of the smallest mass we represent (relative to the row's total): keeps logs finite, so that
#: an empty tail (K = C) gives zero loss and zero gradient instead of 0 * inf = NaN.
LOG_MASS_FLOOR = -80.0


@dataclass
class Targets:
    """A batch of cached teacher targets, as :meth:`LogitCache.collate` delivers them.

    Full mode fills ``logits`` (B, C). Top-k mode fills ``values`` (B, K) raw logits, descending,
    ``indices`` (B, K) class ids and ``logsumexp`` (B,) over all C raw logits. Sampled mode fills
    ``indices`` (B, M) unique drawn ids, ``counts`` (B, M) their counts (0 pads), ``logsumexp``
    (B,), ``sample_temperature`` (Ts) and, when Ts != 1, ``values`` (B, M) the drawn ids' raw logits.

    Per-token (language-model) batches are flat: the rows of every token of the batch's sequences,
    sequence after sequence, with ``lengths`` (S,) the row count of each sequence.

    On the host they keep the storage dtypes (float16 stays float16 in transit); :meth:`to` moves
    them and widens values and counts to float32 and ids to int64, which is what the losses do on
    their own device.
    """

    mode: str
    num_classes: int
    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    sample_temperature: float = 1.0

    def __len__(self) -> int:
        return len(self._rows_tensor())

    def _rows_tensor(self) -> torch.Tensor:
        return {"full": self.logits, "topk": self.values}.get(self.mode, self.indices)

    @property
    def k(self) -> int | None:
        return None if self.mode != "topk" or self.values is None else int(self.values.shape[-1])

    @property
    def device(self) -> torch.device:
        return self._rows_tensor().device

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        """On ``device``, values and counts as float32, ids and lengths as int64 (converted after
        the copy: fewer bytes move)."""
        device = torch.device(device)
        moved = {}
        for name, tensor in self._tensors().items():
            wide = torch.int64 if name in ("indices", "lengths") else torch.float32
            # copy first, widen there (fewer bytes cross to a GPU); on the same device it is one conversion
            moved[name] = tensor.to(device, non_blocking=non_blocking).to(wide) if tensor.device != device else tensor.to(wide)
        return replace(self, **moved)

    def pin_memory(self) -> Targets:
        """Called by ``DataLoader(pin_memory=True)`` so host-to-GPU copies can be asynchronous."""
        return replace(self, **{name: tensor.pin_memory() for name, tensor in self._tensors().items()})

    @classmethod
    def from_arrays(cls, mode: str, num_classes: int, arrays: Mapping[str, np.ndarray],
                    sample_temperature: float = 1.0, lengths: np.ndarray | None = None) -> Targets:
        """From the cache's logical arrays (numpy, storage dtypes), without copying."""
        extra = {"lengths": torch.from_numpy(np.asarray(lengths, dtype=np.int64))} if lengths is not None else {}
        if mode == "full":
            return cls(mode, num_classes, logits=torch.from_numpy(arrays["logits"]), **extra)
        if mode == "topk":
            return cls(
                mode,
                num_classes,
                values=torch.from_numpy(arrays["topk_logits"]),
                indices=torch.from_numpy(arrays["topk_indices"]),
                logsumexp=torch.from_numpy(arrays["logsumexp"]),
                **extra,
            )
        if mode == "sampled":
            drawn = arrays.get("sampled_logits")
            return cls(
                mode,
                num_classes,
                values=None if drawn is None else torch.from_numpy(drawn),
                indices=torch.from_numpy(arrays["sampled_indices"]),
                counts=torch.from_numpy(arrays["sampled_counts"]),
                logsumexp=torch.from_numpy(arrays["logsumexp"]),
                sample_temperature=float(sample_temperature),
                **extra,
            )
        raise ValueError(f"no batch form for mode {mode!r}")


#: The logical arrays a loader reads for each mode (the cache's other arrays are not targets).
TARGET_ARRAYS = {
    "full": ("logits",),
    "topk": ("topk_logits", "topk_indices", "logsumexp"),
    "sampled": ("sampled_indices", "sampled_counts", "logsumexp"),
}
#: Target arrays a mode holds only sometimes (``sampled_logits``: when Ts != 1).
OPTIONAL_TARGET_ARRAYS = {"sampled": ("sampled_logits",)}


def _logsumexp_sorted(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of rows sorted descending (the first is the max): K-wide, and a
    third of ``torch.logsumexp``'s operations, which matter at this size (the cost is dispatch)."""
    top = x[..., 0]
    return (x - top[..., None]).exp().sum(dim=-1).log() + top


def topk_log_probs(
    values: torch.Tensor, logsumexp: torch.Tensor, temperature: float, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities at ``temperature``: of its top-k (B, K) and of the tail (B,).

    Uses the tail model of the module docstring; at T=1 both are exact. Logs are floored at
    ``LOG_MASS_FLOOR`` (an empty or vanishing tail), never -inf.
    """
    values, logsumexp = values.float(), logsumexp.float()
    tail_count = num_classes - values.shape[-1]
    # log of the stored top-k's mass at T=1 (<= 0 up to float16 rounding of the values)
    log_top_mass = _logsumexp_sorted(values - logsumexp[..., None]).clamp(max=0.0)
    # log(1 - exp(x)) without cancellation: -expm1 keeps the digits of a tiny tail
    log_tail_mass = torch.log(-torch.expm1(log_top_mass)).clamp(min=LOG_MASS_FLOOR)
    scaled = values / temperature
    if tail_count == 0:
        log_z = _logsumexp_sorted(scaled)
        return scaled - log_z[..., None], torch.full_like(log_z, LOG_MASS_FLOOR)
    log_count = float(np.log(tail_count))
    tail_logit = logsumexp + log_tail_mass - log_count  # u: the mean tail logit (exp-mean)
    log_tail_t = log_count + tail_logit / temperature
    log_z = torch.logaddexp(_logsumexp_sorted(scaled), log_tail_t)
    return scaled - log_z[..., None], (log_tail_t - log_z).clamp(min=LOG_MASS_FLOOR)
