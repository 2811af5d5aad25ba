"""The student trainer: one loop, read top to bottom, no framework.

Three ways to get the soft targets, one loop:

* ``caches``: cached KD. Targets stream from one or more caches written by ``logit-cache dump``;
  the teacher never runs.
* ``teacher``: online KD, the baseline. The teacher (loaded as ``dump`` loads it) runs on every
  batch while KD applies; the loss is the same, with its logits as full targets.
* ``labels_only``: plain cross-entropy, the other baseline.

What a batch is and which losses compare it is the task's (:mod:`.tasks`: a classifier or a
language model, chosen by the data); the loss mix is :class:`~logit_cache.losses.DistillationLoss`'s
for both. The options and their defaults are :mod:`.config`'s. The resolved config is saved beside
the student, so every checkpoint says how it was trained.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..data.cache import LogitCache, open_cache
from ..data.datasets import ResolvedDataset, resolve_dataset
from ..data.loader import CachedDataset, ChunkShuffleSampler, collate
from ..errors import UsageError
from ..format.manifest import write_json_atomic
from ..format.paths import check_writable, output_errors
from ..losses.sample import logits_targets
from ..specs import resolve_callable
from ..teachers.runtime import resolve_device, run_model
from ..teachers.sources import Teacher, load_teacher
from .config import OPTIMIZERS, TrainConfig, TrainResult  # noqa: F401  (OPTIMIZERS moved to config.py)
from .evaluation import evaluate  # noqa: F401  (moved to evaluation.py)
from .progress import TrainProgress
from .tasks import task_for

log = logging.getLogger(__name__)


def _build_student(config: TrainConfig, device: torch.device) -> nn.Module:
    factory = resolve_callable(config.student, "--student")
    try:
        student = factory(**config.student_kwargs)
    except Exception as exc:
        raise UsageError(f"--student {config.student!r} with kwargs {config.student_kwargs} failed to build: {exc!r}") from exc
    if not isinstance(student, nn.Module):
        raise UsageError(f"--student {config.student!r} returned a {type(student).__name__}, not a torch.nn.Module")
    return student.to(device)


def training_data(config: TrainConfig, data: ResolvedDataset, caches: list[LogitCache], device: torch.device,
                  plain_collate: Any) -> tuple[Any, ChunkShuffleSampler, Any, Teacher | None]:
    """The training set, its sampler and collate function, and the online teacher (or None).

    With caches: the data wrapped with them and their chunk-aware sampler. Without: the plain data
    in the permutation an in-memory cache's sampler gives for this seed (runs differ only in the
    targets), collated by ``plain_collate``, and the teacher loaded as ``dump`` loads it.
    """
    if caches:
        return (CachedDataset(data.dataset, caches, verify=config.verify),
                ChunkShuffleSampler.for_caches(caches, shuffle=True, seed=config.seed), collate, None)
    teacher = None
    if config.teacher:
        teacher = load_teacher(config.teacher, arch=config.arch, arch_kwargs=config.arch_kwargs,
                               trust_checkpoint=config.trust_checkpoint, device=device)
    return data.dataset, ChunkShuffleSampler(len(data), shuffle=True, seed=config.seed), plain_collate, teacher


def optimiser(config: TrainConfig, student: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """``--optimizer`` over the student's parameters, with the cosine decay of the lr to 0 over ``total_steps``."""
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def train_student(config: TrainConfig) -> TrainResult:
    """Train a student as ``config`` says; save it, its sidecar and its metrics; return the metrics."""
    config.validate()
    device = resolve_device(config.device)
    # Every output is checked writable now, not found unwritable after the training.
    for path, what in zip(output_paths(config), ("--out", "the sidecar of --out", "--metrics"), strict=True):
        check_writable(path, what)
    # The student's initialisation, and any augmentation the dataset draws from the global generators
    # (torch, numpy, random), depend only on the seed.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)

    # -- data: the dataset, the task it sets, and where the soft targets come from -------------------
    data = resolve_dataset(config.dataset, config.dataset_kwargs)
    task = task_for(data)  # a language model for token sequences, else a classifier
    caches = [open_cache(path, allow_nonfinite=config.allow_nonfinite_targets) for path in config.caches]
    task.check(config, data, caches)
    train_set, sampler, collate_fn, teacher = training_data(config, data, caches, device, task.plain_collate)
    eval_data = resolve_dataset(config.eval_dataset, config.eval_dataset_kwargs) if config.eval_dataset else None
    task.check_eval(config, eval_data)
    # the eval data paired with its cache once, here: the pairing check reads items, so not every epoch
    eval_cache = CachedDataset(eval_data.dataset, [open_cache(config.eval_cache, allow_nonfinite=config.allow_nonfinite_targets)]) \
        if config.eval_cache and eval_data else None

    # -- model, loss, optimiser -------------------------------------------------------------------
    student = _build_student(config, device)
    task.check_width(student, caches, data, device)
    temperature = None if config.source == "labels" else (
        config.temperature or (caches[0].manifest.temperature if caches else task.default_temperature))
    criterion = task.criterion(config, temperature)  # CE alone (labels only), else DistillationLoss
    kd_window = criterion.active if temperature is not None else lambda progress: False
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
    total_steps = config.epochs * len(loader)
    optimizer, schedule = optimiser(config, student, total_steps)
    source = {"cache": ", ".join(config.caches), "online": f"the teacher {config.teacher} (online)", "labels": "labels only"}
    log.info("training %s on %s (%d %s, %d steps), targets from %s%s", config.student, config.dataset, len(data), task.unit,
             total_steps, source[config.source], f", temperature {temperature:g}" if temperature else "")

    # -- the loop ------------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    train_seconds = teacher_seconds = 0.0
    step = 0
    rate_unit = "tokens" if "tokens" in task.record(0) else task.unit  # what the loss averages over
    # a bar per epoch on a terminal, else one log line per epoch (see .progress); neither when quiet
    with TrainProgress(config.epochs, rate_unit, config.quiet) as reports:
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            student.train()
            report = reports.epoch(epoch + 1, len(loader))
            started = time.perf_counter()
            epoch_teacher = 0.0
            # summed on the device, in float64: reading a GPU loss back every step would stall the GPU
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            for collated in loader:
                batch = task.batch(collated, data, bool(caches), device)
                progress = step / total_steps
                kd = kd_window(progress)
                if teacher is not None and kd:
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        logits = task.teacher_logits(teacher.module, batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    epoch_teacher += time.perf_counter() - t0
                    batch.target = logits_targets(logits.clone())  # an ordinary tensor: inference tensors cannot enter autograd
                # the rows the losses compare: (B, C) for a classifier, the trained positions (N, V) for a language model
                student_rows, labels, target, rows = task.outputs(run_model(student, batch.inputs), batch, kd)
                loss = (criterion(student_rows, labels) if temperature is None
                        else criterion(student_rows, labels, target, progress=progress))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                loss_sum += loss.detach().double() * rows
                seen += rows
                report.step(loss_sum, seen)  # reads the loss back only when a bar is shown, at most twice a second
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            teacher_seconds += epoch_teacher
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen), "seconds": seconds,
                                      "teacher_seconds": epoch_teacher, **task.record(seen)}
            if eval_data is not None:
                report.evaluating()
                record.update(task.evaluate(student, eval_data, device, eval_cache))
            history.append(record)
            report.finish(record, task.describe(record), seen, log)

    return save_student(config, student, history, train_seconds, teacher_seconds, temperature, caches, teacher, device)


def output_paths(config: TrainConfig) -> tuple[Path, Path, Path]:
    """The files a run writes: the weights (``--out``), the sidecar beside them and the metrics."""
    out = Path(config.out)
    return out, out.with_suffix(".json"), Path(config.metrics) if config.metrics else out.with_suffix(".metrics.json")


def save_student(config: TrainConfig, student: nn.Module, history: list[dict[str, Any]], train_seconds: float,
                 teacher_seconds: float, temperature: float | None, caches: list[LogitCache], teacher: Any,
                 device: torch.device) -> TrainResult:
    """Save the weights (atomically), the metrics and the sidecar that says how they were trained."""
    out, sidecar, metrics_path = output_paths(config)
    with output_errors(f"the student {out}"):  # e.g. a disk that filled up during the training
        _save_files(config, student, history, train_seconds, teacher_seconds, temperature, caches, teacher, device)
    for cache in caches:
        cache.close()
    return TrainResult(out, sidecar, metrics_path, history, train_seconds, teacher_seconds, temperature)


def _save_files(config: TrainConfig, student: nn.Module, history: list[dict[str, Any]], train_seconds: float,
                teacher_seconds: float, temperature: float | None, caches: list[LogitCache], teacher: Any,
                device: torch.device) -> None:
    out, sidecar, metrics_path = output_paths(config)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as handle:  # through a Python file, a full disk is an OSError (torch's own writer says RuntimeError)
        torch.save(student.state_dict(), handle)
    os.replace(partial, out)
    summary = {"epochs": history, "train_seconds": train_seconds, "teacher_seconds": teacher_seconds}
    write_json_atomic(metrics_path, summary)
    write_json_atomic(sidecar, {
        "what": "a student state_dict trained by logit-cache",
        "student": config.student, "student_kwargs": config.student_kwargs, "weights": out.name,
        "targets": config.source, "temperature": temperature,
        "caches": [{"path": str(c.path), "key": c.manifest.key, "mode": c.mode, "k": c.manifest.k,
                    "teacher_sha256": c.manifest.teacher.get("sha256")} for c in caches],
        "teacher": None if teacher is None else teacher.manifest_entry(),
        "config": asdict(config), "final": history[-1], "train_seconds": train_seconds, "teacher_seconds": teacher_seconds,
        "tool_version": __version__, "torch_version": torch.__version__, "device": str(device),
    })

