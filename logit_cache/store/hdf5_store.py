"""HDF5 backend: one file per shard, one chunked, resizable dataset per logical array.

Stored uncompressed: HDF5's built-in gzip runs at 30 to 50 MB/s (too slow for the writer), and
Blosc/Zstd would need the hdf5plugin package in every reader. Any h5py user reads a shard with
``h5py.File(path)["topk_logits"][...]``. Handles are opened lazily, so a reader created before a
DataLoader forks is safe (each worker opens its own).

Integrity: every dataset has HDF5's built-in ``fletcher32`` filter (a checksum per chunk, checked by
HDF5 on every read, for any h5py reader, no plugin needed); a chunk that is not allocated in the file
is refused by the reader instead of being read as the fill value.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CorruptShardError
from .base import ArraySpec, Backend, ShardReader, ShardWriter
from .locations import URLPath, is_url, url_filesystem

log = logging.getLogger(__name__)


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
                fletcher32=True,  # a checksum per chunk, checked on read
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
    """A shard opened read-only: ``h5py.File(path, "r")``, which writes nothing to the file.

    File locking: HDF5 takes a shared ``flock`` on files opened for reading, which needs no write
    access (it works on a read-only file, mount or user). Where the filesystem refuses locks
    (``ENOSYS``/``ENOLCK``: some NFS and FUSE mounts), the file is reopened with ``locking=False``:
    a complete shard is never modified, so a reader loses nothing by not locking. A conflicting
    lock (``EAGAIN``: another process has the file open for writing) is not overridden.
    ``HDF5_USE_FILE_LOCKING`` still applies as HDF5 documents it.

    A :class:`URLPath` is read through fsspec: ``h5py.File(fs.open(path, "rb"), "r")`` (h5py's
    file-object driver; every read is a ranged read of the remote file).
    """

    def __init__(self, path: Path | URLPath, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._file: h5py.File | None = None
        self._source: Any = None  # the fsspec file object under a remote shard's h5py.File
        self._missing = {}
        self._names = sorted(self._handle().keys())

    def _handle(self) -> h5py.File:
        if self._file is None:
            fs, inner = url_filesystem(self.path, self.storage_options) if is_url(self.path) else (None, None)
            try:
                if fs is not None:
                    self._source = fs.open(inner, "rb")
                    self._file = h5py.File(self._source, "r")
                else:
                    self._file = _open_read_only(self.path)
            except Exception as exc:
                self.close()
                raise CorruptShardError(f"{self.path}: cannot be opened as an HDF5 file ({exc}); the shard is missing or damaged") from exc
        return self._file

    def names(self) -> list[str]:
        return self._names

    def attrs(self) -> dict[str, Any]:
        return {key: value.item() if isinstance(value, np.generic) else value for key, value in self._handle().attrs.items()}

    def checksummed(self, name: str) -> bool:
        return bool(self._lookup(name).fletcher32)

    def _stored_chunks(self, name: str) -> set[int]:
        """Row-chunk indices of the chunks allocated in the file (from the chunk index, no data read)."""
        dataset = self._lookup(name)
        chunk, count = int(dataset.chunks[0]), dataset.id.get_num_chunks()
        return {int(dataset.id.get_chunk_info(i).chunk_offset[0]) // chunk for i in range(count)}

    def _array(self, name: str) -> Any:
        return self._handle()[name]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._source is not None:
            self._source.close()
            self._source = None

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles (and the fsspec file under a remote one) must not cross a fork or a pickle: reopen on first use.
        state = self.__dict__.copy()
        state["_file"] = None
        state["_source"] = None
        return state


def _open_read_only(path: Path) -> h5py.File:
    """``h5py.File(path, "r")``; without file locking where the filesystem does not support locks."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        message = str(exc)
        code = re.search(r"errno = (\d+)", message)
        if "unable to lock file" not in message.lower() or (code is not None and int(code.group(1)) == errno.EAGAIN):
            raise
        log.info("%s: the filesystem refuses file locks (%s); reading without locking (a complete shard never changes)", path, message)
        return h5py.File(path, "r", locking=False)


class HDF5Backend(Backend):
    name = "hdf5"
    suffix = ".h5"
    writer_class = HDF5ShardWriter
    reader_class = HDF5ShardReader
