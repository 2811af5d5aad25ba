"""The output directory's life during a dump: ``check_output`` refuses to clobber, ``prepare_work_dir``
creates ``OUT.partial`` (or checks and trims it on resume), shards' progress records say which are done,
``finalize`` writes the complete manifest and renames ``OUT.partial`` to ``OUT``. (Split from
``writer.py``, which writes the shards and keeps re-exporting these names.) What may be deleted (ours)
is ``io/ownership.py``; where shards start and stop is ``format/layout.py``.

A shard counts as done only when its record ``progress/<name>.json`` exists, so after a kill at any
moment, ``--resume`` keeps exactly the shards with records and rewrites the rest from their first sample.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ..errors import CacheFormatError, OutputExistsError, UsageError
from ..format.layout import ShardPlan
from ..format.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_json_atomic, write_manifest
from ..format.paths import PARTIAL_SUFFIX, partial_path
from ..store import Backend
from .ownership import WORK_MARKER, discard_dir, is_empty_dir, read_work_marker, refuse_unless_ours, remove_stray_temps, write_work_marker

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


def progress_path(directory: Path, shard_name: str) -> Path:
    return directory / PROGRESS_DIR / f"{shard_name}.json"


def read_progress(directory: Path, backend: Backend, plan: ShardPlan) -> ShardEntry | None:
    """The finished shard's entry, or None if it is not (fully) written."""
    name = backend.shard_name(plan.index)
    record = progress_path(directory, name)
    if not record.is_file() or not (directory / name).exists():
        return None
    try:
        entry = ShardEntry(**json.loads(record.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CacheFormatError(f"{record}: progress record is damaged ({exc}); delete it and rerun with --resume") from exc
    expected = (name, plan.row_start, plan.row_stop, plan.sample_start, plan.sample_stop)
    if (entry.path, entry.row_start, entry.row_stop, entry.sample_start, entry.sample_stop) != expected:
        return None
    return entry


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def discard_unfinished(directory: Path, backend: Backend, plan: ShardPlan) -> None:
    """Delete whatever a killed writer left of a shard that has no progress record."""
    name = backend.shard_name(plan.index)
    for leftover in (directory / name, directory / (name + PARTIAL_SUFFIX), progress_path(directory, name)):
        remove_path(leftover)


def check_output(out: Path, key: str, backend: str, resume: bool, overwrite: bool) -> Manifest | None:
    """Refuse to clobber; return the existing complete manifest when ``resume`` finds the work done.

    Read-only, so every rank can run it.
    """
    work = partial_path(out)
    if out.exists():
        has_manifest = (out / MANIFEST_NAME).is_file()
        if resume and has_manifest:
            manifest = read_manifest(out)
            if manifest.complete and manifest.key == key and manifest.backend == backend:
                return manifest
            raise OutputExistsError(
                f"{out} holds a complete cache of other content (key {manifest.key}, backend {manifest.backend}; "
                f"this dump's key is {key}, backend {backend}); pass --overwrite to replace it or choose another --out"
            )
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        refuse_unless_ours(out, "exists and is not a logit-cache cache", "refusing to delete it with --overwrite; choose another --out")
    if work.exists() or work.is_symlink():
        if not (resume or overwrite):
            raise OutputExistsError(
                f"an unfinished dump is at {work}; pass --resume to continue it, or --overwrite to start over"
            )
        refuse_unless_ours(work, "exists and is not an unfinished logit-cache dump",
                           "refusing to resume into it or delete it; move it away or choose another --out")
    return None


#: Fields that must agree between an unfinished dump and the one resuming it.
_RESUME_FIELDS = ("key", "backend", "mode", "k", "m", "sample_temperature", "encoding", "per_token", "dtype", "num_classes",
                  "num_rows", "chunk_rows", "shard_rows", "arrays")


def prepare_work_dir(work: Path, manifest: Manifest, plans: list[ShardPlan], backend: Backend, overwrite: bool) -> Manifest:
    """Create ``OUT.partial`` or, resuming, check it was started with the same settings and discard
    unfinished shards. Writes the in-progress manifest (``complete: false``) before any shard, so a
    work directory without one holds nothing finished and is started afresh."""
    if work.exists() and (overwrite or not (work / MANIFEST_NAME).is_file()):
        # Killed before its first manifest: nothing but the marker and an empty progress folder.
        trivial = {p.name for p in work.iterdir()} <= {PROGRESS_DIR, WORK_MARKER} and is_empty_dir(work / PROGRESS_DIR)
        if not trivial:
            if not overwrite:
                raise CacheFormatError(f"{work} has no {MANIFEST_NAME} but holds files; pass --overwrite to start over")
            refuse_unless_ours(work, "is not an unfinished logit-cache dump",
                               "refusing to delete it with --overwrite; move it away or choose another --out")
        discard_dir(work)
    if work.exists():
        try:
            previous = read_manifest(work)
        except CacheFormatError as exc:
            raise CacheFormatError(
                f"{work} is an unfinished dump whose manifest cannot be read ({exc}); pass --overwrite to start over"
            ) from exc
        now, before = manifest.to_dict(), previous.to_dict()
        differ = [name for name in _RESUME_FIELDS if now[name] != before[name]]
        if differ == ["arrays"] and previous.tool_version != manifest.tool_version:
            added = sorted(set(now["arrays"]) - set(before["arrays"]))
            raise UsageError(
                f"--resume: the unfinished dump at {work} was started by logit-cache {previous.tool_version or 'before 0.1'}, "
                f"whose shards lack arrays this version writes ({', '.join(added) or 'other array specs'}); its finished "
                f"shards cannot be mixed with new ones: pass --overwrite to start over"
            )
        if differ:
            detail = "; ".join(f"{name}: was {before[name]!r}, now {now[name]!r}" for name in differ)
            raise UsageError(
                f"--resume: the unfinished dump at {work} was started with other settings ({detail}); rerun it with "
                f"the original options, or pass --overwrite to start over"
            )
        manifest.created_at = previous.created_at
        if previous.complete:  # killed inside finalize: its manifest still lists every finished shard
            for entry in previous.shards:
                if (work / entry.path).exists():
                    (work / PROGRESS_DIR).mkdir(exist_ok=True)
                    write_json_atomic(progress_path(work, entry.path), asdict(entry))
        kept = 0
        for plan in plans:
            if read_progress(work, backend, plan) is None:
                discard_unfinished(work, backend, plan)
            else:
                kept += 1
        for stray in remove_stray_temps(work) + remove_stray_temps(work / PROGRESS_DIR):
            log.debug("removed %s, left by a killed writer", stray)
        if read_work_marker(work) is None:
            write_work_marker(work, manifest.key, manifest.backend, "dump")
        log.info("resuming %s: %d of %d shards already written", work, kept, len(plans))
    else:
        work.mkdir(parents=True)
        write_work_marker(work, manifest.key, manifest.backend, "dump")
        log.info("dumping into %s (renamed to %s when complete)", work, work.name.removesuffix(PARTIAL_SUFFIX))
    (work / PROGRESS_DIR).mkdir(exist_ok=True)
    write_manifest(work, manifest)
    return manifest


def finalize(work: Path, out: Path, manifest: Manifest, plans: list[ShardPlan], backend: Backend) -> Manifest:
    """Gather every shard's record, write the complete manifest, and rename ``work`` to ``out``
    (an existing cache at ``out``, replaced on --overwrite, is moved aside first and deleted last)."""
    check_work_intact(work)
    entries = []
    for plan in plans:
        entry = read_progress(work, backend, plan)
        if entry is None:
            raise CacheFormatError(f"{work}: shard {plan.index} is missing after every rank finished; rerun with --resume")
        entries.append(entry)
    manifest.shards = entries
    manifest.complete = True
    write_manifest(work, manifest)
    remove_path(work / PROGRESS_DIR)
    move_into_place(work, out)
    return manifest


def move_into_place(work: Path, out: Path) -> None:
    """Rename the finished ``work`` directory to ``out``. A cache already at ``out`` (replaced on
    --overwrite) is moved aside first (``OUT.replaced-PID``), put back if the rename fails, and deleted
    last (through a tombstone, see :func:`discard_dir`). Fails loudly if ``work`` vanished meanwhile."""
    check_work_intact(work)
    remove_stray_temps(work)
    (work / WORK_MARKER).unlink(missing_ok=True)  # from here on, the complete manifest proves it ours
    if not out.exists() and not out.is_symlink():
        work.rename(out)
        return
    old = out.with_name(f"{out.name}{REPLACED_INFIX}{os.getpid()}")
    out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        old.rename(out)
        raise
    discard_dir(old)


#: ``OUT.replaced-PID``: where ``--overwrite`` puts the cache it replaces, for the moment of the swap.
REPLACED_INFIX = ".replaced-"


def check_work_intact(work: Path, shards: list[str] | tuple[str, ...] = ()) -> None:
    """Raise if ``work`` (or its marker, or one of ``shards``) vanished while it was being written: someone
    deleted it (``rm``, a ``gc`` of an older version, a user), and what is left must not become a cache."""
    if read_work_marker(work) is None:
        what = "is gone" if not work.exists() else f"lost its {WORK_MARKER}"
        raise CacheFormatError(
            f"{work} {what} while it was being written: another process (rm, gc, a user) deleted it, so the result "
            f"would not be complete; nothing was put in place; start over (dump --overwrite, or rerun the conversion)"
        )
    missing = [name for name in shards if not (work / name).exists()]
    if missing:
        raise CacheFormatError(
            f"{work}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} vanished while it was being written "
            f"(another process deleted it); nothing was put in place; start over"
        )
