"""Is there a cache at this location, or only an unfinished dump of one?

A dump or conversion into ``OUT`` works in ``OUT.partial`` and renames it to ``OUT`` once complete
(:mod:`logit_cache.format.paths`); a complete cache's manifest says ``complete: true``. Commands that
are given ``OUT`` ask here whether only the unfinished work exists, to say so instead of "no such
cache" (``info`` shows it, ``verify`` reports it, the reader refuses it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .paths import partial_location, partial_path


def unfinished_work(path: str | Path, exists: Callable[[str | Path], bool] | None = None) -> str | Path | None:
    """``path.partial`` when ``path`` does not exist and that does (an unfinished dump or conversion into
    ``path``); else None. ``exists`` checks a location (default: the local file system; a reader passes
    one that understands fsspec URLs, and then gets the location as a string)."""
    if exists is None:
        local = Path(path)
        return partial_path(local) if not local.exists() and partial_path(local).exists() else None
    work = partial_location(str(path))
    return work if not exists(path) and exists(work) else None


def shown_location(path: Path) -> Path:
    """What ``info`` shows for ``path``: the cache, or the unfinished dump into it when only that exists."""
    work = unfinished_work(path)
    return Path(work) if work is not None else path
