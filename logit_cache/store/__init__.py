"""Storage backends behind one small interface (see :mod:`logit_cache.store.base`)."""

from __future__ import annotations

from ..errors import UsageError
from .base import ArraySpec, Backend, ShardReader, ShardWriter, combine_checksum
from .hdf5_store import HDF5Backend
from .zarr_store import ZarrBackend

BACKENDS: dict[str, Backend] = {"zarr": ZarrBackend(), "hdf5": HDF5Backend()}


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` ("zarr" or "hdf5")."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown storage format {name!r}; choose one of {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "ArraySpec", "Backend", "ShardReader", "ShardWriter", "combine_checksum", "get_backend"]
