"""The demo's measurements and its report: the teacher's cost against the student's, the rows of the
table (from the runs, never assumed), the table itself and one verdict per claim, computed.

The claims (issue 14): cached KD with replayed views beats labels only by more than the seed
spread, matches online KD within it, and runs an epoch at least ``SPEEDUP`` times faster than online
KD. The seed spread of a difference of two methods' means is ``sqrt(std_a**2 + std_b**2)`` (their
sample standard deviations over the seeds): what the difference of two single runs varies by.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..train.config import TrainResult

#: How many times faster than online KD an epoch of cached KD with views must run.
SPEEDUP = 5.0


@dataclass
class MethodRow:
    """One row of the table (and of demo.json): a method's numbers, from its runs."""

    method: str
    test_accuracy: float  # mean over the seeds, on the clean test split, after the last epoch
    test_accuracy_std: float  # sample standard deviation over the seeds (0 with one seed)
    epoch_seconds: float  # median wall time of an epoch over every epoch of every seed (evaluation excluded)
    teacher_seconds: float  # time in the teacher during a run (mean over the seeds): online KD only
    cache_bytes: int  # bytes on disk of the cache the method reads (0 without one)
    train_seconds: float  # a whole run's training loop (mean over the seeds)
    seeds: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def method_row(method: str, runs: list[TrainResult], dump: dict[str, Any] | None) -> MethodRow:
    """The row of ``method`` from its runs (one a seed) and, for a cached method, its dump."""
    accuracies = [float(run.final["eval_accuracy"]) for run in runs]
    return MethodRow(
        method=method, test_accuracy=statistics.fmean(accuracies),
        test_accuracy_std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        epoch_seconds=statistics.median(epoch["seconds"] for run in runs for epoch in run.epochs),
        teacher_seconds=statistics.fmean(run.teacher_seconds for run in runs),
        cache_bytes=int(dump["bytes_on_disk"]) if dump else 0,
        train_seconds=statistics.fmean(run.seconds for run in runs), seeds=len(runs),
    )


def forward_flops(model: nn.Module) -> int:
    """FLOPs of one sample's forward through the model's linear layers (2 a multiply-add; biases and ReLUs ignored)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def timed_forward(model: nn.Module, batch_size: int, repeats: int = 15) -> float:
    """Median seconds of one forward of a batch of digits-shaped inputs, in inference mode, after a warm-up."""
    model.eval()
    inputs = torch.rand(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            started = time.perf_counter()
            model(inputs)
            if i >= 3:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def cost_ratio(teacher: nn.Module, student: nn.Module, batch_size: int) -> dict[str, float]:
    """The teacher's forward cost against the student's: in FLOPs (counted) and in time (measured here)."""
    flops = {name: forward_flops(model) for name, model in (("teacher", teacher), ("student", student))}
    seconds = {name: timed_forward(model, batch_size) for name, model in (("teacher", teacher), ("student", student))}
    return {"teacher_flops": flops["teacher"], "student_flops": flops["student"], "flops_ratio": flops["teacher"] / flops["student"],
            "teacher_forward_seconds": seconds["teacher"], "student_forward_seconds": seconds["student"],
            "time_ratio": seconds["teacher"] / seconds["student"], "batch_size": batch_size,
            "teacher_weights": sum(p.numel() for p in teacher.parameters()),
            "student_weights": sum(p.numel() for p in student.parameters())}


def spread(a: MethodRow, b: MethodRow) -> float:
    """The seed spread of the difference of two methods' mean accuracies."""
    return math.hypot(a.test_accuracy_std, b.test_accuracy_std)


def verdicts(rows: dict[str, MethodRow], labels: str, replayed: str, online: str) -> list[tuple[bool, str]]:
    """One (passed, sentence) a claim, computed from the rows."""
    views, base, teacher = rows[replayed], rows[labels], rows[online]
    gain, gain_spread = views.test_accuracy - base.test_accuracy, spread(views, base)
    gap, gap_spread = views.test_accuracy - teacher.test_accuracy, spread(views, teacher)
    speedup = teacher.epoch_seconds / views.epoch_seconds if views.epoch_seconds > 0 else math.inf
    return [
        (gain > gain_spread, f"{replayed} beats {labels} by {100 * gain:+.2f} points (seed spread {100 * gain_spread:.2f})"),
        (abs(gap) <= gap_spread, f"{replayed} matches {online}: {100 * gap:+.2f} points (seed spread {100 * gap_spread:.2f})"),
        (speedup >= SPEEDUP, f"an epoch of {replayed} runs {speedup:.1f}x faster than {online} (claim: >= {SPEEDUP:g}x)"),
    ]


def _kilobytes(size: int) -> str:
    return f"{size / 1e3:,.0f} kB" if size else "-"


def table(result: Any) -> str:
    """The table of a :class:`~logit_cache.tools.demo.DemoResult`, the set-up it was measured in and the verdicts."""
    settings, cost = result.settings, result.cost
    seeds = settings["seeds"]
    lines = []
    if settings["quick"]:
        lines.append("--quick: toy sizes to check the wiring; these numbers mean nothing.")
    lines.append(f"{'method':<26} {f'test acc ({seeds} seed' + ('s' if seeds > 1 else '') + ')':>19} {'epoch s':>8} "
                 f"{'in teacher s':>13} {'cache on disk':>14}")
    for row in result.rows:
        lines.append(f"{row.method:<26} {row.test_accuracy:>10.4f} ± {row.test_accuracy_std:.4f} {row.epoch_seconds:>8.3f} "
                     f"{row.teacher_seconds:>13.2f} {_kilobytes(row.cache_bytes):>14}")
    lines.append(
        f"Student digits_mlp({_kwargs(settings['student_kwargs'])}), {cost['student_weights']:,} weights, trained {settings['epochs']} "
        f"epochs on augmented digits (shift, noise, flip), tested on the clean test split; test acc: mean ± std over seeds "
        f"{', '.join(map(str, settings['student_seeds']))}; epoch s: median of every epoch; in teacher s: a run's time in the teacher.")
    lines.append(
        f"Teacher digits_mlp({_kwargs(settings['teacher_kwargs'])}), {cost['teacher_weights']:,} weights, clean test accuracy "
        f"{result.teacher_accuracy:.4f}, trained in {result.teacher_train_seconds:.1f} s; a forward costs {cost['flops_ratio']:,.0f}x "
        f"the student's in FLOPs, {cost['time_ratio']:,.0f}x in time (batch {cost['batch_size']}, measured).")
    dumps = "; ".join(f"{name}: {d['rows']:,} rows in {d['seconds']:.2f} s" for name, d in result.dumps.items())
    lines.append(f"Dumped once (top-{settings['k']}, T={settings['temperature']:g}): {dumps}. Total {result.total_seconds:.0f} s "
                 f"on {settings['cpus']} CPUs, {settings['torch_threads']} torch threads, load average {_load(settings)} "
                 "(other work on the machine slows every time above).")
    for ok, text in result.verdicts():
        lines.append(f"{'PASS' if ok else 'MISS'}  {text}")
    if seeds < 2:
        lines.append("(one seed: no seed spread to compare with)")
    return "\n".join(lines)


def _load(settings: dict[str, Any]) -> str:
    start, end = settings.get("load_average_start"), settings.get("load_average_end")
    return "unknown" if start is None or end is None else f"{start:.1f} at the start, {end:.1f} at the end"


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())
