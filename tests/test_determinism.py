"""The same dump settings always write the same bytes: across torch thread counts, DataLoader workers,
and kills followed by ``--resume`` (issue 16, item 11).

The dump here is the one the issue saw differ once in 38 resumes: ``--sample 50 --encoding compact``
on the built-in ``text`` data (a small ``tiny_lm`` teacher, the test split, shards of 1,024 tokens so
there are many). Every dump runs in a subprocess, as a user runs it, with ``OMP_NUM_THREADS`` set
per run. Not covered, and not promised: another ``--batch-size`` (a matmul's rows can round
differently in another blocking, see the README), another machine or another torch/MKL build.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ARCH, ARCH_KWARGS
from test_resume import partial, progress_records

from logit_cache.models import tiny_lm

pytestmark = pytest.mark.slow

TEACHER_KWARGS = {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_len": 128}
TEXT = ("--arch", "logit_cache.models:tiny_lm", "--arch-kwargs", json.dumps(TEACHER_KWARGS), "--dataset", "text",
        "--dataset-kwargs", '{"split": "test"}', "--sample", "50", "--encoding", "compact", "--shard-rows", "1024",
        "--batch-size", "8", "--device", "cpu", "--quiet")  # fmt: skip
TIMEOUT = 120


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "lm.pt"
    torch.save(tiny_lm(**TEACHER_KWARGS).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(lm_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dump on one thread, no workers, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "1 thread"
    run(argv(lm_teacher, out), 1)
    return out


def argv(teacher: Path, out: Path, *extra: str, settings: tuple[str, ...] = TEXT) -> list[str]:
    return [sys.executable, "-m", "logit_cache", "dump", "--teacher", str(teacher), *settings, "--out", str(out), *extra]


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run(command: list[str], threads: int) -> None:
    done = subprocess.run(command, env=env(threads), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def stored(cache: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every stored array of every shard, as plain zarr reads it (compact arrays as stored)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    arrays = {}
    for shard in manifest["shards"]:
        group = zarr.open_group(str(cache / shard["path"]), mode="r")
        for name in group.array_keys():
            arrays[(shard["path"], name)] = group[name][:]
    return arrays


def assert_same_bytes(got: Path, want: Path) -> None:
    got_manifest, want_manifest = (json.loads((path / "manifest.json").read_text()) for path in (got, want))
    assert got_manifest["complete"] is True
    assert got_manifest["key"] == want_manifest["key"]
    assert got_manifest["shards"] == want_manifest["shards"]  # paths, ranges and checksums
    got_arrays, want_arrays = stored(got), stored(want)
    assert got_arrays.keys() == want_arrays.keys()
    for name, expected in want_arrays.items():
        actual = got_arrays[name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        assert actual.tobytes() == expected.tobytes(), f"{name}: {np.flatnonzero(actual != expected)[:10]}"


def test_thread_counts_and_workers_write_the_same_bytes(lm_teacher: Path, reference: Path, teacher: Path, tmp_path: Path) -> None:
    assert len(json.loads((reference / "manifest.json").read_text())["shards"]) > 20
    for name, extra in {"2 threads": (), "2 threads, 2 workers": ("--num-workers", "2")}.items():
        run(argv(lm_teacher, tmp_path / name, *extra), 2)
        assert_same_bytes(tmp_path / name, reference)

    # the per-sample top-k path on the CPU (digits), likewise
    digits = ("--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset", "digits", "--topk", "5", "--dtype", "float32",
              "--shard-rows", "256", "--batch-size", "64", "--device", "cpu", "--quiet")  # fmt: skip
    for threads in (1, 2):
        run(argv(teacher, tmp_path / f"digits-{threads}", settings=digits), threads)
    assert_same_bytes(tmp_path / "digits-2", tmp_path / "digits-1")


def kill_after(command: list[str], threads: int, out: Path, records: int) -> int:
    """Start a dump; SIGKILL it once ``records`` shards are finished (0: once its manifest exists)."""
    proc = subprocess.Popen(command, env=env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((partial(out) / "manifest.json").is_file() and len(progress_records(out)) >= records):
            if proc.poll() is not None:
                pytest.fail(f"the dump ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("the dump never reached the moment to kill it")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return len(progress_records(out))


def test_killed_and_resumed_sampled_compact_dump_is_byte_identical(lm_teacher: Path, reference: Path, tmp_path: Path) -> None:
    total = len(json.loads((reference / "manifest.json").read_text())["shards"])

    # A seeded schedule: kill a fresh dump, then kill its resumption, then resume to the end; thread
    # counts and workers change from run to run (none of them enters the content).
    schedule = sorted(random.Random(16).sample(range(0, 10), 2))
    out = tmp_path / "cache"
    finished = kill_after(argv(lm_teacher, out), 2, out, schedule[0])
    assert finished < total
    finished = kill_after(argv(lm_teacher, out, "--resume"), 1, out, schedule[1])
    assert schedule[1] <= finished < total
    run(argv(lm_teacher, out, "--resume", "--num-workers", "2"), 2)
    assert not partial(out).exists()
    assert_same_bytes(out, reference)
