"""The CE and KD terms of :class:`~logit_cache.losses.sample.DistillationLoss` in one pass, one gradient.

Unfused, a cached-KD step runs two losses over the student's (B, C) logits, each with its own
log-softmax, its own backward chain, and then autograd adds the two gradients: on a small student
that costs as much as a fifth of the step (BENCHMARKS.md, "Training"). Both terms have closed-form
gradients in the student's logits ``s``:

* CE: ``d/ds mean_b CE = (softmax(s) - onehot(label)) / n`` (n: the rows whose label is not ignored);
* KD at T: ``d/ds KL(p || softmax(s/T)) * T^2 / B = T / B * (dKL/dz)``, ``z = s/T``, with ``dKL/dz`` as
  in :class:`~logit_cache.losses.sample._TopkKL` (top-k, ``rest`` or ``ignore`` tail) or
  ``softmax(z) - p`` (full logits).

So the forward computes the loss value and the weighted sum of both gradients at once, in buffers it
owns (in place where it can), and the backward is one multiplication by the incoming gradient. At
T = 1 the two terms share one softmax. The values and gradients equal the unfused losses' (tested
against float64 references for every tail); :class:`DistillationLoss` takes this path whenever it
computes exactly those two losses (its default KD and CE modules, one teacher, tail ``rest`` or
``ignore``), and the unfused one otherwise.
"""

from __future__ import annotations

import torch

from ..targets.batch import LOG_MASS_FLOOR, Targets, topk_log_probs

#: The ``tail`` of full-logit targets: every class is stored, there is no tail to choose.
DENSE = "dense"


def _softmax_and_logsumexp(z: torch.Tensor, z_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(z)`` (B, C) and ``logsumexp(z)`` (B,) for one exponential per element, not two.

    ``z_max`` (B,): each row's maximum. The softmax there is ``exp(0) / sum = 1 / sum``, its largest
    entry (at least ``1/C``: it never underflows), so ``lse = max z - log(max q)``: a comparison per
    element instead of a log-softmax's second ``exp`` (on a CPU an ``exp`` pass costs ~8 ``amax`` passes,
    an ``argmax`` ~10).
    """
    q = torch.softmax(z, dim=-1)
    return q, z_max - torch.log(q.amax(dim=-1))


def _ce_weights(labels: torch.Tensor, ignore_index: int, ce_weight: float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """The labels to gather at (B, 1), and the CE's weight of each row: ``ce_weight`` over the rows whose
    label is not ``ignore_index`` (cross-entropy's mean), as a (B, 1) column, or one float when none is
    ignored (checked on the CPU only, where reading it back costs no GPU sync: a dozen fewer small ops)."""
    ignored = labels == ignore_index
    if labels.device.type == "cpu" and not bool(ignored.any()):
        return labels[:, None], ce_weight / len(labels)
    kept = ~ignored
    return labels.masked_fill(ignored, 0)[:, None], (kept.float() * (ce_weight / kept.sum().clamp(min=1)))[:, None]


class _FusedCEKD(torch.autograd.Function):
    """``kd_weight * KD_T + ce_weight * CE`` for one teacher's targets, gradient made in the forward."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, labels: torch.Tensor | None, teacher: tuple[torch.Tensor, ...],
                temperature: float, tail: str, kd_weight: float, ce_weight: float, ignore_index: int) -> torch.Tensor:
        s = student_logits.float()
        rows = s.shape[0]
        z = s / temperature if temperature != 1.0 else s
        s_max = s.amax(dim=-1)  # max(s / T) = max(s) / T exactly (division by T > 0 is monotone and rounded once)
        # q: (B, C), a buffer of ours, turned into the gradient in place
        q, lse = _softmax_and_logsumexp(z, s_max / temperature if temperature != 1.0 else s_max)
        kd_scale = kd_weight * temperature / rows  # d(T^2 / B * KL)/ds = T / B * dKL/dz
        # -- CE at T = 1: its value now; its gradient (softmax(s) - onehot) * weight per row ------------
        ce_loss = ce_col = q_ce = None
        extra: torch.Tensor | float = 0.0  # the CE's row factor when it shares the KD's softmax (T = 1)
        if labels is not None and ce_weight:
            safe, ce_col = _ce_weights(labels, ignore_index, ce_weight)
            if temperature == 1.0:
                lse_ce, extra = lse, ce_col  # softmax(s) is the KD's q: its part joins the KD's row factor
            else:
                q_ce, lse_ce = _softmax_and_logsumexp(s, s_max)
            ce_loss = ((lse_ce - s.gather(1, safe).squeeze(1))[:, None] * ce_col).sum()
        # -- KD at T: q = softmax(s / T) against the teacher's p ---------------------------------------
        if tail == DENSE:
            teacher_z, p, lse_p = teacher  # (B, C) at T, its softmax, its logsumexp
            # sum_j p_j (log p_j - log q_j) = sum_j p_j (t_j - z_j) - (lse_p - lse): sum_j p_j = 1
            kd = (p * (teacher_z - z)).sum() - (lse_p - lse).sum()
            grad = q.mul_(kd_scale + extra).add_(p, alpha=-kd_scale)
        else:
            log_p, log_rest, ids = teacher  # (B, K), (B,), (B, K)
            log_q_k = z.gather(1, ids) - lse[:, None]
            p = log_p.exp()
            kd = (p * (log_p - log_q_k)).sum()
            if tail == "rest":
                q.scatter_(1, ids, 0.0)  # the tail only: summed, not 1 - sum_k (no cancellation)
                log_q_r = torch.log(q.sum(dim=-1)).clamp(min=LOG_MASS_FLOOR)
                p_r = log_rest.exp()
                kd = kd + (p_r * (log_rest - log_q_r)).sum()
                # off K: q_j (1 - p_r / q_r); on K: q_k - p_k (both plus the shared CE part at T = 1)
                grad = q.mul_(((1.0 - p_r / log_q_r.exp()) * kd_scale)[:, None] + extra)
                grad.scatter_(1, ids, log_q_k.exp() * (kd_scale + extra) - p * kd_scale)
            else:  # ignore: q_j P everywhere, minus p_k on K
                grad = q.mul_((p.sum(dim=-1) * kd_scale)[:, None] + extra)
                grad.scatter_add_(1, ids, p * -kd_scale)
        loss = kd * (kd_weight * temperature**2 / rows)
        if ce_col is not None:
            loss = loss + ce_loss
            if q_ce is not None:
                grad = grad.addcmul_(q_ce, ce_col) if isinstance(ce_col, torch.Tensor) else grad.add_(q_ce, alpha=ce_col)
            grad.scatter_add_(1, safe, -ce_col if isinstance(ce_col, torch.Tensor) else grad.new_full(safe.shape, -ce_col))
        ctx.save_for_backward(grad)
        ctx.dtype = student_logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # loss.backward() sends 1: skip a pass over (B, C) (read back only on the CPU, never a GPU sync)
        if not (grad_out.device.type == "cpu" and grad_out.item() == 1.0):
            grad.mul_(grad_out)
        return grad.to(ctx.dtype), None, None, None, None, None, None, None


def fused_distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor | None, target: Targets, temperature: float,
                            tail: str, kd_weight: float, ce_weight: float, ignore_index: int = -100) -> torch.Tensor:
    """``kd_weight * kd_loss(student, target, T, tail) + ce_weight * cross_entropy(student, labels)`` in one pass.

    ``target``: one teacher's full or top-k :class:`Targets`, already on the student's device in
    float32 (what ``kd_loss``'s checks return); ``tail``: ``"rest"`` or ``"ignore"`` for top-k
    targets (full logits take none). ``labels=None`` or ``ce_weight=0`` leaves the CE term out.
    """
    if target.logits is not None:
        teacher_z = target.logits.float() / temperature
        p, lse_p = _softmax_and_logsumexp(teacher_z, teacher_z.amax(dim=-1))
        teacher: tuple[torch.Tensor, ...] = (teacher_z, p, lse_p)
        tail = DENSE
    else:
        log_p, log_rest = topk_log_probs(target.values, target.logsumexp, temperature, target.num_classes, target.log_tail)
        teacher = (log_p, log_rest, target.indices)
    return _FusedCEKD.apply(student_logits, labels, teacher, temperature, tail, kd_weight, ce_weight, ignore_index)
