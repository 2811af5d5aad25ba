"""Cache roots: names by key, reuse without the teacher, one writer per cache, ls / rm / gc."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import read_plain, spec

from logit_cache import DumpConfig, dump
from logit_cache.catalog import lock_path
from logit_cache.errors import CacheBusyError
from logit_cache.writer import write_work_marker

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def root_dump(root: Path, teacher: Path, arch: str = ARCH, **kwargs):
    settings = {"dataset": spec("random_images"), "mode": "topk", "k": 3, "quiet": True, **kwargs}
    return dump(DumpConfig(teacher=str(teacher), arch=arch, arch_kwargs=json.loads(ARCH_KWARGS), cache_root=str(root), **settings))


def test_a_second_dump_of_the_key_reuses_the_cache_without_the_teacher(tmp_path: Path, teacher: Path) -> None:
    first = root_dump(tmp_path, teacher)
    assert not first.reused and first.out.parent == tmp_path and first.out.name.endswith(f"--{first.manifest.key}")
    # An arch that cannot even be imported: reuse must not build (or run) the teacher.
    second = root_dump(tmp_path, teacher, arch="no_such_module:no_such_arch")
    assert second.reused and second.out == first.out and second.rows_computed == 0
    assert [p.name for p in tmp_path.iterdir()] == [first.out.name]


def test_what_changes_the_key(tmp_path: Path, teacher: Path) -> None:
    base = root_dump(tmp_path, teacher)
    other_data = root_dump(tmp_path, teacher, dataset_kwargs={"seed": 1})
    other_teacher_file = tmp_path.parent / "teacher-2.pt"
    torch.save(make_teacher(seed=1).state_dict(), other_teacher_file)
    other_teacher = root_dump(tmp_path, other_teacher_file)
    other_k = root_dump(tmp_path, teacher, k=4)
    keys = {r.manifest.key for r in (base, other_data, other_teacher, other_k)}
    assert len(keys) == 4 and not any(r.reused for r in (other_data, other_teacher, other_k))
    hdf5 = root_dump(tmp_path, teacher, backend="hdf5")  # the backend is not content: same key, its own directory
    assert hdf5.manifest.key == base.manifest.key and hdf5.out != base.out and not hdf5.reused


def cli_dump(root: Path, teacher: Path, *extra: str, dataset: str = "slow_images", delay: float = 0.02) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "logit_cache", "dump", "--teacher", str(teacher), "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS,
            "--dataset", spec(dataset), "--dataset-kwargs", json.dumps({"n": 300, "delay": delay}), "--cache-root", str(root),
            "--topk", "3", "--shard-rows", "100", *extra]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_dumps_of_one_key_at_once_give_one_cache(tmp_path: Path, teacher: Path) -> None:
    # Slow enough items that the first dump still holds the lock once the second has imported
    # torch (~4 s on a loaded 2-core machine); with 0.02 s items the first could finish before.
    first = cli_dump(tmp_path, teacher, delay=0.08)
    lock = None
    for _ in range(200):  # until the first holds the lock
        locks = list(tmp_path.glob(".*.lock"))
        if locks:
            lock = locks[0]
            break
        time.sleep(0.05)
    assert lock is not None, first.communicate()
    second = cli_dump(tmp_path, teacher, delay=0.08)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert "wrote" in out1 and "reused cache" in out2
    assert "waiting for it" in err2  # it saw the lock and waited, rather than writing alongside
    (cache,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert not lock.exists() and not cache.with_name(cache.name + ".partial").exists()
    assert len(read_plain(cache, "topk_indices")) == 300


def test_no_wait_fails_while_another_dump_holds_the_lock(tmp_path: Path, teacher: Path) -> None:
    probe = root_dump(tmp_path / "probe", teacher)  # learn the cache's name in a root of its own
    out = tmp_path / probe.out.name
    lock = lock_path(out)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))  # a live writer: us
    with pytest.raises(CacheBusyError, match=f"being written by pid {os.getpid()}"):
        root_dump(tmp_path, teacher, wait=False)
    assert lock.exists() and not out.exists()


def test_a_stale_lock_is_recovered(tmp_path: Path, teacher: Path, caplog: pytest.LogCaptureFixture) -> None:
    probe = root_dump(tmp_path / "probe", teacher)
    out = tmp_path / probe.out.name
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited
    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid, "started": time.time() - 60}))
    with caplog.at_level("WARNING"):
        result = root_dump(tmp_path, teacher, wait=False)
    assert not result.reused and result.out == out and not lock_path(out).exists()
    assert "stale lock" in caplog.text
    np.testing.assert_array_equal(read_plain(out, "topk_indices"), read_plain(probe.out, "topk_indices"))


def test_ls_rm_and_gc(tmp_path: Path, teacher: Path, cli) -> None:
    kept = root_dump(tmp_path, teacher)
    doomed = root_dump(tmp_path, teacher, k=5)
    unfinished = tmp_path / "digits--top7-float16-zarr--0123456789abcdef.partial"
    unfinished.mkdir()  # as a dump leaves it when killed right after creating it: only its marker inside
    write_work_marker(unfinished, "0123456789abcdef", "zarr", "dump")
    listing = cli("ls", tmp_path)
    assert listing.exit_code == 0
    assert kept.manifest.key in listing.output and doomed.manifest.key in listing.output and "INCOMPLETE" in listing.output
    records = json.loads(cli("ls", tmp_path, "--json").output)
    assert {r["key"] for r in records if r["complete"]} == {kept.manifest.key, doomed.manifest.key}
    assert all(r["rows"] == 300 for r in records if r["complete"])
    # gc asks first; "n" keeps everything
    from click.testing import CliRunner

    from logit_cache.cli import main

    declined = CliRunner().invoke(main, ["gc", str(tmp_path)], input="n\n")
    assert "nothing deleted" in declined.output and unfinished.exists()
    accepted = CliRunner().invoke(main, ["gc", str(tmp_path)], input="y\n")
    assert accepted.exit_code == 0 and not unfinished.exists() and kept.out.exists()
    removed = cli("rm", doomed.manifest.key, "--root", tmp_path, "--yes")
    assert removed.exit_code == 0 and not doomed.out.exists() and kept.out.exists()
    stranger = tmp_path / "not-a-cache"
    stranger.mkdir()
    refused = cli("rm", stranger, "--yes")
    assert refused.exit_code == 1 and "not a logit-cache cache" in refused.output and stranger.exists()


def test_out_and_cache_root_are_exclusive(tmp_path: Path, teacher: Path) -> None:
    from logit_cache.errors import UsageError

    with pytest.raises(UsageError, match="not both"):
        dump(DumpConfig(teacher=str(teacher), arch=ARCH, dataset="digits", out=str(tmp_path / "a"), cache_root=str(tmp_path), k=3))
    with pytest.raises(UsageError, match="say where the cache goes"):
        dump(DumpConfig(teacher=str(teacher), arch=ARCH, dataset="digits", k=3))


def test_the_root_comes_from_the_environment(tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from logit_cache.cli import main

    root = tmp_path / "root"
    kept = root_dump(root, teacher)
    doomed = root_dump(root, teacher, k=5)
    runner = CliRunner()
    missing = runner.invoke(main, ["ls"], env={"LOGIT_CACHE_ROOT": ""})
    assert missing.exit_code == 1 and "name the cache root" in missing.output and "LOGIT_CACHE_ROOT" in missing.output
    env = {"LOGIT_CACHE_ROOT": str(root)}
    listing = runner.invoke(main, ["ls", "--json"], env=env)
    assert {r["key"] for r in json.loads(listing.output)} == {kept.manifest.key, doomed.manifest.key}
    removed = runner.invoke(main, ["rm", doomed.manifest.key, "--yes"], env=env)  # the key is looked up under $LOGIT_CACHE_ROOT
    assert removed.exit_code == 0 and not doomed.out.exists() and kept.out.exists()
    assert "LOGIT_CACHE_ROOT" in runner.invoke(main, ["dump", "--help"]).output
    # --out wins over the environment's root (it is only the default without --out)
    out = tmp_path / "plain"
    dumped = runner.invoke(main, ["dump", "--teacher", str(teacher), "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset",
                                  spec("random_images"), "--out", str(out), "--topk", "3", "--quiet"], env=env)
    assert dumped.exit_code == 0, dumped.output
    assert out.is_dir() and {p.name for p in root.iterdir()} == {kept.out.name}


def test_names_under_a_root_come_from_the_target_kind(tmp_path: Path) -> None:
    from logit_cache.catalog import cache_dir_name, find_by_key, readable_name
    from logit_cache.format.naming import names_cache_of
    from logit_cache.targets import KINDS

    labels = {name: readable_name("digits", {"split": "train"}, name, 5, "float16", 1, "zarr") for name in KINDS}
    assert labels["topk"] == "digits-split=train--top5-float16-zarr"
    assert labels["sampled"].endswith("--sample5-float16-zarr") and labels["full"].endswith("--full-float16-zarr")
    key = "0123456789abcdef"
    name = cache_dir_name(labels["topk"], key)
    assert names_cache_of(name, key, "zarr") and not names_cache_of(name, key, "hdf5")
    assert not names_cache_of(name + ".partial", key, "zarr")
    for other in (f".{name}", name + ".partial", cache_dir_name(labels["topk"].replace("zarr", "hdf5"), key)):
        (tmp_path / other).mkdir()
    assert find_by_key(tmp_path, key, "zarr") is None  # hidden, unfinished or of another backend: not it
    (tmp_path / name).mkdir()
    assert find_by_key(tmp_path, key, "zarr") == tmp_path / name


def test_gc_does_not_count_its_own_read_of_a_manifest_as_a_use(tmp_path: Path, teacher: Path) -> None:
    """On a relatime (or strictatime) mount the first read of a manifest since it was written, or a day
    after its last read, moves its access time; ``ls``/``gc`` read every manifest, so without care a cache
    nobody read for months would look just used to the very gc deciding whether to delete it."""
    from logit_cache.tools.cleanup import gc_candidates
    from logit_cache.tools.listing import list_caches

    root = tmp_path / "root"
    result = root_dump(root, teacher)
    manifest = result.out / "manifest.json"
    month_ago = time.time() - 30 * 86400
    os.utime(manifest, (month_ago, month_ago - 86400))  # last read a month ago, written the day before
    (entry,) = list_caches(root)
    assert abs(entry.last_access() - month_ago) < 1
    assert [c.path for c in gc_candidates(root, unused_days=7)] == [result.out]
    assert gc_candidates(root, unused_days=60) == []
