"""HDF5 backend: one file per shard, one chunked, resizable dataset per logical array.

Stored uncompressed: HDF5's built-in gzip runs at 30 to 50 MB/s (too slow for the writer), and
Blosc/Zstd would need the hdf5plugin package in every reader. Any h5py user reads a shard with
``h5py.File(path)["topk_logits"][...]``. Handles are opened lazily, so a reader created before a
DataLoader forks is safe (each worker opens its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CorruptShardError
from .base import ArraySpec, Backend, ShardReader, ShardWriter


class HDF5ShardWriter(ShardWriter):
    def __init__(
        self, path: Path, specs: list[ArraySpec], chunk_rows: int, attrs: Mapping[str, Any], rows: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(path, specs, chunk_rows, attrs, rows)
        self._file = h5py.File(path, "w-", track_order=False)
        for key, value in attrs.items():
            self._file.attrs[key] = value
        for spec in specs:
            self._file.create_dataset(
                spec.name,
                shape=(self.initial_rows[spec.name], *spec.row_shape),
                maxshape=(None, *spec.row_shape),
                chunks=(self.chunk_rows[spec.name], *spec.row_shape),
                dtype=spec.dtype,
                track_times=False,
            )

    def _write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        dataset = self._file[name]
        if start + len(data) > dataset.shape[0]:
            dataset.resize(start + len(data), axis=0)
        dataset[start : start + len(data)] = data

    def _resize(self, name: str, rows: int) -> None:
        self._file[name].resize(rows, axis=0)

    def _close(self) -> None:
        self._file.close()


class HDF5ShardReader(ShardReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: h5py.File | None = None
        self._names = sorted(self._handle().keys())

    def _handle(self) -> h5py.File:
        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except Exception as exc:
                raise CorruptShardError(f"{self.path}: cannot be opened as an HDF5 file ({exc}); the shard is missing or damaged") from exc
        return self._file

    def names(self) -> list[str]:
        return self._names

    def _array(self, name: str) -> Any:
        return self._handle()[name]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles must not cross a fork or a pickle: reopen on first use.
        state = self.__dict__.copy()
        state["_file"] = None
        return state


class HDF5Backend(Backend):
    name = "hdf5"
    suffix = ".h5"
    writer_class = HDF5ShardWriter
    reader_class = HDF5ShardReader
