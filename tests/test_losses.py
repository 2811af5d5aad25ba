"""KD losses and the top-k tail model against independent float64 computations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logit_cache.errors import TargetMismatchError, UsageError
from logit_cache.losses import TAILS, DistillationLoss, KLDivergence, kd_loss
from logit_cache.targets import LOG_MASS_FLOOR, Targets, topk_log_probs

B, C = 16, 20


def logits(seed: int, scale: float = 3.0, rows: int = B, classes: int = C) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * scale


def full(t: torch.Tensor) -> Targets:
    return Targets("full", t.shape[1], logits=t)


def topk(t: torch.Tensor, k: int) -> Targets:
    v, i = t.topk(k)
    return Targets("topk", t.shape[1], values=v, indices=i, logsumexp=torch.logsumexp(t, 1))


# -- independent references (float64 numpy, explicit loops over rows) ----------------------------


def softmax64(x: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def kl64(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i (log p_i - log q_i) over the entries with p_i > 0."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    keep = p > 0
    return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def ref_full(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    p, q = softmax64(t.double().numpy(), temperature), softmax64(s.detach().double().numpy(), temperature)
    return sum(kl64(p[r], q[r]) for r in range(len(p))) / len(p) * temperature**2


def ref_topk(s: torch.Tensor, target: Targets, temperature: float, tail: str) -> float:
    """The three tails written from the definitions in the losses.py / targets.py docstrings."""
    values = target.values.double().numpy()
    ids = target.indices.long().numpy()
    lse = target.logsumexp.double().numpy()
    student = s.detach().double().numpy()
    rows, k = values.shape
    classes = target.num_classes
    total = 0.0
    for r in range(rows):
        q_all = softmax64(student[r], temperature)
        outside = np.ones(classes, dtype=bool)
        outside[ids[r]] = False
        if tail == "renormalize":
            p = softmax64(values[r], temperature)
            q = softmax64(student[r, ids[r]], temperature)
            total += kl64(p, q)
            continue
        count = classes - k
        if count == 0:
            p_top, p_rest = softmax64(values[r], temperature), 0.0
        else:
            mass = np.exp(values[r] - lse[r]).sum()
            # float16-rounded values can hold slightly more than all the mass: the tail is then floored (targets.py)
            rest = max(1.0 - mass, math.exp(LOG_MASS_FLOOR))
            u = math.log(math.exp(lse[r]) * rest / count)  # (C - K) exp(u) = exp(lse) * rest
            z = np.exp(values[r] / temperature).sum() + count * math.exp(u / temperature)
            p_top = np.exp(values[r] / temperature) / z
            p_rest = count * math.exp(u / temperature) / z
        total += kl64(p_top, q_all[ids[r]])
        if tail == "rest" and p_rest > 0:
            total += p_rest * (math.log(p_rest) - math.log(q_all[outside].sum()))
    return total / rows * temperature**2


def collapsed_kl(s: torch.Tensor, t: torch.Tensor, k: int, temperature: float) -> float:
    """KL between teacher and student at T over K+1 buckets (teacher's top-k ids + everything else), from full logits."""
    p_all, q_all = softmax64(t.double().numpy(), temperature), softmax64(s.detach().double().numpy(), temperature)
    teacher = t.double().numpy()
    total = 0.0
    for r in range(len(teacher)):
        ids = np.argsort(-teacher[r], kind="stable")[:k]
        outside = np.ones(teacher.shape[1], dtype=bool)
        outside[ids] = False
        p = np.append(p_all[r, ids], p_all[r, outside].sum())
        q = np.append(q_all[r, ids], q_all[r, outside].sum())
        total += kl64(p, q)
    return total / len(teacher) * temperature**2


# -- full targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_full_mode_matches_float64_kl(temperature):
    s, t = logits(1, 2.0), logits(2)
    want = ref_full(s, t, temperature)
    got = kd_loss(s, full(t), temperature=temperature)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert kd_loss(s, t, temperature).item() == pytest.approx(want, rel=1e-5, abs=1e-6)  # a plain tensor is full logits
    assert KLDivergence(temperature=temperature)(s, full(t)).item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert KLDivergence(temperature=temperature)(s, t).item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_loss_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    t = logits(3)
    assert kd_loss(t.clone(), full(t), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits(4), full(t), temperature=2.0).item() > 0.1


def test_full_mode_gradient_matches_the_closed_form():
    """d/ds of KL(p_T || softmax(s/T)) * T^2 / B is (softmax(s/T) - p_T) * T / B."""
    temperature = 3.0
    s = logits(5, 2.0).requires_grad_()
    t = logits(6)
    kd_loss(s, full(t), temperature=temperature).backward()
    want = (softmax64(s.detach().numpy(), temperature) - softmax64(t.numpy(), temperature)) * temperature / B
    np.testing.assert_allclose(s.grad.double().numpy(), want, rtol=1e-4, atol=1e-7)


# -- top-k targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("tail", TAILS)
def test_topk_with_all_classes_equals_the_full_loss(tail, temperature):
    s, t = logits(7, 2.0), logits(8)
    want = kd_loss(s, full(t), temperature=temperature).item()
    assert want == pytest.approx(ref_full(s, t, temperature), rel=1e-5)
    got = kd_loss(s, topk(t, C), temperature=temperature, tail=tail).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("k", [1, 5, 12, C - 1])
@pytest.mark.parametrize("tail", TAILS)
def test_each_tail_matches_its_definition(tail, k, temperature):
    s, t = logits(9, 2.0), logits(10)
    target = topk(t, k)
    want = ref_topk(s, target, temperature, tail)
    got = kd_loss(s, target, temperature=temperature, tail=tail).item()
    # K = C - 1 leaves tails of 1e-6..1e-4 of the mass: float32's 1 - mass keeps only a few digits of them, and T > 1
    # raises the tail's weight, so the loss agrees with float64 to ~5e-5 there (a precision limit, not a model error)
    assert got == pytest.approx(want, rel=1e-5 if k < C - 1 else 2e-4, abs=1e-6)


def test_default_tail_is_rest():
    s, t = logits(11), logits(12)
    target = topk(t, 4)
    assert kd_loss(s, target, temperature=2.0).item() == kd_loss(s, target, temperature=2.0, tail="rest").item()
    assert KLDivergence(temperature=2.0)(s, target).item() == pytest.approx(ref_topk(s, target, 2.0, "rest"), rel=1e-5)


def test_tails_differ_from_each_other_below_all_classes():
    s, t = logits(13, 2.0), logits(14, 1.0)  # a soft teacher: the tail holds real mass
    target = topk(t, 3)
    losses = {tail: kd_loss(s, target, temperature=2.0, tail=tail).item() for tail in TAILS}
    assert len({round(v, 4) for v in losses.values()}) == 3, losses


@pytest.mark.parametrize("k", [1, 4, 10])
def test_rest_at_temperature_one_uses_the_exact_tail_mass(k):
    """At T=1 the (K+1)-bucket KL is exact for any tail: compare with the full logits collapsed."""
    s, t = logits(15, 2.0), logits(16, 1.5)  # uneven tails
    got = kd_loss(s, topk(t, k), temperature=1.0, tail="rest").item()
    assert got == pytest.approx(collapsed_kl(s, t, k, 1.0), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_rest_is_exact_for_a_flat_tail(temperature):
    """All non-top-k logits equal: the even-spread model is the truth at every T."""
    k = 4
    t = torch.full((B, C), -1.0)
    gen = torch.Generator().manual_seed(17)
    for r in range(B):
        ids = torch.randperm(C, generator=gen)[:k]
        t[r, ids] = torch.rand(k, generator=gen) * 4 + 0.5  # above the flat tail, distinct
    s = logits(18, 2.0)
    got = kd_loss(s, topk(t, k), temperature=temperature, tail="rest").item()
    assert got == pytest.approx(collapsed_kl(s, t, k, temperature), rel=1e-5, abs=1e-6)


def test_rest_is_not_exact_for_an_uneven_tail_above_temperature_one():
    """The docstring's caveat, checked: an uneven tail makes the T=4 loss differ from the collapsed truth."""
    s, t = logits(19, 2.0), logits(20, 3.0)
    got = kd_loss(s, topk(t, 3), temperature=4.0, tail="rest").item()
    truth = collapsed_kl(s, t, 3, 4.0)
    assert abs(got - truth) > 1e-3 * truth


# -- gradients -----------------------------------------------------------------------------------


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def grad_targets(t: torch.Tensor, k: int | None) -> Targets:
    """Targets whose tensors are leaves requiring grad (as if built from a teacher outside no_grad)."""
    if k is None:
        return Targets("full", t.shape[1], logits=leaf(t))
    v, i = t.topk(k)
    return Targets("topk", t.shape[1], values=leaf(v), indices=i, logsumexp=leaf(torch.logsumexp(t, 1)))


def peaked(rows: int = B) -> torch.Tensor:
    """A teacher whose top-1 holds all mass (exp(-60) elsewhere: zero in float32)."""
    t = torch.zeros(rows, C)
    t[torch.arange(rows), torch.arange(rows) % C] = 60.0
    return t


@pytest.mark.parametrize(
    ("k", "tail"),
    [(None, None), (5, "rest"), (5, "renormalize"), (5, "ignore"), (C, "rest"), (C, "renormalize"), (C, "ignore"), (1, "rest")],
)
@pytest.mark.parametrize("teacher", ["random", "peaked"])
def test_gradients_reach_the_student_only(k, tail, teacher):
    t = logits(21) if teacher == "random" else peaked()
    s = leaf(logits(22, 2.0))
    target = grad_targets(t, k)
    loss = kd_loss(s, target, temperature=4.0, tail=tail)
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for name in ("logits", "values", "logsumexp"):
        tensor = getattr(target, name)
        if tensor is not None:
            assert tensor.grad is None, f"the loss propagated into the target's {name}"


@pytest.mark.parametrize(("k", "tail"), [(None, None), (5, "rest"), (5, "renormalize"), (5, "ignore"), (C, "rest"), (1, "rest")])
def test_gradients_with_several_teachers_reach_the_student_only(k, tail):
    s = leaf(logits(22, 2.0))
    targets = [grad_targets(peaked(), k), grad_targets(logits(21), k)]
    loss = kd_loss(s, targets, temperature=4.0, tail=tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for target in targets:
        assert all(getattr(target, name) is None or getattr(target, name).grad is None for name in ("logits", "values", "logsumexp"))


def test_plain_tensor_target_gets_no_gradient():
    t, s = leaf(logits(23)), leaf(logits(24))
    kd_loss(s, t, temperature=2.0).backward()
    assert t.grad is None and s.grad is not None


def test_topk_gradient_matches_finite_differences():
    """The rest tail's gradient is the gradient of the loss it computes (float64 central differences of the reference)."""
    temperature, k = 2.0, 4
    s0, t = logits(25, 2.0, rows=3, classes=8), logits(26, rows=3, classes=8)
    target = topk(t, k)
    s = leaf(s0)
    kd_loss(s, target, temperature=temperature, tail="rest").backward()
    eps = 1e-4
    numeric = np.zeros(s0.shape)
    for r in range(s0.shape[0]):
        for c in range(s0.shape[1]):
            hi, lo = s0.double().clone(), s0.double().clone()
            hi[r, c] += eps
            lo[r, c] -= eps
            numeric[r, c] = (ref_topk(hi, target, temperature, "rest") - ref_topk(lo, target, temperature, "rest")) / (2 * eps)
    np.testing.assert_allclose(s.grad.double().numpy(), numeric, rtol=1e-3, atol=1e-6)


def test_empty_tail_and_all_mass_in_top_k_give_zero_loss_at_the_teacher():
    t = peaked()
    for k, tail in [(C, "rest"), (1, "rest"), (3, "rest"), (3, "ignore")]:
        s = leaf(t)
        loss = kd_loss(s, topk(t, k), temperature=1.0, tail=tail)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-5), (k, tail)
        assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-5, (k, tail)


# -- storage dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
def test_float16_values_and_uint16_ids_widen_like_float32(tail):
    s, t = logits(27, 2.0), logits(28)
    v, i = t.topk(6)
    lse = torch.logsumexp(t, 1)
    v16 = torch.from_numpy(v.numpy().astype(np.float16))
    i16 = torch.from_numpy(i.numpy().astype(np.uint16))
    stored = Targets("topk", C, values=v16, indices=i16, logsumexp=lse)
    widened = Targets("topk", C, values=v16.float(), indices=i16.long(), logsumexp=lse)
    assert stored.values.dtype == torch.float16 and stored.indices.dtype == torch.uint16
    got = kd_loss(s, stored, temperature=4.0, tail=tail).item()
    assert got == pytest.approx(kd_loss(s, widened, temperature=4.0, tail=tail).item(), abs=1e-6)
    assert got == pytest.approx(ref_topk(s, widened, 4.0, tail), rel=1e-5, abs=1e-6)
    assert stored.values.dtype == torch.float16  # the caller's batch is not modified


def test_float16_full_logits_widen_like_float32():
    s, t = logits(29, 2.0), logits(30)
    t16 = torch.from_numpy(t.numpy().astype(np.float16))
    got = kd_loss(s, full(t16), temperature=2.0).item()
    assert got == pytest.approx(kd_loss(s, full(t16.float()), temperature=2.0).item(), abs=1e-6)
    assert got == pytest.approx(ref_full(s, t16.float(), 2.0), rel=1e-5)


# -- several teachers ----------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [None, *TAILS])
def test_two_identical_teachers_equal_one(tail):
    s, t = logits(31, 2.0), logits(32)
    target = full(t) if tail is None else topk(t, 5)
    single = kd_loss(s, target, temperature=4.0, tail=tail).item()
    pair = kd_loss(s, [target, target], temperature=4.0, tail=tail).item()
    assert pair == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_two_full_teachers_are_averaged_in_probability_space():
    temperature = 3.0
    s, t1, t2 = logits(33, 2.0), logits(34), logits(35, 1.0)
    mean = (softmax64(t1.numpy(), temperature) + softmax64(t2.numpy(), temperature)) / 2
    q = softmax64(s.numpy(), temperature)
    want = sum(kl64(mean[r], q[r]) for r in range(B)) / B * temperature**2
    got = kd_loss(s, [full(t1), t2], temperature=temperature).item()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # not the mean of the two losses (KL is convex in p: the mixture's KL is smaller)
    assert got < (ref_full(s, t1, temperature) + ref_full(s, t2, temperature)) / 2


def test_two_topk_teachers_with_rest_tails_average_their_dense_distributions():
    """Each teacher made dense (top-k probs + its tail spread evenly), averaged; support = union of ids; one rest bucket."""
    temperature, k = 2.0, 3
    s, t1, t2 = logits(36, 2.0), logits(37), logits(38)
    targets = [topk(t1, k), topk(t2, k)]
    q_all = softmax64(s.numpy(), temperature)
    total = 0.0
    for r in range(B):
        dense, support = np.zeros(C), np.zeros(C, dtype=bool)
        for target in targets:
            v, ids, lse = target.values[r].double().numpy(), target.indices[r].numpy(), float(target.logsumexp[r])
            rest = 1.0 - np.exp(v - lse).sum()
            u = math.log(math.exp(lse) * rest / (C - k))
            z = np.exp(v / temperature).sum() + (C - k) * math.exp(u / temperature)
            p = np.full(C, math.exp(u / temperature) / z)
            p[ids] = np.exp(v / temperature) / z
            dense += p / len(targets)
            support[ids] = True
        total += kl64(dense[support], q_all[r, support])
        p_rest, q_rest = dense[~support].sum(), q_all[r, ~support].sum()
        total += p_rest * (math.log(p_rest) - math.log(q_rest))
    want = total / B * temperature**2
    assert kd_loss(s, targets, temperature=temperature).item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_teachers_per_step_picks_one_teacher_per_call():
    s, t1, t2 = logits(39, 2.0), logits(40), logits(41)
    targets = [topk(t1, 5), topk(t2, 5)]
    singles = [kd_loss(s, target, temperature=4.0).item() for target in targets]
    assert abs(singles[0] - singles[1]) > 1e-3
    module = KLDivergence(temperature=4.0, teachers_per_step=1, seed=0)
    seen = []
    for _ in range(20):
        value = module(s, targets).item()
        matches = [j for j, single in enumerate(singles) if value == pytest.approx(single, rel=1e-6)]
        assert len(matches) == 1, (value, singles)
        seen.append(matches[0])
    assert set(seen) == {0, 1}


def test_teachers_per_step_is_reproducible_from_its_seed():
    s, t1, t2 = logits(42, 2.0), logits(43), logits(44)
    targets = [full(t1), full(t2)]
    a, b = KLDivergence(teachers_per_step=1, seed=3), KLDivergence(teachers_per_step=1, seed=3)
    run_a = [a(s, targets).item() for _ in range(10)]
    run_b = [b(s, targets).item() for _ in range(10)]
    assert run_a == run_b and len(set(run_a)) == 2
    # as many teachers as given: all of them, i.e. the ensemble loss
    assert KLDivergence(teachers_per_step=2)(s, targets).item() == kd_loss(s, targets).item()


# -- DistillationLoss ----------------------------------------------------------------------------


def test_distillation_loss_combines_ce_and_kd():
    s, t = logits(45, 2.0), logits(46)
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(47))
    target = topk(t, 5)
    q = softmax64(s.numpy(), 1.0)
    ce = -sum(math.log(q[r, int(labels[r])]) for r in range(B)) / B
    kd = ref_topk(s, target, 4.0, "rest")
    loss = DistillationLoss(KLDivergence(temperature=4.0), kd_loss_weight=0.9, org_loss_weight=0.1)
    assert loss(s, labels, target).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)
    # defaults: weights 0.9 / 0.1 and KD at T=4
    assert DistillationLoss()(s, labels, target).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)

    windowed = DistillationLoss(KLDivergence(temperature=4.0), kd_loss_weight=0.9, org_loss_weight=0.1, start=0.5, end=1.0)
    assert windowed(s, labels, target, progress=0.2).item() == pytest.approx(ce, rel=1e-5)
    assert windowed(s, labels, target, progress=0.5).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)
    assert windowed(s, labels, target, progress=0.6).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)
    assert windowed(s, labels, target, progress=1.0).item() == pytest.approx(ce, rel=1e-5)  # end is exclusive
    assert windowed(s, labels, target).item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-5)  # no progress: KD applies


def test_distillation_loss_without_labels():
    s, t = logits(48), logits(49)
    kd_only = DistillationLoss(KLDivergence(temperature=2.0), kd_loss_weight=1.0, org_loss_weight=0.0)
    assert kd_only(s, None, full(t)).item() == pytest.approx(ref_full(s, t, 2.0), rel=1e-5)
    with pytest.raises(UsageError, match="needs labels"):
        DistillationLoss()(s, None, full(t))
    with pytest.raises(UsageError, match="needs labels"):
        DistillationLoss(start=0.5)(s, None, full(t), progress=0.1)


# -- errors --------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong():
    s, t = logits(50), logits(51)
    with pytest.raises(TargetMismatchError, match="student has 12 outputs"):
        kd_loss(logits(52, classes=12), topk(t, 3))
    with pytest.raises(TargetMismatchError, match="outputs"):
        kd_loss(logits(52, classes=12), t)
    with pytest.raises(TargetMismatchError, match="top-k"):
        kd_loss(s, full(t), tail="renormalize")
    with pytest.raises(UsageError, match="expected one of"):
        kd_loss(s, topk(t, 3), tail="bucket")
    with pytest.raises(UsageError, match="expected one of"):
        KLDivergence(tail="bucket")
    for bad in (0.0, -1.0):
        with pytest.raises(UsageError, match="temperature must be positive"):
            kd_loss(s, full(t), temperature=bad)
    with pytest.raises(TargetMismatchError, match="misaligned"):
        kd_loss(s[:10], topk(t, 3))
    with pytest.raises(TargetMismatchError, match="misaligned"):
        kd_loss(s, [full(t), full(t[:10])])
    with pytest.raises(UsageError, match=r"start=0\.8, end=0\.2"):
        DistillationLoss(start=0.8, end=0.2)
    with pytest.raises(UsageError, match="teachers_per_step"):
        KLDivergence(teachers_per_step=0)
    with pytest.raises(UsageError, match="at least one target"):
        kd_loss(s, [])
    with pytest.raises(TargetMismatchError, match=r"\[batch, classes\]"):
        kd_loss(s, t[0])


# -- topk_log_probs ------------------------------------------------------------------------------


def test_topk_log_probs_at_temperature_one_are_exact():
    t = logits(53, 2.0)
    v, _ = t.topk(5)
    lse = torch.logsumexp(t, 1)
    log_p, log_tail = topk_log_probs(v, lse, 1.0, C)
    t64 = t.double().numpy()
    lse64 = np.log(np.exp(t64).sum(1))
    top64 = -np.sort(-t64, axis=1)[:, :5]
    np.testing.assert_allclose(log_p.double().numpy(), top64 - lse64[:, None], rtol=0, atol=2e-6)
    tail64 = np.log(1.0 - np.exp(top64 - lse64[:, None]).sum(1))
    np.testing.assert_allclose(log_tail.double().numpy(), tail64, rtol=0, atol=2e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("k", [1, 7, C])
def test_topk_log_probs_sum_to_one(temperature, k):
    t = logits(54, 2.0)
    v, _ = t.topk(k)
    log_p, log_tail = topk_log_probs(v, torch.logsumexp(t, 1), temperature, C)
    assert log_p.shape == (B, k) and log_tail.shape == (B,)
    total = log_p.double().exp().sum(1) + (log_tail.double().exp() if k < C else 0.0)
    np.testing.assert_allclose(total.numpy(), 1.0, rtol=0, atol=1e-5)
    if k == C:  # empty tail: floored, not -inf
        assert (log_tail == LOG_MASS_FLOOR).all()


def test_tail_model_overestimates_an_uneven_tail_above_temperature_one():
    """targets.py: by the power-mean inequality the even-spread model gives the tail more mass at T > 1, less at T < 1."""
    t = logits(55, 3.0)
    k = 4
    v, ids = t.topk(k)
    lse = torch.logsumexp(t, 1)
    for temperature, above in [(3.0, True), (0.5, False)]:
        _, log_tail = topk_log_probs(v, lse, temperature, C)
        p = softmax64(t.numpy(), temperature)
        mask = np.ones_like(p, dtype=bool)
        np.put_along_axis(mask, ids.numpy(), False, axis=1)
        truth = (p * mask).sum(1)
        model = log_tail.double().exp().numpy()
        assert ((model > truth) if above else (model < truth)).all(), (temperature, model, truth)


def test_topk_log_probs_with_all_mass_in_top_k_stays_finite():
    t = peaked()
    v, _ = t.topk(2)
    log_p, log_tail = topk_log_probs(v, torch.logsumexp(t, 1), 4.0, C)
    assert torch.isfinite(log_p).all() and torch.isfinite(log_tail).all()
    assert (log_tail >= LOG_MASS_FLOOR).all()


# -- dispatch: on what the batch holds, refused by the kind's `losses` ---------------------------


def test_losses_dispatch_on_the_batch_and_ask_the_kind_which_losses_read_it():
    """A kind's targets go through the loss by what they hold (top-k values here), not by the mode's name;
    a kind whose `losses` does not name kd_loss is refused by it, and token_kd_loss still reads it."""
    from logit_cache.losses import token_kd_loss
    from logit_cache.targets import register, unregister
    from logit_cache.targets.topk import TopK

    class TokenOnlyTopK(TopK):
        name = "token-only-topk"
        losses = frozenset({"token_kd_loss"})

    register(TokenOnlyTopK())
    try:
        s, t = logits(1), logits(2)
        plain = topk(t, 5)
        renamed = Targets("token-only-topk", C, values=plain.values, indices=plain.indices, logsumexp=plain.logsumexp)
        with pytest.raises(TargetMismatchError, match="mode 'token-only-topk' are not supported by kd_loss"):
            kd_loss(s, renamed)
        assert torch.equal(token_kd_loss(s, renamed, 2.0), token_kd_loss(s, plain, 2.0))
    finally:
        unregister("token-only-topk")


def test_kd_loss_refuses_sampled_targets():
    t = logits(3)
    sampled = Targets("sampled", C, indices=t.topk(4).indices, counts=torch.ones(B, 4, dtype=torch.uint8),
                      logsumexp=torch.logsumexp(t, 1))
    with pytest.raises(TargetMismatchError, match="mode 'sampled' are not supported by kd_loss"):
        kd_loss(logits(4), sampled)
