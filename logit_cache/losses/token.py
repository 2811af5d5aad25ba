"""Per-token distillation losses for language models, computed in chunks of tokens.

A language-model batch has one teacher distribution per token and vocabularies up to ~250k, so the
dense ``[tokens, vocab]`` float32 intermediates of :func:`losses.kd_loss` (the student's
log-softmax, its softmax saved for backward, a dense teacher) cost gigabytes: 16k tokens x 250k
classes x 4 bytes is 16 GB per tensor. Here one :class:`torch.autograd.Function` loops over
``chunk_tokens`` rows at a time in both passes:

* forward: for each chunk, the student's ``log_softmax(s / T)`` in float32 and its logsumexp, the
  chunk's loss; it saves for backward only its inputs (the student logits, the teacher's K- or M-wide
  tensors, or the full teacher logits as given) and [N] per-row statistics;
* backward: for each chunk again, ``q = exp(z - logsumexp)`` recomputed, the closed-form gradient
  formed in place and copied into one preallocated gradient of the student's dtype.

The float32 working set is two or three ``chunk_tokens x V`` tensors, whatever N; nothing ``[N, V]``
in float32 is ever allocated for the sparse modes, nor for full mode (whose teacher logits stay in
their storage dtype and are widened a chunk at a time). On an H100, 8192 tokens x 131072 classes
with a bfloat16 student, chunks of 1024: 3.0-3.5 GiB beyond the inputs (2 GiB of it the gradient)
against 10 GiB (top-k) and 24 GiB (full) for ``kd_loss``, at 1.1x (full) to 1.3x (top-k) its time. The loss convention is
:func:`losses.kd_loss`'s: ``T^2`` times the mean over the N tokens of the per-token loss.

Gradients, with ``z = s / T``, ``q = softmax(z)``, per token (then times ``T^2 / N / T``):

* ``full``: ``KL(p || q)``, ``p = softmax(t / T)``; ``dL/dz = q - p``.
* ``topk`` (the tails of :mod:`losses`, teacher side from :func:`targets.topk_log_probs`):
  ``rest``: ``dL/dz_j = q_j - p_j`` on the top-k, ``q_j (1 - p_r / q_r)`` elsewhere;
  ``ignore``: ``dL/dz_j = q_j P - [j in K] p_j`` with ``P = sum_k p_k``;
  ``renormalize``: K-wide only (a log-softmax over the student's logits at the teacher's ids),
  left to autograd: its backward is a scatter into a zero gradient of the student's dtype.
* ``sampled`` (random-sampling KD): the cross-entropy ``-sum_j w_j log q[id_j]`` against the
  sparse weights ``w`` of the drawn ids (:func:`sampled_weights`); ``dL/dz = q W - scatter(w)``,
  ``W = sum_j w_j`` (1 up to rounding). ``ignore`` is the same sparse cross-entropy with ``w = p``
  plus the constant ``sum_k p_k log p_k``, and shares the code.

Logits must be finite (a cache never stores NaN or inf: ``dump`` refuses such rows).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .._legacy import callable_module
from ..data.tokens import next_token_mask, shifted_labels
from ..errors import TargetMismatchError, UsageError
from ..targets.batch import LOG_MASS_FLOOR, Targets, topk_log_probs
from .sample import DEFAULT_TEMPERATURE, TAILS, check_kind

__all__ = ["TokenCrossEntropy", "TokenKLDivergence", "masked_token_logits", "sampled_weights", "token_kd_loss", "token_loss_terms",
           "trained_positions"]

#: Rows per chunk by default: the float32 working set is a few ``chunk_tokens x V`` tensors.
DEFAULT_CHUNK_TOKENS = 4096


def token_kd_loss(student_logits: torch.Tensor, target: Targets, temperature: float = DEFAULT_TEMPERATURE, tail: str | None = None,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """``T^2`` times the mean over the N tokens of the per-token KD loss; a float32 scalar.

    ``student_logits``: [N, V], the valid tokens only, flattened (see :func:`masked_token_logits`),
    any float dtype; its gradient comes back in that dtype. ``target``: a :class:`Targets` of N rows
    in ``full``, ``topk`` or ``sampled`` mode, in storage dtypes or not, on any device (moved to the
    student's). ``tail``: top-k only, ``"rest"`` (default), ``"renormalize"`` or ``"ignore"``, as
    in :func:`losses.kd_loss` (which this equals on the same inputs, without its dense [N, V]
    float32 intermediates). Sampled targets give the cross-entropy against the drawn ids' weights;
    a training temperature other than the sampling temperature needs the stored sampled logits
    (importance weights), else :class:`TargetMismatchError`. ``temperature`` and ``tail`` default as
    :func:`losses.kd_loss`'s (4, and ``rest`` for top-k): language models usually distil at T=1, say so.

    ``chunk_tokens`` rows are processed at a time: besides the gradient (the student's shape and
    dtype), the peak memory is about three float32 ``chunk_tokens x V`` tensors for full targets and
    two for the sparse modes (4096 x 250k: 4 GB each), so lower it for large vocabularies; the result
    does not depend on it. N = 0 gives a zero still connected to ``student_logits`` (its
    gradient is the empty [0, V]), so ``loss.backward()`` works on a batch with no valid token.

    >>> loss = token_kd_loss(masked_token_logits(student(ids), lengths), targets, temperature=2.0)
    """
    _check(student_logits, target, temperature, tail, chunk_tokens)
    chunk_tokens = int(chunk_tokens)
    device = student_logits.device
    rows = student_logits.shape[0]
    scale = temperature**2 / max(rows, 1)
    # dispatch on what the batch holds: dense logits, sampled ids with counts, else top-k values + logsumexp
    if target.logits is not None:
        # moved, not widened: a float16 [N, V] cache row set stays float16, widened a chunk at a time
        teacher = target.logits.detach().to(device, non_blocking=True)
        total = _ChunkedTokenKD.apply(student_logits, "dense", temperature, chunk_tokens, teacher)
        return total * scale
    target = target.to(device, non_blocking=True)
    if target.counts is not None:
        weights = sampled_weights(target, temperature)
        total = _ChunkedTokenKD.apply(student_logits, "sparse", temperature, chunk_tokens, target.indices, weights)
        return total * scale
    ids = target.indices.detach()
    values = target.values.detach()
    tail = tail or "rest"
    if tail == "renormalize":  # K-wide: gather first, then widen (never a float32 copy of the [N, V] student)
        log_p = F.log_softmax(values / temperature, dim=-1)
        log_q = F.log_softmax(student_logits.gather(1, ids).float() / temperature, dim=-1)
        total = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        return total * scale
    log_tail = None if target.log_tail is None else target.log_tail.detach()
    log_p, log_rest = topk_log_probs(values, target.logsumexp.detach(), temperature, target.num_classes, log_tail)  # (N, K), (N,)
    if tail == "rest":
        total = _ChunkedTokenKD.apply(student_logits, "rest", temperature, chunk_tokens, ids, log_p, log_rest)
        return total * scale
    p = log_p.exp()  # ignore: the sparse cross-entropy against p, plus the teacher's constant sum_k p_k log p_k
    total = _ChunkedTokenKD.apply(student_logits, "sparse", temperature, chunk_tokens, ids, p)
    return (total + (p * log_p).sum()) * scale


def sampled_weights(target: Targets, temperature: float) -> torch.Tensor:
    """The target distribution (N, M) over a sampled row's drawn ids at the training temperature.

    Ids were drawn from ``softmax(t / Ts)``. At ``T == Ts`` the counts estimate that distribution
    directly: ``w = counts / M``. At ``T != Ts`` each draw is reweighted by ``p_T(x) / q_Ts(x)``,
    which is ``exp(z (1/T - 1/Ts))`` up to a per-row constant (``z`` the drawn id's raw logit, the
    stored ``values``); self-normalised, the constant cancels: ``w ∝ counts * exp(z (1/T - 1/Ts))``,
    summing to 1 per row. Pads (count 0) get weight 0. A cache sampled at ``Ts = 1`` stores no
    logits, so it only serves ``T = Ts``: anything else raises :class:`TargetMismatchError`.
    """
    counts = target.counts.detach().float()
    sample_temperature = float(target.sample_temperature)
    if math.isclose(temperature, sample_temperature, rel_tol=1e-6):
        return counts / counts.sum(dim=-1, keepdim=True)
    if target.values is None:
        raise TargetMismatchError(
            f"the cache was sampled at Ts={sample_temperature:g} and stores no sampled logits, so its draws cannot be "
            f"importance-weighted to temperature={temperature:g}: train with temperature={sample_temperature:g}, or re-dump "
            f"with --sample-temperature equal to the training temperature ({temperature:g}), which stores the drawn logits"
        )
    log_w = counts.log() + target.values.detach().float() * (1.0 / temperature - 1.0 / sample_temperature)  # pads: -inf
    return torch.softmax(log_w, dim=-1)


def masked_token_logits(student_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The rows of the real tokens of right-padded sequences: [B, T, V] -> [sum(lengths), V].

    Sequence after sequence (row order b, then t), which is the order of a per-token
    :class:`Targets` batch, so the result pairs row for row with it. One boolean-mask index, no
    Python loop over tokens; differentiable (the padding positions get zero gradient). ``lengths``
    [B]: the real tokens of each sequence (``Targets.lengths``), on any device. On a GPU this
    synchronises with the host once for the checks and once for the index (the output's size
    depends on the lengths).
    """
    if student_logits.dim() != 3:
        raise TargetMismatchError(
            f"student logits must be [batch, sequence, vocab] to mask padding, got shape {tuple(student_logits.shape)}"
        )
    batch, steps, _ = student_logits.shape
    lengths = torch.as_tensor(lengths).to(student_logits.device, torch.int64)
    if lengths.shape != (batch,):
        raise TargetMismatchError(f"lengths must be [batch] = ({batch},), one per sequence, got shape {tuple(lengths.shape)}")
    if batch:
        shortest, longest = torch.stack(torch.aminmax(lengths)).tolist()  # one sync
        if longest > steps:
            raise TargetMismatchError(
                f"a sequence length of {longest} exceeds the student's {steps} positions: the lengths do not belong to these "
                "logits (or the student's input was truncated)"
            )
        if shortest < 0:
            raise TargetMismatchError(f"lengths must be >= 0, got {shortest}")
    mask = torch.arange(steps, device=student_logits.device) < lengths[:, None]  # (B, T)
    return student_logits[mask]


def _check(student_logits: torch.Tensor, target: Targets, temperature: float, tail: str | None, chunk_tokens: int) -> None:
    if not isinstance(target, Targets):
        raise TargetMismatchError(f"token_kd_loss expects a Targets batch, got {type(target).__name__}")
    check_kind(target, "token_kd_loss")
    if student_logits.dim() != 2:
        raise TargetMismatchError(
            f"student logits must be [tokens, vocab], got shape {tuple(student_logits.shape)}: flatten the valid tokens "
            "first, e.g. masked_token_logits(logits, lengths)"
        )
    rows, classes = student_logits.shape
    if classes != target.num_classes:
        raise TargetMismatchError(
            f"the student has {classes} outputs but the teacher's targets have {target.num_classes} classes: "
            "student and teacher must share the vocabulary"
        )
    if len(target) != rows:
        raise TargetMismatchError(
            f"{rows} student token rows but {len(target)} target rows: the tokens are misaligned (flatten the same valid "
            "tokens the cache holds, sequence after sequence)"
        )
    if not temperature > 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral) or chunk_tokens < 1:
        raise UsageError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    if tail is not None:
        if tail not in TAILS:
            raise UsageError(f"tail={tail!r}: expected one of {', '.join(TAILS)}")
        if target.logits is not None or target.counts is not None:  # only top-k rows have a tail to choose
            raise TargetMismatchError(
                f"tail={tail!r} applies to top-k targets only, but these are {target.mode} targets: drop tail="
            )
    if target.logits is None and (target.values is None or target.logsumexp is None) and target.counts is None:
        raise TargetMismatchError(f"{target.mode} targets hold neither logits, top-k values with their logsumexp, nor sampled "
                                  "counts: the batch is not a cache's")


#: Input dtypes whose float32 widening is exact, so kernels may widen them on the fly.
_NARROW = (torch.float16, torch.bfloat16, torch.float32)


def _log_softmax(rows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(rows / T)`` (c, V) as a new float32 tensor, and its logsumexp (c,).

    At T=1 one fused kernel reads the rows in their own dtype. The logsumexp is read off where the
    row is largest, ``z_max - log_q[argmax]`` (``log_q`` there is in ``[-log V, 0]``: no digits lost),
    which costs one max instead of ``torch.logsumexp``'s four passes.
    """
    if temperature == 1.0 and rows.dtype in _NARROW:
        log_q = F.log_softmax(rows, dim=-1, dtype=torch.float32)
        top, where = rows.max(dim=-1)
    else:
        z = rows.to(torch.float32, copy=True)
        log_q = F.log_softmax(z.div_(temperature) if temperature != 1.0 else z, dim=-1)
        top, where = z.max(dim=-1)
    return log_q, top.float() - log_q.gather(1, where[:, None]).squeeze(1)


def _softmax(rows: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(rows / T - lse)`` (c, V) as a new float32 tensor, in two passes (the subtraction widens on the fly)."""
    if rows.dtype in _NARROW:
        out = torch.sub(rows, lse[:, None]) if temperature == 1.0 else torch.add(-lse[:, None], rows, alpha=1.0 / temperature)
        out = out.float()  # float16/bfloat16 minus float32 is float32 already: a no-op then
    else:
        out = rows.to(torch.float32).div_(temperature).sub_(lse[:, None])
    return out.exp_()


class _ChunkedTokenKD(torch.autograd.Function):
    """Sum over rows of a per-token KD loss, forward and backward ``chunk`` rows at a time.

    ``kind`` and the teacher tensors after ``chunk``:

    * ``"dense"``: teacher logits (N, V), any float dtype; saved with the teacher's logsumexp (N,).
    * ``"rest"``: ids (N, K), teacher log-probabilities (N, K), tail log-mass (N,); saved with the
      row factor ``1 - p_r / q_r`` (N,).
    * ``"sparse"``: ids (N, M), weights (N, M); the loss is ``-sum_j w_j log q[id_j]``. A repeated
      id (the weight-0 pads' id 0) is fine: the gradient scatter-adds.

    Always saved: the student logits (an input: no copy) and the student's logsumexp of ``s / T`` (N,).
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, kind: str, temperature: float, chunk: int,
                *teacher: torch.Tensor) -> torch.Tensor:
        rows = student_logits.shape[0]
        device = student_logits.device
        student_lse = torch.empty(rows, dtype=torch.float32, device=device)
        row_stat = torch.empty(rows, dtype=torch.float32, device=device) if kind in ("dense", "rest") else None
        total = torch.zeros((), dtype=torch.float64, device=device)  # chunk sums accumulate in float64
        for lo in range(0, rows, chunk):
            hi = min(lo + chunk, rows)
            log_q, student_lse[lo:hi] = _log_softmax(student_logits[lo:hi], temperature)  # (c, V) float32, (c,)
            if kind == "dense":
                log_p, row_stat[lo:hi] = _log_softmax(teacher[0][lo:hi], temperature)
                p = log_p.exp()
                part = log_p.sub_(log_q).mul_(p).sum()  # sum p (log p - log q)
            elif kind == "rest":
                ids, log_p, log_rest = (x[lo:hi] for x in teacher)
                log_q_k = log_q.gather(1, ids)  # (c, K)
                q = log_q.exp_().scatter_(1, ids, 0.0)  # the student's tail only
                log_q_r = q.sum(dim=-1).log().clamp(min=LOG_MASS_FLOOR)  # floored: an empty tail gives 0, not NaN
                p_r = log_rest.exp()
                row_stat[lo:hi] = 1.0 - p_r / log_q_r.exp()
                part = (log_p.exp() * (log_p - log_q_k)).sum() + (p_r * (log_rest - log_q_r)).sum()
            else:  # sparse: the drawn ids' log-probabilities only
                ids, weights = (x[lo:hi] for x in teacher)
                part = -(weights * log_q.gather(1, ids)).sum()
            del log_q
            total += part
        ctx.save_for_backward(student_logits, student_lse, row_stat, *teacher)
        ctx.kind, ctx.temperature, ctx.chunk = kind, temperature, chunk
        return total.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student_logits, student_lse, row_stat, *teacher = ctx.saved_tensors
        kind, temperature = ctx.kind, ctx.temperature
        scale = grad.float() / temperature  # d/ds = d/dz / T
        out = torch.empty_like(student_logits)  # the student's dtype: the only [N, V] tensor made here
        for lo in range(0, student_logits.shape[0], ctx.chunk):
            hi = min(lo + ctx.chunk, student_logits.shape[0])
            q = _softmax(student_logits[lo:hi], student_lse[lo:hi], temperature)  # (c, V) float32
            if kind == "dense":
                p = _softmax(teacher[0][lo:hi], row_stat[lo:hi], temperature)
                q.sub_(p).mul_(scale)  # q - p
            elif kind == "rest":
                ids, log_p, _ = (x[lo:hi] for x in teacher)
                top_q = q.gather(1, ids)
                q.mul_((row_stat[lo:hi] * scale)[:, None])  # q_j (1 - p_r / q_r) off the top-k
                q.scatter_(1, ids, (top_q - log_p.exp()) * scale)  # q_k - p_k on it
            else:
                ids, weights = (x[lo:hi] for x in teacher)
                q.mul_((weights.sum(dim=-1) * scale)[:, None])  # q W
                q.scatter_add_(1, ids, weights * -scale)  # - w at the drawn ids (pads add 0)
            out[lo:hi] = q
        return (out, None, None, None, *(None for _ in teacher))


def _select(target: Targets, keep: torch.Tensor) -> Targets:
    """The rows of a flat per-token Targets where ``keep`` (over its rows) is true."""
    picked = {name: tensor[keep] for name, tensor in target.tensors().items() if name != "lengths"}
    return replace(target, **picked, lengths=None)


def trained_positions(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, target: Targets | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, Targets | None]:
    """The positions of a batch of sequences that predict a label: the student's rows (N, V), their
    labels (N,) and the teacher's rows there (or None).

    ``logits`` (B, T, V); position ``t`` predicts ``labels[t + 1]`` (:func:`~logit_cache.data.tokens.next_token_mask`).
    ``target``: a flat Targets over the batch's real tokens (a cache's, with ``lengths``), or teacher rows
    already selected at the trained positions (online KD, no ``lengths``), taken as they are.
    """
    mask = next_token_mask(labels, lengths)  # (B, T)
    student = logits[mask]  # (N, V): b-major like the cache's rows
    if target is not None and target.lengths is not None:  # a cache's rows: every real token; keep those at the trained positions
        if not torch.equal(target.lengths.to(lengths.device), lengths):
            raise TargetMismatchError("the cache's rows per sequence differ from the batch's lengths: misaligned data")
        real = torch.arange(labels.shape[1], device=labels.device)[None, :] < lengths[:, None]
        target = _select(target, mask[real].to(target.device))
    return student, shifted_labels(labels)[mask], target


class TokenCrossEntropy(nn.Module):
    """The mean cross-entropy of trained positions (:func:`trained_positions`), in float32; a zero still
    connected to the logits when there is none (a batch of one-token sequences)."""

    def forward(self, student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.float(), labels) if len(student) else student.sum() * 0.0


class TokenKLDivergence(nn.Module):
    """:func:`token_kd_loss` as a module (what :class:`~logit_cache.losses.DistillationLoss` takes as ``kd``)."""

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, tail: str | None = None,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        self.temperature, self.tail, self.chunk_tokens = float(temperature), tail, chunk_tokens

    def forward(self, student: torch.Tensor, target: Targets) -> torch.Tensor:
        return token_kd_loss(student, target, temperature=self.temperature, tail=self.tail, chunk_tokens=self.chunk_tokens)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, tail={self.tail or 'rest'}, chunk_tokens={self.chunk_tokens}"


def token_loss_terms(logits: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, target: Targets | None,
                     temperature: float = DEFAULT_TEMPERATURE, tail: str | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The mean next-token cross-entropy, the token KD loss (or None), and the number of positions.

    ``logits`` (B, T, V); ``target`` a flat Targets over the batch's real tokens (with ``lengths``)
    or teacher logits already selected at the trained positions (online KD). ``temperature`` and
    ``tail`` default as :func:`token_kd_loss`'s.
    """
    student, shifted, target = trained_positions(logits, labels, lengths, target)
    ce = TokenCrossEntropy()(student, shifted)
    if target is None:
        return ce, None, len(student)
    return ce, token_kd_loss(student, target, temperature=temperature, tail=tail), len(student)


#: ``logit_cache.token_losses(...)`` was this function before the module moved here.
token_losses = token_loss_terms

callable_module(__name__, token_loss_terms)
