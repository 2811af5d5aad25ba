"""Sharing caches: cache roots, names by content key, one writer per cache, listing and clean-up.

A **cache root** is a directory (``--cache-root`` or ``LOGIT_CACHE_ROOT``) holding caches named
``<readable part>--<key>``: the readable part says what is inside (dataset, mode, dtype, views), the
key (``fingerprint.py``) is what identifies it. A dump into a root first looks for a complete cache
with its key (whatever the readable part) and reuses it; only if there is none does it compute.

**One writer.** A dump holds ``.<name>.lock`` beside its output while it works: a JSON record of
host, pid and start time, created with ``O_EXCL`` and touched every few seconds (a heartbeat). A
second dump of the same cache waits for the lock to go (then finds the cache complete and reuses
it), or fails at once with ``wait=False``. A lock is stale, and taken over, when its process is gone
(same host) or its heartbeat is older than ``STALE_SECONDS`` (another host, where the pid cannot be
checked); a dump killed with ``kill -9`` leaves such a lock, and its unfinished ``.partial`` work is
resumed by the next dump of the key.

**Unused caches.** Readers write nothing into a cache (it may be a read-only mount), so "unused"
is read from the manifest's access time, which most file systems update at most daily (``relatime``)
and some never (``noatime``): ``gc --unused-days`` says which it relies on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CacheBusyError, CacheFormatError
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .writer import PARTIAL_SUFFIX

log = logging.getLogger(__name__)

ROOT_ENV = "LOGIT_CACHE_ROOT"
#: A lock whose heartbeat is older than this is stale (when its pid cannot be checked).
STALE_SECONDS = 300.0
HEARTBEAT_SECONDS = 10.0
POLL_SECONDS = 0.5


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.")[:limit] or "cache"


def readable_name(dataset_spec: str, dataset_kwargs: dict[str, Any], mode: str, k: int | None, dtype: str, views: int,
                  backend: str) -> str:
    """What a cache holds, for humans: ``digits-split=train--top5-float16-zarr`` (the key follows)."""
    data = Path(dataset_spec.split(":")[-1]).name if ":" in dataset_spec else dataset_spec
    args = ",".join(f"{key}={value}" for key, value in sorted(dataset_kwargs.items()))
    what = f"top{k}" if mode == "topk" else f"sample{k}" if mode == "sampled" else mode
    content = what + f"-{dtype}" + (f"-v{views}" if views > 1 else "")
    return f"{_slug(data + ('-' + args if args else ''))}--{content}-{backend}"


def cache_dir_name(readable: str, key: str) -> str:
    return f"{readable}--{key}"


def find_by_key(root: Path, key: str, backend: str) -> Path | None:
    """The ``backend`` cache of ``key`` under ``root`` (complete or not), whatever the rest of its name."""
    if not root.is_dir():
        return None
    matches = sorted(p for p in root.glob(f"*-{backend}--{key}") if p.is_dir())
    return matches[0] if matches else None


# -- the writer's lock ------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: judged by its age


def lock_is_stale(path: Path, record: dict[str, Any] | None = None) -> bool:
    """Whether the lock at ``path`` belongs to no live writer (see the module docstring)."""
    record = _read_lock(path) if record is None else record
    if record is None:
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return not _alive(record["pid"])
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_SECONDS


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')} (since {started})"


@contextlib.contextmanager
def writer_lock(out: Path, wait: bool = True, timeout: float | None = None) -> Iterator[None]:
    """Hold the one-writer lock of cache ``out`` for the duration (see the module docstring)."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    waited_since = time.monotonic()
    announced = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = _read_lock(path)
            if lock_is_stale(path, record):
                # Take it over atomically: of several recoverers only one rename succeeds.
                tombstone = path.with_name(f"{path.name}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, tombstone)
                    tombstone.unlink()
                    log.warning("%s: removed a stale lock of %s (its process is gone)", out, _describe(record))
                continue
            if not wait:
                raise CacheBusyError(
                    f"{out} is being written by {_describe(record)}; wait for it (drop --no-wait) or, if that "
                    f"process is gone on another host, delete {path} after {STALE_SECONDS:.0f} s without a heartbeat"
                ) from None
            if timeout is not None and time.monotonic() - waited_since > timeout:
                raise CacheBusyError(f"{out}: still locked by {_describe(record)} after {timeout:.0f} s") from None
            if not announced:
                log.info("%s is being written by %s: waiting for it", out, _describe(record))
                announced = True
            time.sleep(POLL_SECONDS)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, handle)
        break
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(path)

    beat = threading.Thread(target=heartbeat, name="logit-cache-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- listing and clean-up -------------------------------------------------------------------------


@dataclass
class CacheEntry:
    """One cache (or unfinished dump) under a root, as ``ls`` shows it."""

    path: Path
    manifest: Manifest | None
    complete: bool
    bytes_on_disk: int
    locked: bool
    error: str | None = None

    @property
    def key(self) -> str:
        return self.manifest.key if self.manifest else "?"

    def last_access(self) -> float:
        try:
            return (self.path / MANIFEST_NAME).stat().st_atime
        except OSError:
            return 0.0

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        record: dict[str, Any] = {"path": str(self.path), "complete": self.complete, "locked": self.locked,
                                  "bytes_on_disk": self.bytes_on_disk, "error": self.error}
        if m is not None:
            record.update({
                "key": m.key, "teacher": m.teacher.get("path"), "teacher_sha256": m.teacher.get("sha256"),
                "dataset": m.dataset.get("spec"), "dataset_kwargs": m.dataset.get("kwargs", {}), "mode": m.mode, "k": m.k,
                "dtype": m.dtype, "backend": m.backend, "views": m.views, "seed": m.seed, "rows": m.num_rows,
                "samples": m.num_samples, "bytes_per_sample": self.bytes_on_disk / max(1, m.num_samples),
                "created_at": m.created_at,
            })
        return record


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (what the cache costs on disk, before block rounding)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _finished(path: Path) -> Path:
    """The cache directory an unfinished dump (``NAME.partial``) becomes; a cache directory itself."""
    return path.with_name(path.name.removesuffix(PARTIAL_SUFFIX))


def list_caches(root: Path) -> list[CacheEntry]:
    """Every cache directory and unfinished dump directly under ``root``, sorted by name."""
    if not root.is_dir():
        raise CacheFormatError(f"cache root {root} does not exist (set --cache-root or {ROOT_ENV})")
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (path / MANIFEST_NAME).is_file() and not path.name.endswith(PARTIAL_SUFFIX):
            continue  # not ours
        try:
            manifest = read_manifest(path)
            error = None
        except CacheFormatError as exc:
            manifest, error = None, str(exc)
        complete = bool(manifest and manifest.complete and not path.name.endswith(PARTIAL_SUFFIX))
        lock = lock_path(_finished(path))
        locked = lock.exists() and not lock_is_stale(lock)
        entries.append(CacheEntry(path, manifest, complete, directory_bytes(path), locked, error))
    return entries


def gc_candidates(root: Path, unused_days: float | None = None) -> list[tuple[CacheEntry, str]]:
    """What ``gc`` would delete and why: unfinished dumps no one is writing, stale locks' leftovers,
    and (with ``unused_days``) complete caches whose manifest was not read for that long."""
    now = time.time()
    chosen = []
    for entry in list_caches(root):
        if entry.locked:
            continue
        if not entry.complete:
            chosen.append((entry, "unfinished dump, no writer holds its lock"))
        elif unused_days is not None and now - entry.last_access() > unused_days * 86400:
            days = (now - entry.last_access()) / 86400
            chosen.append((entry, f"not read for {days:.0f} days (manifest access time)"))
    return chosen


def remove_cache(path: Path) -> None:
    """Delete one cache or unfinished dump directory (only one that holds a manifest or is ``.partial``)."""
    if not path.is_dir() or not ((path / MANIFEST_NAME).is_file() or path.name.endswith(PARTIAL_SUFFIX)):
        raise CacheFormatError(f"{path} is not a logit-cache cache (no {MANIFEST_NAME}); refusing to delete it")
    lock = lock_path(_finished(path))
    if lock.exists() and not lock_is_stale(lock):
        raise CacheBusyError(f"{path} is being written by {_describe(_read_lock(lock))}; not deleting it")
    shutil.rmtree(path)
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
