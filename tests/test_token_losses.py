"""Per-token KD losses (token_losses.py) against dense references written here with plain autograd (float64 but for
the large-vocabulary case), against kd_loss, and statistically for sampled targets."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_factories import LargestFloat32

from logit_cache.errors import TargetMismatchError, UsageError
from logit_cache.losses import TAILS, kd_loss
from logit_cache.targets import LOG_MASS_FLOOR, Targets, count_dtype, encode, index_dtype
from logit_cache.token_losses import masked_token_logits, sampled_weights, token_kd_loss

N, V, K, M = 10, 40, 6, 24
#: chunk sizes: one row at a time, one that does not divide N, more than N, the default
CHUNKS = (1, 3, N + 5, 4096)


def randn(seed: int, rows: int = N, classes: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * scale


def stored(logits: torch.Tensor, mode: str, dtype: str = "float32", k: int | None = None, m: int | None = None,
           sample_temperature: float = 1.0, seed: int = 0) -> Targets:
    """Targets as a cache delivers them on the host: encoded, then narrowed to the storage dtypes
    (float16 values when asked, uint16/int32 ids, uint8/uint16 counts)."""
    classes = logits.shape[1]
    encoded = encode(logits, mode, k, dtype, m=m, sample_temperature=sample_temperature,
                     generator=torch.Generator().manual_seed(seed))
    narrow = {"topk_indices": index_dtype(classes), "sampled_indices": index_dtype(classes)}
    if m is not None:
        narrow["sampled_counts"] = count_dtype(m)
    arrays = {name: t.numpy().astype(narrow.get(name, t.numpy().dtype)) for name, t in encoded.arrays.items()}
    return Targets.from_arrays(mode, classes, arrays, sample_temperature=sample_temperature)


# -- dense references: plain autograd in the student's dtype (float64 but for the large case), from the definitions --


def ref_full(s: torch.Tensor, target: Targets, temperature: float, tail: str | None = None) -> torch.Tensor:
    log_p = F.log_softmax(target.logits.to(s.dtype) / temperature, dim=1)
    log_q = F.log_softmax(s / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * temperature**2


def ref_topk(s: torch.Tensor, target: Targets, temperature: float, tail: str | None) -> torch.Tensor:
    """The three tails; the teacher side from the tail model (targets.py docstring), not topk_log_probs."""
    tail = tail or "rest"
    values, ids, lse = target.values.to(s.dtype), target.indices.long(), target.logsumexp.to(s.dtype)
    k = values.shape[1]
    log_q = F.log_softmax(s / temperature, dim=1)
    log_q_k = log_q.gather(1, ids)
    if tail == "renormalize":
        log_p = F.log_softmax(values / temperature, dim=1)
        student = F.log_softmax(s.gather(1, ids) / temperature, dim=1)
        return (log_p.exp() * (log_p - student)).sum(dim=1).mean() * temperature**2
    count = target.num_classes - k
    if count == 0:
        log_p, log_r = F.log_softmax(values / temperature, dim=1), None
    else:
        # tail mass at T=1, spread evenly: (C - K) exp(u) = exp(lse) * rest; floored as targets.py does
        if target.log_tail is None:
            rest = (1.0 - torch.exp(values - lse[:, None]).sum(dim=1)).clamp(min=math.exp(LOG_MASS_FLOOR))
        else:  # the stored tail; the values keep their ratios and fill the rest (targets.topk_log_probs)
            rest = target.log_tail.to(s.dtype).clamp(min=LOG_MASS_FLOOR).exp()
            lse = torch.logsumexp(values, dim=1) - torch.log1p(-rest)
        u = lse + torch.log(rest) - math.log(count)
        tail_t = math.log(count) + u / temperature  # log of the tail's unnormalised mass at T
        log_z = torch.logsumexp(torch.cat([values / temperature, tail_t[:, None]], dim=1), dim=1)
        log_p, log_r = values / temperature - log_z[:, None], tail_t - log_z
    per_row = (log_p.exp() * (log_p - log_q_k)).sum(dim=1)
    if tail == "rest" and log_r is not None:
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids, True)
        log_q_r = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), dim=1)
        per_row = per_row + log_r.exp() * (log_r - log_q_r)
    return per_row.mean() * temperature**2


def ref_weights(target: Targets, temperature: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """w_j ∝ counts_j * p_T(x_j) / q_Ts(x_j) = counts_j * exp(z_j (1/T - 1/Ts)) (times a row constant)."""
    counts = target.counts.to(dtype)
    if temperature == target.sample_temperature:
        return counts / counts.sum(dim=1, keepdim=True)
    w = counts * torch.exp(target.values.to(dtype) * (1 / temperature - 1 / target.sample_temperature))
    return w / w.sum(dim=1, keepdim=True)


def ref_sampled(s: torch.Tensor, target: Targets, temperature: float, tail: str | None = None) -> torch.Tensor:
    log_q = F.log_softmax(s / temperature, dim=1).gather(1, target.indices.long())
    return -(ref_weights(target, temperature, s.dtype) * log_q).sum(dim=1).mean() * temperature**2


REFERENCES = {"full": ref_full, "topk": ref_topk, "sampled": ref_sampled}


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """max |got - want| <= rel * max |want|: relative to the tensor's scale (entries near 0 included)."""
    dtype = torch.promote_types(got.dtype, want.dtype)  # float64 against a float64 reference
    got, want = got.to(dtype), want.to(dtype)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale + 1e-12, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def check_against_reference(student: torch.Tensor, target: Targets, temperature: float, tail: str | None = None,
                            rel: float = 1e-5, chunks: tuple[int, ...] = CHUNKS) -> None:
    """Loss and gradient for every chunk size vs the dense reference (upstream gradient 1.7: the scale passes through)."""
    s64 = student.detach().double().requires_grad_()
    want = REFERENCES[target.mode](s64, target, temperature, tail)
    (want_grad,) = torch.autograd.grad(1.7 * want, s64)
    for chunk in chunks:
        s = student.detach().clone().requires_grad_()
        loss = token_kd_loss(s, target, temperature, tail, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad(1.7 * loss, s)
        assert loss.shape == () and grad.dtype == student.dtype
        assert_rel(loss, want, rel)
        assert_rel(grad, want_grad, rel)


# -- agreement with the dense references ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_matches_dense_reference(dtype, temperature):
    check_against_reference(randn(1), stored(randn(2), "full", dtype), temperature)


@pytest.mark.parametrize("tail", [*TAILS, None])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_topk_matches_dense_reference(tail, dtype, temperature):
    check_against_reference(randn(3), stored(randn(4), "topk", dtype, k=K), temperature, tail)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(("temperature", "sample_temperature"), [(1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (3.0, 0.5)])
def test_sampled_matches_dense_reference(dtype, temperature, sample_temperature):
    target = stored(randn(6), "sampled", dtype, m=M, sample_temperature=sample_temperature)
    assert (target.counts == 0).any(), "the case should hold padding"
    check_against_reference(randn(5), target, temperature)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [K, V])  # K = V: an empty tail (floored logs)
def test_topk_equals_kd_loss(tail, k):
    student, target = randn(7), stored(randn(8), "topk", "float16", k=k)
    for temperature in (1.0, 4.0):
        a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
        mine, theirs = token_kd_loss(a, target, temperature, tail, chunk_tokens=3), kd_loss(b, target, temperature, tail)
        mine.backward()
        theirs.backward()
        assert_rel(mine, theirs, 1e-6)
        assert_rel(a.grad, b.grad, 1e-6)


def test_full_equals_kd_loss():
    student, target = randn(9), stored(randn(10), "full", "float16")
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    mine, theirs = token_kd_loss(a, target, 2.0, chunk_tokens=4), kd_loss(b, target, 2.0)
    mine.backward()
    theirs.backward()
    assert_rel(mine, theirs, 1e-6)
    assert_rel(a.grad, b.grad, 1e-6)


def test_sampled_weights_are_a_distribution_with_zero_pads():
    target = stored(randn(11), "sampled", m=M, sample_temperature=2.0)
    for temperature in (2.0, 1.0):
        w = sampled_weights(target.to("cpu"), temperature)
        assert torch.allclose(w.sum(dim=1), torch.ones(N))
        assert (w[target.counts == 0] == 0).all() and (w[target.counts > 0] > 0).all()


# -- sampled mode, statistically --------------------------------------------------------------------------


def dense_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of the student against the true teacher distribution at T=1 (float64)."""
    return -(F.softmax(teacher.double(), dim=1) * F.log_softmax(student.double(), dim=1)).sum(dim=1)


def test_sampled_with_many_draws_approaches_the_full_cross_entropy():
    rows, classes, draws = 8, 64, 20000
    student, teacher = randn(12, rows, classes), randn(13, rows, classes)
    loss = token_kd_loss(student, stored(teacher, "sampled", m=draws), temperature=1.0)
    # counts / M is the empirical distribution of M iid draws from softmax(t): the estimate of a row's
    # cross-entropy has variance Var_p(log q) / M, so the mean over rows a standard error of
    # sqrt(sum_n Var_n / M) / rows; 5 standard errors (float32 rounding is far below it)
    p, log_q = F.softmax(teacher.double(), dim=1), F.log_softmax(student.double(), dim=1)
    var = (p * log_q**2).sum(dim=1) - (p * log_q).sum(dim=1) ** 2
    standard_error = math.sqrt(var.sum().item() / draws) / rows
    truth = dense_ce(student, teacher).mean().item()
    assert abs(loss.item() - truth) <= 5 * standard_error
    assert 5 * standard_error < 0.02 * truth  # the check is tight: within 2%


def test_importance_weights_recover_the_teacher_at_another_temperature():
    """Drawn at Ts=2, trained at T=1: the self-normalised weights estimate softmax(t), not softmax(t/2)."""
    rows, classes, draws, sample_temperature = 1000, 32, 256, 2.0
    teacher, student = randn(14, 1, classes), randn(15, 1, classes)
    target = stored(teacher.expand(rows, classes).contiguous(), "sampled", m=draws, sample_temperature=sample_temperature)
    loss = token_kd_loss(student.expand(rows, classes), target, temperature=1.0).item()

    # per row, the estimate is sum_j w_j f(x_j), f = -log q_student, over draws from g = softmax(t / Ts)
    p = F.softmax(teacher.double(), dim=1)[0]
    g = F.softmax(teacher.double() / sample_temperature, dim=1)[0]
    f = -F.log_softmax(student.double(), dim=1)[0]
    truth = (p * f).sum().item()
    w = ref_weights(target, 1.0)  # (rows, M)
    estimates = (w * f[target.indices.long()]).sum(dim=1)  # (rows,) iid
    standard_error = estimates.std().item() / math.sqrt(rows)
    # self-normalised IS is biased at O(1/M): E[estimate] ~ truth - E_g[r^2 (f - truth)] / M, r = p / g
    bias = -((p / g) ** 2 * g * (f - truth)).sum().item() / draws
    tolerance = 5 * standard_error + 2 * abs(bias)  # 5 standard errors; twice the first-order bias for its higher orders
    assert abs(loss - truth) <= tolerance
    assert abs(estimates.mean().item() - loss) < 1e-5 * abs(truth)  # the loss is the mean of these per-row estimates

    # the weights, averaged over the rows, approach the teacher's distribution (each class within 5 standard errors + bias)
    dense = torch.zeros(rows, classes, dtype=torch.float64).scatter_add_(1, target.indices.long(), w)
    class_error = dense.std(dim=0) / math.sqrt(rows)
    # the first-order bias of the same formula with f = [x = i]: p_i (E_g[r^2] - p_i / g_i) / M
    class_bias = (p * ((p**2 / g).sum() - p / g) / draws).abs()
    assert ((dense.mean(dim=0) - p).abs() <= 5 * class_error + 2 * class_bias).all()

    # without the correction (the draws taken as if Ts = T) the loss is far off: the test can tell
    uncorrected = Targets("sampled", classes, indices=target.indices, counts=target.counts, sample_temperature=1.0)
    naive = token_kd_loss(student.expand(rows, classes), uncorrected, temperature=1.0).item()
    assert abs(naive - truth) > 10 * tolerance


def test_other_temperature_without_sampled_logits_is_refused():
    target = stored(randn(16), "sampled", m=M)  # Ts = 1: no sampled logits stored
    assert target.values is None
    with pytest.raises(TargetMismatchError, match=r"sampled at Ts=1 and stores no sampled logits.*temperature=1\b.*--sample-temperature"):
        token_kd_loss(randn(17), target, temperature=2.0)
    token_kd_loss(randn(17), target, temperature=1.0)  # T = Ts needs no logits


# -- memory: nothing [N, V] in float32 ------------------------------------------------------------------


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Records (dtype, shape) of every tensor saved for backward in its scope."""

    def __init__(self) -> None:
        self.saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.saved.append((t.dtype, tuple(t.shape)))
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> SavedTensors:
        super().__enter__()
        return self


@functools.cache
def large_logits(rows: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (float32) and student logits (bfloat16), made once for the three large cases."""
    return randn(18, rows, classes), randn(19, rows, classes).bfloat16()


@pytest.mark.parametrize(("mode", "tail"), [("full", None), ("topk", "rest"), ("sampled", None)])
def test_large_vocabulary_in_small_chunks(mode, tail):
    """V = 70000 (int32 ids), 64 tokens, 8 at a time, a bfloat16 student and float16 targets: correct; the forward
    makes no float32 tensor larger than one chunk (8 x V), and what it saves for backward is the student's logits,
    the teacher's as given and K- or M-wide or per-row float32 tensors."""
    rows, classes, chunk = 64, 70000, 8
    teacher, student_logits = large_logits(rows, classes)
    options = {"full": {}, "topk": {"k": 32}, "sampled": {"m": 64, "sample_temperature": 2.0}}[mode]
    target = stored(teacher, mode, "float16", **options)
    if mode != "full":
        assert target.indices.dtype == torch.int32 and int(target.indices.max()) > 65535
    student = student_logits.clone().requires_grad_()
    with LargestFloat32() as tracker, SavedTensors() as saved:
        loss = token_kd_loss(student, target, temperature=1.5, tail=tail, chunk_tokens=chunk)
    assert 0 < tracker.largest <= chunk * classes
    assert (torch.bfloat16, (rows, classes)) in saved.saved
    wide = [(dtype, shape) for dtype, shape in saved.saved if math.prod(shape) > rows * 64]
    assert set(wide) <= {(torch.bfloat16, (rows, classes)), (torch.float16, (rows, classes))}  # student, full teacher
    loss.backward()
    assert student.grad.dtype == torch.bfloat16

    s32 = student.detach().float().requires_grad_()  # float32 reference: float64 would take most of the test's time
    want = REFERENCES[mode](s32, target, 1.5, tail)
    (want_grad,) = torch.autograd.grad(want, s32)
    assert_rel(loss, want, 1e-5)  # the same (bfloat16) logits, both in float32
    assert_rel(student.grad, want_grad, 1e-2)  # the gradient is rounded to bfloat16 (8 significant bits)


def test_the_memory_checks_see_a_dense_loss():
    """The trackers above are not vacuous: kd_loss makes and saves [N, V] float32 tensors."""
    student, target = randn(20, 16, 1000).bfloat16().requires_grad_(), stored(randn(21, 16, 1000), "topk", "float16", k=8)
    with LargestFloat32() as tracker, SavedTensors() as saved:
        kd_loss(student, target, 1.5)
    assert tracker.largest >= 16 * 1000
    assert (torch.float32, (16, 1000)) in saved.saved


# -- edge cases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "options", "temperature"), [
    ("full", {}, 2.0), ("topk", {"k": K}, 2.0), ("sampled", {"m": M}, 1.0), ("sampled", {"m": M, "sample_temperature": 2.0}, 1.0),
])
def test_no_tokens_gives_a_connected_zero(mode, options, temperature):
    target = stored(randn(22, 0, V), mode, "float16", **options)
    student = torch.zeros(0, V, requires_grad=True)
    loss = token_kd_loss(student, target, temperature=temperature)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert student.grad.shape == (0, V)


def test_student_dtype_is_kept_for_the_gradient():
    target = stored(randn(23), "sampled", "float16", m=M)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        student = randn(24).to(dtype).requires_grad_()
        token_kd_loss(student, target, temperature=1.0, chunk_tokens=3).backward()
        assert student.grad.dtype == dtype
    check_against_reference(randn(24).double(), target, 1.0)  # float64 logits, float32 arithmetic inside


def test_evaluation_without_grad():
    """Validation loops call it under no_grad: the same value, and nothing to backpropagate."""
    student, target = randn(30), stored(randn(31), "topk", "float16", k=K)
    with torch.no_grad():
        loss = token_kd_loss(student, target, 2.0, chunk_tokens=3)
    assert loss.grad_fn is None
    assert_rel(loss, ref_topk(student.double(), target, 2.0, None), 1e-5)


# -- errors -------------------------------------------------------------------------------------------------------


def bad_calls():
    full, topk, sampled = stored(randn(25), "full"), stored(randn(25), "topk", k=K), stored(randn(25), "sampled", m=M)
    s = randn(26)
    return [
        ((s[None], full), {}, TargetMismatchError, r"\[tokens, vocab\], got shape \(1, 10, 40\).*masked_token_logits"),
        ((s[:, :30], topk), {}, TargetMismatchError, "30 outputs but the teacher's targets have 40 classes"),
        ((s[:7], sampled), {}, TargetMismatchError, "7 student token rows but 10 target rows"),
        ((s, full), {"temperature": 0.0}, UsageError, "temperature must be positive, got 0.0"),
        ((s, full), {"temperature": -1.0}, UsageError, "temperature must be positive, got -1.0"),
        ((s, topk), {"chunk_tokens": 0}, UsageError, "chunk_tokens must be an integer >= 1, got 0"),
        ((s, topk), {"chunk_tokens": 2.5}, UsageError, "chunk_tokens must be an integer >= 1, got 2.5"),
        ((s, full), {"tail": "rest"}, TargetMismatchError, "tail='rest' applies to top-k targets only, but these are full"),
        ((s, sampled), {"tail": "ignore"}, TargetMismatchError, "tail='ignore' applies to top-k targets only.*sampled"),
        ((s, topk), {"tail": "flat"}, UsageError, "tail='flat': expected one of rest, renormalize, ignore"),
        ((s, Targets("dense", V, logits=s)), {}, TargetMismatchError, "mode 'dense' are not supported.*full, topk, sampled"),
        ((s, s), {}, TargetMismatchError, "expects a Targets batch, got Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_errors_name_the_value_and_the_fix(case):
    args, kwargs, error, match = bad_calls()[case]
    with pytest.raises(error, match=match):
        token_kd_loss(*args, **kwargs)


# -- masked_token_logits -------------------------------------------------------------------------------------


def test_masked_token_logits_matches_a_loop():
    logits = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(27), requires_grad=True)
    lengths = torch.tensor([3, 0, 7, 1])
    flat = masked_token_logits(logits, lengths)
    expected = torch.cat([logits[b, : int(n)] for b, n in enumerate(lengths)])
    assert torch.equal(flat, expected)
    flat.sum().backward()  # padding positions get no gradient
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths.tolist()])
    assert torch.equal(logits.grad, mask[..., None].float().expand(4, 7, 5))
    assert masked_token_logits(logits, np.array([0, 0, 0, 0])).shape == (0, 5)


def test_masked_token_logits_pairs_with_per_token_targets():
    """Sequences flattened with masked_token_logits pair row for row with the per-token targets."""
    lengths = torch.tensor([2, 5, 3])
    teacher = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(28)) * 3
    student = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(29))
    flat_teacher = torch.cat([teacher[b, : int(n)] for b, n in enumerate(lengths)])
    target = stored(flat_teacher, "topk", k=K)
    loss = token_kd_loss(masked_token_logits(student, lengths), target, 2.0, chunk_tokens=4)
    per_token = [kd_loss(student[b, t : t + 1], stored(teacher[b, t : t + 1], "topk", k=K), 2.0)
                 for b, n in enumerate(lengths.tolist()) for t in range(n)]
    assert_rel(loss, torch.stack(per_token).mean(), 1e-6)


@pytest.mark.parametrize(("shape", "lengths", "match"), [
    ((2, 4, 3), [2, 5], "a sequence length of 5 exceeds the student's 4 positions"),
    ((2, 4, 3), [2, -1], "lengths must be >= 0, got -1"),
    ((2, 4, 3), [2, 1, 1], r"lengths must be \[batch\] = \(2,\), one per sequence, got shape \(3,\)"),
    ((8, 3), [2], r"\[batch, sequence, vocab\] to mask padding, got shape \(8, 3\)"),
])
def test_masked_token_logits_errors(shape, lengths, match):
    with pytest.raises(TargetMismatchError, match=match):
        masked_token_logits(torch.zeros(shape), torch.tensor(lengths))


def test_defaults_are_kd_losss():
    """token_kd_loss and token_loss_terms default `temperature` and `tail` as kd_loss does, and then agree with it."""
    import inspect

    from logit_cache.losses import token_loss_terms

    expected = {name: inspect.signature(kd_loss).parameters[name].default for name in ("temperature", "tail")}
    for function in (token_kd_loss, token_loss_terms):
        parameters = inspect.signature(function).parameters
        assert {name: parameters[name].default for name in expected} == expected, function.__name__
    student, target = randn(40), stored(randn(41), "topk", k=K)
    assert_rel(token_kd_loss(student, target), kd_loss(student, target), 1e-5)
