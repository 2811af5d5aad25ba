"""``logit-cache demo``: why cache a teacher's logits, measured in about a minute and a half on two CPU cores.

The story, on the built-in digits data with random augmentation (``DigitsDataset(augment=True)``):

1. train a teacher far costlier than the student (``TEACHER_KWARGS``: a wide ``digits_mlp``; its
   cost against the student's is measured and printed) on the clean train split;
2. dump its top-k logits once into each of two caches: a cache of the clean images (one view a sample) and a cache
   of ``VIEWS`` replayable augmented views a sample (``dump --views V --seed 0``);
3. train the same small student on the augmented train split four ways, for each of a few seeds,
   methods interleaved (machine load hits all alike): labels only, cached KD from the one-view
   cache (the teacher's targets for *another* input, the clean one), cached KD from the views
   cache (the teacher's targets for exactly the input shown) and online KD (the teacher runs on
   every batch);
4. print a table (clean test accuracy, mean ± std over the seeds; the median time of an epoch; time
   in the teacher; bytes of the cache on disk) and one verdict per claim, computed from it.

Deterministic given the seed (the accuracies; times are measured). It works in a temporary folder
(removed afterwards) or in ``--workdir DIR``, where it replaces its own earlier outputs and keeps
``demo.json``. The measuring and the verdicts are :mod:`.demo_report`'s.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DigitsDataset
from ..errors import UsageError
from ..format.manifest import write_json_atomic
from ..pipeline.dump import DumpConfig, dump_cache
from ..train.config import TrainConfig, TrainResult
from ..train.loop import train_student
from .demo_report import MethodRow, cost_ratio, method_row, table, verdicts
from .models import digits_mlp

log = logging.getLogger(__name__)

TEACHER_ARCH = "logit_cache.models:digits_mlp"
STUDENT = "logit_cache.models:digits_mlp"
#: 2.4k weights. The augmented-views evidence (scripts/augment_evidence.py) chose it over hidden 16.
STUDENT_KWARGS = {"hidden": 32, "depth": 1}
#: A teacher whose forward costs thousands of times the student's in FLOPs and far more than the
#: student's whole training step in time, as the teachers that KD is used with do. Its size is set by
#: the speed-up claim: an epoch of cached KD with replayed views costs the augmentation and the
#: replay's per-item seeding (about 2x a labels-only epoch on the demo's student), so online KD is >= 5x slower only
#: with a teacher of ~1 ms a sample; depth 2 (half the cost) is enough once the replay is as cheap as labels.
TEACHER_KWARGS = {"hidden": 4096, "depth": 3}
#: A wide MLP fits the clean digits in a few epochs; larger batches and a lower lr than the scripts' teacher.
TEACHER_TRAINING = {"epochs": 3, "batch_size": 128, "lr": 1e-3}
#: T=2 was within 0.15 points of the best T for the cached views and online KD (augment_evidence).
TEMPERATURE = 2.0
VIEWS = 8
EPOCHS = 10
SEEDS = 3
#: The rows of the table, in order, under the names demo.json uses.
LABELS, CLEAN, REPLAYED, ONLINE = "labels only", "cached KD, 1 clean view", "cached KD, replayed views", "online KD"
METHODS = (LABELS, CLEAN, REPLAYED, ONLINE)
#: --quick: the same steps at toy sizes, to check the wiring in a few seconds (its numbers mean nothing).
QUICK = {"teacher_kwargs": {"hidden": 64, "depth": 1}, "teacher_training": {"epochs": 1, "batch_size": 128, "lr": 1e-3},
         "views": 2, "epochs": 1, "seeds": 1}


def train_digits_teacher(out: str | Path, epochs: int = 40, seed: int = 0, hidden: int = 256, depth: int = 2,
                         batch_size: int = 64, lr: float = 3e-3) -> float:
    """Train ``digits_mlp(hidden, depth)`` on the clean digits train split, save its state_dict, return test accuracy.

    The defaults (256 wide, 2 layers, 40 epochs) are the teacher of the scripts; the demo asks for a wider one.
    """
    torch.manual_seed(seed)
    train_set, test_set = DigitsDataset("train"), DigitsDataset("test")
    model = digits_mlp(hidden=hidden, depth=depth)
    # Adam at 3e-3 with batches of 64 converges in a few dozen epochs on 1,437 images.
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=generator)
        for start in range(0, len(train_set), batch_size):
            batch = order[start : start + batch_size]
            loss = loss_fn(model(train_set.images[batch]), train_set.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_set.images).argmax(1) == test_set.labels).float().mean().item()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return accuracy


@dataclass
class DemoResult:
    """What the demo measured: the teacher, the caches, every student run, and the rows built from them."""

    workdir: Path
    settings: dict[str, Any]
    teacher_accuracy: float
    teacher_train_seconds: float
    cost: dict[str, float]
    dumps: dict[str, dict[str, Any]]
    runs: dict[str, list[TrainResult]] = field(default_factory=dict)
    rows: list[MethodRow] = field(default_factory=list)
    total_seconds: float = 0.0

    def verdicts(self) -> list[tuple[bool, str]]:
        return verdicts({row.method: row for row in self.rows}, LABELS, REPLAYED, ONLINE)

    def table(self) -> str:
        return table(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "what": "logit-cache demo: a student on augmented digits from labels, a one-view cache, a views cache and online KD",
            "rows": [row.to_json() for row in self.rows],
            "verdicts": [{"pass": ok, "claim": text} for ok, text in self.verdicts()],
            "settings": self.settings, "teacher_accuracy": self.teacher_accuracy,
            "teacher_train_seconds": self.teacher_train_seconds, "cost": self.cost, "dumps": self.dumps,
            "per_seed": {name: [{"seed": seed, "test_accuracy": run.final.get("eval_accuracy"), "train_seconds": run.seconds,
                                 "teacher_seconds": run.teacher_seconds, "epoch_seconds": [e["seconds"] for e in run.epochs]}
                                for seed, run in zip(self.settings["student_seeds"], runs, strict=True)]
                         for name, runs in self.runs.items()},
            "total_seconds": self.total_seconds,
        }


def run_demo(workdir: str | Path | None = None, seed: int = 0, epochs: int | None = None, topk: int = 5, quiet: bool = False,
             seeds: int | None = None, views: int | None = None, quick: bool = False) -> DemoResult:
    """Run the demo; with ``workdir=None`` in a temporary folder that is removed afterwards.

    ``epochs``, ``seeds`` and ``views`` default to ``EPOCHS``, ``SEEDS`` and ``VIEWS`` (with
    ``quick``, to the toy sizes of ``QUICK``); the students use seeds ``seed .. seed + seeds - 1``.
    """
    for name, value in (("--seeds", seeds), ("--epochs", epochs), ("--topk", topk)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if views is not None and views < 2:
        raise UsageError(f"--views must be >= 2 (one view is what the clean cache holds), got {views}")
    settings = {
        "quick": quick, "seed": seed, "k": topk, "temperature": TEMPERATURE,
        "epochs": epochs or (QUICK["epochs"] if quick else EPOCHS), "seeds": seeds or (QUICK["seeds"] if quick else SEEDS),
        "views": views or (QUICK["views"] if quick else VIEWS),
        "teacher_kwargs": dict(QUICK["teacher_kwargs"] if quick else TEACHER_KWARGS),
        "teacher_training": dict(QUICK["teacher_training"] if quick else TEACHER_TRAINING),
        "student": STUDENT, "student_kwargs": dict(STUDENT_KWARGS), "dataset": "digits", "augment": True,
    }
    settings["student_seeds"] = list(range(seed, seed + settings["seeds"]))
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="logit-cache-demo-") as tmp:
            return _run(Path(tmp), settings, quiet)
    return _run(Path(workdir), settings, quiet)


def _run(workdir: Path, settings: dict[str, Any], quiet: bool) -> DemoResult:
    started = time.perf_counter()
    # the times are only as good as the machine is quiet: the load and threads go with them
    settings.update(cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), load_average_start=_load())
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = workdir / "teacher.pt"
    teacher_kwargs = settings["teacher_kwargs"]
    t0 = time.perf_counter()
    accuracy = train_digits_teacher(teacher, seed=settings["seed"], **teacher_kwargs, **settings["teacher_training"])
    teacher_seconds = time.perf_counter() - t0
    log.info("teacher digits_mlp(%s): clean test accuracy %.4f, trained in %.1f s", teacher_kwargs, accuracy, teacher_seconds)
    cost = cost_ratio(digits_mlp(**teacher_kwargs), digits_mlp(**STUDENT_KWARGS), batch_size=TrainConfig.batch_size)
    log.info("a forward of the teacher costs %.0fx the student's in FLOPs, %.0fx in time (batch %d)",
             cost["flops_ratio"], cost["time_ratio"], TrainConfig.batch_size)

    dumps = _dump_caches(workdir, teacher, settings)
    result = DemoResult(workdir, settings, accuracy, teacher_seconds, cost, dumps, runs={name: [] for name in METHODS})
    sources: dict[str, dict[str, Any]] = {
        LABELS: {"labels_only": True},
        # the clean cache against augmented inputs: only the length can match (the naive use of a cache)
        CLEAN: {"caches": [dumps[CLEAN]["path"]], "verify": "length"},
        REPLAYED: {"caches": [dumps[REPLAYED]["path"]]},
        ONLINE: {"teacher": str(teacher), "arch": TEACHER_ARCH, "arch_kwargs": teacher_kwargs},
    }
    for student_seed in settings["student_seeds"]:
        for name in METHODS:  # interleaved: drift in the machine's load hits every method alike
            slug = name.replace(",", "").replace(" ", "-")
            config = TrainConfig(
                student=STUDENT, student_kwargs=dict(STUDENT_KWARGS), out=str(workdir / f"student-{slug}-seed{student_seed}.pt"),
                dataset="digits", dataset_kwargs={"split": "train", "augment": True}, eval_dataset="digits",
                eval_dataset_kwargs={"split": "test"}, epochs=settings["epochs"], temperature=TEMPERATURE, seed=student_seed,
                device="cpu", quiet=quiet, **sources[name])
            run = train_student(config)
            result.runs[name].append(run)
            log.info("seed %d, %s: test accuracy %.4f, %.3f s an epoch, %.2f s in the teacher", student_seed, name,
                     run.final["eval_accuracy"], statistics.median(e["seconds"] for e in run.epochs), run.teacher_seconds)
    result.rows = [method_row(name, result.runs[name], dumps.get(name)) for name in METHODS]
    result.total_seconds = time.perf_counter() - started
    settings["load_average_end"] = _load()
    write_json_atomic(workdir / "demo.json", result.to_json())
    return result


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return None


def _dump_caches(workdir: Path, teacher: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The one-view cache of the clean train split and the cache of its replayable augmented views."""
    common: dict[str, Any] = {"teacher": str(teacher), "arch": TEACHER_ARCH, "arch_kwargs": settings["teacher_kwargs"],
                              "dataset": "digits", "k": settings["k"], "temperature": TEMPERATURE, "device": "cpu",
                              "quiet": True, "overwrite": True}
    configs = {
        CLEAN: DumpConfig(out=str(workdir / f"cache-clean-top{settings['k']}"), dataset_kwargs={"split": "train"}, **common),
        REPLAYED: DumpConfig(out=str(workdir / f"cache-views{settings['views']}-top{settings['k']}"),
                             dataset_kwargs={"split": "train", "augment": True}, views=settings["views"], seed=0, **common),
    }
    dumps = {}
    for name, config in configs.items():
        # overwrite: the demo's own outputs of an earlier run (a finished cache of other content, or an
        # unfinished OUT.partial) are replaced, and only when provably ours (the dump's ownership checks).
        t0 = time.perf_counter()
        done = dump_cache(config)
        dumps[name] = {"path": str(done.out), "seconds": time.perf_counter() - t0, "compute_seconds": done.compute_seconds,
                       "rows": done.manifest.num_rows, "views": done.manifest.views, "bytes_on_disk": done.bytes_on_disk}
        log.info("dumped %s: %d rows in %.2f s, %d bytes", done.out, done.manifest.num_rows, dumps[name]["seconds"], done.bytes_on_disk)
    return dumps
