"""The trainer's token-level loop, for language-model students (``train`` calls it for token data).

Same three sources of soft targets as ``train.py`` (a per-token cache, an online teacher, labels
only) and the same options; what differs is the shape of the work:

* a batch is right-padded sequences (``tokens.collate_tokens``): student logits (B, T, V);
* position ``t`` predicts token ``t + 1``: the ground-truth loss is the cross-entropy against the
  shifted labels, and the KD loss pairs the student's row at ``t`` with the teacher's row at ``t``
  (the teacher saw the same prefix). Both use :func:`tokens.next_token_mask`, so the last token of
  a sequence and tokens before an ignored label (-100) count for neither;
* the KD loss is ``token_losses.token_kd_loss`` (full, top-k or sampled targets), computed in chunks
  of tokens so that sparse targets never need a dense (tokens, V) float32 teacher distribution;
* the evaluation metric is perplexity, ``exp`` of the mean next-token cross-entropy, and, given a
  cache of the eval split, the mean token-level KD loss at T=1 (the KL to the teacher for full and
  top-k caches).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.datasets import ResolvedDataset, resolve_dataset
from ..data.loader import CachedDataset, collate
from ..data.tokens import collate_tokens, next_token_mask
from ..errors import TargetMismatchError, UsageError
from ..io.reader import LogitCache, open_cache
from ..losses.sample import DistillationLoss
from ..losses.token import token_loss_terms
from ..targets.batch import Targets
from ..teachers.runtime import run_teacher, to_device
from .loop import TrainConfig, TrainResult, _build_student, _loader, optimiser, save_student, training_data

log = logging.getLogger(__name__)

#: Language models distil at T=1 unless told otherwise (the cache's recorded temperature wins).
LM_TEMPERATURE = 1.0


def _plain_collate(items: list[Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Batches without a cache: ``(inputs, labels, lengths)`` (a cache's batch carries lengths in its Targets)."""
    batch = collate_tokens(items)
    return batch.inputs, batch.labels, batch.lengths


def _split(third: Targets | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Targets | None]:
    """A batch's third element: a cache's Targets (with lengths) or, without a cache, the lengths."""
    if isinstance(third, Targets):
        return third.lengths.to(device), third
    return third.to(device), None


@torch.no_grad()
def evaluate_tokens(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: CachedDataset | None = None,
                    batch_size: int = 32) -> dict[str, float]:
    """Perplexity of ``student`` on ``data`` and, with a cache of it, the mean token KD loss at T=1."""
    student.eval()
    loader = DataLoader(cache if cache is not None else data.dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate if cache is not None else _plain_collate)
    ce_sum = kd_sum = 0.0
    count = 0
    for inputs, labels, third in loader:
        inputs, labels = to_device(inputs, device), labels.to(device)
        lengths, target = _split(third, device)
        logits = run_teacher(student, inputs)
        ce, kd, n = token_loss_terms(logits, labels, lengths, target, 1.0, None)
        ce_sum += float(ce) * n
        kd_sum += float(kd) * n if kd is not None else 0.0
        count += n
    metrics = {"eval_loss": ce_sum / max(1, count), "eval_perplexity": math.exp(min(50.0, ce_sum / max(1, count)))}
    if cache is not None:
        metrics["eval_kl"] = kd_sum / max(1, count)
    return metrics


def train_tokens(config: TrainConfig, data: ResolvedDataset, device: torch.device) -> TrainResult:
    """The token-level twin of :func:`train.train` (module docstring); called by it for token data."""
    # -- data and targets ------------------------------------------------------------------------------
    caches: list[LogitCache] = [open_cache(path, allow_nonfinite=config.allow_nonfinite_targets) for path in config.caches]
    for cache in caches:
        if not cache.per_token:
            raise TargetMismatchError(f"{cache.path} holds one distribution per sample, but --dataset {config.dataset!r} "
                                      f"holds token sequences: use a cache dumped from this token data")
    train_set, sampler, collate_fn, teacher = training_data(config, data, caches, device, _plain_collate)
    eval_data = resolve_dataset(config.eval_dataset, config.eval_dataset_kwargs) if config.eval_dataset else None
    if eval_data is not None and not eval_data.per_token:
        raise UsageError(f"--eval-dataset {config.eval_dataset!r} does not hold token sequences, unlike --dataset {config.dataset!r}")
    eval_cache = CachedDataset(eval_data.dataset, [open_cache(config.eval_cache, allow_nonfinite=config.allow_nonfinite_targets)]) \
        if config.eval_cache and eval_data else None

    # -- model, loss weights, optimiser --------------------------------------------------------------------
    student = _build_student(config, device)
    first = collate_tokens([data.dataset[0]])
    with torch.no_grad():
        width = run_teacher(student, to_device(first.inputs, device)).shape[-1]
    for cache in caches:
        if width != cache.num_classes:
            raise TargetMismatchError(f"the student has {width} outputs but {cache.path} holds targets over a vocabulary of "
                                      f"{cache.num_classes}")
    temperature = None if config.source == "labels" else (
        config.temperature or (caches[0].manifest.temperature if caches else LM_TEMPERATURE))
    if config.teachers_per_step is not None or len(caches) > 1:
        raise UsageError("several teachers (caches) per token are not supported yet: pass one --cache")
    window = DistillationLoss(start=config.kd_start, end=config.kd_end)  # only its KD window is used here
    loader = _loader(train_set, sampler, collate_fn, config, device)
    total_steps = config.epochs * len(loader)
    optimizer, schedule = optimiser(config, student, total_steps)
    log.info("training %s on %s (%d sequences, %d steps), targets from %s%s", config.student, config.dataset, len(data),
             total_steps, config.source, f", temperature {temperature:g}" if temperature else "")

    # -- the loop ---------------------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    train_seconds = teacher_seconds = 0.0
    step = 0
    show = not config.quiet and sys.stderr.isatty()
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        student.train()
        started = time.perf_counter()
        epoch_teacher = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no per-step sync
        seen = 0
        for inputs, labels, third in tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                                          disable=not show):
            inputs, labels = to_device(inputs, device), labels.to(device, non_blocking=True)
            lengths, target = _split(third, device)
            kd_on = config.source != "labels" and window.active(step / total_steps)
            if teacher is not None and kd_on:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    full = run_teacher(teacher.module, inputs)[next_token_mask(labels, lengths)].float()  # (N, V)
                target = Targets("full", int(full.shape[-1]), logits=full.clone())  # a normal tensor, not an inference one
                epoch_teacher += time.perf_counter() - t0
            logits = run_teacher(student, inputs)  # (B, T, V)
            ce, kd, positions = token_loss_terms(logits, labels, lengths, target if kd_on else None, temperature or 1.0, config.tail)
            loss = ce if kd is None else config.kd_loss_weight * kd + config.org_loss_weight * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.detach().double() * positions
            seen += positions
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        teacher_seconds += epoch_teacher
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen), "seconds": seconds,
                                  "teacher_seconds": epoch_teacher, "tokens": seen}
        if eval_data is not None:
            record.update(evaluate_tokens(student, eval_data, device, eval_cache))
        history.append(record)
        log.info("epoch %d/%d: loss %.4f%s, %.2f s", epoch + 1, config.epochs, record["train_loss"],
                 f", eval perplexity {record['eval_perplexity']:.3f}" if "eval_perplexity" in record else "", seconds)
    return save_student(config, student, history, train_seconds, teacher_seconds, temperature, caches, teacher, device)
