"""The lightweight student trainer: one file, read top to bottom, no framework.

Three ways to get the soft targets, one loop:

* ``caches``: cached KD. Targets stream from one or more caches written by ``logit-cache dump``;
  the teacher never runs.
* ``teacher``: online KD, the baseline. The teacher (loaded as ``dump`` loads it) runs on every
  batch; the loss is the same, with its logits as full targets.
* ``labels_only``: plain cross-entropy, the other baseline.

The defaults are chosen so the built-in digits student trains well without tuning: AdamW at
lr 1e-2 with weight decay 1e-4 (on digits, 1e-2 beat 3e-3 by 2 points of test accuracy for both
labels-only and KD students, 3 seeds each), batch 64 (23 steps per epoch over 1,437 images),
30 epochs, cosine decay of the learning rate to zero (no warm-up: the models are small), and
Composer's KD weights (0.9 KD / 0.1 ground truth). The temperature defaults to the one recorded in
the (first) cache at dump time, else 4 (Composer's default). The resolved config is saved beside
the student, so every checkpoint says how it was trained.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..data.datasets import ResolvedDataset, resolve_dataset, split_batch
from ..data.loader import VERIFY_CHOICES, CachedDataset, ChunkShuffleSampler, collate
from ..data.replay import preserved_rng
from ..errors import TargetMismatchError, UsageError
from ..format.manifest import write_json_atomic
from ..format.paths import check_writable, output_errors
from ..io.reader import LogitCache, open_cache
from ..losses.sample import DEFAULT_TEMPERATURE, TAILS, DistillationLoss, KLDivergence, kd_loss
from ..specs import resolve_callable
from ..teachers.runtime import resolve_device, run_teacher, to_device
from ..teachers.sources import Teacher, load_teacher

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """What ``logit-cache train`` was asked to do (one field per CLI option)."""

    student: str  # MODULE:CALLABLE building the student nn.Module
    out: str  # where the student's state_dict goes (a JSON sidecar goes beside it)
    dataset: str = "digits"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    caches: list[str] = field(default_factory=list)  # cached KD: one or more cache directories
    teacher: str | None = None  # online KD: a checkpoint, loaded as dump loads it
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_checkpoint: bool = False
    labels_only: bool = False
    eval_dataset: str | None = None  # e.g. "digits" with eval_dataset_kwargs {"split": "test"}
    eval_dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_cache: str | None = None  # a cache of the eval split: adds the eval KL to the teacher
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    temperature: float | None = None  # None: the first cache's recorded temperature, else 4.0
    kd_loss_weight: float = 0.9
    org_loss_weight: float = 0.1
    tail: str | None = None  # top-k caches: rest (default) | renormalize | ignore
    kd_start: float = 0.0  # KD only while the fraction of training done is in [kd_start, kd_end)
    kd_end: float = 1.0
    teachers_per_step: int | None = None  # several caches: a random subset of this many per step
    verify: str = "fingerprint"
    allow_nonfinite_targets: bool = False  # read NaN/inf cached targets instead of refusing them (a damaged cache)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    metrics: str | None = None  # JSON metrics file; default: OUT with suffix .metrics.json
    quiet: bool = False

    @property
    def source(self) -> str:
        return "cache" if self.caches else "online" if self.teacher else "labels"

    def validate(self) -> None:
        """Reject bad or incompatible options before any work is done."""
        chosen = [name for name, on in (("--cache", bool(self.caches)), ("--teacher", bool(self.teacher)),
                                        ("--labels-only", self.labels_only)) if on]
        if len(chosen) != 1:
            raise UsageError(
                "choose where the soft targets come from: --cache DIR (cached KD), --teacher CKPT (online KD) "
                "or --labels-only" + (f"; got {' and '.join(chosen)}" if chosen else "")
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"--epochs and --batch-size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.temperature is not None and not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if self.tail is not None and self.tail not in TAILS:
            raise UsageError(f"--tail {self.tail!r} is not one of {', '.join(TAILS)}")
        if self.verify not in VERIFY_CHOICES:
            raise UsageError(f"--verify {self.verify!r} is not one of {', '.join(VERIFY_CHOICES)}")
        if self.num_workers < 0:
            raise UsageError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.eval_cache and not self.eval_dataset:
            raise UsageError("--eval-cache needs --eval-dataset (the data set the eval cache was dumped from)")


@dataclass
class TrainResult:
    """What a run produced: the files, the per-epoch metrics and where the time went."""

    out: Path
    sidecar: Path
    metrics_path: Path
    epochs: list[dict[str, Any]]
    seconds: float  # wall time of the training loop (all epochs, evaluation excluded)
    teacher_seconds: float  # of which spent running the teacher (online KD only)
    temperature: float | None

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1]


def _build_student(config: TrainConfig, device: torch.device) -> nn.Module:
    factory = resolve_callable(config.student, "--student")
    try:
        student = factory(**config.student_kwargs)
    except Exception as exc:
        raise UsageError(f"--student {config.student!r} with kwargs {config.student_kwargs} failed to build: {exc!r}") from exc
    if not isinstance(student, nn.Module):
        raise UsageError(f"--student {config.student!r} returned a {type(student).__name__}, not a torch.nn.Module")
    return student.to(device)


def _check_classes(student: nn.Module, caches: list[LogitCache], sample: Any, device: torch.device) -> None:
    """Fail before training if the student's output width is not the caches' class count."""
    with torch.no_grad():
        width = run_teacher(student, to_device(sample, device)).shape[-1]
    for cache in caches:
        if width != cache.num_classes:
            raise TargetMismatchError(f"the student has {width} outputs but {cache.path} holds targets over {cache.num_classes} classes")


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


def _loader(dataset: Any, sampler: Any, collate_fn: Any, config: TrainConfig, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=config.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=config.num_workers > 0)


@torch.no_grad()
def evaluate(student: nn.Module, data: ResolvedDataset, device: torch.device, cache: LogitCache | CachedDataset | None = None,
             batch_size: int = 512) -> dict[str, float]:
    """Accuracy on ``data`` (needs labels) and, given a cache of it, the mean KL(teacher || student) at T=1.

    ``cache`` may be the cache or ``data`` already wrapped with it (checked once, not every epoch).
    """
    student.eval()
    if isinstance(cache, LogitCache):
        cache = CachedDataset(data.dataset, [cache])
    loader = DataLoader(cache if cache is not None else data.dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate if cache is not None else None)
    correct = count = 0
    kl_sum = 0.0
    for batch in loader:
        if cache is not None:
            *head, target = batch
            inputs, labels = head if len(head) == 2 else (head[0], None)
        else:
            inputs, labels = split_batch(batch, data.has_labels)
        logits = run_teacher(student, to_device(inputs, device))
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

    # -- data: the dataset, and where the soft targets come from ---------------------------------
    data = resolve_dataset(config.dataset, config.dataset_kwargs)
    if data.per_token:  # a language model's data: the token-level loop
        from .lm import train_tokens

        return train_tokens(config, data, device)
    if config.org_loss_weight and config.source != "labels" and not data.has_labels:
        raise UsageError(f"--dataset {config.dataset!r} has no labels: set --org-loss-weight 0 to train on the teacher alone")
    if config.labels_only and not data.has_labels:
        raise UsageError(f"--labels-only needs labels, but --dataset {config.dataset!r} has none")
    caches = [open_cache(path, allow_nonfinite=config.allow_nonfinite_targets) for path in config.caches]
    train_set, sampler, collate_fn, teacher = training_data(config, data, caches, device, None)
    eval_data = resolve_dataset(config.eval_dataset, config.eval_dataset_kwargs) if config.eval_dataset else None
    # the eval data paired with its cache once, here: the pairing check reads items, so not every epoch
    eval_cache = CachedDataset(eval_data.dataset, [open_cache(config.eval_cache, allow_nonfinite=config.allow_nonfinite_targets)]) \
        if config.eval_cache and eval_data else None

    # -- model, loss, optimiser -------------------------------------------------------------------
    student = _build_student(config, device)
    if caches:
        with preserved_rng():  # reading item 0 must not shift the augmentation's random draws
            first = split_batch(torch.utils.data.default_collate([data.dataset[0]]), data.has_labels)[0]
        _check_classes(student, caches, first, device)
    temperature = config.temperature or (caches[0].manifest.temperature if caches else DEFAULT_TEMPERATURE)
    if config.source == "labels":
        temperature = None
        criterion: nn.Module = nn.CrossEntropyLoss()
    else:
        kd = KLDivergence(temperature, tail=config.tail, teachers_per_step=config.teachers_per_step, seed=config.seed)
        criterion = DistillationLoss(kd, config.kd_loss_weight, config.org_loss_weight, config.kd_start, config.kd_end)
    loader = _loader(train_set, sampler, collate_fn, config, device)
    total_steps = config.epochs * len(loader)
    optimizer, schedule = optimiser(config, student, total_steps)
    source = {"cache": ", ".join(config.caches), "online": f"the teacher {config.teacher} (online)", "labels": "labels only"}
    log.info("training %s on %s (%d samples, %d steps), targets from %s%s", config.student, config.dataset, len(data), total_steps,
             source[config.source], f", temperature {temperature:g}" if temperature else "")

    # -- the loop ------------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    train_seconds = teacher_seconds = 0.0
    step = 0
    show = not config.quiet and sys.stderr.isatty()
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        student.train()
        started = time.perf_counter()
        epoch_teacher = 0.0
        # summed on the device, in float64: reading a GPU loss back every step would stall the GPU
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False, disable=not show)
        for batch in bar:
            if caches:
                *head, target = batch
                inputs, labels = head if len(head) == 2 else (head[0], None)
            else:
                inputs, labels = split_batch(batch, data.has_labels)
            inputs = to_device(inputs, device)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            if teacher is not None:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    target = run_teacher(teacher.module, inputs).float()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                epoch_teacher += time.perf_counter() - t0
                target = target.clone()  # an ordinary tensor: inference tensors cannot enter autograd
            logits = run_teacher(student, inputs)  # (B, C); dict inputs become keyword arguments
            if config.source == "labels":
                loss = criterion(logits, labels)
            else:
                loss = criterion(logits, labels, target, progress=step / total_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.detach().double() * len(logits)
            seen += len(logits)
            if show:  # the running loss on the bar costs a device sync: only when a bar is shown
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        teacher_seconds += epoch_teacher
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(loss_sum) / seen, "seconds": seconds,
                                  "teacher_seconds": epoch_teacher}
        if eval_data is not None:
            record.update(evaluate(student, eval_data, device, eval_cache))
        history.append(record)
        log.info("epoch %d/%d: loss %.4f%s%s, %.2f s", epoch + 1, config.epochs, record["train_loss"],
                 f", eval accuracy {record['eval_accuracy']:.4f}" if "eval_accuracy" in record else "",
                 f", eval KL {record['eval_kl']:.4f}" if "eval_kl" in record else "", seconds)

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

