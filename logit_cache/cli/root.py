"""The commands on a cache root: ``ls`` (list), ``rm`` (delete named caches) and ``gc`` (clean up)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..errors import LogitCacheError
from ..format.naming import ROOT_ENV
from ..io.lookup import directory_bytes
from ..tools.cleanup import check_removable, gc_candidates, remove_cache
from ..tools.listing import caches_by_key, list_caches
from .common import describe_targets, fail, human_bytes
from .options import json_option, require_root, root_argument


@click.command("ls")
@root_argument()
@json_option("Print a JSON list, one object per cache.")
def ls_command(root: Path | None, as_json: bool) -> None:
    """List the caches under a cache root [default: $LOGIT_CACHE_ROOT].

    One row per cache: key, teacher file and hash, dataset, content, rows, size on disk,
    bytes per sample, status, created. Unfinished dumps are marked INCOMPLETE (or WRITING while
    a dump holds their lock).
    """
    try:
        entries = list_caches(require_root(root), progress=not as_json)
    except LogitCacheError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    header = ["key", "teacher", "dataset", "content", "rows", "size", "B/sample", "status", "created", "name"]
    lines = []
    for entry in entries:
        record = entry.to_json()
        status = "complete" if entry.complete else ("WRITING" if entry.locked else "INCOMPLETE")
        if entry.manifest is None:
            if entry.unreadable:
                state = f"UNREADABLE: {entry.error}"
            elif entry.unfinished:
                detail = " (no manifest yet)" if entry.error is None else f": {entry.error}"
                state = ("WRITING" if entry.locked else "INCOMPLETE") + detail
            else:
                state = f"DAMAGED: {entry.error}"
            lines.append([entry.key, "?", "?", "?", "?", human_bytes(entry.bytes_on_disk), "?", state, "?", entry.path.name])
            continue
        what = f"{describe_targets(entry.manifest)} {record['dtype']} {record['backend']}"
        what += f" x{record['views']} views" if record["views"] > 1 else ""
        data = record["dataset"] + (f" {json.dumps(record['dataset_kwargs'])}" if record["dataset_kwargs"] else "")
        lines.append([record["key"], f"{Path(str(record['teacher'])).name} ({str(record['teacher_sha256'])[:8]})", data, what,
                      f"{record['rows']:,}", human_bytes(entry.bytes_on_disk), f"{record['bytes_per_sample']:,.1f}", status,
                      str(record["created_at"])[:19], entry.path.name])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not lines:
        click.echo(f"(no caches under {root})")


def _confirm_and_delete(targets: list[tuple[Path, str, Callable[[], None]]], yes: bool) -> None:
    """List ``targets`` (path, why, delete), ask unless ``yes``, delete each; one that cannot be deleted
    (a writer took its lock meanwhile, it vanished, it is not ours) is reported in one line and the rest
    go on; the exit status is 1 if any failed."""
    if not targets:
        click.echo("nothing to delete")
        return
    for path, why, _ in targets:
        click.echo(f"  {path}  ({why}, {human_bytes(directory_bytes(path))})")
    if not yes and not click.confirm(f"delete these {len(targets)}?", default=False):
        click.echo("nothing deleted")
        return
    failed = 0
    for path, _, delete in targets:
        try:
            delete()
        except LogitCacheError as exc:
            failed += 1
            click.echo(f"error: not deleted: {exc}", err=True)
            continue
        click.echo(f"deleted {path}")
    if failed:
        sys.exit(1)


@click.command("rm")
@click.argument("caches", nargs=-1, required=True, metavar="CACHE...")
@click.option("--root", type=click.Path(path_type=Path), envvar=ROOT_ENV, show_envvar=True,
              help="Cache root, to name caches by key [default: $LOGIT_CACHE_ROOT].")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
def rm_command(caches: tuple[str, ...], root: Path | None, yes: bool) -> None:
    """Delete caches: directories, or keys under a cache root. Asks first.

    A key must be given whole, or as a prefix of at least 4 characters that starts only one key; the
    readable part of a name is never matched. Only directories that are provably logit-cache's are
    deleted (a logit-cache manifest, or an unfinished .partial dump with its marker), never one that a
    running dump is writing, never through a symbolic link. A cache is renamed to a hidden name before
    it is deleted, so an interrupted rm leaves nothing that can be taken for a cache.
    """
    try:
        targets: list[tuple[Path, str, Callable[[], None]]] = []
        for name in caches:
            path = Path(name)
            if path.exists() or path.is_symlink():
                check_removable(path)  # a link, someone else's folder: refused before anything is listed
                targets.append((path, "named", lambda path=path: remove_cache(path)))
                continue
            for entry in caches_by_key(require_root(root), name):
                targets.append((entry.path, f"key {entry.key}", lambda path=entry.path: remove_cache(path)))
        _confirm_and_delete(targets, yes)
    except LogitCacheError as exc:
        fail(exc)


@click.command("gc")
@root_argument()
@click.option("--unused-days", type=float, default=None,
              help="Also delete complete caches whose manifest was not read for this many days (its access time: updated "
                   "at most daily on relatime mounts, never on noatime ones).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
def gc_command(root: Path | None, unused_days: float | None, yes: bool) -> None:
    """Delete unfinished dumps no one is writing (and, with --unused-days, unused caches) under a root.

    Also deletes what interrupted work left: hidden tombstones of deletions, NAME.replaced-PID of an
    interrupted --overwrite, stale locks, temporary manifests. Never deletes what is not provably
    logit-cache's, what a live writer holds the lock of, or a cache whose manifest cannot be read.
    Lists what it would delete and asks first.
    """
    try:
        candidates = gc_candidates(require_root(root), unused_days, progress=True)
        _confirm_and_delete([(c.path, c.why, c.delete) for c in candidates], yes)
    except LogitCacheError as exc:
        fail(exc)

