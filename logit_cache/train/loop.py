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

Under ``torchrun`` the same loop runs on every rank, data-parallel: each rank its share of every
epoch, the student in DistributedDataParallel, the reported loss and metrics reduced across ranks,
files and log lines from rank 0 only (:mod:`.ddp` says how and why).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from ..data.cache import LogitCache, open_cache
from ..data.datasets import ResolvedDataset, resolve_dataset
from ..data.distributed import Dist, destroy, device_kind, init_distributed, phase, sum_across
from ..data.loader import CachedDataset, ChunkShuffleSampler, collate
from ..errors import UsageError
from ..format.manifest import write_json_atomic
from ..format.paths import check_writable, output_errors
from ..losses.sample import logits_targets
from ..specs import resolve_callable
from ..teachers.runtime import resolve_device, run_model
from ..teachers.sources import Teacher, load_teacher
from . import ddp
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
                  plain_collate: Any, num_replicas: int | None = None,
                  rank: int | None = None) -> tuple[Any, ChunkShuffleSampler, Any, Teacher | None]:
    """The training set, its sampler and collate function, and the online teacher (or None).

    With caches: the data wrapped with them and their chunk-aware sampler. Without: the plain data
    in the permutation an in-memory cache's sampler gives for this seed (runs differ only in the
    targets), collated by ``plain_collate``, and the teacher loaded as ``dump`` loads it. Either
    sampler gives this rank (``rank`` of ``num_replicas``; None: the process group's) its contiguous
    share of each epoch's order.
    """
    split = {"num_replicas": num_replicas, "rank": rank}
    if caches:
        return (CachedDataset(data.dataset, caches, verify=config.verify),
                ChunkShuffleSampler.for_caches(caches, shuffle=True, seed=config.seed, **split), collate, None)
    teacher = None
    if config.teacher:
        teacher = load_teacher(config.teacher, arch=config.arch, arch_kwargs=config.arch_kwargs,
                               trust_checkpoint=config.trust_checkpoint, device=device)
    return data.dataset, ChunkShuffleSampler(len(data), shuffle=True, seed=config.seed, **split), plain_collate, teacher


def optimiser(config: TrainConfig, student: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """``--optimizer`` over the student's parameters, with the cosine decay of the lr to 0 over ``total_steps``."""
    if config.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def train_student(config: TrainConfig) -> TrainResult:
    """Train a student as ``config`` says; save it, its sidecar and its metrics; return the metrics.

    Under torchrun (``WORLD_SIZE > 1``) every rank calls this and trains data-parallel (:mod:`.ddp`);
    ``config.batch_size`` is per rank and only rank 0 writes the files.
    """
    config.validate()
    ranks = init_distributed(device_kind(config.device))
    try:
        return _train(config, ranks)
    finally:
        destroy(ranks)


@dataclass
class _Setup:
    """Everything the loop needs, built before it (on every rank, checked on every rank)."""

    device: torch.device
    data: ResolvedDataset
    task: Any
    caches: list[LogitCache]
    train_set: Any
    sampler: ChunkShuffleSampler
    collate_fn: Any
    teacher: Teacher | None
    eval_data: ResolvedDataset | None
    eval_cache: CachedDataset | None
    student: nn.Module
    temperature: float | None
    criterion: nn.Module


def _setup(config: TrainConfig, ranks: Dist) -> _Setup:
    device = resolve_device(config.device, ranks.local_rank)
    if device.type == "cuda" and ranks.world_size > 1:
        torch.cuda.set_device(device)  # NCCL and the caching allocator follow the current device
    if ranks.is_main:  # every output is checked writable now, not found unwritable after the training
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
    train_set, sampler, collate_fn, teacher = training_data(config, data, caches, device, task.plain_collate,
                                                            ranks.world_size, ranks.rank)
    eval_data = resolve_dataset(config.eval_dataset, config.eval_dataset_kwargs) if config.eval_dataset else None
    task.check_eval(config, eval_data)
    # the eval data paired with its cache once, here: the pairing check reads items, so not every epoch
    eval_cache = CachedDataset(eval_data.dataset, [open_cache(config.eval_cache, allow_nonfinite=config.allow_nonfinite_targets)]) \
        if config.eval_cache and eval_data else None

    # -- model, loss ---------------------------------------------------------------------------------
    student = _build_student(config, device)
    task.check_width(student, caches, data, device)
    temperature = None if config.source == "labels" else (
        config.temperature or (caches[0].manifest.temperature if caches else task.default_temperature))
    criterion = task.criterion(config, temperature)  # CE alone (labels only), else DistillationLoss
    return _Setup(device, data, task, caches, train_set, sampler, collate_fn, teacher, eval_data, eval_cache, student,
                  temperature, criterion)


def _train(config: TrainConfig, ranks: Dist) -> TrainResult:
    setup = phase(ranks, _setup, config, ranks)  # an error on one rank stops every rank, each with a message
    device, data, task, caches, sampler, teacher = setup.device, setup.data, setup.task, setup.caches, setup.sampler, setup.teacher
    temperature, criterion = setup.temperature, setup.criterion
    student = ddp.wrap(setup.student, ranks, device)  # under torchrun: rank 0's weights on every rank, gradients averaged
    ddp.reseed_rank(config.seed, ranks)
    kd_window = criterion.active if temperature is not None else lambda progress: False
    loader = DataLoader(setup.train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=setup.collate_fn,
                        num_workers=config.num_workers, pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0)
    total_steps = config.epochs * len(loader)
    optimizer, schedule = optimiser(config, student, total_steps)
    source = {"cache": ", ".join(config.caches), "online": f"the teacher {config.teacher} (online)", "labels": "labels only"}
    if ranks.is_main:
        parallel = f", {ranks.world_size} ranks x batch {config.batch_size}" if ranks.world_size > 1 else ""
        log.info("training %s on %s (%d %s, %d steps%s), targets from %s%s", config.student, config.dataset, len(data), task.unit,
                 total_steps, parallel, source[config.source], f", temperature {temperature:g}" if temperature else "")

    # -- the loop ------------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    train_seconds = teacher_seconds = 0.0
    step = 0
    rate_unit = "tokens" if "tokens" in task.record(0) else task.unit  # what the loss averages over
    # a bar per epoch on a terminal, else one log line per epoch (see .progress); neither when quiet, nor on ranks > 0
    try:
        with TrainProgress(config.epochs, rate_unit, config.quiet or not ranks.is_main) as reports:
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
                    weight = ddp.row_weight(rows, ranks, device) if task.rows_vary else None
                    optimizer.zero_grad(set_to_none=True)
                    (loss if weight is None else loss * weight).backward()
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
                total_loss, total_seen = sum_across(ranks, [float(loss_sum), seen])  # every rank's rows
                record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total_loss / max(1, total_seen), "seconds": seconds,
                                          "teacher_seconds": epoch_teacher, **task.record(int(total_seen))}
                if setup.eval_data is not None:
                    report.evaluating()
                    record.update(task.evaluate(ddp.unwrap(student), setup.eval_data, device, setup.eval_cache, ranks))
                history.append(record)
                report.finish(record, task.describe(record), int(total_seen), log)
    except Exception as exc:
        failure = ddp.peer_failure(exc, ranks)
        if failure is exc:
            raise
        raise failure from exc
    # rank 0 writes; an error there (a full disk) reaches every rank
    return phase(ranks, save_student, config, ddp.unwrap(student), history, train_seconds, teacher_seconds, temperature, caches,
                 teacher, device, ranks)


def output_paths(config: TrainConfig) -> tuple[Path, Path, Path]:
    """The files a run writes: the weights (``--out``), the sidecar beside them and the metrics."""
    out = Path(config.out)
    return out, out.with_suffix(".json"), Path(config.metrics) if config.metrics else out.with_suffix(".metrics.json")


def save_student(config: TrainConfig, student: nn.Module, history: list[dict[str, Any]], train_seconds: float,
                 teacher_seconds: float, temperature: float | None, caches: list[LogitCache], teacher: Any,
                 device: torch.device, ranks: Dist | None = None) -> TrainResult:
    """Save the weights (atomically), the metrics and the sidecar that says how they were trained (under
    torchrun rank 0 alone writes; every rank gets the result)."""
    ranks = ranks or Dist()
    out, sidecar, metrics_path = output_paths(config)
    if ranks.is_main:
        with output_errors(f"the student {out}"):  # e.g. a disk that filled up during the training
            _save_files(config, student, history, train_seconds, teacher_seconds, temperature, caches, teacher, device,
                        ranks.world_size)
    for cache in caches:
        cache.close()
    return TrainResult(out, sidecar, metrics_path, history, train_seconds, teacher_seconds, temperature, ranks.world_size,
                       ranks.rank)


def _save_files(config: TrainConfig, student: nn.Module, history: list[dict[str, Any]], train_seconds: float,
                teacher_seconds: float, temperature: float | None, caches: list[LogitCache], teacher: Any,
                device: torch.device, world_size: int) -> None:
    out, sidecar, metrics_path = output_paths(config)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as handle:  # through a Python file, a full disk is an OSError (torch's own writer says RuntimeError)
        torch.save(student.state_dict(), handle)
    os.replace(partial, out)
    # --batch-size is per rank: a step took batch_size * world_size samples
    parallel = {"world_size": world_size, "batch_size": config.batch_size, "global_batch_size": config.batch_size * world_size}
    summary = {"epochs": history, "train_seconds": train_seconds, "teacher_seconds": teacher_seconds, **parallel}
    write_json_atomic(metrics_path, summary)
    write_json_atomic(sidecar, {
        "what": "a student state_dict trained by logit-cache",
        "student": config.student, "student_kwargs": config.student_kwargs, "weights": out.name,
        "targets": config.source, "temperature": temperature,
        "caches": [{"path": str(c.path), "key": c.manifest.key, "mode": c.mode, "k": c.manifest.k,
                    "teacher_sha256": c.manifest.teacher.get("sha256")} for c in caches],
        "teacher": None if teacher is None else teacher.manifest_entry(),
        "config": asdict(config), "final": history[-1], "train_seconds": train_seconds, "teacher_seconds": teacher_seconds,
        "tool_version": __version__, "torch_version": torch.__version__, "device": str(device), **parallel,
    })

