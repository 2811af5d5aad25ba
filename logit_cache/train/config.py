"""What a training run is asked to do (:class:`TrainConfig`, one field per ``logit-cache train`` option)
and what it produced (:class:`TrainResult`).

The defaults are chosen so the built-in digits student trains well without tuning: AdamW at
lr 1e-2 with weight decay 1e-4 (on digits, 1e-2 beat 3e-3 by 2 points of test accuracy for both
labels-only and KD students, 3 seeds each), batch 64 (23 steps per epoch over 1,437 images),
30 epochs, cosine decay of the learning rate to zero (no warm-up: the models are small), and
Composer's KD weights (0.9 KD / 0.1 ground truth). The temperature defaults to the one recorded in
the (first) cache at dump time, else the task's default (4 for classification, Composer's; 1 for
language models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.loader import VERIFY_CHOICES
from ..errors import UsageError
from ..losses.sample import TAILS

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
    batch_size: int = 64  # per rank under torchrun: a step takes batch_size * world_size samples
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
    world_size: int = 1  # ranks that trained together (torchrun); batch_size is per rank
    rank: int = 0  # this process's rank: only rank 0 wrote the files and should print the summary

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1]
