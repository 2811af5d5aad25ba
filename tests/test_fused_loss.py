"""The fused CE + KD loss (losses/fused.py) equals the two losses it replaces, value and gradient.

The reference is computed here, in float64, from first principles: the teacher's top-k rebuilt as a
dense distribution (the stored logits at their ids, the tail's mean logit everywhere else: the
even-spread tail model at every T), the KL terms written out per tail, and torch's own float64
cross-entropy; autograd gives the reference gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logit_cache import DistillationLoss, KLDivergence, Targets, kd_loss
from logit_cache.losses import fused as fused_module

B, C = 12, 50


def _teacher(k: int, seed: int = 0) -> tuple[torch.Tensor, Targets]:
    gen = torch.Generator().manual_seed(seed)
    # spread enough for peaked rows, not so much that a one-class tail (K = C - 1) is below float32's digits
    logits = torch.randn(B, C, generator=gen, dtype=torch.float64) * 1.5
    logits[:, 0] = -6.0  # never in a top-k below C: see test_extreme_student_logits_stay_finite
    values, ids = logits.topk(k, dim=-1)
    target = Targets("topk", C, values=values.float(), indices=ids, logsumexp=logits.logsumexp(-1).float())
    # the reference starts from what is stored (float32), as the loss does
    return logits.float().double(), target


def _reference(s: torch.Tensor, logits: torch.Tensor, k: int | None, labels: torch.Tensor, temperature: float, tail: str,
               kd_weight: float, ce_weight: float) -> tuple[float, torch.Tensor]:
    s = s.detach().double().requires_grad_()
    log_q = F.log_softmax(s / temperature, dim=-1)
    if k is None:  # full logits
        log_p = F.log_softmax(logits / temperature, dim=-1)
        kd = (log_p.exp() * (log_p - log_q)).sum()
    else:
        values, ids = logits.topk(k, dim=-1)
        lse = logits.logsumexp(-1)
        dense = torch.empty_like(logits)
        if k < C:  # the tail's mean logit (exp-mean): the tail model's stand-in for every tail class
            tail_mass = (lse.exp() - values.exp().sum(-1)).clamp(min=0)
            dense[:] = torch.log(tail_mass / (C - k))[:, None]
        dense.scatter_(1, ids, values)
        log_p_all = F.log_softmax(dense / temperature, dim=-1)
        in_k = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
        p_k, log_p_k, log_q_k = log_p_all.exp().gather(1, ids), log_p_all.gather(1, ids), log_q.gather(1, ids)
        kd = (p_k * (log_p_k - log_q_k)).sum()
        if tail == "rest" and k < C:
            p_r = log_p_all.exp().masked_fill(in_k, 0).sum(-1)
            q_r = log_q.exp().masked_fill(in_k, 0).sum(-1)
            kd = kd + (p_r * (p_r.log() - q_r.log())).sum()
    loss = kd_weight * kd * temperature**2 / s.shape[0]
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s, labels)
    loss.backward()
    return float(loss.detach()), s.grad.float()


def _check(s: torch.Tensor, got: torch.Tensor, want: tuple[float, torch.Tensor], atol: float = 1e-6) -> None:
    value, grad = want
    assert float(got.detach()) == pytest.approx(value, rel=2e-5, abs=1e-6)
    torch.testing.assert_close(s.grad, grad, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
@pytest.mark.parametrize("k", [1, 5, C - 1, C])
@pytest.mark.parametrize("tail", ["rest", "ignore"])
def test_fused_topk_equals_the_float64_reference_and_the_unfused_losses(temperature, k, tail):
    logits, target = _teacher(k)
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    s = (torch.randn(B, C, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    criterion = DistillationLoss(KLDivergence(temperature, tail=tail), kd_loss_weight=0.7, org_loss_weight=0.3)
    loss = criterion(s, labels, target)
    loss.backward()
    # K = C - 1: the one-class tail's mass is 1 - (top-k mass), a difference of float32 numbers near 1,
    # good to ~1e-7 absolute: its class's gradient is good to a few 1e-6 (the unfused loss's too)
    _check(s, loss, _reference(s, logits, k, labels, temperature, tail, 0.7, 0.3), atol=1e-5 if k == C - 1 else 1e-6)
    # and the unfused pair, through the public functions
    s2 = s.detach().clone().requires_grad_()
    unfused = 0.7 * kd_loss(s2, target, temperature, tail=tail) + 0.3 * F.cross_entropy(s2, labels)
    unfused.backward()
    assert float(loss.detach()) == pytest.approx(float(unfused.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fused_full_logits_equal_the_reference(temperature):
    logits, _ = _teacher(3)
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))
    s = torch.randn(B, C, generator=torch.Generator().manual_seed(4)).requires_grad_()
    target = Targets("full", C, logits=logits.half())  # stored as float16, as a cache holds it
    loss = DistillationLoss(KLDivergence(temperature))(s, labels, target)
    loss.backward()
    _check(s, loss, _reference(s, logits.half().double(), None, labels, temperature, "rest", 0.9, 0.1))


def test_ignored_labels_drop_out_of_the_mean_as_in_cross_entropy():
    logits, target = _teacher(5)
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(5))
    labels[::3] = -100
    s = torch.randn(B, C, generator=torch.Generator().manual_seed(6)).requires_grad_()
    loss = DistillationLoss(KLDivergence(2.0))(s, labels, target)
    loss.backward()
    _check(s, loss, _reference(s, logits, 5, labels, 2.0, "rest", 0.9, 0.1))


def test_weights_zero_and_scaled_gradients():
    """org_loss_weight=0 needs no labels; a loss scaled before backward scales the gradient."""
    logits, target = _teacher(5)
    s = torch.randn(B, C, generator=torch.Generator().manual_seed(7)).requires_grad_()
    loss = DistillationLoss(KLDivergence(4.0), kd_loss_weight=1.0, org_loss_weight=0.0)(s, None, target)
    (loss * 3.0).backward()
    value, grad = _reference(s, logits, 5, torch.zeros(B, dtype=torch.long), 4.0, "rest", 1.0, 0.0)
    assert float(loss.detach()) == pytest.approx(value, rel=2e-5)
    torch.testing.assert_close(s.grad, grad * 3.0, rtol=1e-4, atol=1e-6)


def test_extreme_student_logits_stay_finite():
    """A student sure of a class outside the teacher's top-k: its q_k underflow to 0 in float32, yet
    log q_k comes exact from the logsumexp (the softmax's argmax), never log(0)."""
    logits, target = _teacher(5)
    s = torch.zeros(B, C)
    s[:, 0] = 200.0  # q underflows to 0 everywhere but class 0
    s.requires_grad_()
    labels = torch.ones(B, dtype=torch.long)
    loss = DistillationLoss(KLDivergence(1.0))(s, labels, target)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(s.grad).all()
    _check(s, loss, _reference(s, logits, 5, labels, 1.0, "rest", 0.9, 0.1))


def test_the_fused_path_is_taken_only_for_the_default_pair(monkeypatch):
    calls = []
    real = fused_module.fused_distillation_loss
    monkeypatch.setattr("logit_cache.losses.sample.fused_distillation_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _, target = _teacher(5)
    labels = torch.randint(0, C, (B,))
    s = torch.randn(B, C, requires_grad=True)
    DistillationLoss()(s, labels, target)
    assert calls == [1]
    smoothed = DistillationLoss(ce_loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    loss = smoothed(s, labels, target)
    want = 0.9 * kd_loss(s, target, 4.0) + 0.1 * F.cross_entropy(s, labels, label_smoothing=0.1)
    assert calls == [1] and float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    DistillationLoss(KLDivergence(4.0, tail="renormalize"))(s, labels, target)
    DistillationLoss()(s, labels, [target, target])
    assert calls == [1]
    with torch.no_grad():  # no gradient wanted: nothing to fuse
        DistillationLoss()(s, labels, target)
    assert calls == [1]
