"""Outputs the system refuses and datasets that break their promises: one line and a non-zero exit, never a traceback.

Issue 16, item 9. Root ignores permission bits, so "you may not write there" is made two ways: a
read-only tmpfs mounted in a private mount namespace (``unshare -rm``, a real EROFS from the kernel;
skipped where the machine allows no user namespaces) and, everywhere, ``os.open``/``os.mkdir``
patched to answer EACCES under one directory. A full disk is the shard writer raising ENOSPC midway.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCH, ARCH_KWARGS
from data_factories import RaggedTokens, RandomImages, causal_bag, spec

from logit_cache.fingerprint import sample_indices
from logit_cache.store import BACKENDS
from logit_cache.store import base as store_base

HERE = f"{Path(__file__).resolve()}"
STUDENT = "logit_cache.models:digits_mlp"


# -- datasets that break their promises (named by this file's path in specs) ---------------------------


class LongerThanItems(RandomImages):
    """``__len__`` says ``n + extra``; items past ``n`` raise IndexError, as a list's would."""

    def __init__(self, n: int = 100, extra: int = 20) -> None:
        super().__init__(n)
        self.extra = extra

    def __len__(self) -> int:
        return len(self.images) + self.extra


class RaisesAt(RandomImages):
    """Item ``at`` raises ValueError."""

    def __init__(self, n: int = 100, at: int = 0) -> None:
        super().__init__(n)
        self.at = at

    def __getitem__(self, index: int):
        if index == self.at:
            raise ValueError(f"bad record {index}")
        return super().__getitem__(index)


class TokensRaiseAt(RaggedTokens):
    """Token sequences whose item ``at`` raises (and no ``token_lengths()``: the dump reads every item)."""

    def __init__(self, n: int = 40, at: int = 1) -> None:
        super().__init__(n=n, vocab=50)
        self.at = at

    def __getitem__(self, index: int):
        if index == self.at:
            raise KeyError(f"record {index} is missing")
        return super().__getitem__(index)


def assert_one_line_error(output: str, *fragments: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def dump_args(teacher: Path, *extra: str, dataset: str | None = None, kwargs: str = '{"n": 100}') -> list[str]:
    return ["dump", "--teacher", str(teacher), "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset",
            dataset or spec("random_images"), "--dataset-kwargs", kwargs, "--topk", "3", "--quiet", *extra]  # fmt: skip


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--student", STUDENT, "--student-kwargs", '{"hidden": 8, "depth": 1}', "--dataset", "digits",
            "--labels-only", "--epochs", "1", "--out", str(out), "--quiet", *extra]  # fmt: skip


# -- outputs: a read-only mount (a real EROFS) --------------------------------------------------------------


def _read_only_mounts_work(tmp: Path) -> str | None:
    """None if ``unshare -rm`` can mount a read-only tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = tmp / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none '{probe}' && ! touch '{probe}/x' 2>/dev/null"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    return None if done.returncode == 0 else f"no private read-only mount here: {done.stderr.strip()[:200]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["out", "out-under-missing-parent", "cache-root", "train-out"])
def test_outputs_on_a_read_only_mount_fail_in_one_line(tmp_path: Path, teacher_ckpt: Path, case: str) -> None:
    why = _read_only_mounts_work(tmp_path)
    if why is not None:
        pytest.skip(why)
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = {
        "out": dump_args(teacher_ckpt, "--out", str(ro / "cache")),
        "out-under-missing-parent": dump_args(teacher_ckpt, "--out", str(ro / "sub" / "cache")),
        "cache-root": dump_args(teacher_ckpt, "--cache-root", str(ro)),
        "train-out": train_args(ro / "student.pt"),
    }[case]
    script = f"mount -t tmpfs -o ro none '{ro}' && exec \"$@\""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "logit_cache", *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    line = assert_one_line_error(done.stderr, str(ro), "Read-only file system", "read-only: choose another location")
    if case == "train-out":
        assert "--out" in line


# -- outputs: no permission (EACCES, simulated: root ignores permission bits) -------------------------------


@pytest.fixture
def denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory under which creating files or directories fails with EACCES, as for a non-root user
    in a directory they may not write."""
    root = tmp_path / "denied"
    root.mkdir()
    prefix = f"{root}{os.sep}"
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path: object) -> bool:
        return os.fspath(path).startswith(prefix)  # type: ignore[arg-type]

    def fake_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return root


@pytest.mark.parametrize("where", ["cache", "sub/cache"])
def test_dump_out_without_permission_fails_in_one_line(cli, teacher_ckpt: Path, denied: Path, where: str) -> None:
    result = cli(*dump_args(teacher_ckpt, "--out", str(denied / where)))
    assert result.exit_code == 1
    assert_one_line_error(result.output, str(denied), "Permission denied", "get write permission")
    assert not any(denied.iterdir())


@pytest.mark.parametrize("unwritable", ["out", "metrics"])
def test_train_checks_its_outputs_before_training(cli, tmp_path: Path, denied: Path, monkeypatch: pytest.MonkeyPatch,
                                                  unwritable: str) -> None:  # fmt: skip
    train_module = importlib.import_module("logit_cache.train.loop")

    def no_training(*args, **kwargs):
        raise AssertionError("the training started although an output cannot be written")

    monkeypatch.setattr(train_module, "_build_student", no_training)
    if unwritable == "out":
        args = train_args(denied / "student.pt")
    else:
        args = train_args(tmp_path / "student.pt", "--metrics", str(denied / "m.json"))
    result = cli(*args)
    assert result.exit_code == 1
    line = assert_one_line_error(result.output, str(denied), "Permission denied")
    assert ("--out" if unwritable == "out" else "--metrics") in line
    assert not (tmp_path / "student.pt").exists()


def test_train_out_that_is_a_directory_fails_before_training(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_module = importlib.import_module("logit_cache.train.loop")

    monkeypatch.setattr(train_module, "_build_student", lambda *a, **k: pytest.fail("the training started"))
    (tmp_path / "student.pt").mkdir()
    result = cli(*train_args(tmp_path / "student.pt"))
    assert result.exit_code == 1
    assert_one_line_error(result.output, str(tmp_path / "student.pt"), "directory")


# -- a full disk midway: one line, the unfinished dump kept, --resume completes it ---------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_full_disk_midway_keeps_the_partial_and_resume_completes_it(cli, teacher_ckpt: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, backend: str) -> None:  # fmt: skip
    common = ("--dataset-kwargs", '{"n": 300}', "--shard-rows", "64", "--batch-size", "16", "--num-workers", "0", "--format", backend)
    whole = tmp_path / "whole"
    assert cli(*dump_args(teacher_ckpt, "--out", str(whole), *common)).exit_code == 0

    out = tmp_path / "cache"
    real_append = store_base.ShardWriter.append
    calls = {"n": 0}

    def append_until_the_disk_is_full(self, arrays):
        calls["n"] += 1
        if calls["n"] == 11:  # shard 2's third batch: shards 0 and 1 are finished
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_append(self, arrays)

    monkeypatch.setattr(store_base.ShardWriter, "append", append_until_the_disk_is_full)
    result = cli(*dump_args(teacher_ckpt, "--out", str(out), *common))
    assert result.exit_code == 1
    partial = out.with_name("cache.partial")
    assert_one_line_error(result.output, "No space left on device", "shard-00002", "disk is full", "--resume")
    assert not out.exists() and partial.is_dir()
    assert len(list((partial / "progress").glob("shard-*.json"))) == 2

    monkeypatch.setattr(store_base.ShardWriter, "append", real_append)
    resumed = cli(*dump_args(teacher_ckpt, "--out", str(out), *common, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "2 kept from the unfinished dump" in resumed.output
    got, want = (json.loads((path / "manifest.json").read_text()) for path in (out, whole))
    assert got["key"] == want["key"]
    assert [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in want["shards"]]
    assert len(got["shards"]) == 5


# -- datasets that break their promises ------------------------------------------------------------------


def test_dataset_longer_than_its_items_names_the_index(cli, teacher_ckpt: Path, tmp_path: Path) -> None:
    first_missing = next(i for i in sample_indices(120) if i >= 100)  # the first index the fingerprint reads past the items
    result = cli(*dump_args(teacher_ckpt, "--out", str(tmp_path / "out"), dataset=f"{HERE}:LongerThanItems",
                            kwargs='{"n": 100, "extra": 20}'))  # fmt: skip
    assert result.exit_code == 1
    assert_one_line_error(result.output, f"item {first_missing}", "IndexError", "len() is 120", "__len__")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_dataset_raising_at_a_fingerprinted_index_names_it(cli, teacher_ckpt: Path, tmp_path: Path) -> None:
    at = sample_indices(100)[5]
    result = cli(*dump_args(teacher_ckpt, "--out", str(tmp_path / "out"), dataset=f"{HERE}:RaisesAt",
                            kwargs=json.dumps({"n": 100, "at": at})))  # fmt: skip
    assert result.exit_code == 1
    assert_one_line_error(result.output, f"item {at}", "fingerprint", "ValueError", f"bad record {at}")


def test_dataset_raising_midway_names_the_item(cli, teacher_ckpt: Path, tmp_path: Path) -> None:
    at = next(i for i in range(40, 100) if i not in sample_indices(100))  # read first by the dump's loader
    result = cli(*dump_args(teacher_ckpt, "--out", str(tmp_path / "out"), "--batch-size", "16", "--num-workers", "0",
                            dataset=f"{HERE}:RaisesAt", kwargs=json.dumps({"n": 100, "at": at})))  # fmt: skip
    assert result.exit_code == 1
    assert_one_line_error(result.output, f"at item {at}", f"bad record {at}")


def test_token_dataset_raising_while_counting_tokens_names_the_item(cli, tmp_path: Path) -> None:
    at = next(i for i in range(40) if i not in sample_indices(40))
    torch.manual_seed(0)
    teacher = tmp_path / "bag.pt"
    torch.save(causal_bag(vocab=50).state_dict(), teacher)
    result = cli("dump", "--teacher", str(teacher), "--arch", spec("causal_bag"), "--dataset", f"{HERE}:TokensRaiseAt",
                 "--dataset-kwargs", json.dumps({"n": 40, "at": at}), "--topk", "3", "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 1
    assert_one_line_error(result.output, f"item {at}", "KeyError", "record")


def test_train_on_a_disk_that_fills_up_while_saving_fails_in_one_line(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(handle, "name", str(handle)))

    monkeypatch.setattr(torch, "save", full_disk)
    result = cli(*train_args(tmp_path / "student.pt"))
    assert result.exit_code == 1
    assert_one_line_error(result.output, "No space left on device", str(tmp_path / "student.pt"), "disk is full")
