"""Distillation losses for cached targets (full logits or top-k), as pure functions and modules.

The KD term is Hinton et al.'s and Composer's ``KLDivergence``: ``KL(teacher_T || student_T) * T^2``
with ``batchmean`` reduction (the sum over classes, averaged over rows), where ``x_T`` is the
softmax of ``logits / T``. The ``T^2`` keeps the gradient's scale independent of T.

Top-k targets store the K largest raw logits, their ids and the logsumexp of all C logits. What to
do with the other ``C - K`` classes (the tail) is a choice, ``tail=``:

* ``"rest"`` (default): a (K+1)-th bucket. The teacher's tail mass is exact at T=1 (from the
  logsumexp) and, at other T, follows the even-spread tail model of ``targets.topk_log_probs``
  (exact for a flat tail; otherwise more tail mass than the truth at T > 1). The student's bucket
  is its exact probability outside the teacher's top-k. Nothing is renormalised: the closest to the
  full loss, equal to it when K = C.
* ``"renormalize"``: both distributions restricted to the teacher's top-k and renormalised there
  (the student through a log-softmax over its logits at those ids). Ignores how much mass the tail
  holds; cheapest.
* ``"ignore"``: the top-k terms of the full KL, ``sum_k p_k (log p_k - log q_k)``, with the
  teacher's probabilities normalised over all C classes (exact at T=1; at other T through the
  tail model's normaliser, as for ``rest``) and the student's log-softmax over all classes; the
  tail's terms are dropped (not a divergence any more: it can be negative).

Several caches (teachers): their distributions are averaged in probability space, then the same
loss is taken against the average. Each teacher's distribution is made dense over the C classes
(top-k: the stored probabilities, plus for ``rest`` its tail mass spread evenly over its non-top-k
classes); the "top-k" support is the union of the teachers' ids. With one teacher this equals the
single-teacher loss. The dense form costs O(rows x C), fine for classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetMismatchError, UsageError
from ..targets import KINDS
from ..targets.batch import LOG_MASS_FLOOR, Targets, topk_log_probs
from ..targets.full import KIND as FULL_LOGITS
from .fused import DENSE as _DENSE  # what _check returns for dense targets: no tail to choose
from .fused import fused_distillation_loss

TAILS = ("rest", "renormalize", "ignore")
#: Composer's and most recipes' default distillation temperature.
DEFAULT_TEMPERATURE = 4.0

TargetLike = Targets | torch.Tensor


def logits_targets(logits: torch.Tensor) -> Targets:
    """Teacher logits (rows, C) as full-logit :class:`Targets` (online KD: the teacher ran on this batch)."""
    return Targets(FULL_LOGITS.name, int(logits.shape[-1]), logits=logits)


def check_kind(target: Targets, loss: str) -> None:
    """Refuse targets of a kind that ``loss`` (``"kd_loss"``, ``"token_kd_loss"``) cannot read (the kind's ``losses``)."""
    readers = [name for name, kind in KINDS.items() if loss in kind.losses]
    if target.mode not in readers:
        raise TargetMismatchError(f"targets of mode {target.mode!r} are not supported by {loss}: expected one of {', '.join(readers)}")


def _as_targets(target: TargetLike, device: torch.device) -> Targets:
    """Targets on ``device`` in float32; a plain tensor is taken as full logits (online KD)."""
    if isinstance(target, torch.Tensor):
        if target.dim() != 2:
            raise TargetMismatchError(f"teacher logits must be [batch, classes], got shape {tuple(target.shape)}")
        return logits_targets(target.detach().to(device).float())
    if isinstance(target, Targets):
        check_kind(target, "kd_loss")
        if target.counts is not None:  # sampled ids with counts: no per-sample loss reads them
            raise TargetMismatchError(f"targets of mode {target.mode!r} are not supported by kd_loss (sampled ids: use token_kd_loss)")
        moved = target.to(device, non_blocking=True) if target.device != device or _narrow(target) else target
        tensors = moved.tensors()
        if any(tensor.requires_grad for tensor in tensors.values()):  # teachers get no gradients
            moved = replace(moved, **{name: tensor.detach() for name, tensor in tensors.items()})
        return moved
    raise TargetMismatchError(f"expected a Targets batch or a tensor of teacher logits, got {type(target).__name__}")


def _narrow(target: Targets) -> bool:
    values = target.logits if target.logits is not None else target.values
    return values.dtype != torch.float32 or (target.indices is not None and target.indices.dtype != torch.int64)


def _check(student_logits: torch.Tensor, target: Targets, tail: str | None) -> str:
    """The tail strategy to use; errors for a mismatched student or strategy.

    Dispatch is on what the batch holds (``logits``: dense; else top-k values with their logsumexp),
    once :func:`_as_targets` has refused kinds kd_loss does not read."""
    if student_logits.dim() != 2:
        raise TargetMismatchError(f"student logits must be [batch, classes], got shape {tuple(student_logits.shape)}")
    rows, classes = student_logits.shape
    if classes != target.num_classes:
        raise TargetMismatchError(
            f"the student has {classes} outputs but the teacher's targets have {target.num_classes} classes"
        )
    if len(target) != rows:
        raise TargetMismatchError(f"{rows} student rows but {len(target)} target rows: the batch is misaligned")
    if tail is not None and tail not in TAILS:
        raise UsageError(f"tail={tail!r}: expected one of {', '.join(TAILS)}")
    if target.logits is not None:
        if tail not in (None, "rest"):
            raise TargetMismatchError(
                f"tail={tail!r} applies to top-k targets, but these are full logits (every class is stored): drop tail="
            )
        return _DENSE
    return tail or "rest"


def _log_tail(scaled: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside ``support`` (B,), relative to its log-partition.

    A floor column (the row's log-partition + LOG_MASS_FLOOR, constant) keeps an empty tail finite
    with zero gradient. (The several-teacher path; one teacher takes the fused :class:`_TopkKL`.)
    """
    log_z = torch.logsumexp(scaled, dim=-1)  # (B,)
    outside = scaled.masked_fill(support, float("-inf"))
    floor = (log_z.detach() + LOG_MASS_FLOOR)[:, None]
    return torch.logsumexp(torch.cat([outside, floor], dim=-1), dim=-1) - log_z


class _FullKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)), with its closed-form gradient.

    d/dz KL(p || softmax(z)) = softmax(z) - p, so the backward is one subtraction instead of
    autograd's chain through log_softmax and kl_div: the KD loss runs over (B, C) at every step,
    and on a small student those passes cost as much as the student (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
        p = log_p.exp()
        value = (p * (log_p - log_q)).sum()
        ctx.save_for_backward(log_q.exp_(), p)
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        q, p = ctx.saved_tensors
        return ((q - p) * (grad / ctx.temperature)).to(ctx.dtype), None, None


class _TopkKL(torch.autograd.Function):
    """Sum over rows of the top-k KL with the ``rest`` or ``ignore`` tail, with its closed-form gradient.

    With ``q = softmax(z)``, ``z = s/T``, teacher top-k probabilities ``p_k`` and tail mass ``p_r``:

    * ``ignore``: ``L = sum_k p_k (log p_k - log q_k)``; ``dL/dz_j = q_j P - [j in K] p_j``, ``P = sum_k p_k``.
    * ``rest``: ``L += p_r (log p_r - log q_r)`` with ``q_r`` the student's mass outside K;
      ``dL/dz_j = q_j - p_j`` on K and ``q_j (1 - p_r / q_r)`` elsewhere (as ``sum_k p_k + p_r = 1``).

    ``q_r`` is summed over the tail's own probabilities (no ``1 - sum_k q_k`` cancellation) and its
    log is floored at ``LOG_MASS_FLOOR``, so an empty tail (K = C) gives zero loss and gradient.
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, log_p: torch.Tensor, log_rest: torch.Tensor, ids: torch.Tensor,
                temperature: float, rest: bool) -> torch.Tensor:
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C); one fused pass, unlike logsumexp
        log_q_k = log_q.gather(1, ids)  # (B, K)
        q = log_q.exp_()  # (B, C), in place: log_q is ours and not needed again
        p = log_p.exp()  # (B, K)
        value = (p * (log_p - log_q_k)).sum()
        if rest:
            q.scatter_(1, ids, 0.0)  # q now holds the tail only
            log_q_r = torch.log(q.sum(dim=-1)).clamp(min=LOG_MASS_FLOOR)  # (B,)
            p_r = log_rest.exp()
            value = value + (p_r * (log_rest - log_q_r)).sum()
            row_scale = 1.0 - p_r / log_q_r.exp()  # (B,); the floored log: never a division by 0
            ctx.save_for_backward(q, row_scale, log_q_k.exp(), p, ids)
        else:
            ctx.save_for_backward(q, p.sum(dim=-1), log_q_k, p, ids)
        ctx.temperature, ctx.dtype, ctx.rest = temperature, student_logits.dtype, rest
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, row_scale, top_q, p, ids = ctx.saved_tensors
        scale = grad / ctx.temperature
        out = q * (row_scale * scale)[:, None]  # rest: the tail's q_j (1 - p_r / q_r); ignore: q_j P
        if ctx.rest:
            out.scatter_(1, ids, (top_q - p) * scale)  # the top-k: q_k - p_k
        else:
            out.scatter_add_(1, ids, -p * scale)  # q_k P - p_k on the top-k
        return out.to(ctx.dtype), None, None, None, None, None


def _topk_kl(student_logits: torch.Tensor, target: Targets, temperature: float, tail: str) -> torch.Tensor:
    """Sum over rows of the top-k KL with the chosen tail (not yet scaled by T^2 / B)."""
    ids = target.indices  # (B, K)
    if tail == "renormalize":  # K-wide only: autograd is cheap here
        teacher = F.log_softmax(target.values / temperature, dim=-1)  # (B, K)
        student = F.log_softmax(student_logits.float().gather(1, ids) / temperature, dim=-1)
        return F.kl_div(student, teacher, reduction="sum", log_target=True)
    log_p, log_rest = topk_log_probs(target.values, target.logsumexp, temperature, target.num_classes, target.log_tail)  # (B, K), (B,)
    return _TopkKL.apply(student_logits, log_p, log_rest, ids, temperature, tail == "rest")


def _dense(target: Targets, temperature: float, tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's probabilities over all classes (B, C) at T and its support (B, C) bool."""
    if target.logits is not None:
        probs = F.softmax(target.logits / temperature, dim=-1)
        return probs, torch.ones_like(probs, dtype=torch.bool)
    rows, k, classes = len(target), target.k, target.num_classes
    support = torch.zeros(rows, classes, dtype=torch.bool, device=target.values.device).scatter_(1, target.indices, True)
    if tail == "renormalize":
        top = F.softmax(target.values / temperature, dim=-1)
        return torch.zeros(rows, classes, device=top.device).scatter_(1, target.indices, top), support
    log_p, log_rest = topk_log_probs(target.values, target.logsumexp, temperature, classes, target.log_tail)
    fill = (log_rest.exp() / max(1, classes - k))[:, None] if tail == "rest" else log_p.new_zeros(rows, 1)
    probs = fill.expand(rows, classes).clone().scatter_(1, target.indices, log_p.exp())
    return probs, support


def _ensemble_kl(student_logits: torch.Tensor, targets: Sequence[Targets], temperature: float, tail: str) -> torch.Tensor:
    """Sum over rows of the KL against the teachers' average in probability space."""
    dense = [_dense(t, temperature, tail) for t in targets]
    probs = torch.stack([p for p, _ in dense]).mean(dim=0)  # (B, C)
    support = torch.stack([s for _, s in dense]).any(dim=0)  # (B, C)
    scaled = student_logits.float() / temperature
    inside = torch.where(support, probs, torch.zeros_like(probs))
    if tail == "renormalize":
        inside = inside / inside.sum(dim=-1, keepdim=True)
        log_q = F.log_softmax(scaled.masked_fill(~support, float("-inf")), dim=-1).masked_fill(~support, 0.0)
        return (torch.xlogy(inside, inside) - inside * log_q).sum()
    log_q = F.log_softmax(scaled, dim=-1)
    kl = (torch.xlogy(inside, inside) - inside * log_q).sum()
    if tail == "ignore":
        return kl
    rest = torch.where(support, torch.zeros_like(probs), probs).sum(dim=-1)  # (B,)
    log_rest = torch.log(rest.clamp(min=0)).clamp(min=LOG_MASS_FLOOR)
    return kl + (rest * (log_rest - _log_tail(scaled, support))).sum()


def kd_loss(
    student_logits: torch.Tensor,
    target: TargetLike | Sequence[TargetLike],
    temperature: float = DEFAULT_TEMPERATURE,
    tail: str | None = None,
) -> torch.Tensor:
    """``KL(teacher_T || student_T) * T^2``, averaged over rows (``batchmean``); a scalar.

    ``target``: a :class:`Targets` batch from a cache (full or top-k), a tensor of teacher logits
    (B, C), or a list of either (several teachers, averaged in probability space). ``tail``: for
    top-k targets, ``"rest"`` (default), ``"renormalize"`` or ``"ignore"`` (module docstring).
    Targets are moved to the student's device and widened to float32 here.

    >>> loss = kd_loss(student(inputs), target, temperature=4.0)
    """
    if temperature <= 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    device = student_logits.device
    many = isinstance(target, (list, tuple))
    targets = [_as_targets(t, device) for t in (target if many else [target])]
    if not targets:
        raise UsageError("kd_loss needs at least one target")
    strategies = {_check(student_logits, t, tail) for t in targets}
    rows = student_logits.shape[0]
    if len(targets) == 1:
        (single,) = targets
        if single.logits is not None:
            total = _FullKL.apply(student_logits, single.logits, temperature)
        else:
            total = _topk_kl(student_logits, single, temperature, strategies.pop())
    else:
        chosen = tail or "rest"
        total = _ensemble_kl(student_logits, targets, temperature, chosen if strategies != {_DENSE} else "rest")
    return total * (temperature**2) / rows


class KLDivergence(nn.Module):
    """:func:`kd_loss` as a module: ``KLDivergence(temperature=4.0)(student_logits, target)``.

    ``teachers_per_step``: with a list of targets, use a random subset of this many per call
    (Composer's ``n_teachers_to_sample``), drawn from a generator seeded with ``seed``.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, tail: str | None = None,
                 teachers_per_step: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if tail is not None and tail not in TAILS:
            raise UsageError(f"tail={tail!r}: expected one of {', '.join(TAILS)}")
        if teachers_per_step is not None and teachers_per_step < 1:
            raise UsageError(f"teachers_per_step must be at least 1, got {teachers_per_step}")
        self.temperature, self.tail, self.teachers_per_step = float(temperature), tail, teachers_per_step
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, student_logits: torch.Tensor, target: TargetLike | Sequence[TargetLike]) -> torch.Tensor:
        if isinstance(target, (list, tuple)) and self.teachers_per_step is not None and self.teachers_per_step < len(target):
            chosen = torch.randperm(len(target), generator=self.generator)[: self.teachers_per_step]
            target = [target[int(i)] for i in chosen.sort().values]
        return kd_loss(student_logits, target, temperature=self.temperature, tail=self.tail)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, tail={self.tail or 'rest'}, teachers_per_step={self.teachers_per_step}"


class DistillationLoss(nn.Module):
    """``org_loss_weight * CE(student, labels) + kd_loss_weight * kd(student, target)``.

    The weights and their defaults (0.9 / 0.1) are Composer's Distillation algorithm's. KD applies
    only while the training progress (a fraction passed as ``progress=``) is in ``[start, end)``;
    outside it the loss is the plain cross-entropy, as in Composer. Without ``progress`` KD always
    applies. ``ce_loss`` replaces the ground-truth loss (default: cross-entropy).
    """

    def __init__(self, kd: nn.Module | None = None, kd_loss_weight: float = 0.9, org_loss_weight: float = 0.1,
                 start: float = 0.0, end: float = 1.0, ce_loss: nn.Module | None = None) -> None:
        super().__init__()
        if not 0.0 <= start <= end <= 1.0:
            raise UsageError(f"KD window start={start}, end={end}: expected 0 <= start <= end <= 1")
        self.kd = kd if kd is not None else KLDivergence()
        self.kd_loss_weight, self.org_loss_weight = float(kd_loss_weight), float(org_loss_weight)
        self.start, self.end = float(start), float(end)
        self.ce_loss = ce_loss if ce_loss is not None else nn.CrossEntropyLoss()

    def active(self, progress: float | None) -> bool:
        """Whether KD applies at ``progress`` (fraction of training done)."""
        return progress is None or self.start <= progress < self.end

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor | None,
                target: TargetLike | Sequence[TargetLike], progress: float | None = None) -> torch.Tensor:
        if not self.active(progress):
            if labels is None:
                raise UsageError("outside the KD window the loss is the ground-truth loss, which needs labels")
            return self.ce_loss(student_logits, labels)
        if self.org_loss_weight and labels is None:
            raise UsageError("org_loss_weight > 0 needs labels; set org_loss_weight=0 for unlabeled data")
        fused = self._fused(student_logits, labels, target)
        if fused is not None:
            return fused
        loss = self.kd_loss_weight * self.kd(student_logits, target)
        if self.org_loss_weight:
            loss = loss + self.org_loss_weight * self.ce_loss(student_logits, labels)
        return loss

    def _fused(self, student_logits: torch.Tensor, labels: torch.Tensor | None, target: TargetLike | Sequence[TargetLike]
               ) -> torch.Tensor | None:
        """Both terms in one pass (:mod:`.fused`) when they are exactly our default KL and plain
        mean cross-entropy against one teacher; None when anything else is asked for."""
        kd, ce = self.kd, self.ce_loss
        if type(kd) is not KLDivergence or type(ce) is not nn.CrossEntropyLoss or not torch.is_grad_enabled():
            return None
        if kd.tail == "renormalize":  # K-wide only: the unfused loss is cheap there
            return None
        if ce.weight is not None or ce.label_smoothing or ce.reduction != "mean" or student_logits.dim() != 2:
            return None
        if isinstance(target, (list, tuple)):
            if len(target) != 1:
                return None
            (target,) = target
        if kd.temperature <= 0:
            raise UsageError(f"temperature must be positive, got {kd.temperature}")
        single = _as_targets(target, student_logits.device)
        tail = _check(student_logits, single, kd.tail)
        return fused_distillation_loss(student_logits, labels if self.org_loss_weight else None, single, kd.temperature,
                                       tail, self.kd_loss_weight, self.org_loss_weight, ce.ignore_index)
