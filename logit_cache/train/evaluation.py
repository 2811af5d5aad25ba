"""Evaluating a student on held-out data: :func:`evaluate` (classification) and :func:`evaluate_tokens`
(language models), and the helpers that read their batches (the training loop's tasks read batches
the same way, through these).

Classification: accuracy (given labels) and, with a cache of the eval split, the mean
KL(teacher || student) at T=1. Language models: perplexity, ``exp`` of the mean next-token
cross-entropy, and, with a cache of the eval split, the mean token-level KD loss at T=1 (the KL to
the teacher for full and top-k caches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import ResolvedDataset, split_batch
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


@torch.no_grad()
def evaluate(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: TargetReader | CachedDataset | None = None,
             batch_size: int = 512) -> dict[str, float]:
    """Accuracy on ``data`` (needs labels) and, given a cache of it, the mean KL(teacher || student) at T=1.

    ``cache`` may be the cache or ``data`` already wrapped with it (checked once, not every epoch).
    """
    student.eval()
    if isinstance(cache, TargetReader):
        cache = CachedDataset(data.dataset, [cache])
    loader = DataLoader(cache if cache is not None else data.dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate if cache is not None else None)
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
    metrics = {}
    if data.has_labels:
        metrics["eval_accuracy"] = correct / count
    if cache is not None:
        metrics["eval_kl"] = kl_sum / count
    return metrics


@torch.no_grad()
def evaluate_tokens(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: CachedDataset | None = None,
                    batch_size: int = 32) -> dict[str, float]:
    """Perplexity of ``student`` on ``data`` and, with a cache of it, the mean token KD loss at T=1."""
    student.eval()
    loader = DataLoader(cache if cache is not None else data.dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate if cache is not None else plain_token_batch)
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
    metrics = {"eval_loss": ce_sum / max(1, count), "eval_perplexity": math.exp(min(50.0, ce_sum / max(1, count)))}
    if cache is not None:
        metrics["eval_kl"] = kd_sum / max(1, count)
    return metrics
