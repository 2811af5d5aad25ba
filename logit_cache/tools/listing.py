"""Listing a cache root: what caches (and unfinished dumps) it holds, and finding them by key.

Only what is provably ours is listed (a logit-cache manifest, or a ``.partial`` with our marker);
see :mod:`logit_cache.tools.catalog` for cache roots and names, :mod:`logit_cache.tools.cleanup`
for deleting.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import CacheFormatError, UsageError
from ..format.manifest import MANIFEST_NAME, Manifest
from ..format.naming import CACHE_NAME, ROOT_ENV
from ..format.paths import PARTIAL_SUFFIX
from ..io.locks import is_locked
from ..io.lookup import directory_bytes
from ..io.ownership import is_our_manifest, read_work_marker
from ..io.workdir import REPLACED_INFIX

#: ``NAME.replaced-PID``: the old cache an ``--overwrite`` moves aside while it swaps in the new one.
REPLACED = re.compile(re.escape(REPLACED_INFIX) + r"\d+$")
#: ``rm`` takes a key prefix of at least this many characters (and only one that names a single key).
MIN_KEY_PREFIX = 4
#: The bar over a root's entries (``progress=True``) shows only once the scan has taken this long: a
#: small root is listed with no flicker, a large one (or one on a slow file system) says how far it got.
PROGRESS_DELAY = 0.5


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
    #: The manifest's access time (0 when it has none); listing reads it without moving it where it can.
    accessed: float = 0.0

    @property
    def key(self) -> str:
        return self.manifest.key if self.manifest else self.key_hint or "?"

    @property
    def unfinished(self) -> bool:
        """An unfinished dump or conversion (``.partial``), as opposed to a cache, damaged or not."""
        return self.path.name.endswith(PARTIAL_SUFFIX)

    def last_access(self) -> float:
        return self.accessed

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


def finished_dir(path: Path) -> Path:
    """The cache directory an unfinished dump (``NAME.partial``) or a moved-aside cache (``NAME.replaced-PID``)
    belongs to, whose lock guards it; a cache directory itself."""
    name = REPLACED.sub("", path.name.removesuffix(PARTIAL_SUFFIX))
    return path.with_name(name)


def _read_untouched(path: Path) -> bytes:
    """The file's bytes, read without moving its access time where the system allows it (O_NOATIME, for
    files we own): listing is not using a cache, and ``gc --unused-days`` judges use by that time."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0))
    except PermissionError as exc:
        if exc.errno != errno.EPERM:  # EACCES: not readable at all
            raise
        fd = os.open(path, os.O_RDONLY)  # EPERM: O_NOATIME is only for the file's owner
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _inspect(path: Path) -> tuple[Manifest | None, str | None, bool, str | None] | None:
    """(manifest, error, unreadable, key) of a directory under a root, or None when it is not ours (no
    logit-cache manifest and no marker of our unfinished work). Never raises for what it finds."""
    marker = read_work_marker(path) if path.name.endswith(PARTIAL_SUFFIX) else None
    marker_key = str(marker["key"]) if marker and marker.get("key") else None
    try:
        raw = _read_untouched(path / MANIFEST_NAME)
    except FileNotFoundError:
        return (None, None, False, marker_key) if marker is not None else None
    except (PermissionError, IsADirectoryError) as exc:
        if marker is None and not CACHE_NAME.match(path.name) and not os.path.isfile(path / MANIFEST_NAME):
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
        manifest = Manifest.from_dict(data, str(path / MANIFEST_NAME))  # validated as read_manifest does, not read again
    except CacheFormatError as exc:
        return None, str(exc), False, key
    return manifest, None, False, manifest.key


def scan_bar(items: list[Path], root: Path, progress: bool) -> tqdm:
    """A transient bar on stderr over ``items`` (entries of ``root``): only with ``progress``, only on a
    terminal (tqdm's ``disable=None``), and only after :data:`PROGRESS_DELAY` seconds."""
    return tqdm(items, desc=f"reading {root}", unit="dir", leave=False, delay=PROGRESS_DELAY, disable=None if progress else True)


def _access_time(path: Path) -> float:
    try:
        return (path / MANIFEST_NAME).stat().st_atime
    except OSError:
        return 0.0


def list_caches(root: Path, progress: bool = False) -> list[CacheEntry]:
    """Every cache directory and unfinished dump directly under ``root``, sorted by name.

    Only what is ours is listed: a directory with a logit-cache manifest, or a ``.partial`` with our
    marker. Never listed: hidden names (locks, tombstones of deletions), ``NAME.replaced-PID`` (the
    old cache of an interrupted ``--overwrite``), symbolic links, other people's folders. A cache whose
    manifest cannot be read (permissions) is listed as unreadable, never as unfinished.

    Reading every manifest and sizing every directory takes a while on a large root: with ``progress``
    (``ls`` and ``gc`` on a terminal, never for JSON output) a bar on stderr says how far it got.
    """
    if not root.is_dir():
        raise CacheFormatError(f"cache root {root} does not exist (set --cache-root or {ROOT_ENV})")
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        raise CacheFormatError(f"cache root {root} cannot be listed ({exc.strerror or exc}); check its permissions") from exc
    entries = []
    for path in scan_bar(children, root, progress):
        if path.name.startswith(".") or REPLACED.search(path.name) or path.is_symlink():
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
        entries.append(CacheEntry(path, manifest, complete, directory_bytes(path), is_locked(finished_dir(path)), error,
                                  unreadable, key, _access_time(path)))
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

