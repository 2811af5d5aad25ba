"""What is ours: the only directories ``rm``, ``gc``, ``--overwrite`` and ``convert`` may delete, and how
they delete them.

A dump or conversion marks its ``OUT.partial`` with :data:`WORK_MARKER` the moment it creates it; a
cache proves itself ours by its manifest. Anything else (a folder named ``thesis.partial``, a browser
extension's ``manifest.json``) is refused. Deletion goes through a hidden tombstone, so an
interruption leaves nothing under the deleted name.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError
from ..format.manifest import MANIFEST_NAME, is_json_temp, write_json_atomic
from ..format.paths import PARTIAL_SUFFIX

#: A small JSON file a dump or conversion writes into its ``OUT.partial`` as soon as it creates it:
#: proof that the directory is logit-cache's unfinished work (a folder named ``thesis.partial`` is not).
#: It is removed just before ``OUT.partial`` is renamed to ``OUT`` (by then the complete manifest proves it).
WORK_MARKER = ".logit-cache-work.json"
WORK_MARKER_TOOL = "logit-cache"
#: Fields a logit-cache manifest always has (any format version): a ``manifest.json`` without them is someone else's.
OUR_MANIFEST_FIELDS = frozenset({"format_version", "backend", "mode", "key", "shards", "complete", "teacher", "dataset"})
#: What a directory is renamed to while it is deleted: hidden, and matching no cache name or key lookup.
TOMBSTONE_INFIX = ".logit-cache-deleting-"


def write_work_marker(work: Path, key: str, backend: str, writer: str) -> None:
    """Mark ``work`` (an ``OUT.partial`` just created) as logit-cache's own, naming the cache it will become."""
    write_json_atomic(work / WORK_MARKER, {"tool": WORK_MARKER_TOOL, "writer": writer, "key": key, "backend": backend,
                                           "cache": work.name.removesuffix(PARTIAL_SUFFIX)})


def read_work_marker(work: Path) -> dict[str, Any] | None:
    """The marker's record if ``work`` holds a valid one, else None (missing, unreadable, or not ours)."""
    try:
        data = json.loads((work / WORK_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == WORK_MARKER_TOOL else None


def is_our_manifest(data: Any) -> bool:
    """Whether parsed ``manifest.json`` content is a logit-cache manifest (of any version, damaged or not):
    a JSON object with an integer ``format_version`` and our fields. A browser extension's
    ``{"manifest_version": 3, ...}`` is not."""
    return isinstance(data, dict) and isinstance(data.get("format_version"), int) and data.keys() >= OUR_MANIFEST_FIELDS


def why_not_ours(path: Path) -> str | None:
    """None if ``path`` is provably a logit-cache directory (a cache, an unfinished dump or conversion),
    else why not, for a message. Provably ours: a ``manifest.json`` that :func:`is_our_manifest`, or an
    ``OUT.partial`` holding our :data:`WORK_MARKER`. A manifest that cannot be read proves nothing."""
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a directory" if path.exists() else "it does not exist"
    if path.name.endswith(PARTIAL_SUFFIX) and read_work_marker(path) is not None:
        return None
    manifest = path / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_bytes())
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}, and no {WORK_MARKER} of an unfinished logit-cache dump"
    except PermissionError as exc:
        return f"its {MANIFEST_NAME} cannot be read ({exc.strerror}), so it cannot be told apart from someone else's"
    except OSError as exc:
        return f"its {MANIFEST_NAME} cannot be read ({exc})"
    except ValueError:
        return f"its {MANIFEST_NAME} is not valid JSON, so it cannot be told apart from someone else's"
    if not is_our_manifest(data):
        return f"its {MANIFEST_NAME} is not a logit-cache manifest (no format_version, key, shards...)"
    return None


def is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def refuse_unless_ours(path: Path, not_what: str, then: str) -> None:
    """Raise :class:`OutputExistsError` ``"{path} {not_what} ({why}); {then}"`` unless ``path`` is an empty
    directory or provably ours (:func:`why_not_ours`): what every overwrite, resume and convert asks
    before it may delete or write into a directory that is already there."""
    why = None if is_empty_dir(path) else why_not_ours(path)
    if why is not None:
        raise OutputExistsError(f"{path} {not_what} ({why}); {then}")


def tombstone_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for it to be deleted under (see :func:`discard_dir`)."""
    return path.with_name(f".{path.name}{TOMBSTONE_INFIX}{os.getpid()}-{secrets.token_hex(3)}")


def is_tombstone(name: str) -> bool:
    return name.startswith(".") and TOMBSTONE_INFIX in name


def rmtree_tolerant(path: Path) -> None:
    """Delete a directory tree; what vanished meanwhile (another gc finishing the same tombstone) is fine."""

    def onerror(func: Any, failed: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


def discard_dir(path: Path) -> None:
    """Delete directory ``path`` so that an interruption (kill -9, power loss) leaves nothing under its
    name: first rename it to a hidden tombstone (atomic), then delete the tombstone. A tombstone left
    by a kill holds no cache anyone can find; ``gc`` deletes it."""
    tomb = tombstone_path(path)
    os.rename(path, tomb)
    rmtree_tolerant(tomb)


def remove_stray_temps(directory: Path) -> list[Path]:
    """Delete temporary files of :func:`write_json_atomic` that a killed writer left in ``directory``."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if is_json_temp(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed
