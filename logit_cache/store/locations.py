"""Where a cache or shard is: a local path or an fsspec URL (reading only).

A cache may be read from an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``...):
:func:`is_url` tells URLs from local paths, :class:`URLPath` joins them like a :class:`Path`,
:func:`as_location` makes either from what the user gave, and :func:`url_filesystem` imports fsspec
only then, turning a missing package into a clear error. Split from ``base.py`` (the backend
interface), which re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import MissingPackageError, UsageError

#: ``protocol://...`` or a chained ``protocol::...`` URL (fsspec's syntax); anything else is a local path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def is_url(location: Any) -> bool:
    """Whether ``location`` is an fsspec URL (a ``str`` with a protocol); a :class:`Path` is always local."""
    return isinstance(location, str) and bool(_URL.match(location))


class URLPath(str):
    """A location given as an fsspec URL: a string (messages show the URL) that joins with ``/`` like a Path."""

    __slots__ = ()

    def __truediv__(self, name: str | Path) -> URLPath:
        return URLPath(f"{self.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> URLPath:
        return URLPath(self.rstrip("/").rsplit("/", 1)[0])


def as_location(location: str | Path, storage_options: Mapping[str, Any] | None = None) -> Path | URLPath:
    """``location`` as a :class:`URLPath` (a URL) or a :class:`Path`; ``storage_options`` apply only to URLs."""
    if is_url(location):
        stripped = location.rstrip("/")
        return URLPath(location if stripped.endswith(":") else stripped)  # "s3://b/cache/" -> "s3://b/cache"
    if storage_options:
        raise UsageError(f"{location}: storage_options apply to fsspec URLs (s3://, gs://, memory://, file://...), not to a local path")
    return Path(location)


def _protocols(url: str) -> list[str]:
    """The protocols of a (possibly chained) URL, outermost first: ``simplecache::s3://b/k`` -> simplecache, s3."""
    return [part.split("://", 1)[0] if "://" in part else part for part in url.split("::")]


def url_filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and the path within it of ``url``: ``fsspec.core.url_to_fs(url, **storage_options)``.

    fsspec is imported here, only when a URL is read. A missing fsspec, or a missing implementation
    of the URL's protocol (s3fs for ``s3://``, gcsfs for ``gs://``...), raises
    :class:`MissingPackageError` naming the package to install.
    """
    try:
        import fsspec
        import fsspec.core
        from fsspec.registry import known_implementations
    except ImportError as exc:
        raise MissingPackageError(
            f"{url}: reading a cache from a URL needs the fsspec package, which is not installed: pip install fsspec "
            f"(plus the package of the URL's protocol, such as s3fs for s3:// or gcsfs for gs://)"
        ) from exc
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        for protocol in _protocols(url):
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError:
                known = known_implementations.get(protocol, {})
                package = str(known.get("class", "")).split(".")[0]
                install = f"pip install {package}" if package and package != "fsspec" else "install the packages it names"
                raise MissingPackageError(
                    f"{url}: fsspec cannot read {protocol}:// URLs here: {exc}; {install} (fsspec's implementation of {protocol}://)"
                ) from exc
            except ValueError:
                continue
        raise MissingPackageError(f"{url}: fsspec cannot open this URL, a package it needs is missing: {exc}") from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise UsageError(
                f"{url}: fsspec knows no protocol {', '.join(_protocols(url))!r} ({exc}); use a protocol fsspec knows "
                f"(s3://, gs://, memory://, file://...) or a local path"
            ) from exc
        raise
