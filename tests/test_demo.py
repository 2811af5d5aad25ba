"""``logit-cache demo``: its table and demo.json come from the runs (checked against the files they left), and
its verdicts from the table's numbers."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from logit_cache.datasets import DigitsDataset
from logit_cache.models import digits_mlp
from logit_cache.tools.demo import METHODS, STUDENT_KWARGS
from logit_cache.tools.demo_report import SPEEDUP, MethodRow, forward_flops, verdicts

FIELDS = ("test_accuracy", "test_accuracy_std", "epoch_seconds", "teacher_seconds", "cache_bytes")


def tree_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(folder, name)).st_size for folder, _, names in os.walk(path) for name in names)


def student_accuracy(student_path: Path) -> float:
    """The saved student's accuracy on the clean digits test split, computed here."""
    student = digits_mlp(**STUDENT_KWARGS)
    student.load_state_dict(torch.load(student_path, weights_only=True))
    student.eval()
    test = DigitsDataset("test")
    with torch.no_grad():
        return (student(test.images).argmax(1) == test.labels).double().mean().item()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One quick demo of two seeds (3 and 4) in a kept workdir, shared by the tests that read its outputs."""
    workdir = tmp_path_factory.mktemp("demo")
    result = run_cli("demo", "--quick", "--seeds", "2", "--seed", "3", "--workdir", workdir, "--quiet")
    assert result.exit_code == 0, result.output
    return workdir, result.output


def test_demo_json_has_the_four_rows_with_their_fields(quick: tuple[Path, str]) -> None:
    workdir, output = quick
    document = json.loads((workdir / "demo.json").read_text())
    assert [row["method"] for row in document["rows"]] == list(METHODS) == \
        ["labels only", "cached KD, 1 clean view", "cached KD, replayed views", "online KD"]
    for row in document["rows"]:
        assert all(isinstance(row[name], (int, float)) for name in FIELDS), row
        assert row["method"] in output
    assert document["settings"]["student_seeds"] == [3, 4] and document["settings"]["quick"] is True
    assert "these numbers mean nothing" in output


def test_accuracies_are_the_saved_students_mean_and_std(quick: tuple[Path, str]) -> None:
    """Each row's mean ± std over seeds equals the accuracy of the students it saved, evaluated here."""
    workdir, _ = quick
    rows = {row["method"]: row for row in json.loads((workdir / "demo.json").read_text())["rows"]}
    for method, row in rows.items():
        slug = method.replace(",", "").replace(" ", "-")
        accuracies = [student_accuracy(workdir / f"student-{slug}-seed{seed}.pt") for seed in (3, 4)]
        assert row["test_accuracy"] == pytest.approx(statistics.fmean(accuracies), abs=1e-6)
        assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accuracies), abs=1e-6)
        # the epoch time is the median over the epochs the runs' metrics files recorded
        epochs = [e["seconds"] for seed in (3, 4)
                  for e in json.loads((workdir / f"student-{slug}-seed{seed}.metrics.json").read_text())["epochs"]]
        assert row["epoch_seconds"] == pytest.approx(statistics.median(epochs))


def test_cache_bytes_and_teacher_time_come_from_the_runs(quick: tuple[Path, str]) -> None:
    workdir, _ = quick
    rows = {row["method"]: row for row in json.loads((workdir / "demo.json").read_text())["rows"]}
    caches = sorted(p for p in workdir.iterdir() if p.is_dir() and p.name.startswith("cache-"))
    assert [p.name for p in caches] == ["cache-clean-top5", "cache-views2-top5"]  # --quick: 2 views
    assert rows["cached KD, 1 clean view"]["cache_bytes"] == tree_bytes(caches[0]) > 0
    assert rows["cached KD, replayed views"]["cache_bytes"] == tree_bytes(caches[1]) > tree_bytes(caches[0])
    assert rows["labels only"]["cache_bytes"] == rows["online KD"]["cache_bytes"] == 0
    # only online KD runs the teacher while training; its time is the mean of what its runs recorded
    assert [rows[m]["teacher_seconds"] for m in METHODS[:3]] == [0.0, 0.0, 0.0]
    online = [json.loads((workdir / f"student-online-KD-seed{seed}.metrics.json").read_text())["teacher_seconds"] for seed in (3, 4)]
    assert rows["online KD"]["teacher_seconds"] == pytest.approx(statistics.fmean(online)) and min(online) > 0


def test_printed_verdicts_follow_the_numbers(quick: tuple[Path, str]) -> None:
    """The PASS/MISS lines printed are those the rows in demo.json give (recomputed here)."""
    workdir, output = quick
    rows = {row["method"]: row for row in json.loads((workdir / "demo.json").read_text())["rows"]}
    views, labels, online = rows["cached KD, replayed views"], rows["labels only"], rows["online KD"]
    expected = [
        views["test_accuracy"] - labels["test_accuracy"] > math.hypot(views["test_accuracy_std"], labels["test_accuracy_std"]),
        abs(views["test_accuracy"] - online["test_accuracy"]) <= math.hypot(views["test_accuracy_std"], online["test_accuracy_std"]),
        online["epoch_seconds"] / views["epoch_seconds"] >= SPEEDUP,
    ]
    printed = re.findall(r"^(PASS|MISS)  ", output, flags=re.MULTILINE)
    assert printed == ["PASS" if ok else "MISS" for ok in expected]


def row(method: str, accuracy: float, std: float, epoch: float) -> MethodRow:
    return MethodRow(method, accuracy, std, epoch, 0.0, 0, epoch, 3)


@pytest.mark.parametrize(("views", "labels", "online", "expected"), [
    ((0.98, 0.005, 0.1), (0.90, 0.008, 0.08), (0.985, 0.003, 0.6), [True, True, True]),
    # a gain within the spread, a gap beyond it, a speed-up under 5x
    ((0.91, 0.010, 0.1), (0.90, 0.008, 0.08), (0.95, 0.003, 0.45), [False, False, False]),
])
def test_verdicts_compare_with_the_seed_spread(views: tuple, labels: tuple, online: tuple, expected: list[bool]) -> None:
    rows = {name: row(name, *numbers) for name, numbers in (("v", views), ("l", labels), ("o", online))}
    assert [ok for ok, _ in verdicts(rows, "l", "v", "o")] == expected


def test_forward_flops_counts_the_linear_layers() -> None:
    # 64 -> 32 -> 10: 2 * (64 * 32 + 32 * 10) FLOPs a sample
    assert forward_flops(digits_mlp(hidden=32, depth=1)) == 2 * (64 * 32 + 32 * 10)


def test_demo_refuses_one_view(tmp_path: Path, cli) -> None:
    result = cli("demo", "--quick", "--views", "1", "--workdir", tmp_path)
    assert result.exit_code == 1
    assert "--views must be >= 2" in result.output
    assert not (tmp_path / "demo.json").exists()
