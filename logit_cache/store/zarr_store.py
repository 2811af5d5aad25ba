"""Zarr v3 backend: one group per shard, one array per logical array.

Top-k arrays are compressed with Blosc-zstd level 1 and bit-shuffle (1.4x to 1.7x smaller, cheap
to decode); full logits are stored uncompressed because fp16 logits barely compress (1.09x,
DESIGN.md section 6) and the CPU is better spent elsewhere. Writes arrive in whole chunks (the base
class buffers), since partial-chunk writes are read-modify-write in zarr.

Integrity: every array ends its codec pipeline with ``crc32c`` (a core Zarr v3 codec; zarr checks it
on every decode, for any reader), and is created with ``write_empty_chunks`` so that every chunk is
stored, even one equal to the fill value: a chunk missing from storage is then damage, refused by the
reader (zarr itself would return the fill value). crc32c costs 4 bytes per chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import collect_aiterator

from ..errors import CorruptShardError
from .base import ArraySpec, Backend, ShardReader, ShardWriter
from .entropy_codec import LOSSY_CODECS, make_codec
from .locations import URLPath, is_url, url_filesystem


def _compressors(spec: ArraySpec) -> tuple[Any, ...]:
    """The bytes-to-bytes codecs of an array: Blosc when compressed, then always the chunk's crc32c
    (an entropy-coded array's bytes do not compress further: crc32c alone)."""
    if not spec.compress or spec.codec:
        return (Crc32cCodec(),)
    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=np.dtype(spec.dtype).itemsize), Crc32cCodec()


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
                serializer=make_codec(spec.codec, spec.codec_config) if spec.codec else "auto",
                fill_value=0,
                config={"write_empty_chunks": True},  # every chunk stored: an absent one is damage
            )
            for spec in specs
        }
        self._read_back = {spec.name for spec in specs if spec.codec in LOSSY_CODECS}

    def _write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        array = self._arrays[name]
        if start + len(data) > array.shape[0]:
            array.resize((start + len(data), *array.shape[1:]))
        array[start : start + len(data)] = data

    def _read_rows(self, name: str, start: int, rows: int) -> np.ndarray:
        return self._arrays[name][start : start + rows]

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
        self._missing = {}

    def names(self) -> list[str]:
        return self._names

    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    def checksummed(self, name: str) -> bool:
        return any(isinstance(codec, Crc32cCodec) for codec in self._lookup(name).metadata.codecs)

    def _stored_chunks(self, name: str) -> set[int]:
        """Row-chunk indices whose chunk key is in the store: one listing of the array's prefix."""
        array = self._lookup(name)
        prefix = array.store_path.path
        keys = set(collect_aiterator(array.store_path.store.list_prefix(f"{prefix}/" if prefix else "")))
        rest = (0,) * (array.ndim - 1)  # rows are chunked, a row never is
        rows, chunk = int(array.shape[0]), int(array.chunks[0])
        joined = (lambda key: f"{prefix}/{key}") if prefix else (lambda key: key)
        return {i for i in range(-(-rows // chunk)) if joined(array.metadata.encode_chunk_key((i, *rest))) in keys}

    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]


class ZarrBackend(Backend):
    name = "zarr"
    suffix = ".zarr"
    supports_codecs = True
    writer_class = ZarrShardWriter
    reader_class = ZarrShardReader
