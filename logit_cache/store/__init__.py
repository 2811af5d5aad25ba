"""Storage backends behind one small interface (see :mod:`logit_cache.store.base`).

:data:`BACKENDS` is the registry, and the one source of backend names: the CLI's choices, the
dump's check of ``--backend``, convert and the tests iterate over it. A backend is a
:class:`~logit_cache.store.base.Backend` (a name, a shard suffix, a writer and a reader class)
passed to :func:`register_backend`; Zarr and HDF5 are registered on import, in that order (the
first is the default and the order messages list them in). Shard locations (a local path or an
fsspec URL) are :mod:`.locations`'s job. The ``entropy`` encoding's Zarr v3 codecs are
:mod:`.entropy_codec`'s, registered with zarr on import.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import ArraySpec, Backend, ShardReader, ShardWriter, combine_checksum
from .entropy_codec import CODECS, register_codecs
from .hdf5_store import HDF5Backend
from .locations import URLPath, as_location, is_url, url_filesystem
from .zarr_store import ZarrBackend

register_codecs()  # zarr also finds them through the zarr.codecs entry points, without this import

#: Every registered backend, by name, in registration order.
BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) ``backend`` under its name; returns it."""
    if not getattr(backend, "name", ""):
        raise UsageError("a storage backend needs a name")
    BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, in registration order."""
    return tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` ("zarr" or "hdf5")."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown storage format {name!r}; choose one of {', '.join(BACKENDS)}") from None


for _backend in (ZarrBackend(), HDF5Backend()):
    register_backend(_backend)

#: The backend a dump writes when not told (``DumpConfig.backend``, ``--format``).
DEFAULT_BACKEND = ZarrBackend.name

__all__ = [
    "BACKENDS",
    "CODECS",
    "DEFAULT_BACKEND",
    "ArraySpec",
    "Backend",
    "ShardReader",
    "ShardWriter",
    "URLPath",
    "as_location",
    "backend_names",
    "combine_checksum",
    "get_backend",
    "is_url",
    "register_backend",
    "register_codecs",
    "url_filesystem",
]
