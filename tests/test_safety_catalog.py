"""Issue 16, shared roots and deletion: file modes, what rm / gc / --overwrite may delete, deletion that a
kill cannot leave half done, convert under the writer's lock, locks across pid namespaces and zombies,
and the leftovers of interrupted work."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ARCH, ARCH_KWARGS
from data_factories import read_plain, spec

import logit_cache.convert as convert_module
from logit_cache import DumpConfig, dump
from logit_cache.catalog import (
    STALE_SECONDS,
    _holder,
    find_by_key,
    gc_candidates,
    list_caches,
    lock_is_stale,
    lock_path,
    remove_cache,
    writer_lock,
)
from logit_cache.cli import main
from logit_cache.convert import convert
from logit_cache.errors import CacheBusyError, CacheFormatError, OutputExistsError
from logit_cache.manifest import write_json_atomic
from logit_cache.store import BACKENDS
from logit_cache.tools import listing as listing_module
from logit_cache.writer import WORK_MARKER, check_output, partial_path, write_work_marker

NOBODY = 65534


def root_dump(root: Path, teacher: Path, **kwargs):
    settings = {"dataset": spec("random_images"), "mode": "topk", "k": 3, "quiet": True, **kwargs}
    return dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), cache_root=str(root), **settings))


def tree(path: Path) -> list[str]:
    """Every file and folder under ``path``, relative: what a whole cache holds."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def invoke(*args) -> object:
    """The CLI in-process; a traceback (an exception escaping the CLI) fails the test."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- item 2: modes follow the umask; an unreadable manifest is never "unfinished" -----------------------


@pytest.fixture
def umask002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def test_write_json_atomic_gives_the_umask_mode(tmp_path: Path) -> None:
    for mask, want in ((0o002, 0o664), (0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            target = tmp_path / f"m{mask:o}.json"
            write_json_atomic(target, {"a": 1})
            write_json_atomic(target, {"a": 2})  # replaced: still the umask's mode
        finally:
            os.umask(old)
        assert stat.S_IMODE(target.stat().st_mode) == want, (oct(mask), oct(target.stat().st_mode))
        assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2.json", "m22.json", "m77.json"]  # no temporaries left


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_cache_in_a_group_shared_root_is_group_readable(tmp_path: Path, teacher: Path, umask002, backend: str) -> None:
    """setgid 2775 root, umask 002: every file 0664, every folder 2775 (as `open` and `mkdir` give them)."""
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o2775)
    result = root_dump(root, teacher, backend=backend, shard_rows=100)
    converted = convert(result.out, root / "converted", dtype="float32", quiet=True)
    for cache in (result.out, converted.dst):
        paths = [cache, *cache.rglob("*")]
        assert len(paths) > 3
        for path in paths:
            mode = path.stat().st_mode
            if path.is_dir():
                assert stat.S_IMODE(mode) == 0o2775, (path, oct(mode))
            else:
                assert stat.S_IMODE(mode) == 0o664, (path, oct(mode))


def test_an_unreadable_manifest_is_never_unfinished(tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a teammate sees another's manifest.json of mode 0600 (simulated: root reads everything)."""
    kept = root_dump(tmp_path, teacher)
    before = snapshot(kept.out)
    manifest = kept.out / "manifest.json"

    def refuse(original):
        def read(self, *args, **kwargs):
            if self == manifest:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self, *args, **kwargs)

        return read

    monkeypatch.setattr(Path, "read_bytes", refuse(Path.read_bytes))
    monkeypatch.setattr(Path, "read_text", refuse(Path.read_text))
    monkeypatch.setattr(listing_module, "_read_untouched", refuse(listing_module._read_untouched))  # how ls and gc read it
    assert gc_candidates(tmp_path) == [] and gc_candidates(tmp_path, unused_days=0) == []
    (entry,) = list_caches(tmp_path)
    assert entry.unreadable and not entry.complete and "Permission denied" in entry.error
    listing = invoke("ls", tmp_path)
    assert "UNREADABLE" in listing.output and "INCOMPLETE" not in listing.output and "DAMAGED" not in listing.output
    assert "nothing to delete" in invoke("gc", tmp_path, "--yes").output
    one_line_error(invoke("rm", kept.out, "--yes"), "cannot be read", "refusing to delete")
    monkeypatch.undo()
    assert snapshot(kept.out) == before


_TEAMMATE = f"""
import json, os, sys
from click.testing import CliRunner
from logit_cache.cli import main
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
assert os.getuid() == {NOBODY} and os.getgid() == {NOBODY}
results = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
print(json.dumps([[r.exit_code, r.output] for r in results]))
"""


def _as_nobody(*commands: list[str]) -> list[tuple[int, str]]:
    """Run ``logit-cache COMMAND`` for each command in one process of user/group 65534 (no capabilities).
    It imports first, as root, because this interpreter's files are readable by root only; then it drops
    to the teammate's ids. Skips the test (with the reason) where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the teammate's process as another user (uid/gid 65534)")
    done = subprocess.run([sys.executable, "-c", _TEAMMATE, json.dumps(commands)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"cannot run a process as uid {NOBODY} here: {done.stderr.strip()[-300:]}")
    return [(code, output) for code, output in json.loads(done.stdout)]


@pytest.mark.slow
def test_a_teammate_sees_complete_caches_and_gc_deletes_none(teacher: Path) -> None:
    # /tmp itself, not pytest's tmp_path: that lies under a 0700 folder a teammate cannot enter
    root = Path(tempfile.mkdtemp(prefix="logit-cache-shared-", dir="/tmp"))
    old = os.umask(0o002)
    try:
        os.chown(root, 0, NOBODY)  # the team's group
        root.chmod(0o2775)
        caches = [root_dump(root, teacher).out, root_dump(root, teacher, k=5).out, root_dump(root, teacher, k=7).out]
        before = {cache: snapshot(cache) for cache in caches}
        # A manifest the teammate really cannot read (0600, as older versions wrote them): listed, never deleted.
        (caches[2] / "manifest.json").chmod(0o600)
        (listed, as_json), (table, as_table), (cleaned, cleaned_output), (info, info_output) = _as_nobody(
            ["ls", str(root), "--json"], ["ls", str(root)], ["gc", str(root), "--yes"], ["info", str(caches[0])]
        )
        assert listed == 0 and table == 0 and cleaned == 0 and info == 0, (as_table, cleaned_output, info_output)
        assert "UNREADABLE" in as_table and "INCOMPLETE" not in as_table and "DAMAGED" not in as_table, as_table
        records = {r["path"]: r for r in json.loads(as_json)}
        assert records[str(caches[0])]["complete"] and records[str(caches[1])]["complete"], records
        assert records[str(caches[2])]["unreadable"] and not records[str(caches[2])]["complete"], records
        assert "nothing to delete" in cleaned_output
        assert {cache: snapshot(cache) for cache in caches} == before
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)


# -- item 3: a kill during rm / gc leaves the whole cache or nothing under its name ----------------------


def _run_killed_at(limit: int, args: list[str]) -> int:
    """Run ``logit-cache ARGS`` in a forked child (the modules are loaded already) that SIGKILLs itself
    at its ``limit``-th unlink / rmdir / rename; return the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def hooked(real):
                def call(*a, **k):
                    calls[0] += 1
                    if calls[0] >= limit:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **k)

                return call

            for name in ("unlink", "rmdir", "rename", "remove"):
                setattr(os, name, hooked(getattr(os, name)))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            main(args, prog_name="logit-cache", standalone_mode=True)
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def _assert_nothing_partial_is_a_cache(root: Path, key: str, whole: list[str]) -> bool:
    """No directory under ``root`` is taken for a complete cache unless it holds every file. True if one is."""
    found = False
    for entry in list_caches(root):
        if entry.complete:
            assert tree(entry.path) == whole, f"{entry.path} is listed complete but is not whole"
            found = True
    hit = find_by_key(root, key, "zarr")
    if hit is not None and check_output(hit, key, "zarr", resume=True, overwrite=False) is not None:
        assert tree(hit) == whole, f"{hit} is found by key as complete but is not whole"
        found = True
    return found


@pytest.mark.slow
@pytest.mark.parametrize("command", ["rm", "gc"])
def test_a_kill_during_rm_or_gc_never_leaves_a_partial_cache(tmp_path: Path, teacher: Path, command: str) -> None:
    root = tmp_path / "root"
    first = root_dump(root, teacher, shard_rows=10)  # 30 shards: 270 files, 600 entries
    whole, key = tree(first.out), first.manifest.key
    assert len(whole) > 500
    args = ["rm", "--root", str(root), key, "--yes"] if command == "rm" else ["gc", str(root), "--unused-days", "0", "--yes"]
    rng = random.Random(16 if command == "rm" else 61)
    # kill points: before the rename (1), right after it (2: the lock's removal), then seeded points in the rmtree
    schedule = [1, 2, *sorted(rng.sample(range(3, len(whole)), 3))]
    recomputed = 0
    for limit in schedule:
        status = _run_killed_at(limit, args)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (limit, status)
        intact = _assert_nothing_partial_is_a_cache(root, key, whole)
        assert intact == (limit == 1), (limit, os.listdir(root))
        again = root_dump(root, teacher, shard_rows=10)
        assert again.reused == intact and again.out == first.out and tree(again.out) == whole
        recomputed += not again.reused
        # what the kill left (a tombstone, a stale lock) goes with gc, and gc leaves the cache alone
        assert invoke("gc", root, "--yes").exit_code == 0
        assert sorted(os.listdir(root)) == [first.out.name]
    assert recomputed == len(schedule) - 1
    np.testing.assert_array_equal(read_plain(first.out, "topk_indices").shape, (300, 3))
    # uninterrupted, it deletes everything and leaves nothing behind
    assert invoke(*args).exit_code == 0 and os.listdir(root) == []


# -- item 4: convert holds the writer's lock; a vanished DST.partial fails loudly ---------------------------


@pytest.fixture
def many_shards(tmp_path: Path, teacher: Path) -> Path:
    return root_dump(tmp_path / "src-root", teacher, shard_rows=50).out  # 6 shards


def test_gc_during_a_convert_leaves_its_partial_alone(tmp_path: Path, many_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dst = root / "converted--float32"
    real = convert_module.convert_shard
    seen = {}

    def meanwhile(reader, position, *args, **kwargs):
        if position == 2:  # while converting: a gc (and an rm) in the same root
            seen["gc"] = invoke("gc", root, "--unused-days", "0", "--yes").output
            seen["rm"] = invoke("rm", partial_path(dst), "--yes").output
            seen["partial"] = partial_path(dst).is_dir()
        return real(reader, position, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_shard", meanwhile)
    result = convert(many_shards, dst, dtype="float32", quiet=True)
    assert seen["partial"] and "nothing to delete" in seen["gc"], seen
    assert "being written by pid" in seen["rm"] and "not deleting" in seen["rm"], seen
    assert result.manifest.complete and not partial_path(dst).exists() and not lock_path(dst).exists()
    np.testing.assert_array_equal(read_plain(dst, "topk_logits"), read_plain(many_shards, "topk_logits").astype(np.float32))


def test_a_convert_whose_partial_vanished_fails_loudly(tmp_path: Path, many_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "converted"
    real = convert_module.convert_shard

    def vanish(reader, position, *args, **kwargs):
        if position == 3:  # deleted by another process (an older gc, a user)
            shutil.rmtree(partial_path(dst))
        return real(reader, position, *args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_shard", vanish)
    line = one_line_error(invoke("convert", many_shards, dst, "--dtype", "float32", "--quiet"), str(partial_path(dst)))
    assert "while it was being written" in line or "vanished" in line
    assert not dst.exists() and not partial_path(dst).exists() and not lock_path(dst).exists()


# -- item 5: delete only what is provably ours ----------------------------------------------------------


def _strangers(root: Path) -> dict[str, dict[str, bytes]]:
    extension = root / "my-extension"
    extension.mkdir()
    (extension / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "Tab Saver", "version": "1.2"}))
    (extension / "background.js").write_text("chrome.tabs.query({}, () => {});\n")
    thesis = root / "thesis.partial"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\section{Introduction}\n")
    data = root / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"files": ["important.csv"], "format_version": 1}))
    (data / "important.csv").write_text("a,b\n1,2\n")
    return {name: snapshot(root / name) for name in ("my-extension", "thesis.partial", "data")}


def test_rm_gc_and_overwrite_spare_what_is_not_ours(tmp_path: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # `rm NAME` takes NAME as a path first: not the project's own data/ folder
    root = tmp_path / "root"
    cache = root_dump(root, teacher)
    strangers = _strangers(root)
    ours = root / "digits--top7-float16-zarr--0123456789abcdef.partial"  # a killed dump's: only its marker
    ours.mkdir()
    write_work_marker(ours, "0123456789abcdef", "zarr", "dump")
    listed = [r["path"] for r in json.loads(invoke("ls", root, "--json").output)]
    assert sorted(listed) == sorted([str(cache.out), str(ours)])
    gc = invoke("gc", root, "--yes")
    assert gc.exit_code == 0 and not ours.exists() and cache.out.exists()
    assert invoke("gc", root, "--unused-days", "0", "--yes").exit_code == 0 and not cache.out.exists()
    for name in strangers:
        one_line_error(invoke("rm", root / name, "--yes"), "is not a logit-cache cache", "refusing to delete it")
        one_line_error(invoke("rm", "--root", root, name, "--yes"), "no cache under")
    # --overwrite: a dump or a conversion onto someone else's folder, or beside their NAME.partial
    for name in ("my-extension", "data"):
        with pytest.raises(OutputExistsError, match="is not a logit-cache cache"):
            dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("random_images"),
                            k=3, quiet=True, out=str(root / name), overwrite=True))
    for flag in ("overwrite", "resume"):
        with pytest.raises(OutputExistsError, match=r"thesis\.partial exists and is not an unfinished logit-cache dump"):
            dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("random_images"),
                            k=3, quiet=True, out=str(root / "thesis"), **{flag: True}))
    source = root_dump(tmp_path / "elsewhere", teacher).out
    for name in ("my-extension", "data"):
        with pytest.raises(OutputExistsError, match="is not a logit-cache cache"):
            convert(source, root / name, dtype="float32", overwrite=True, quiet=True)
    with pytest.raises(OutputExistsError, match="not an unfinished logit-cache dump"):
        convert(source, root / "thesis", dtype="float32", overwrite=True, quiet=True)
    assert {name: snapshot(root / name) for name in strangers} == strangers
    assert sorted(os.listdir(root)) == sorted(strangers)


def test_rm_matches_keys_not_names(tmp_path: Path, teacher: Path) -> None:
    root = tmp_path / "root"
    top3, top5 = root_dump(root, teacher), root_dump(root, teacher, k=5)
    assert "--top3-" in top3.out.name
    for text in ("t", "top3", "--top3", "random_images"):
        one_line_error(invoke("rm", "--root", root, "--yes", "--", text), "no cache under")
    assert top3.out.exists() and top5.out.exists()
    a, b = top3.manifest.key, top5.manifest.key
    shared = a[: next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))]
    if len(shared) >= 4:
        one_line_error(invoke("rm", "--root", root, shared, "--yes"), "give more of the key")
    prefix = top3.manifest.key[: max(len(shared) + 1, 4)]
    removed = invoke("rm", "--root", root, prefix, "--yes")
    assert removed.exit_code == 0 and not top3.out.exists() and top5.out.exists()
    assert invoke("rm", "--root", root, top5.manifest.key, "--yes").exit_code == 0 and os.listdir(root) == []


def test_rm_of_a_pattern_or_a_symlink_is_one_line(tmp_path: Path, teacher: Path) -> None:
    root = tmp_path / "root"
    cache = root_dump(root, teacher)
    one_line_error(invoke("rm", "--root", root, "*", "--yes"), "not names or patterns")
    one_line_error(invoke("rm", "--root", root, "**", "--yes"), "not names or patterns")
    link = tmp_path / "link"
    link.symlink_to(cache.out, target_is_directory=True)
    one_line_error(invoke("rm", link, "--yes"), "symbolic link", "not deleting through it")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    one_line_error(invoke("rm", dangling, "--yes"), "symbolic link")
    in_root = root / "alias--0123456789abcdef"
    in_root.symlink_to(cache.out, target_is_directory=True)
    assert [e.path for e in list_caches(root)] == [cache.out]  # a link is never listed, so gc never follows it
    assert invoke("gc", root, "--unused-days", "0", "--yes").exit_code == 0
    assert link.is_symlink() and dangling.is_symlink() and in_root.is_symlink() and not cache.out.exists()


# -- item 8: locks across pid namespaces, zombies, reused pids ---------------------------------------------


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def _write_lock(out: Path, record: dict, age: float = 0.0) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps(record))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_holder_in_another_pid_namespace_is_judged_by_its_heartbeat(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    record = {**_holder(), "pid": _dead_pid(), "pid_ns": "pid:[4026532999]", "pid_start": 12345}
    path = _write_lock(out, record)
    assert not lock_is_stale(path)  # its pid means nothing here, and its heartbeat is fresh
    with pytest.raises(CacheBusyError, match="being written by"), writer_lock(out, wait=False):
        pass
    _write_lock(out, record, age=STALE_SECONDS + 5)
    assert lock_is_stale(path)
    # likewise another kernel (a host of the same name: another machine, or before a reboot)
    path = _write_lock(out, {**_holder(), "pid": _dead_pid(), "boot_id": "00000000-0000-0000-0000-000000000000"})
    assert not lock_is_stale(path)


def test_a_zombie_or_a_reused_pid_holds_no_lock(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    assert not lock_is_stale(_write_lock(out, _holder()))  # ourselves: alive
    reused = {**_holder(), "pid_start": _holder()["pid_start"] - 1}  # our pid, but another process's start time
    assert lock_is_stale(_write_lock(out, reused))
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(200):  # until it is a zombie (exited, not reaped)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.01)
        assert state == "Z"
        record = _holder(pid)
        assert lock_is_stale(_write_lock(out, record))
        legacy = {"host": socket.gethostname(), "pid": pid, "started": time.time()}  # an older logit-cache's record
        assert lock_is_stale(_write_lock(out, legacy))
        started = time.monotonic()
        with writer_lock(out, wait=True, timeout=5):  # a waiter is not blocked forever
            pass
        assert time.monotonic() - started < 3
    finally:
        os.waitpid(pid, 0)


def test_a_lock_taken_over_is_not_deleted_by_its_former_holder(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    with writer_lock(out):
        path = lock_path(out)
        path.rename(tmp_path / "gone")  # judged stale and taken over by another process meanwhile
        path.write_text(json.dumps({**_holder(), "pid": 1}))
    assert path.exists() and json.loads(path.read_text())["pid"] == 1


# -- item 10: leftovers of kills are cleaned by gc and never listed -----------------------------------------


def test_gc_removes_leftovers_and_ls_never_lists_them(tmp_path: Path, teacher: Path) -> None:
    root = tmp_path / "root"
    cache = root_dump(root, teacher)
    whole = snapshot(cache.out)
    stray = cache.out / ".manifest.json.k3j9x2.partial"
    stray.write_text('{"format_version": 1')
    aside = root / f"{cache.out.name}.replaced-123"
    shutil.copytree(cache.out, aside)
    (aside / ".manifest.json.k3j9x2.partial").unlink()
    stale = _write_lock(cache.out, {**_holder(), "pid": _dead_pid()})
    half_stale = root / f"{stale.name}.stale-777"
    half_stale.write_text("{}")
    tombstone = root / f".{cache.out.name}.logit-cache-deleting-4242-abcdef"
    shutil.copytree(cache.out, tombstone)
    (tombstone / "manifest.json").unlink()
    busy_out = root / "busy--top3-float16-zarr--0123456789abcdef"
    busy = _write_lock(busy_out, _holder())  # a live writer (us): kept

    records = json.loads(invoke("ls", root, "--json").output)
    assert [r["path"] for r in records] == [str(cache.out)] and records[0]["complete"]
    assert find_by_key(root, cache.manifest.key, "zarr") == cache.out
    kinds = sorted(c.kind for c in gc_candidates(root))
    assert kinds == ["cache", "lock", "lock", "temp", "tombstone"], gc_candidates(root)
    result = invoke("gc", root, "--yes")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(root)) == sorted([cache.out.name, busy.name])
    assert snapshot(cache.out) == whole
    assert invoke("gc", root, "--yes").output.strip() == "nothing to delete"


def test_an_interrupted_overwrite_is_finished_or_cleaned(tmp_path: Path, teacher: Path) -> None:
    """Killed between moving the old cache aside and renaming the new one in: no complete cache is listed under
    the aside's name, gc removes it, and --resume puts the new one in place."""
    out = tmp_path / "out"
    base = dict(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("random_images"), k=3,
                quiet=True, out=str(out))
    dump(DumpConfig(**base))
    new = dump(DumpConfig(**{**base, "k": 4}, overwrite=True))
    whole = snapshot(new.out)
    # the state of the kill: the new cache still in OUT.partial (complete manifest), the old one aside
    out.rename(partial_path(out))
    write_work_marker(partial_path(out), new.manifest.key, "zarr", "dump")
    dump(DumpConfig(**{**base, "out": str(tmp_path / "old")}))
    (tmp_path / "old").rename(tmp_path / "out.replaced-999")
    assert [e.path.name for e in list_caches(tmp_path) if e.complete] == []
    candidates = {c.path.name: c.kind for c in gc_candidates(tmp_path)}
    assert candidates == {"out.replaced-999": "cache", "out.partial": "cache"}
    (aside,) = [c for c in gc_candidates(tmp_path) if c.path.name == "out.replaced-999"]
    aside.delete()
    resumed = dump(DumpConfig(**{**base, "k": 4}, resume=True))
    got = snapshot(out)
    assert resumed.rows_computed == 0 and got.pop("manifest.json") and whole.pop("manifest.json") and got == whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert not (out / WORK_MARKER).exists()


def test_remove_cache_refuses_a_locked_partial(tmp_path: Path, teacher: Path) -> None:
    out = tmp_path / "cache"
    work = partial_path(out)
    work.mkdir()
    write_work_marker(work, "0123456789abcdef", "zarr", "dump")
    with writer_lock(out), pytest.raises(CacheBusyError, match="not deleting it"):
        remove_cache(work)
    assert work.exists()
    with pytest.raises(CacheFormatError, match="not a logit-cache cache"):
        remove_cache(tmp_path)
    remove_cache(work)
    assert sorted(os.listdir(tmp_path)) == []
