"""Sharing caches: cache roots, names by content key, one writer per cache, listing and clean-up.

A **cache root** is a directory (``--cache-root`` or ``LOGIT_CACHE_ROOT``) holding caches named
``<readable part>--<key>``: the readable part says what is inside (dataset, mode, dtype, views), the
key (``fingerprint.py``) is what identifies it. A dump into a root first looks for a complete cache
with its key (whatever the readable part) and reuses it; only if there is none does it compute.

**One writer.** Every writer into a root (a dump, a ``convert``, and ``rm``/``gc`` for the moment of
taking a cache away) holds ``.<name>.lock`` beside its output while it works: a JSON record of host,
pid, start time, boot id and pid namespace, created with ``O_EXCL`` and touched every few seconds (a
heartbeat). A second dump of the same cache waits for the lock to go (then finds the cache complete
and reuses it), or fails at once with ``wait=False``. A lock is stale, and taken over, when its holder
is provably dead (same host, boot and pid namespace: the pid is gone, a zombie, or now another
process), or else when its heartbeat is older than ``STALE_SECONDS`` (another host, a container with
its own pids: a pid there says nothing here). A dump killed with ``kill -9`` leaves such a lock, and
its unfinished ``.partial`` work is resumed by the next dump of the key.

**Deleting only what is ours.** ``rm``, ``gc`` and ``--overwrite`` delete a directory only when it
is provably logit-cache's: a ``manifest.json`` with our fields (``format_version``, ``key``,
``shards``...), or an ``OUT.partial`` holding the marker a dump or conversion writes when it creates
it (``writer.WORK_MARKER``). A deletion first renames the directory to a hidden tombstone, so a kill
mid-way leaves nothing under the cache's name; ``gc`` deletes tombstones, the ``NAME.replaced-PID``
of an interrupted ``--overwrite``, stale locks and temporary manifests a killed writer left. A cache
whose manifest cannot be read (another user's, mode 0600) is never taken for an unfinished one.

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
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError, CacheFormatError, CacheNotFoundError, LogitCacheError, UsageError
from ..format.manifest import MANIFEST_NAME, Manifest, is_json_temp, read_manifest
from ..io.writer import (
    PARTIAL_SUFFIX,
    REPLACED_INFIX,
    is_our_manifest,
    is_tombstone,
    read_work_marker,
    rmtree_tolerant,
    tombstone_path,
    why_not_ours,
)

log = logging.getLogger(__name__)

ROOT_ENV = "LOGIT_CACHE_ROOT"
#: A lock whose heartbeat is older than this is stale (when its pid cannot be checked).
STALE_SECONDS = 300.0
HEARTBEAT_SECONDS = 10.0
POLL_SECONDS = 0.5
#: ``.NAME.lock.stale-PID``: a stale lock being removed (renamed first, so only one recoverer wins).
STALE_INFIX = ".stale-"


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


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    """This kernel's boot: two hosts of one name (containers, clones) differ here, and so does one host after a reboot."""
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    """``pid:[4026531836]``: pids of another namespace (a container on the same host) mean nothing here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_state(pid: int) -> tuple[str, int | None] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc/PID/stat``; None if
    there is no such process; ("?", None) if /proc cannot say (no /proc: another OS)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        if os.path.isdir("/proc/self"):
            return None
        return ("?", None) if _alive(pid) else None
    try:
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces and parentheses
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (ValueError, IndexError):
        return ("?", None)


def _holder(pid: int | None = None) -> dict[str, Any]:
    """What a lock records of its holder: enough to tell, later, whether that very process still runs."""
    pid = os.getpid() if pid is None else pid
    state = _proc_state(pid)
    return {"host": socket.gethostname(), "pid": pid, "started": time.time(), "boot_id": _boot_id(),
            "pid_ns": _pid_namespace(), "pid_start": state[1] if state else None}


def _holder_is(record: dict[str, Any]) -> str:
    """"dead", "alive", or "unknown" (another host, kernel or pid namespace: only the heartbeat can tell)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "unknown"
    if "pid_ns" in record or "boot_id" in record:
        here = (_pid_namespace(), _boot_id())
        if None in here or (record.get("pid_ns"), record.get("boot_id")) != here:
            return "unknown"
    # else a record of an older logit-cache (host and pid only): judged by its pid, as that version did
    state = _proc_state(pid)
    if state is None or state[0] in ("Z", "X", "x"):  # gone, or a zombie no one reaped: it will never unlock
        return "dead"
    recorded_start = record.get("pid_start")
    if isinstance(recorded_start, int) and state[1] is not None and state[1] != recorded_start:
        return "dead"  # the pid was reused by another process
    return "alive"


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: judged by its age


def _stale_reason(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why the lock at ``path`` belongs to no live writer, or None if it may (see :func:`lock_is_stale`)."""
    if record is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = _holder_is(record) if record else "unknown"
    if holder == "dead":
        return "its process is gone"
    if holder == "unknown" and age > STALE_SECONDS:
        return f"no heartbeat for {age:.0f} s"
    return None


def lock_is_stale(path: Path, record: dict[str, Any] | None = None) -> bool:
    """Whether the lock at ``path`` belongs to no live writer.

    On this host, in this pid namespace and since this boot (all recorded in the lock), the holder is
    dead when its pid is gone, is a zombie, or now names another process (its start time differs).
    Anywhere else (another host, a container with its own pids, a host of the same name) a pid says
    nothing: the lock is stale only when its heartbeat (the file's mtime, touched every
    ``HEARTBEAT_SECONDS``) is older than ``STALE_SECONDS``.
    """
    return _stale_reason(path, _read_lock(path) if record is None else record) is not None


def _break_stale_lock(path: Path, record: dict[str, Any] | None, why: str, out: Path) -> bool:
    """Remove a stale lock atomically: of several recoverers only one rename succeeds."""
    tombstone = path.with_name(f"{path.name}{STALE_INFIX}{os.getpid()}")
    try:
        os.rename(path, tombstone)
    except FileNotFoundError:
        return False
    tombstone.unlink(missing_ok=True)
    log.warning("%s: removed a stale lock of %s (%s)", out, _describe(record), why)
    return True


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
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the mode the umask gives
        except FileExistsError:
            record = _read_lock(path)
            why = _stale_reason(path, record)
            if why is not None:
                _break_stale_lock(path, record, why, out)
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
            identity = os.fstat(handle.fileno())
            json.dump(_holder(), handle)
        break
    mine = (identity.st_dev, identity.st_ino)
    stop = threading.Event()

    def still_mine() -> bool:
        """False once another process took the lock over (it judged ours stale): never touch or delete theirs."""
        try:
            now = path.stat()
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == mine

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                if still_mine():
                    os.utime(path)

    beat = threading.Thread(target=heartbeat, name="logit-cache-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if still_mine():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# -- listing and clean-up -------------------------------------------------------------------------

#: ``NAME.replaced-PID``: the old cache an ``--overwrite`` moves aside while it swaps in the new one.
_REPLACED = re.compile(re.escape(REPLACED_INFIX) + r"\d+$")
#: ``.NAME.lock.stale-PID``: a stale lock a recoverer renamed and was killed before deleting.
_STALE_LOCK = re.compile(r"^\..+\.lock" + re.escape(STALE_INFIX) + r"\d+$")
#: What a cache root's directories are called by dumps: ``<readable>--<key>`` (and ``.partial``).
_CACHE_NAME = re.compile(r"^.+--[0-9a-f]{8,64}(" + re.escape(PARTIAL_SUFFIX) + ")?$")
#: ``rm`` takes a key prefix of at least this many characters (and only one that names a single key).
MIN_KEY_PREFIX = 4


@dataclass
class CacheEntry:
    """One cache (or unfinished dump) under a root, as ``ls`` shows it."""

    path: Path
    manifest: Manifest | None
    complete: bool
    bytes_on_disk: int
    locked: bool
    error: str | None = None
    #: Its manifest exists but cannot be read (permissions): it may well be a complete cache.
    unreadable: bool = False
    #: The key, when there is no valid manifest to say it (an unfinished dump's marker).
    key_hint: str | None = None

    @property
    def key(self) -> str:
        return self.manifest.key if self.manifest else self.key_hint or "?"

    @property
    def unfinished(self) -> bool:
        """An unfinished dump or conversion (``.partial``), as opposed to a cache, damaged or not."""
        return self.path.name.endswith(PARTIAL_SUFFIX)

    def last_access(self) -> float:
        try:
            return (self.path / MANIFEST_NAME).stat().st_atime
        except OSError:
            return 0.0

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        record: dict[str, Any] = {"path": str(self.path), "complete": self.complete, "locked": self.locked,
                                  "bytes_on_disk": self.bytes_on_disk, "error": self.error, "unreadable": self.unreadable}
        if m is None and self.key_hint:
            record["key"] = self.key_hint
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
    """Bytes of every file under ``path`` (what the cache costs on disk, before block rounding). Files
    that vanish or cannot be seen while it counts (another process deleting, permissions) count 0."""
    try:
        if not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _finished(path: Path) -> Path:
    """The cache directory an unfinished dump (``NAME.partial``) or a moved-aside cache (``NAME.replaced-PID``)
    belongs to, whose lock guards it; a cache directory itself."""
    name = _REPLACED.sub("", path.name.removesuffix(PARTIAL_SUFFIX))
    return path.with_name(name)


def _locked(cache: Path) -> bool:
    lock = lock_path(cache)
    return lock.exists() and not lock_is_stale(lock)


def _inspect(path: Path) -> tuple[Manifest | None, str | None, bool, str | None] | None:
    """(manifest, error, unreadable, key) of a directory under a root, or None when it is not ours (no
    logit-cache manifest and no marker of our unfinished work). Never raises for what it finds."""
    marker = read_work_marker(path) if path.name.endswith(PARTIAL_SUFFIX) else None
    marker_key = str(marker["key"]) if marker and marker.get("key") else None
    try:
        raw = (path / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return (None, None, False, marker_key) if marker is not None else None
    except (PermissionError, IsADirectoryError) as exc:
        if marker is None and not _CACHE_NAME.match(path.name) and not os.path.isfile(path / MANIFEST_NAME):
            return None  # a folder we may not look into, with no name of ours: someone else's
        return None, f"{MANIFEST_NAME} cannot be read ({exc.strerror})", True, marker_key
    except OSError as exc:
        return None, f"{MANIFEST_NAME} cannot be read ({exc})", True, marker_key
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return None, f"{path / MANIFEST_NAME}: not valid JSON ({exc})", False, marker_key
    if not is_our_manifest(data):
        if marker is None:
            return None  # someone else's manifest.json (a browser extension's, a data set's)
        return None, f"{path / MANIFEST_NAME}: not a logit-cache manifest", False, marker_key
    key = data.get("key") if isinstance(data.get("key"), str) else marker_key
    try:
        manifest = read_manifest(path)
    except CacheFormatError as exc:
        return None, str(exc), False, key
    return manifest, None, False, manifest.key


def find_by_key(root: Path, key: str, backend: str) -> Path | None:
    """The ``backend`` cache of ``key`` under ``root`` (complete or not), whatever the rest of its name.
    Hidden names (tombstones of deletions, locks) and symbolic links are never it."""
    if not root.is_dir():
        return None
    matches = sorted(p for p in root.glob(f"*-{backend}--{key}")
                     if not p.name.startswith(".") and not p.is_symlink() and p.is_dir())
    return matches[0] if matches else None


def list_caches(root: Path) -> list[CacheEntry]:
    """Every cache directory and unfinished dump directly under ``root``, sorted by name.

    Only what is ours is listed: a directory with a logit-cache manifest, or a ``.partial`` with our
    marker. Never listed: hidden names (locks, tombstones of deletions), ``NAME.replaced-PID`` (the
    old cache of an interrupted ``--overwrite``), symbolic links, other people's folders. A cache whose
    manifest cannot be read (permissions) is listed as unreadable, never as unfinished.
    """
    if not root.is_dir():
        raise CacheFormatError(f"cache root {root} does not exist (set --cache-root or {ROOT_ENV})")
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise CacheFormatError(f"cache root {root} cannot be listed ({exc.strerror or exc}); check its permissions") from exc
    entries = []
    for path in children:
        if path.name.startswith(".") or _REPLACED.search(path.name) or path.is_symlink():
            continue
        try:
            if not path.is_dir():
                continue
        except OSError:
            continue
        found = _inspect(path)
        if found is None:
            continue  # not ours
        manifest, error, unreadable, key = found
        complete = bool(manifest and manifest.complete and not path.name.endswith(PARTIAL_SUFFIX))
        entries.append(CacheEntry(path, manifest, complete, directory_bytes(path), _locked(_finished(path)), error,
                                  unreadable, key))
    return entries


def caches_by_key(root: Path, text: str) -> list[CacheEntry]:
    """The caches (and unfinished dumps) under ``root`` whose key is ``text``, or else whose key starts
    with ``text`` when exactly one key does (at least ``MIN_KEY_PREFIX`` characters). Only the key
    field is matched, never the readable part of a name: ``t`` does not match ``--top3``."""
    entries = [entry for entry in list_caches(root) if entry.key != "?"]
    exact = [entry for entry in entries if entry.key == text]
    if exact:
        return exact
    keys = sorted({entry.key for entry in entries if entry.key.startswith(text)}) if len(text) >= MIN_KEY_PREFIX else []
    if len(keys) > 1:
        raise UsageError(f"{text!r} is the start of {len(keys)} keys under {root} ({', '.join(keys)}); give more of the key")
    if keys:
        return [entry for entry in entries if entry.key == keys[0]]
    raise UsageError(
        f"{text}: no such cache directory, and no cache under {root} whose key is {text!r} (or starts with it, given "
        f"at least {MIN_KEY_PREFIX} characters); name cache directories or keys as `logit-cache ls {root}` shows them, "
        f"not names or patterns"
    )


@dataclass
class GcCandidate:
    """One thing ``gc`` would delete, why, and what kind: ``cache`` (a cache or unfinished dump, deleted
    through :func:`remove_cache`), ``tombstone`` (what an interrupted deletion left), ``lock`` (stale),
    ``temp`` (a killed writer's temporary manifest)."""

    path: Path
    why: str
    kind: str

    def delete(self) -> None:
        """Delete it, checking again that it is still what it was judged to be."""
        if self.kind == "cache":
            remove_cache(self.path)
        elif self.kind == "tombstone":
            if is_tombstone(self.path.name) and self.path.is_dir() and not self.path.is_symlink():
                rmtree_tolerant(self.path)
        elif self.kind == "lock":
            if _STALE_LOCK.match(self.path.name):
                self.path.unlink(missing_ok=True)
            else:
                record = _read_lock(self.path)
                why = _stale_reason(self.path, record)
                if why is None:
                    raise CacheBusyError(f"{self.path} is held again (by {_describe(record)}); not removing it")
                _break_stale_lock(self.path, record, why, _lock_owner(self.path))
        elif self.kind == "temp":
            if is_json_temp(self.path.name) and not self.path.is_symlink():
                self.path.unlink(missing_ok=True)
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown gc candidate kind {self.kind!r}")


def _lock_owner(lock: Path) -> Path:
    """The cache directory a ``.NAME.lock`` guards."""
    return lock.with_name(lock.name[1:].removesuffix(".lock"))


def _is_our_lock(path: Path, record: dict[str, Any] | None) -> bool:
    """A ``.NAME.lock`` file our writers made: a JSON record of host and pid (or empty: killed while creating it)."""
    if record is None or not path.is_file() or path.is_symlink():
        return False
    if record == {}:
        with contextlib.suppress(OSError):
            return path.stat().st_size == 0
        return False
    return {"host", "pid", "started"} <= record.keys()


def gc_candidates(root: Path, unused_days: float | None = None) -> list[GcCandidate]:
    """What ``gc`` would delete and why: unfinished dumps no one is writing, what interrupted work left
    (tombstones of deletions, ``NAME.replaced-PID``, stale locks, temporary manifests in finished caches)
    and, with ``unused_days``, complete caches whose manifest was not read for that long.

    Never a candidate: anything not provably ours (see :func:`logit_cache.writer.why_not_ours`), anything
    whose lock a live writer holds, and a cache whose manifest cannot be read (it may be complete).
    """
    now = time.time()
    chosen = []
    for entry in list_caches(root):
        if entry.locked or entry.unreadable:
            continue
        if entry.unfinished:
            chosen.append(GcCandidate(entry.path, "unfinished dump, no writer holds its lock", "cache"))
        elif entry.manifest is None:
            continue  # damaged (or of a newer format version): ls shows it; only `rm` deletes it, when asked
        elif not entry.manifest.complete:
            chosen.append(GcCandidate(entry.path, "unfinished (complete: false), no writer holds its lock", "cache"))
        elif unused_days is not None and now - entry.last_access() > unused_days * 86400:
            days = (now - entry.last_access()) / 86400
            chosen.append(GcCandidate(entry.path, f"not read for {days:.0f} days (manifest access time)", "cache"))
        else:
            with contextlib.suppress(OSError):
                for stray in sorted(entry.path.iterdir()):
                    if is_json_temp(stray.name) and stray.is_file() and not stray.is_symlink():
                        chosen.append(GcCandidate(stray, "temporary file a killed writer left", "temp"))
    for path in sorted(root.iterdir()):
        name = path.name
        try:
            if is_tombstone(name) and path.is_dir() and not path.is_symlink():
                chosen.append(GcCandidate(path, "left by an interrupted rm, gc or --overwrite (hidden, not a cache)", "tombstone"))
            elif _REPLACED.search(name) and not name.startswith(".") and path.is_dir() and not path.is_symlink():
                if why_not_ours(path) is None and not _locked(_finished(path)):
                    chosen.append(GcCandidate(path, "the old cache an interrupted --overwrite was replacing", "cache"))
            elif _STALE_LOCK.match(name) and path.is_file() and not path.is_symlink():
                chosen.append(GcCandidate(path, "a stale lock whose removal was interrupted", "lock"))
            elif name.startswith(".") and name.endswith(".lock"):
                record = _read_lock(path)
                why = _stale_reason(path, record)
                if why is not None and _is_our_lock(path, record):
                    chosen.append(GcCandidate(path, f"stale lock of {_describe(record)} ({why})", "lock"))
        except OSError:
            continue
    return chosen


def check_removable(path: Path) -> None:
    """Raise (one line for the user) unless ``path`` is a directory that is provably ours to delete."""
    if path.is_symlink():
        raise CacheFormatError(
            f"{path} is a symbolic link (to {os.readlink(path)}); not deleting through it: name the cache directory "
            f"itself, or remove the link with the system's rm"
        )
    if not path.exists():
        raise CacheNotFoundError(f"{path}: no such cache directory")
    why = why_not_ours(path)
    if why is not None:
        raise CacheFormatError(f"{path} is not a logit-cache cache ({why}); refusing to delete it")


def remove_cache(path: Path) -> None:
    """Delete one cache or unfinished dump directory: only one that is provably ours (a logit-cache
    manifest, or a ``.partial`` with our marker), never one a live writer holds the lock of.

    The directory is first renamed to a hidden tombstone (atomic) while holding its lock, then deleted:
    a kill at any moment leaves either the whole cache under its name or nothing under it (``gc``
    deletes a leftover tombstone).
    """
    check_removable(path)
    owner = _finished(path)
    tomb = tombstone_path(path)
    try:
        with writer_lock(owner, wait=False):
            os.rename(path, tomb)
    except CacheBusyError:
        raise CacheBusyError(f"{path} is being written by {_describe(_read_lock(lock_path(owner)))}; not deleting it") from None
    except FileNotFoundError as exc:
        raise CacheNotFoundError(f"{path}: vanished before it could be deleted (another rm or gc?)") from exc
    except OSError as exc:
        raise LogitCacheError(f"{path}: cannot be deleted ({exc.strerror or exc}); check the permissions of {path.parent}") from exc
    try:
        rmtree_tolerant(tomb)
    except OSError as exc:
        raise LogitCacheError(
            f"{path}: taken away from its name but not wholly deleted ({exc}); what is left is the hidden {tomb.name}, "
            f"which no one takes for a cache; `logit-cache gc` deletes it once the cause is fixed"
        ) from exc
