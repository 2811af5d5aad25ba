"""Progress where a person waits: the trainer's epoch bars, ``ls`` / ``gc`` over a large root, ``convert``.

A terminal is faked by a StringIO whose ``isatty`` says yes, put in place of ``sys.stderr`` (tqdm and
the trainer write to stderr); the bars' final states are read back from what was written and their
numbers compared with the run's own history (the returned result and the metrics file re-read).
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_teacher, run_cli
from data_factories import dump_digits, read_plain

import logit_cache.tools.convert as convert_module
import logit_cache.tools.listing as listing_module
from logit_cache import TrainConfig, train_student
from logit_cache.datasets import DigitsDataset
from logit_cache.tools.cleanup import gc_candidates
from logit_cache.tools.listing import list_caches
from logit_cache.train import progress as progress_module

STUDENT = "logit_cache.models:digits_mlp"
LOOP_LOGGER = "logit_cache.train.loop"
TRAIN_ROWS = len(DigitsDataset(split="train"))


class FakeTerminal(io.StringIO):
    """stderr as a terminal would be: tqdm draws on it (no ``fileno``: a fixed width, nothing cut)."""

    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    """Put a fake terminal in place of stderr; in the test's body, since pytest's capture puts its own
    stderr back between a fixture's setup and the test."""
    fake = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", fake)
    return fake


def states(text: str) -> list[str]:
    """Every state a bar was drawn in (tqdm redraws a line after ``\\r``), in order, blank ones left out."""
    return [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The seeded teacher's top-5 caches of the digits train and test splits, and a root holding three caches."""
    root = tmp_path_factory.mktemp("progress")
    teacher = root / "teacher.pt"
    torch.save(make_teacher().state_dict(), teacher)
    caches = root / "caches"
    caches.mkdir()
    paths = {"teacher": teacher, "caches": caches}
    for name, split in (("train", "train"), ("test", "test")):
        paths[name] = dump_digits(caches, teacher, name, dataset_kwargs={"split": split}, mode="topk", k=5, temperature=2.0)
    paths["full"] = dump_digits(caches, teacher, "full", mode="full", dtype="float32", shard_rows=500)
    return paths


def run(work: dict[str, Path], tmp_path: Path, quiet: bool) -> tuple[object, dict]:
    config = TrainConfig(student=STUDENT, student_kwargs={"hidden": 16, "depth": 1}, dataset="digits", out=str(tmp_path / "s.pt"),
                         caches=[str(work["train"])], eval_dataset="digits", eval_dataset_kwargs={"split": "test"},
                         eval_cache=str(work["test"]), epochs=2, device="cpu", quiet=quiet)
    result = train_student(config)
    return result, json.loads(result.metrics_path.read_text())


def plain_line(record: dict) -> str:
    """The per-epoch line as it has always read, from a record of the metrics file."""
    return (f"epoch {record['epoch']}/2: loss {record['train_loss']:.4f}, eval accuracy {record['eval_accuracy']:.4f}, "
            f"eval KL {record['eval_kl']:.4f}, {record['seconds']:.2f} s")


def test_on_a_terminal_each_epoch_is_a_bar_with_the_running_loss_and_ends_with_its_metrics(
        work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(progress_module, "REFRESH_SECONDS", 0.0)  # every step redrawn, so each running value shows
    terminal = fake_terminal(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOOP_LOGGER):
        result, metrics = run(work, tmp_path, quiet=False)
    assert metrics["epochs"] == json.loads(json.dumps(result.epochs))
    drawn = states(terminal.getvalue())
    batches = -(-TRAIN_ROWS // 64)
    for record in metrics["epochs"]:
        mine = [s for s in drawn if s.startswith(f"epoch {record['epoch']}/2")]
        final = mine[-1]
        # the bar's last state: every batch done, the epoch's loss, its throughput and its eval metrics
        assert f"{batches}/{batches}" in final and "100%" in final, final
        rate = TRAIN_ROWS / record["seconds"]
        assert f"loss {record['train_loss']:.4f}, {rate:,.0f} samples/s" in final, final
        assert f"eval accuracy {record['eval_accuracy']:.4f}, eval KL {record['eval_kl']:.4f}" in final, final
        # while it ran: the running loss and samples/s after each step; the last running mean is the epoch's loss
        running = [s for s in mine if "samples/s" in s and "eval" not in s]
        assert len(running) >= batches // 2, mine
        losses = [float(m.group(1)) for s in running if (m := re.search(r"loss (\d+\.\d+), [\d,]+ samples/s", s))]
        assert len(losses) == len(running) and f"{losses[-1]:.4f}" == f"{record['train_loss']:.4f}"
        assert any("evaluating..." in s for s in mine)  # said while the eval set is scored
    assert terminal.getvalue().endswith("\n")  # the last bar is closed: what follows starts on its own line
    # the bar replaces the plain line: nothing of it at INFO (at DEBUG it is still there for whoever asks)
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch ")]


def test_without_a_terminal_each_epoch_is_the_plain_log_line(work: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    assert not sys.stderr.isatty()
    with caplog.at_level(logging.INFO, logger=LOOP_LOGGER):
        result, metrics = run(work, tmp_path, quiet=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines == [plain_line(record) for record in metrics["epochs"]]
    assert [e["train_loss"] for e in metrics["epochs"]] == [e["train_loss"] for e in result.epochs]
    err = capsys.readouterr().err
    assert "samples/s" not in err and "batch/s" not in err and "%|" not in err


def test_quiet_shows_neither_bar_nor_line(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    terminal = fake_terminal(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOOP_LOGGER):
        result, metrics = run(work, tmp_path, quiet=True)
    assert len(metrics["epochs"]) == 2 and result.final["eval_accuracy"] == metrics["epochs"][-1]["eval_accuracy"]
    assert terminal.getvalue() == ""
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch ")]
    with caplog.at_level(logging.DEBUG, logger=LOOP_LOGGER):  # still logged, below INFO
        run(work, tmp_path, quiet=True)
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG and r.getMessage().startswith("epoch ")]) == 2


def test_ls_and_gc_show_a_bar_over_the_root_on_a_terminal(work: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing_module, "PROGRESS_DELAY", 0.0)
    terminal = fake_terminal(monkeypatch)
    root = work["caches"]
    entries = list_caches(root, progress=True)
    assert sorted(e.path.name for e in entries) == ["full", "test", "train"]
    drawn = states(terminal.getvalue())
    assert any(s.startswith(f"reading {root}:") and "/3 [" in s and "dir/s" in s for s in drawn), drawn
    # transient: the bar is wiped when the listing is done, so the table starts on a clean line
    assert terminal.getvalue().rstrip(" ").endswith("\r")
    terminal.seek(0)
    terminal.truncate()
    assert gc_candidates(root, progress=True) == []
    assert any(s.startswith(f"reading {root}:") and "/3 [" in s for s in states(terminal.getvalue()))
    terminal.seek(0)
    terminal.truncate()
    # by default (and so for --json, and for every other caller) nothing is drawn
    assert [e.path for e in list_caches(root)] == [e.path for e in entries] and gc_candidates(root) == []
    assert terminal.getvalue() == ""


def test_no_bar_on_a_small_root_or_off_a_terminal(work: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    list_caches(work["caches"], progress=True)  # pytest's stderr is no terminal
    assert "reading" not in capsys.readouterr().err
    fake = fake_terminal(monkeypatch)
    list_caches(work["caches"], progress=True)  # a terminal, but done before PROGRESS_DELAY: no flicker
    assert fake.getvalue() == ""


def test_the_cli_asks_for_the_bar_except_for_json(work: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``ls`` and ``gc`` pass ``progress=True`` (the bar then shows only on a terminal); ``ls --json`` never."""
    asked = []
    real = listing_module.scan_bar

    def spy(items, root, progress):
        asked.append(progress)
        return real(items, root, progress)

    monkeypatch.setattr(listing_module, "scan_bar", spy)
    listing = run_cli("ls", work["caches"], "--json")
    assert sorted(Path(r["path"]).name for r in json.loads(listing.output)) == ["full", "test", "train"]
    assert asked == [False]
    run_cli("ls", work["caches"])
    run_cli("gc", work["caches"], "--yes")
    assert asked == [False, True, True]


def test_convert_counts_the_bytes_it_reads(work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars = []

    class Recorded(convert_module.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(convert_module, "tqdm", Recorded)
    src = work["full"]
    manifest = json.loads((src / "manifest.json").read_text())
    stored = sum(read_plain(src, name).nbytes for name in manifest["arrays"])  # every array here is per row or per sample
    terminal = fake_terminal(monkeypatch)
    convert_module.convert(src, tmp_path / "h5", backend="hdf5")
    (bar,) = bars
    assert bar.total == stored and bar.n == stored
    final = states(terminal.getvalue())[-1]
    shards = len(manifest["shards"])
    assert shards == 3 and final.startswith("convert: 100%") and f"shard {shards}/{shards}" in final, final
    np.testing.assert_array_equal(read_plain(tmp_path / "h5", "logits"), read_plain(src, "logits"))
    bars.clear()
    terminal.seek(0)
    terminal.truncate()
    convert_module.convert(src, tmp_path / "quiet", backend="hdf5", quiet=True)
    assert terminal.getvalue() == "" and bars[0].disable
