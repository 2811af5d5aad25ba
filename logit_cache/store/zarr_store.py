"""Zarr v3 backend: one group per shard, one array per logical array.

Top-k arrays are compressed with Blosc-zstd level 1 and bit-shuffle (1.4x to 1.7x smaller, cheap
to decode); full logits are stored uncompressed because fp16 logits barely compress (1.09x,
DESIGN.md section 6) and the CPU is better spent elsewhere. Writes arrive in whole chunks (the base
class buffers), since partial-chunk writes are read-modify-write in zarr.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import CorruptShardError
from .base import ArraySpec, Backend, ShardReader, ShardWriter, URLPath, is_url, url_filesystem


def _compressors(spec: ArraySpec) -> Any:
    if not spec.compress:
        return None
    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=np.dtype(spec.dtype).itemsize)


class ZarrShardWriter(ShardWriter):
    def __init__(
        self, path: Path, specs: list[ArraySpec], chunk_rows: int, attrs: Mapping[str, Any], rows: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(path, specs, chunk_rows, attrs, rows)
        self._group = zarr.open_group(str(path), mode="w-", attributes=dict(attrs), zarr_format=3)
        self._arrays = {
            spec.name: self._group.create_array(
                spec.name,
                shape=(self.initial_rows[spec.name], *spec.row_shape),
                chunks=(self.chunk_rows[spec.name], *spec.row_shape),
                dtype=spec.dtype,
                compressors=_compressors(spec),
                fill_value=0,
            )
            for spec in specs
        }

    def _write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        array = self._arrays[name]
        if start + len(data) > array.shape[0]:
            array.resize((start + len(data), *array.shape[1:]))
        array[start : start + len(data)] = data

    def _resize(self, name: str, rows: int) -> None:
        array = self._arrays[name]
        array.resize((rows, *array.shape[1:]))

    def _close(self) -> None:
        self._arrays.clear()


class ZarrShardReader(ShardReader):
    """A shard opened read-only (``mode="r"``: zarr's store is read-only and nothing is written).

    A :class:`URLPath` is opened through fsspec: ``zarr.open_group(url, mode="r", storage_options=...)``
    (zarr builds an ``FsspecStore`` from the URL, wrapping a synchronous filesystem for its async API).
    """

    def __init__(self, path: Path | URLPath, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = path
        remote: dict[str, Any] = {}
        if is_url(path):
            url_filesystem(path, storage_options)  # a missing fsspec or protocol package: a clear error, not a damaged shard
            remote = {"storage_options": dict(storage_options or {})}
        try:
            self._group = zarr.open_group(str(path), mode="r", zarr_format=3, **remote)
            self._names = sorted(self._group.array_keys())
        except Exception as exc:
            raise CorruptShardError(f"{path}: cannot be opened as a Zarr v3 group ({exc!r}); the shard is missing or damaged") from exc
        self._arrays: dict[str, Any] = {}

    def names(self) -> list[str]:
        return self._names

    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]


class ZarrBackend(Backend):
    name = "zarr"
    suffix = ".zarr"
    writer_class = ZarrShardWriter
    reader_class = ZarrShardReader
