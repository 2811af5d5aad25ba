"""Finding a cache under a root by its key, and measuring a cache on disk.

Here (below the dump and the tools) because the dump looks for a complete cache of its key before
computing, and the dump, ``convert`` and the catalog report sizes; :mod:`logit_cache.tools.catalog`
re-exports both under their old names.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..format.naming import names_cache_of


def find_by_key(root: Path, key: str, backend: str) -> Path | None:
    """The ``backend`` cache of ``key`` under ``root`` (complete or not), whatever the rest of its name.
    Hidden names (tombstones of deletions, locks) and symbolic links are never it."""
    if not root.is_dir():
        return None
    matches = sorted(p for p in root.iterdir()
                     if names_cache_of(p.name, key, backend) and not p.name.startswith(".") and not p.is_symlink() and p.is_dir())
    return matches[0] if matches else None


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
