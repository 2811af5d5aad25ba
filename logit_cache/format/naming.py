"""Names of caches under a cache root: ``<readable part>--<key>``.

A **cache root** is a directory (``--cache-root`` or ``$LOGIT_CACHE_ROOT``) holding caches named
``<readable part>--<key>``: the readable part says what is inside (dataset, target kind, dtype, views,
backend), the key (:mod:`logit_cache.format.identity`) is what identifies it. Only the key is ever
matched when a cache is looked up; the readable part is for people.

Here (in ``format``, below the dump and the tools) because the dump names caches and the catalog
finds them by these rules; :mod:`logit_cache.tools.catalog` re-exports the names it used to define.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..targets import get_kind
from .paths import PARTIAL_SUFFIX

#: The environment variable naming the default cache root.
ROOT_ENV = "LOGIT_CACHE_ROOT"
#: Between the readable part of a name and the key.
KEY_SEPARATOR = "--"
#: What a cache root's directories are called by dumps: ``<readable>--<key>`` (and ``.partial``).
CACHE_NAME = re.compile(r"^.+" + KEY_SEPARATOR + r"[0-9a-f]{8,64}(" + re.escape(PARTIAL_SUFFIX) + ")?$")


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.")[:limit] or "cache"


def readable_name(dataset_spec: str, dataset_kwargs: dict[str, Any], mode: str, k: int | None, dtype: str, views: int,
                  backend: str) -> str:
    """What a cache holds, for humans: ``digits-split=train--top5-float16-zarr`` (the key follows).

    ``k`` is the kind's width (k or m); the target kind names itself (``top5``, ``sample50``, ``full``)."""
    data = Path(dataset_spec.split(":")[-1]).name if ":" in dataset_spec else dataset_spec
    args = ",".join(f"{key}={value}" for key, value in sorted(dataset_kwargs.items()))
    content = get_kind(mode).label(k) + f"-{dtype}" + (f"-v{views}" if views > 1 else "")
    return f"{_slug(data + ('-' + args if args else ''))}{KEY_SEPARATOR}{content}-{backend}"


def cache_dir_name(readable: str, key: str) -> str:
    """The directory name of the cache of ``key`` under a root."""
    return f"{readable}{KEY_SEPARATOR}{key}"


def names_cache_of(name: str, key: str, backend: str) -> bool:
    """Whether ``name`` is the directory name a dump gives the ``backend`` cache of ``key`` (whatever its readable part)."""
    return name.endswith(f"-{backend}{cache_dir_name('', key)}")
