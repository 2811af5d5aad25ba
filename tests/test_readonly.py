"""Read-only use and remote reading: caches on read-only trees, many readers, fsspec URLs.

The caches (top-k, Zarr and HDF5, 512-row shards over the digits train split) are dumped once into
a world-readable temporary directory and then made read-only (``chmod -R a-w``) for the whole
module, so every test here reads a tree it cannot write. Tests run as root here, and root ignores
permission bits: "writes nothing" is also checked directly, by snapshots of (path, size, mtime_ns,
mode) of everything under a cache, and the permission test proper runs in a process without the
power to override permissions (user ``nobody``, or root without ``CAP_DAC_OVERRIDE``).

fsspec: caches are copied into fsspec's in-process ``memory://`` filesystem and read through it;
DataLoader workers (other processes, which cannot see this process's memory filesystem) read the
same cache through ``file://``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import pickle
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from queue import Empty
from typing import ClassVar

import fsspec
import numpy as np
import pytest
import torch
from conftest import ARCH, make_teacher
from data_factories import read_plain
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry, known_implementations
from torch.utils.data import DataLoader

import logit_cache
from logit_cache import DumpConfig
from logit_cache.datasets import DigitsDataset
from logit_cache.errors import CacheNotFoundError, CorruptShardError, IncompleteCacheError, LogitCacheError, MissingPackageError, UsageError
from logit_cache.reader import LogitCache, open_cache, open_reader
from logit_cache.store import BACKENDS as STORE_BACKENDS
from logit_cache.store import hdf5_store
from logit_cache.store.base import URLPath, is_url

N, K = 1437, 5
SMALL_CACHE = 4096  # bytes: a two-slot chunk cache for three chunks, so chunks are evicted and shards reopened
BACKENDS = tuple(sorted(STORE_BACKENDS))
TARGET_NAMES = {"values": "topk_logits", "indices": "topk_indices", "logsumexp": "logsumexp"}


# -- fixtures -------------------------------------------------------------------------------------


def snapshot(root: Path) -> list[tuple[str, int, int, int]]:
    """(relative path, size, mtime_ns, mode) of ``root`` and everything under it: any write changes it."""
    entries = []
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        entries.append((str(path.relative_to(root)), info.st_size, info.st_mtime_ns, info.st_mode))
    return entries


def set_writable(root: Path, writable: bool) -> None:
    """``chmod -R a-w`` (or back to ``u+w``) over ``root``."""
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def root() -> Path:
    """A world-readable directory (pytest's own temporary root is private to its user), removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="logit-cache-readonly-"))
    path.chmod(0o755)
    yield path
    set_writable(path, True)
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def caches(root: Path) -> dict[str, Path]:
    """A zarr and an hdf5 top-k cache, read-only for the whole module; at the end, proof that nothing was written."""
    teacher = root / "teacher.pt"
    torch.save(make_teacher().state_dict(), teacher)
    paths = {}
    for backend in BACKENDS:
        paths[backend] = root / backend
        logit_cache.dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs={"hidden": 32}, dataset="digits",
                                    out=str(paths[backend]), mode="topk", k=K, shard_rows=512, quiet=True, backend=backend))
        set_writable(paths[backend], False)
    before = {backend: snapshot(path) for backend, path in paths.items()}
    yield paths
    assert {backend: snapshot(path) for backend, path in paths.items()} == before, "a test wrote into a read-only cache"


@pytest.fixture(scope="module")
def plain(caches: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """Every target array of each cache, read with plain zarr / h5py."""
    return {backend: {name: read_plain(path, name) for name in TARGET_NAMES.values()} for backend, path in caches.items()}


@pytest.fixture(scope="module")
def data() -> DigitsDataset:
    return DigitsDataset("train")


@pytest.fixture(scope="module")
def memory(caches: dict[str, Path]) -> dict[str, str]:
    """The caches copied into fsspec's memory filesystem: backend -> ``memory://`` URL."""
    fs = fsspec.filesystem("memory")
    prefix = f"logit-cache-test-{uuid.uuid4().hex[:8]}"
    urls = {}
    for backend, path in caches.items():
        fs.put(str(path), f"/{prefix}/{backend}", recursive=True)
        urls[backend] = f"memory://{prefix}/{backend}"
    yield urls
    fs.rm(prefix, recursive=True)


def loader_order(sampler) -> np.ndarray:
    return np.array([int(i[0]) if isinstance(i, (tuple, list)) else int(i) for i in sampler])


def check_loader(cache: LogitCache, data: DigitsDataset, expected: dict[str, np.ndarray], workers: int, ctx: str | None = "fork") -> None:
    """Iterate a DataLoader over ``cache.wrap(data)``: every item is the dataset's, with its cache row."""
    sampler = cache.sampler(shuffle=True, seed=3)
    loader = DataLoader(cache.wrap(data), batch_size=200, sampler=sampler, collate_fn=cache.collate, num_workers=workers,
                        multiprocessing_context=ctx if workers else None)
    order, position = loader_order(sampler), 0
    for inputs, labels, target in loader:
        rows = order[position : position + len(inputs)]
        position += len(inputs)
        assert torch.equal(inputs, data.images[rows]) and torch.equal(labels, data.labels[rows])
        for field, name in TARGET_NAMES.items():
            np.testing.assert_array_equal(getattr(target, field).numpy(), expected[name][rows])
    assert position == N


# -- read-only use --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_from_a_read_only_cache_writes_nothing(caches, plain, data, backend, in_memory, workers):
    path = caches[backend]
    assert not any(p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) for p in [path, *path.rglob("*")])
    before = snapshot(path)
    cache = open_cache(path, in_memory=in_memory, chunk_cache_bytes=SMALL_CACHE)
    check_loader(cache, data, plain[backend], workers)
    shard = cache.shard(0)  # the shards are opened read-only
    if backend == "hdf5":
        assert shard._handle().mode == "r"
    else:
        assert shard._group.store.read_only
    assert open_reader(path).verify_checksums() == []
    cache.close()
    assert snapshot(path) == before


UNPRIVILEGED_READ = """
import hashlib, json, sys
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader, TensorDataset

from logit_cache.reader import open_cache, open_reader

paths = [Path(p) for p in json.loads(sys.argv[1])]
try:  # the test is only meaningful if this process cannot write the cache
    (paths[0] / "probe").write_text("x")
except PermissionError:
    pass
else:
    (paths[0] / "probe").unlink()
    sys.exit("this process can write into the read-only cache: permissions are not enforced")
digests = []
for path in paths:
    assert open_reader(path).verify_checksums() == []
    for workers in (0, 2):
        cache = open_cache(path, in_memory=False, chunk_cache_bytes=4096)
        data = TensorDataset(torch.arange(cache.num_samples), torch.zeros(cache.num_samples, dtype=torch.long))  # (no scikit-learn import)
        loader = DataLoader(cache.wrap(data, verify="length"), batch_size=200, collate_fn=cache.collate, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        digest = hashlib.sha256()
        for inputs, labels, target in loader:
            for array in (target.values, target.indices, target.logsumexp):
                digest.update(array.numpy().tobytes())
        digests.append(digest.hexdigest())
print(json.dumps(digests))
"""


#: Cheap check that a process can run this Python and find logit_cache (without importing torch).
PROBE = "import importlib.util, sys; sys.exit(importlib.util.find_spec('logit_cache') is None)"


def _drop_dac_override() -> None:
    """In a child before exec: drop CAP_DAC_OVERRIDE from the bounding set, so root obeys write permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def unprivileged(root: Path) -> tuple[dict, str]:
    """subprocess.run options for a process that obeys permission bits, and how; pytest.skip if none can be had."""
    if os.geteuid() != 0:
        return {}, f"uid {os.geteuid()} (not root: permission bits apply)"
    reasons = []
    try:
        pwd.getpwnam("nobody")
        probe = subprocess.run([sys.executable, "-c", PROBE], user="nobody", cwd=root, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return {"user": "nobody"}, "user nobody"
        reasons.append(f"user nobody cannot find logit_cache ({probe.stderr.decode()[-200:]!r})")
    except (KeyError, OSError) as exc:
        reasons.append(f"cannot run {sys.executable} as user nobody ({exc})")
    if sys.platform.startswith("linux"):
        try:
            probe = subprocess.run([sys.executable, "-c", PROBE], preexec_fn=_drop_dac_override, capture_output=True, timeout=60)
            if probe.returncode == 0:
                return {"preexec_fn": _drop_dac_override}, "root without CAP_DAC_OVERRIDE"
            reasons.append(f"root without CAP_DAC_OVERRIDE cannot find logit_cache ({probe.stderr.decode()[-200:]!r})")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"cannot drop CAP_DAC_OVERRIDE ({exc})")
    pytest.skip("no way to run a process that obeys permission bits: " + "; ".join(reasons))


def test_a_process_without_write_permission_trains_from_the_cache(root, caches, plain):
    options, who = unprivileged(root)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(root)}
    result = subprocess.run([sys.executable, "-c", UNPRIVILEGED_READ, json.dumps([str(caches[b]) for b in BACKENDS])],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300, **options)
    assert result.returncode == 0, f"as {who}: {result.stderr[-3000:]}"
    digests = json.loads(result.stdout.strip().splitlines()[-1])
    want = []
    for backend in BACKENDS:
        digest = hashlib.sha256()
        for start in range(0, N, 200):
            for name in TARGET_NAMES.values():
                digest.update(plain[backend][name][start : start + 200].tobytes())
        want += [digest.hexdigest()] * 2
    assert digests == want, who


def _read_concurrently(paths: list[str], barrier, queue, seed: int) -> None:
    """One of several processes: open the caches, wait for the others, read every row in a shuffled order."""
    try:
        caches = [open_cache(path, in_memory=False, chunk_cache_bytes=SMALL_CACHE) for path in paths]
        barrier.wait(timeout=120)
        digests = []
        for cache in caches:
            order = np.random.default_rng(seed).permutation(cache.num_rows)
            out = {name: np.empty((cache.num_rows, *cache._row_shapes[name]), cache._dtypes[name]) for name in cache.names}
            for start in range(0, cache.num_rows, 97):
                rows = order[start : start + 97]
                for name, values in cache.rows(rows).items():
                    out[name][rows] = values
            digests.append({name: hashlib.sha256(out[name].tobytes()).hexdigest() for name in TARGET_NAMES.values()})
        queue.put((seed, digests))
    except BaseException as exc:
        queue.put((seed, repr(exc)))


def test_many_processes_read_one_cache_at_once(caches, plain):
    # Fresh processes that inherit nothing from this one (no open handles, no HDF5 state), as with
    # "spawn"; from a fork server that imports logit_cache once, so the imports are not paid four times.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["logit_cache", "zarr", "h5py", __name__])
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    paths = [str(caches[b]) for b in BACKENDS]
    before = {b: snapshot(caches[b]) for b in BACKENDS}
    processes = [ctx.Process(target=_read_concurrently, args=(paths, barrier, queue, seed)) for seed in range(4)]
    for process in processes:
        process.start()
    results = {}
    while len(results) < len(processes):
        try:
            seed, digests = queue.get(timeout=1)
            results[seed] = digests
        except Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            assert not dead, f"reader processes died with exit codes {dead}"
    for process in processes:
        process.join(timeout=60)
    want = [{name: hashlib.sha256(plain[b][name].tobytes()).hexdigest() for name in TARGET_NAMES.values()} for b in BACKENDS]
    assert results == dict.fromkeys(range(4), want)
    assert all(process.exitcode == 0 for process in processes)
    assert {b: snapshot(caches[b]) for b in BACKENDS} == before


def test_hdf5_reads_without_locking_where_the_filesystem_refuses_locks(caches, plain, monkeypatch):
    real, calls = hdf5_store.h5py.File, []

    def refusing(path, mode="r", **kwargs):
        calls.append(kwargs.get("locking"))
        if "locking" not in kwargs:
            raise OSError("Unable to synchronously open file (unable to lock file, errno = 38, error message = 'Function not implemented')")
        return real(path, mode, **kwargs)

    monkeypatch.setattr(hdf5_store.h5py, "File", refusing)
    cache = open_cache(caches["hdf5"], in_memory=False)
    np.testing.assert_array_equal(cache.rows(np.arange(N))["topk_logits"], plain["hdf5"]["topk_logits"])
    assert calls[:2] == [None, False]

    def conflicting(path, mode="r", **kwargs):  # a writer holds the file: not overridden
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 11, error message = 'Resource unavailable')")

    monkeypatch.setattr(hdf5_store.h5py, "File", conflicting)
    with pytest.raises(CorruptShardError, match="errno = 11"):
        open_cache(caches["hdf5"], in_memory=False).rows([0])


# -- fsspec URLs ----------------------------------------------------------------------------------


def test_urls_are_told_from_local_paths():
    assert is_url("memory://caches/x") and is_url("s3://bucket/key") and is_url("file:///abs/path")
    assert is_url("simplecache::s3://bucket/key")
    assert not is_url("caches/x") and not is_url("/abs/path") and not is_url(Path("/abs/path")) and not is_url("./a://b")
    url = URLPath("memory://caches/x/")
    assert url / "manifest.json" == "memory://caches/x/manifest.json" and url.name == "x" and url.parent == "memory://caches"
    assert isinstance(pickle.loads(pickle.dumps(url / "a")), URLPath)


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_memory_url_reads_the_same_rows_as_the_local_cache(caches, memory, backend, in_memory):
    url = memory[backend]
    cache = open_cache(url, in_memory=in_memory, chunk_cache_bytes=SMALL_CACHE)
    local = open_cache(caches[backend], in_memory=False)
    assert isinstance(cache.path, URLPath) and str(cache.path) == url
    assert open_reader(url + "/").path == url
    assert cache.manifest == local.manifest
    rng = np.random.default_rng(0)
    for rows in [np.arange(N), rng.permutation(N), rng.integers(0, N, 300), np.array([1436, 0, 511, 512, 1024])]:
        got, want = cache.rows(rows), local.rows(rows)
        for name in cache.names:
            np.testing.assert_array_equal(got[name], want[name])
    revived = pickle.loads(pickle.dumps(cache))  # what a spawned DataLoader worker receives
    assert isinstance(revived.path, URLPath)
    np.testing.assert_array_equal(revived.rows([5, 900])["topk_indices"], local.rows([5, 900])["topk_indices"])
    reader = open_reader(url)
    assert reader.verify_checksums() == []
    np.testing.assert_array_equal(reader.read("labels"), read_plain(caches[backend], "labels"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_memory_url_feeds_a_dataloader_without_workers(memory, plain, data, backend):
    check_loader(open_cache(memory[backend], in_memory=False, chunk_cache_bytes=SMALL_CACHE), data, plain[backend], workers=0)


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_url_feeds_forked_dataloader_workers(caches, plain, data, backend, in_memory):
    cache = open_cache(f"file://{caches[backend]}", in_memory=in_memory, chunk_cache_bytes=SMALL_CACHE)
    assert str(cache.path) == f"file://{caches[backend]}"
    check_loader(cache, data, plain[backend], workers=2)


class RecordingFileSystem(MemoryFileSystem):
    """The memory filesystem under another protocol, remembering the options it was made with."""

    protocol = "lcrecord"
    seen: ClassVar[list[dict]] = []

    def __init__(self, *args, **kwargs):
        RecordingFileSystem.seen.append(dict(kwargs))
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).replace("lcrecord://", "memory://", 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_options_reach_fsspec(caches, memory, backend, monkeypatch):
    monkeypatch.setitem(_registry, "lcrecord", RecordingFileSystem)
    monkeypatch.setattr(RecordingFileSystem, "seen", [])
    url = memory[backend].replace("memory://", "lcrecord://")
    cache = open_cache(url, in_memory=False, storage_options={"marker": backend})
    np.testing.assert_array_equal(cache.rows([3, 1400])["topk_logits"], open_cache(caches[backend]).rows([3, 1400])["topk_logits"])
    # (zarr adds asynchronous=True to the options of the filesystems it makes)
    assert RecordingFileSystem.seen and all(options.get("marker") == backend for options in RecordingFileSystem.seen)
    with pytest.raises(UsageError, match="storage_options apply to fsspec URLs"):
        open_cache(caches[backend], storage_options={"marker": backend})


def test_a_missing_protocol_package_is_named(monkeypatch):
    monkeypatch.setitem(known_implementations, "lcmissing",
                        {"class": "logit_cache_no_such_package.FileSystem", "err": "Install logit_cache_no_such_package to read lcmissing"})
    with pytest.raises(MissingPackageError, match=r"lcmissing://bucket/cache: .*pip install logit_cache_no_such_package") as info:
        open_cache("lcmissing://bucket/cache")
    assert isinstance(info.value, ImportError) and isinstance(info.value, LogitCacheError)
    with pytest.raises(UsageError, match="fsspec knows no protocol 'lcunknown'"):
        open_reader("lcunknown://bucket/cache")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingPackageError, match="pip install s3fs"):
            open_cache("s3://bucket/caches/digits")


def test_a_missing_fsspec_is_named(caches, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(MissingPackageError, match="needs the fsspec package, which is not installed: pip install fsspec"):
        open_cache("memory://caches/x")
    assert open_cache(caches["zarr"]).num_rows == N  # local paths need no fsspec of ours


def test_incomplete_missing_and_damaged_remote_caches_are_refused(caches, memory):
    fs = fsspec.filesystem("memory")
    prefix = f"logit-cache-test-{uuid.uuid4().hex[:8]}"
    try:
        fs.put(str(caches["zarr"]), f"{prefix}/unfinished", recursive=True)
        manifest = json.loads(fs.cat_file(f"{prefix}/unfinished/manifest.json"))
        fs.pipe_file(f"{prefix}/unfinished/manifest.json", json.dumps({**manifest, "complete": False}).encode())
        with pytest.raises(IncompleteCacheError, match=f"memory://{prefix}/unfinished: manifest says complete=false"):
            open_cache(f"memory://{prefix}/unfinished")
        assert not open_reader(f"memory://{prefix}/unfinished", allow_incomplete=True).manifest.complete

        fs.put(str(caches["zarr"]), f"{prefix}/running.partial", recursive=True)
        with pytest.raises(IncompleteCacheError, match=rf"memory://{prefix}/running: the dump has not finished; .* is in memory://{prefix}/running\.partial"):
            open_cache(f"memory://{prefix}/running")

        with pytest.raises(CacheNotFoundError, match=f"memory://{prefix}/nothing: no such cache directory"):
            open_cache(f"memory://{prefix}/nothing")
        fs.pipe_file(f"{prefix}/empty/readme.txt", b"not a cache")
        with pytest.raises(CacheNotFoundError, match=f"memory://{prefix}/empty: no manifest.json in it"):
            open_cache(f"memory://{prefix}/empty")
        fs.pipe_file(f"{prefix}/garbled/manifest.json", b"{not json")
        with pytest.raises(LogitCacheError, match=f"memory://{prefix}/garbled/manifest.json: cannot be read as JSON"):
            open_cache(f"memory://{prefix}/garbled")

        for backend in BACKENDS:
            fs.put(str(caches[backend]), f"{prefix}/{backend}-damaged", recursive=True)
            shard = json.loads(fs.cat_file(f"{prefix}/{backend}-damaged/manifest.json"))["shards"][1]["path"]
            fs.rm(f"{prefix}/{backend}-damaged/{shard}", recursive=True)
            cache = open_cache(f"memory://{prefix}/{backend}-damaged", in_memory=False)
            with pytest.raises(CorruptShardError, match=f"memory://{prefix}/{backend}-damaged/{shard}: cannot be opened"):
                cache.rows([600])
    finally:
        fs.rm(prefix, recursive=True)
