"""The whole pipeline on the built-in digits data, in about a minute on two CPU cores.

1. train a teacher (``digits_mlp``, 256 wide, 2 hidden layers) on the train split;
2. dump its top-k logits once, for the train split (and the test split, to measure eval KL);
3. train the same small student three ways with the same seed and data order: labels only,
   online KD (the teacher runs every step) and cached KD (targets from step 2);
4. print test accuracy, eval KL to the teacher, student training time and time in the teacher.

Deterministic given the seed. It works in a fresh temporary folder (removed afterwards) or in
``--workdir DIR``, where it replaces its own earlier outputs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datasets import DigitsDataset
from ..format.manifest import write_json_atomic
from ..pipeline.dump import DumpConfig, dump_cache
from ..train.config import TrainConfig, TrainResult
from ..train.loop import train_student
from .models import digits_mlp

log = logging.getLogger(__name__)

TEACHER_ARCH = "logit_cache.models:digits_mlp"
STUDENT = "logit_cache.models:digits_mlp"
#: About 40x fewer weights than the teacher (1.2k vs 83k): small enough for the teacher to matter.
STUDENT_KWARGS = {"hidden": 16, "depth": 1}
#: On digits T=1 distilled best (test accuracy, 3 seeds: T=1 0.983, T=2 0.979, T=4 0.959 at 30
#: epochs; labels only 0.983): the teacher is 99.4% accurate, so its soft targets say little
#: beyond the labels. At T=1 the top-k "rest" tail is exact.
TEMPERATURE = 1.0


def train_digits_teacher(out: str | Path, epochs: int = 40, seed: int = 0, hidden: int = 256) -> float:
    """Train ``digits_mlp(hidden=hidden)`` on the digits train split, save its state_dict, return test accuracy."""
    torch.manual_seed(seed)
    train_set, test_set = DigitsDataset("train"), DigitsDataset("test")
    model = digits_mlp(hidden=hidden)
    # Adam at 3e-3 with batches of 64 converges in a few dozen epochs on 1,437 images.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(train_set), generator=generator)
        for start in range(0, len(train_set), 64):
            batch = order[start : start + 64]
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
    workdir: Path
    teacher_accuracy: float
    teacher_train_seconds: float
    dump_seconds: float
    runs: dict[str, TrainResult] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"method": name, "test_accuracy": run.final.get("eval_accuracy"), "eval_kl": run.final.get("eval_kl"),
             "train_seconds": run.seconds, "teacher_seconds": run.teacher_seconds}
            for name, run in self.runs.items()
        ]

    def table(self) -> str:
        lines = [f"{'method':<12} {'test acc':>9} {'eval KL':>8} {'train s':>8} {'in teacher s':>13}"]
        for row in self.rows():
            lines.append(f"{row['method']:<12} {row['test_accuracy']:>9.4f} {row['eval_kl']:>8.4f} "
                         f"{row['train_seconds']:>8.2f} {row['teacher_seconds']:>13.2f}")
        lines.append(f"teacher: test accuracy {self.teacher_accuracy:.4f}, trained in {self.teacher_train_seconds:.1f} s; "
                     f"the cache was dumped once in {self.dump_seconds:.2f} s (train and test splits)")
        return "\n".join(lines)


def run_demo(workdir: str | Path | None = None, seed: int = 0, epochs: int = 30, topk: int = 5, quiet: bool = False) -> DemoResult:
    """Run the demo; with ``workdir=None`` in a temporary folder that is removed afterwards."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="logit-cache-demo-") as tmp:
            return _run(Path(tmp), seed, epochs, topk, quiet)
    return _run(Path(workdir), seed, epochs, topk, quiet)


def _run(workdir: Path, seed: int, epochs: int, topk: int, quiet: bool) -> DemoResult:
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = workdir / "teacher.pt"
    started = time.perf_counter()
    accuracy = train_digits_teacher(teacher, seed=seed)
    teacher_seconds = time.perf_counter() - started
    log.info("teacher: test accuracy %.4f (%.1f s) -> %s", accuracy, teacher_seconds, teacher)

    caches = {split: workdir / f"cache-{split}-top{topk}" for split in ("train", "test")}
    started = time.perf_counter()
    for split, out in caches.items():
        # overwrite: the demo's own outputs of an earlier run (a finished cache of other content, or an
        # unfinished OUT.partial) are replaced, and only when provably ours (the dump's ownership checks).
        dump_cache(DumpConfig(teacher=str(teacher), arch=TEACHER_ARCH, dataset="digits", dataset_kwargs={"split": split},
                        out=str(out), k=topk, temperature=TEMPERATURE, overwrite=True, quiet=True, device="cpu"))
    dump_seconds = time.perf_counter() - started

    result = DemoResult(workdir, accuracy, teacher_seconds, dump_seconds)
    common: dict[str, Any] = {"student": STUDENT, "student_kwargs": STUDENT_KWARGS, "dataset": "digits",
                              "dataset_kwargs": {"split": "train"}, "eval_dataset": "digits",
                              "eval_dataset_kwargs": {"split": "test"}, "eval_cache": str(caches["test"]),
                              "epochs": epochs, "seed": seed, "device": "cpu", "quiet": quiet, "temperature": TEMPERATURE}
    for name, source in (("labels only", {"labels_only": True}),
                         ("online KD", {"teacher": str(teacher), "arch": TEACHER_ARCH}),
                         ("cached KD", {"caches": [str(caches["train"])]})):
        log.info("training the student: %s", name)
        slug = name.replace(" ", "-")
        result.runs[name] = train_student(TrainConfig(out=str(workdir / f"student-{slug}.pt"), **common, **source))
    # demo.json: the table, the teacher's figures and run_demo's own arguments under their names
    write_json_atomic(workdir / "demo.json", dict(rows=result.rows(), teacher_accuracy=accuracy, teacher_train_seconds=teacher_seconds,
                                                  dump_seconds=dump_seconds, seed=seed, epochs=epochs, topk=topk))
    return result
