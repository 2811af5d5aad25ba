"""Target batches: :class:`Targets` (what losses read), the thin :func:`encode` that asks a kind to
encode teacher logits on the device, and the tensor maths the kinds share.

Pure tensor code. Encoding runs where the logits are (the GPU when there is one), so that only
the K values and ids of each row cross to the host in top-k mode. Each kind's arrays (names are the
cache format's, DESIGN.md section 3) are described in its module: ``full.py``, ``topk.py``,
``sampled.py``; ``registry.py`` says what a kind is.

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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from .dtypes import UINT16_CLASSES, count_dtype, index_dtype, torch_dtype  # noqa: F401  (moved to targets.dtypes)
from .encoded import EncodedBatch  # moved to targets.encoded
from .registry import KINDS, TargetKind, get_kind, kind_names


def encode(logits: torch.Tensor, mode: str, k: int | None, dtype: str, *, m: int | None = None,
           sample_temperature: float = 1.0, generator: torch.Generator | None = None) -> EncodedBatch:
    """Encode logits [B, C] for storage as the kind ``mode`` does (its width is ``k`` or ``m``, by the
    kind's width field). Nothing here synchronises with the device.

    ``sample_temperature`` and ``generator`` are for kinds that draw (``sampled``, see its module).
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, classes], got {tuple(logits.shape)}")
    kind = get_kind(mode)
    width = {"k": k, "m": m}.get(kind.width_field or "")
    return kind.encode(logits, width, dtype, sample_temperature=sample_temperature, generator=generator)


def sample_unique(raw: torch.Tensor, m: int, sample_temperature: float, generator: torch.Generator | None,
                  finite: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``m`` ids per row from ``softmax(raw / Ts)`` with replacement; return the unique ids
    (ascending, left-aligned, 0-padded) and their counts, both (B, M).

    Rows flagged not ``finite`` draw from a uniform stand-in (they are reported and never stored).
    ``raw`` in any float dtype: the softmax is float32, made from ``raw`` directly (one [B, C] float32
    tensor, the one the draws need; a second only at ``Ts != 1``).
    """
    if sample_temperature != 1.0:
        probs = torch.softmax(raw.to(torch.float32, copy=True).div_(sample_temperature), dim=1)  # (B, C)
    else:
        probs = torch.softmax(raw, dim=1, dtype=torch.float32)  # (B, C)
    if finite is not None:
        probs.masked_fill_(~finite[:, None], 1.0 / raw.shape[1])  # the softmax of a zero row, in place
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
    ``indices`` (B, K) class ids, ``logsumexp`` (B,) over all C raw logits and, from caches that store
    it, ``log_tail`` (B,) the log of the mass outside the top k at T=1 (else None). Sampled mode fills
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
    log_tail: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._rows_tensor())

    @property
    def kind(self) -> TargetKind:
        """The target kind of :attr:`mode` (see ``targets/registry.py``)."""
        return get_kind(self.mode)

    def _rows_tensor(self) -> torch.Tensor:
        return getattr(self, self.kind.rows_field)

    @property
    def k(self) -> int | None:
        """The top-k width (None for kinds whose width is not a k)."""
        return None if self.kind.width_field != "k" or self.values is None else int(self.values.shape[-1])

    @property
    def device(self) -> torch.device:
        return self._rows_tensor().device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        """On ``device``, values and counts as float32, ids and lengths as int64 (converted after
        the copy: fewer bytes move)."""
        device = torch.device(device)
        moved = {}
        for name, tensor in self.tensors().items():
            wide = torch.int64 if name in ("indices", "lengths") else torch.float32
            # copy first, widen there (fewer bytes cross to a GPU); on the same device it is one conversion
            moved[name] = tensor.to(device, non_blocking=non_blocking).to(wide) if tensor.device != device else tensor.to(wide)
        return replace(self, **moved)

    def pin_memory(self) -> Targets:
        """Called by ``DataLoader(pin_memory=True)`` so host-to-GPU copies can be asynchronous."""
        return replace(self, **{name: tensor.pin_memory() for name, tensor in self.tensors().items()})

    @classmethod
    def from_arrays(cls, mode: str, num_classes: int, arrays: Mapping[str, np.ndarray],
                    sample_temperature: float = 1.0, lengths: np.ndarray | None = None) -> Targets:
        """From the cache's logical arrays (numpy, storage dtypes), without copying (the kind builds it)."""
        return get_kind(mode).batch(num_classes, arrays, sample_temperature=sample_temperature, lengths=lengths)


def lengths_field(lengths: np.ndarray | None) -> dict[str, torch.Tensor]:
    """``{"lengths": ...}`` for a per-token batch's :class:`Targets` (int64), else nothing."""
    return {"lengths": torch.from_numpy(np.asarray(lengths, dtype=np.int64))} if lengths is not None else {}


class _ArraysByKind(Mapping[str, tuple[str, ...]]):
    """mode -> one of its kind's array tuples, read from the registry at each lookup (so a kind
    registered after ``from ...batch import TARGET_ARRAYS`` is included); kinds whose tuple is empty
    are left out when ``skip_empty``."""

    def __init__(self, attribute: str, skip_empty: bool = False) -> None:
        self.attribute, self.skip_empty = attribute, skip_empty

    def __getitem__(self, mode: str) -> tuple[str, ...]:
        value = getattr(KINDS[mode], self.attribute)
        if self.skip_empty and not value:
            raise KeyError(mode)
        return value

    def __iter__(self) -> Iterator[str]:
        return (mode for mode, kind in KINDS.items() if getattr(kind, self.attribute) or not self.skip_empty)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


#: The logical arrays a loader reads for each mode (the cache's other arrays are not targets).
TARGET_ARRAYS: Mapping[str, tuple[str, ...]] = _ArraysByKind("target_arrays")
#: Target arrays a mode holds only sometimes (``sampled_logits``: when Ts != 1).
OPTIONAL_TARGET_ARRAYS: Mapping[str, tuple[str, ...]] = _ArraysByKind("optional_arrays", skip_empty=True)


def __getattr__(name: str) -> Any:
    """``MODES``: the registered kinds' names when read (old code; ask :func:`kind_names`)."""
    if name == "MODES":
        return kind_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _logsumexp_sorted(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of rows sorted descending (the first is the max): K-wide, and a
    third of ``torch.logsumexp``'s operations, which matter at this size (the cost is dispatch)."""
    top = x[..., 0]
    return (x - top[..., None]).exp().sum(dim=-1).log() + top


def topk_log_probs(
    values: torch.Tensor, logsumexp: torch.Tensor, temperature: float, num_classes: int, log_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities at ``temperature``: of its top-k (B, K) and of the tail (B,).

    Uses the tail model of the module docstring; at T=1 both are exact. Logs are floored at
    ``LOG_MASS_FLOOR`` (an empty or vanishing tail), never -inf.

    ``log_tail`` (B,): the tail's log-mass at T=1 as the cache stores it (``topk_log_tail``), used
    instead of ``log(1 - sum_k exp(v_k - logsumexp))``, which cancels for confident rows. Values
    rounded to float16 then no longer sum to exactly ``1 - tail``, so the top-k is renormalised to
    that mass: the values keep their ratios (the stored logits as they are) and the row's total is
    taken as ``logsumexp(values) - log(1 - tail)`` instead of ``logsumexp``, so that top + tail sums to
    1 and the tail is exactly the stored one. Rounding moves mass between the top-k entries (as it
    always did), never into or out of the tail.
    """
    values, logsumexp = values.float(), logsumexp.float()
    tail_count = num_classes - values.shape[-1]
    if log_tail is None:
        # log of the stored top-k's mass at T=1 (<= 0 up to float16 rounding of the values)
        log_top_mass = _logsumexp_sorted(values - logsumexp[..., None]).clamp(max=0.0)
        # log(1 - exp(x)) without cancellation: -expm1 keeps the digits of a tiny tail
        log_tail_mass = torch.log(-torch.expm1(log_top_mass)).clamp(min=LOG_MASS_FLOOR)
    else:
        log_tail_mass = log_tail.float().clamp(min=LOG_MASS_FLOOR, max=0.0)
        # log(1 - tail), floored like the tail: a top-k of (nearly) no mass keeps a finite total
        log_top_mass = torch.log(-torch.expm1(log_tail_mass)).clamp(min=LOG_MASS_FLOOR)
        logsumexp = _logsumexp_sorted(values) - log_top_mass
    scaled = values / temperature
    if tail_count == 0:
        log_z = _logsumexp_sorted(scaled)
        return scaled - log_z[..., None], torch.full_like(log_z, LOG_MASS_FLOOR)
    log_count = float(np.log(tail_count))
    tail_logit = logsumexp + log_tail_mass - log_count  # u: the mean tail logit (exp-mean)
    log_tail_t = log_count + tail_logit / temperature
    log_z = torch.logaddexp(_logsumexp_sorted(scaled), log_tail_t)
    return scaled - log_z[..., None], (log_tail_t - log_z).clamp(min=LOG_MASS_FLOOR)
