"""A dump killed with SIGKILL resumes (``--resume``) to exactly the cache an uninterrupted dump writes.

Every dump here runs in a subprocess (``python -m logit_cache dump``) over ``slow_images``, whose items
take 10 ms each, so a dump of 400 items in 7 shards of 64 rows lasts a few seconds and can be killed
at a chosen moment: right after ``OUT.partial/manifest.json`` appears (nothing finished yet), or after
the first shard's progress record (some shards finished). The uninterrupted reference dumps start in
the background when the module's first test asks for them, so they overlap with the killed ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from data_factories import spec

from logit_cache.errors import IncompleteCacheError
from logit_cache.reader import open_reader
from logit_cache.store import BACKENDS

pytestmark = pytest.mark.slow

ARRAYS = ("topk_logits", "topk_indices", "logsumexp", "labels")
NUM_SHARDS = 7  # 400 samples, 64 rows per shard
SETTINGS = (
    "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs", '{"hidden": 32}',
    "--dataset", spec("slow_images"), "--dataset-kwargs", '{"n": 400, "delay": 0.01}',
    "--shard-rows", "64", "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--quiet",
)  # fmt: skip
#: One thread per process: the same kernels in the killed, resumed and reference dumps.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 60


def dump_argv(teacher: Path, out: Path, backend: str, *extra: str, topk: str = "3") -> list[str]:
    return [sys.executable, "-m", "logit_cache", "dump", "--teacher", str(teacher), *SETTINGS,
            "--topk", topk, "--format", backend, "--out", str(out), *extra]  # fmt: skip


def run_dump(teacher: Path, out: Path, backend: str, *extra: str, topk: str = "3") -> subprocess.CompletedProcess[str]:
    return subprocess.run(dump_argv(teacher, out, backend, *extra, topk=topk), env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def progress_records(out: Path) -> list[Path]:
    """Finished shards' records (``write_json_atomic``'s temporary files start with a dot)."""
    return sorted((partial(out) / "progress").glob("shard-*.json"))


def manifest_appeared(out: Path) -> bool:
    return (partial(out) / "manifest.json").is_file()


def first_shard_done(out: Path) -> bool:
    return bool(progress_records(out))


MOMENTS: dict[str, Callable[[Path], bool]] = {"early": manifest_appeared, "midway": first_shard_done}


def kill_dump_when(teacher: Path, out: Path, backend: str, moment: Callable[[Path], bool]) -> int:
    """Start a dump, SIGKILL it as soon as ``moment(out)`` holds; return how many shards had finished."""
    log = (out.parent / f"{out.name}.killed.log").open("w")
    proc = subprocess.Popen(dump_argv(teacher, out, backend), env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not moment(out):
            if proc.poll() is not None:
                log.close()
                pytest.fail(f"the dump ended (exit {proc.returncode}) before it could be killed:\n"
                            f"{Path(log.name).read_text()}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail("the dump never reached the moment to kill it")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL, "the dump had already exited when it was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return len(progress_records(out))


def read_raw(cache: Path) -> dict[str, np.ndarray]:
    """Every array across the shards, read with plain zarr / h5py (no logit_cache code)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    for shard in manifest["shards"]:
        path = cache / shard["path"]
        if manifest["backend"] == "zarr":
            group = zarr.open_group(path, mode="r")
            for name in ARRAYS:
                parts[name].append(group[name][:])
        else:
            with h5py.File(path, "r") as handle:
                for name in ARRAYS:
                    parts[name].append(handle[name][:])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def assert_same_cache(got: Path, want: Path) -> None:
    """Same manifest identity and shards, bit-identical arrays of the same dtypes, valid checksums."""
    got_manifest = json.loads((got / "manifest.json").read_text())
    want_manifest = json.loads((want / "manifest.json").read_text())
    assert got_manifest["complete"] is True
    for name in ("key", "backend", "mode", "k", "dtype", "num_classes", "num_samples", "num_rows", "shards", "arrays"):
        assert got_manifest[name] == want_manifest[name], name
    assert len(got_manifest["shards"]) == NUM_SHARDS
    got_raw, want_raw = read_raw(got), read_raw(want)
    with open_reader(got) as got_reader, open_reader(want) as want_reader:
        assert got_reader.verify_checksums() == []
        for name in ARRAYS:
            via_reader = got_reader.read(name)
            reference = want_reader.read(name)
            for actual, expected in ((via_reader, reference), (got_raw[name], want_raw[name]), (via_reader, got_raw[name])):
                assert actual.dtype == expected.dtype, name
                assert actual.shape[0] == 400, name
                assert np.array_equal(actual, expected), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Iterator[Callable[[str], Path]]:
    """``reference(backend)``: an uninterrupted dump of the same settings (both start at once, in the background)."""
    root = tmp_path_factory.mktemp("reference")
    procs = {
        backend: subprocess.Popen(dump_argv(teacher, root / backend, backend), env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        for backend in sorted(BACKENDS)
    }

    def get(backend: str) -> Path:
        output, _ = procs[backend].communicate(timeout=TIMEOUT)
        assert procs[backend].returncode == 0, output
        return root / backend

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_killed_dump_resumes_to_identical_cache(tmp_path: Path, teacher: Path, reference: Callable[[str], Path],
                                                backend: str, moment: str) -> None:  # fmt: skip
    out = tmp_path / "cache"
    finished = kill_dump_when(teacher, out, backend, MOMENTS[moment])
    if moment == "early":
        assert finished == 0, "the first shard finished before the early kill: the test did not test 'nothing finished'"
    else:
        assert 1 <= finished < NUM_SHARDS

    # Nothing half-written is taken for a cache.
    assert not out.exists()
    assert json.loads((partial(out) / "manifest.json").read_text())["complete"] is False
    with pytest.raises(IncompleteCacheError, match="--resume"):
        open_reader(out)
    with pytest.raises(IncompleteCacheError, match="--resume"):
        open_reader(partial(out))

    # Without --resume the unfinished dump is refused and left alone.
    refused = run_dump(teacher, out, backend)
    assert refused.returncode != 0
    assert str(partial(out)) in refused.stderr and "--resume" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not out.exists()
    assert len(progress_records(out)) == finished

    kept = {path.name.removesuffix(".json"): (partial(out) / path.name.removesuffix(".json")).stat().st_ino
            for path in progress_records(out)}  # fmt: skip
    resumed = run_dump(teacher, out, backend, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    if finished:
        assert f"{finished} kept from the unfinished dump" in resumed.stdout, resumed.stdout
    else:
        assert "kept from the unfinished dump" not in resumed.stdout, resumed.stdout
    assert not partial(out).exists()
    assert not (out / "progress").exists()
    # Finished shards were kept as they were, not written again.
    assert {name: (out / name).stat().st_ino for name in kept} == kept
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["manifest.json", *(f"shard-{i:05d}.{'zarr' if backend == 'zarr' else 'h5'}" for i in range(NUM_SHARDS))]
    )
    assert_same_cache(out, reference(backend))

    if moment == "midway":  # (once per backend is enough) resuming a complete cache of the same settings does nothing
        again = run_dump(teacher, out, backend, "--resume")
        assert again.returncode == 0, again.stderr
        assert "reused cache" in again.stdout and "nothing computed" in again.stdout
        assert_same_cache(out, reference(backend))


def test_resume_with_other_settings_is_refused(tmp_path: Path, teacher: Path, reference: Callable[[str], Path]) -> None:
    out = tmp_path / "cache"
    kill_dump_when(teacher, out, "zarr", first_shard_done)
    before = {path.relative_to(partial(out)): path.read_bytes() for path in partial(out).rglob("*") if path.is_file()}

    cases = [  # (backend, topk, extra options, what the message must name)
        ("zarr", "4", (), "k: was 3, now 4"),
        ("zarr", "3", ("--shard-rows", "32"), "shard_rows: was 64, now 32"),
        ("hdf5", "3", (), "backend: was 'zarr', now 'hdf5'"),
    ]
    # The three read the unfinished dump at once (to save time); any write they made would show in `after`.
    procs = [
        subprocess.Popen(dump_argv(teacher, out, backend, "--resume", *extra, topk=topk), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for backend, topk, extra, _ in cases
    ]
    for proc, (backend, topk, extra, field) in zip(procs, cases, strict=True):
        _, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode != 0, (backend, topk, extra)
        assert "Traceback" not in stderr, stderr
        assert "--resume" in stderr and str(partial(out)) in stderr, stderr
        assert field in stderr, stderr
    assert not out.exists()

    # The refusals left the unfinished dump untouched; resuming it as started still completes it.
    after = {path.relative_to(partial(out)): path.read_bytes() for path in partial(out).rglob("*") if path.is_file()}
    assert after == before
    resumed = run_dump(teacher, out, "zarr", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_cache(out, reference("zarr"))
