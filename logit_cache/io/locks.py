"""The one-writer lock of a cache: ``.<name>.lock`` beside the cache, held by every writer.

Every writer into a cache location (a dump, a ``convert``, and ``rm``/``gc`` for the moment of
taking a cache away) holds ``.<name>.lock`` beside its output while it works: a JSON record of host,
pid, start time, boot id and pid namespace, created with ``O_EXCL`` and touched every few seconds (a
heartbeat). A second writer of the same cache waits for the lock to go, or fails at once with
``wait=False``. A lock is stale, and taken over, when its holder is provably dead (same host, boot
and pid namespace: the pid is gone, a zombie, or now another process), or else when its heartbeat is
older than ``STALE_SECONDS`` (another host, a container with its own pids: a pid there says nothing
here). A writer killed with ``kill -9`` leaves such a lock; ``gc`` removes it.

Here (below ``pipeline`` and ``tools``) because the dump, ``convert`` and the catalog's clean-up all
take it; :mod:`logit_cache.tools.catalog` re-exports it under its old names.
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
from pathlib import Path
from typing import Any

from ..errors import CacheBusyError

log = logging.getLogger(__name__)

#: A lock whose heartbeat is older than this is stale (when its pid cannot be checked).
STALE_SECONDS = 300.0
HEARTBEAT_SECONDS = 10.0
POLL_SECONDS = 0.5
#: ``.NAME.lock.stale-PID``: a stale lock being removed (renamed first, so only one recoverer wins).
STALE_INFIX = ".stale-"


def lock_path(out: Path) -> Path:
    """Where the lock of cache ``out`` lives: ``.NAME.lock`` beside it."""
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


def holder_record(pid: int | None = None) -> dict[str, Any]:
    """What a lock records of its holder: enough to tell, later, whether that very process still runs."""
    pid = os.getpid() if pid is None else pid
    state = _proc_state(pid)
    return {"host": socket.gethostname(), "pid": pid, "started": time.time(), "boot_id": _boot_id(),
            "pid_ns": _pid_namespace(), "pid_start": state[1] if state else None}


def holder_state(record: dict[str, Any]) -> str:
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


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or damaged: judged by its age


def stale_reason(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why the lock at ``path`` belongs to no live writer, or None if it may (see :func:`lock_is_stale`)."""
    if record is None:
        return None
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = holder_state(record) if record else "unknown"
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
    return stale_reason(path, read_lock(path) if record is None else record) is not None


def break_stale_lock(path: Path, record: dict[str, Any] | None, why: str, out: Path) -> bool:
    """Remove a stale lock atomically: of several recoverers only one rename succeeds."""
    tombstone = path.with_name(f"{path.name}{STALE_INFIX}{os.getpid()}")
    try:
        os.rename(path, tombstone)
    except FileNotFoundError:
        return False
    tombstone.unlink(missing_ok=True)
    log.warning("%s: removed a stale lock of %s (%s)", out, describe_holder(record), why)
    return True


def describe_holder(record: dict[str, Any] | None) -> str:
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
            record = read_lock(path)
            why = stale_reason(path, record)
            if why is not None:
                break_stale_lock(path, record, why, out)
                continue
            if not wait:
                raise CacheBusyError(
                    f"{out} is being written by {describe_holder(record)}; wait for it (drop --no-wait) or, if that "
                    f"process is gone on another host, delete {path} after {STALE_SECONDS:.0f} s without a heartbeat"
                ) from None
            if timeout is not None and time.monotonic() - waited_since > timeout:
                raise CacheBusyError(f"{out}: still locked by {describe_holder(record)} after {timeout:.0f} s") from None
            if not announced:
                log.info("%s is being written by %s: waiting for it", out, describe_holder(record))
                announced = True
            time.sleep(POLL_SECONDS)
            continue
        with os.fdopen(fd, "w") as handle:
            identity = os.fstat(handle.fileno())
            json.dump(holder_record(), handle)
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


#: ``.NAME.lock.stale-PID``: a stale lock a recoverer renamed and was killed before deleting.
STALE_LOCK = re.compile(r"^\..+\.lock" + re.escape(STALE_INFIX) + r"\d+$")


def lock_owner(lock: Path) -> Path:
    """The cache directory a ``.NAME.lock`` guards."""
    return lock.with_name(lock.name[1:].removesuffix(".lock"))


def is_locked(cache: Path) -> bool:
    """Whether a live writer holds the lock of ``cache``."""
    lock = lock_path(cache)
    return lock.exists() and not lock_is_stale(lock)


def is_our_lock(path: Path, record: dict[str, Any] | None) -> bool:
    """A ``.NAME.lock`` file our writers made: a JSON record of host and pid (or empty: killed while creating it)."""
    if record is None or not path.is_file() or path.is_symlink():
        return False
    if record == {}:
        with contextlib.suppress(OSError):
            return path.stat().st_size == 0
        return False
    return {"host", "pid", "started"} <= record.keys()
