"""Evaluating a student on held-out data: :func:`evaluate` (classification) and :func:`evaluate_tokens`
(language models), and the helpers that read their batches (the training loop's tasks read batches
the same way, through these).

Classification: accuracy (given labels) and, with a cache of the eval split, the mean
KL(teacher || student) at T=1. Language models: perplexity, ``exp`` of the mean next-token
cross-entropy, and, with a cache of the eval split, the mean token-level KD loss at T=1 (the KL to
the teacher for full and top-k caches).

Under torchrun (``ranks`` given, world size > 1) each rank evaluates a contiguous share of the eval set
(no padding, so no item counts twice) and the sums behind every metric (correct answers, KL and
cross-entropy sums, counts) are added across ranks before dividing: the same figures one process
gives, up to the order of float additions, in 1/world_size of the time, with no rank idle in a
collective while another evaluates alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import ResolvedDataset, split_batch
from ..data.distributed import Dist, shard_bounds, sum_across
from ..data.loader import CachedDataset, collate
from ..data.tokens import collate_tokens
from ..io.rows import TargetReader
from ..losses.sample import kd_loss
from ..losses.token import token_loss_terms
from ..targets.batch import Targets
from ..teachers.runtime import run_model, to_device


def cached_parts(batch: Any) -> tuple[Any, torch.Tensor | None, Any]:
    """A collated batch of a wrapped dataset, ``(inputs, labels, target)`` or ``(inputs, target)``: its
    inputs, labels (None without) and target."""
    *head, target = batch
    inputs, labels = head if len(head) == 2 else (head[0], None)
    return inputs, labels, target


def plain_token_batch(items: list[Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``collate_fn`` of token data without a cache: ``(inputs, labels, lengths)`` (a cache's batch carries
    the lengths in its Targets instead)."""
    batch = collate_tokens(items)
    return batch.inputs, batch.labels, batch.lengths


def token_parts(third: Targets | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Targets | None]:
    """A token batch's third element: a cache's Targets (with lengths) or, without a cache, the lengths;
    gives the lengths on ``device`` and the Targets (or None)."""
    if isinstance(third, Targets):
        return third.lengths.to(device), third
    return third.to(device), None


def _loader(dataset: Any, batch_size: int, collate_fn: Any, ranks: Dist | None) -> DataLoader:
    """The eval set in order; under torchrun only this rank's contiguous share of it."""
    start, stop = shard_bounds(len(dataset), ranks) if ranks is not None else (0, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=range(start, stop), collate_fn=collate_fn)


@torch.no_grad()
def evaluate(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: TargetReader | CachedDataset | None = None,
             batch_size: int = 512, ranks: Dist | None = None) -> dict[str, float]:
    """Accuracy on ``data`` (needs labels) and, given a cache of it, the mean KL(teacher || student) at T=1.

    ``cache`` may be the cache or ``data`` already wrapped with it (checked once, not every epoch).
    ``ranks``: under torchrun, every rank calls this and evaluates its share (module docstring).
    """
    student.eval()
    if isinstance(cache, TargetReader):
        cache = CachedDataset(data.dataset, [cache])
    if cache is not None:
        cache.set_epoch(0)  # a views cache is evaluated on view 0, on purpose (not the epochless-views mistake)
    loader = _loader(cache if cache is not None else data.dataset, batch_size, collate if cache is not None else None, ranks)
    correct = count = 0
    kl_sum = 0.0
    for batch in loader:
        if cache is not None:
            inputs, labels, target = cached_parts(batch)
        else:
            inputs, labels = split_batch(batch, data.has_labels)
        logits = run_model(student, to_device(inputs, device))
        if labels is not None:
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
        if cache is not None:
            kl_sum += float(kd_loss(logits, target, temperature=1.0)) * len(logits)
        count += len(logits)
    if ranks is not None:
        correct, count, kl_sum = sum_across(ranks, [correct, count, kl_sum])
    metrics = {}
    if data.has_labels:
        metrics["eval_accuracy"] = correct / max(1, count)
    if cache is not None:
        metrics["eval_kl"] = kl_sum / max(1, count)
    return metrics


@torch.no_grad()
def evaluate_tokens(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: CachedDataset | None = None,
                    batch_size: int = 32, ranks: Dist | None = None) -> dict[str, float]:
    """Perplexity of ``student`` on ``data`` and, with a cache of it, the mean token KD loss at T=1 (``ranks``: as
    for :func:`evaluate`)."""
    student.eval()
    loader = _loader(cache if cache is not None else data.dataset, batch_size, collate if cache is not None else plain_token_batch,
                     ranks)
    ce_sum = kd_sum = 0.0
    count = 0
    for inputs, labels, third in loader:
        inputs, labels = to_device(inputs, device), labels.to(device)
        lengths, target = token_parts(third, device)
        logits = run_model(student, inputs)
        ce, kd, n = token_loss_terms(logits, labels, lengths, target, temperature=1.0, tail=None)
        ce_sum += float(ce) * n
        kd_sum += float(kd) * n if kd is not None else 0.0
        count += n
    if ranks is not None:
        ce_sum, kd_sum, count = sum_across(ranks, [ce_sum, kd_sum, count])
    metrics = {"eval_loss": ce_sum / max(1, count), "eval_perplexity": math.exp(min(50.0, ce_sum / max(1, count)))}
    if cache is not None:
        metrics["eval_kl"] = kd_sum / max(1, count)
    return metrics
