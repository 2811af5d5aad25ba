"""Deleting caches under a root: ``rm`` (one named cache) and ``gc`` (what no one needs any more).

Only what is provably ours is deleted, never what a live writer holds the lock of; a deletion renames
the directory to a hidden tombstone first (see :mod:`logit_cache.tools.catalog`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheBusyError, CacheFormatError, CacheNotFoundError, LogitCacheError
from ..format.manifest import is_json_temp
from ..io.locks import (
    STALE_LOCK,
    break_stale_lock,
    describe_holder,
    is_locked,
    is_our_lock,
    lock_owner,
    lock_path,
    read_lock,
    stale_reason,
    writer_lock,
)
from ..io.writer import is_tombstone, rmtree_tolerant, tombstone_path, why_not_ours
from .listing import REPLACED, finished_dir, list_caches


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
            if STALE_LOCK.match(self.path.name):
                self.path.unlink(missing_ok=True)
            else:
                record = read_lock(self.path)
                why = stale_reason(self.path, record)
                if why is None:
                    raise CacheBusyError(f"{self.path} is held again (by {describe_holder(record)}); not removing it")
                break_stale_lock(self.path, record, why, lock_owner(self.path))
        elif self.kind == "temp":
            if is_json_temp(self.path.name) and not self.path.is_symlink():
                self.path.unlink(missing_ok=True)
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown gc candidate kind {self.kind!r}")


def gc_candidates(root: Path, unused_days: float | None = None, progress: bool = False) -> list[GcCandidate]:
    """What ``gc`` would delete and why: unfinished dumps no one is writing, what interrupted work left
    (tombstones of deletions, ``NAME.replaced-PID``, stale locks, temporary manifests in finished caches)
    and, with ``unused_days``, complete caches whose manifest was not read for that long.

    Never a candidate: anything not provably ours (see :func:`logit_cache.writer.why_not_ours`), anything
    whose lock a live writer holds, and a cache whose manifest cannot be read (it may be complete).
    ``progress``: a bar on stderr (on a terminal) while the root is read, as ``ls`` shows it.
    """
    now = time.time()
    chosen = []
    for entry in list_caches(root, progress=progress):
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
            elif REPLACED.search(name) and not name.startswith(".") and path.is_dir() and not path.is_symlink():
                if why_not_ours(path) is None and not is_locked(finished_dir(path)):
                    chosen.append(GcCandidate(path, "the old cache an interrupted --overwrite was replacing", "cache"))
            elif STALE_LOCK.match(name) and path.is_file() and not path.is_symlink():
                chosen.append(GcCandidate(path, "a stale lock whose removal was interrupted", "lock"))
            elif name.startswith(".") and name.endswith(".lock"):
                record = read_lock(path)
                why = stale_reason(path, record)
                if why is not None and is_our_lock(path, record):
                    chosen.append(GcCandidate(path, f"stale lock of {describe_holder(record)} ({why})", "lock"))
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
    owner = finished_dir(path)
    tomb = tombstone_path(path)
    try:
        with writer_lock(owner, wait=False):
            os.rename(path, tomb)
    except CacheBusyError:
        raise CacheBusyError(f"{path} is being written by {describe_holder(read_lock(lock_path(owner)))}; not deleting it") from None
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
