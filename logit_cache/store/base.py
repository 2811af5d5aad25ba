"""The small interface every storage backend implements, and what they share.

A backend knows how to create a shard (one Zarr group or one HDF5 file) holding named 2-D or 1-D
arrays that grow by rows, and how to open one for reading. Buffering to whole chunks and the
shard checksum live here, once, so both backends write the same bytes in the same order and a
cache's checksums do not depend on the backend or the chunking.

Checksum: for each array, SHA-256 over its C-order bytes as stored, in row order; the shard
checksum is SHA-256 over ``name:dtype:shape:digest;`` for the arrays sorted by name, written as
``"sha256:<hex>"``. It is computed while writing (no read-back) and recomputed by re-reading.

Damage is found as the bytes are read, not only by ``verify``: every chunk carries a checksum of its
stored bytes (Zarr v3's ``crc32c`` codec, last in each array's codec pipeline; HDF5's built-in
``fletcher32`` filter), checked by the library that decodes it, so any Zarr or h5py reader checks it
too. Every chunk of such an array is written (Zarr: ``write_empty_chunks``), so a chunk that is not in
storage is damage: :meth:`ShardReader.read` refuses it instead of returning the fill value. Shards
written before chunk checksums existed read as before, unchecked.

Reading is read-only: readers open Zarr groups and HDF5 files with mode ``"r"`` and write nothing.
A cache may also be read from an fsspec URL: where a shard is (a local path or a URL) is
``locations.py``'s, re-exported here for the backends and older imports.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheFormatError, CorruptShardError, MissingPackageError, UsageError
from .locations import URLPath, as_location, is_url, url_filesystem  # moved to store/locations.py

__all__ = [
    "READ_BLOCK_ROWS",
    "ArraySpec",
    "Backend",
    "ShardReader",
    "ShardWriter",
    "URLPath",
    "as_location",
    "combine_checksum",
    "is_url",
    "url_filesystem",
]

#: Rows read per call when streaming an array (checksums, concatenation).
READ_BLOCK_ROWS = 1 << 16


@dataclass(frozen=True)
class ArraySpec:
    """One array of a shard: its dtype, the shape of one row, and whether it has a row per cache
    row (``per="row"``), per sample (``"sample"``) or is an offsets array (``"offsets"``)."""

    name: str
    dtype: str
    row_shape: tuple[int, ...] = ()
    per: str = "row"
    compress: bool = False
    #: Rows per chunk for this array, when it differs from the shard's (e.g. narrow per-sample labels).
    chunk_rows: int | None = None
    #: An entropy codec that replaces the array's bytes serializer (``entropy_codec.CODECS``: the
    #: ``entropy`` encoding), with its configuration as (key, value) pairs; Zarr only.
    codec: str | None = None
    codec_config: tuple[tuple[str, Any], ...] = ()

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape), "per": self.per}


def combine_checksum(parts: Mapping[str, tuple[str, tuple[int, ...], str]]) -> str:
    """Shard checksum from per-array ``(dtype, shape, sha256 hex)``."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        dtype, shape, hexdigest = parts[name]
        digest.update(f"{name}:{dtype}:{list(shape)}:{hexdigest};".encode())
    return "sha256:" + digest.hexdigest()


class ShardReader(ABC):
    """Read access to one shard's arrays. Use as a context manager so file handles close.

    Subclasses take ``(path, storage_options=None)``: ``path`` is local, or a :class:`URLPath`
    read through fsspec with ``storage_options``. Nothing is ever written.
    """

    path: Path | URLPath
    #: Per array, the chunks missing from storage (filled in on the first read; subclasses set it to {}).
    _missing: dict[str, frozenset[int]]

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def _array(self, name: str) -> Any:
        """The backend's array object (supports ``.shape``, ``.dtype`` and row slicing)."""

    def close(self) -> None:
        """Release file handles (HDF5); a no-op where there are none."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lookup(self, name: str) -> Any:
        if name not in self.names():
            raise CacheFormatError(f"{self.path}: has no array {name!r} (it holds {', '.join(sorted(self.names()))})")
        return self._array(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._lookup(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._lookup(name).dtype)

    def attrs(self) -> dict[str, Any]:
        """The shard's attributes (as written at creation: key, shard_index, row_start, sample_start)."""
        return {}

    def checksummed(self, name: str) -> bool:
        """Whether the chunks of array ``name`` carry checksums, checked as they are decoded."""
        return False

    def _stored_chunks(self, name: str) -> set[int] | None:
        """Indices (along rows) of the chunks of ``name`` present in storage; None when it cannot be told."""
        return None

    def _damaged(self, name: str, what: str) -> CorruptShardError:
        return CorruptShardError(
            f"{self.path}: array {name!r} {what}; the shard is damaged: run `logit-cache verify {self.path.parent}` "
            f"to see what else is, and dump the cache again"
        )

    def _check_present(self, name: str, array: Any, start: int | None, stop: int | None) -> None:
        """Refuse a read of chunks missing from storage (which zarr and HDF5 fill with the fill value).

        Only for checksummed arrays: their writer stores every chunk, so an absent one is damage. The
        listing is taken once per array and reader (one directory listing).
        """
        missing = self._missing.get(name)
        if missing is None:
            stored = self._stored_chunks(name) if self.checksummed(name) else None
            count = -(-int(array.shape[0]) // self.chunk_rows(name))
            missing = self._missing[name] = frozenset() if stored is None else frozenset(set(range(count)) - stored)
        if not missing:  # the usual case: one dict lookup per read
            return
        rows, chunk = int(array.shape[0]), self.chunk_rows(name)
        first, last, _ = slice(start, stop).indices(rows)
        hit = sorted(i for i in missing if i * chunk < last and (i + 1) * chunk > first)
        if hit:
            shown = ", ".join(f"{i} (rows {i * chunk}:{min(rows, (i + 1) * chunk)})" for i in hit[:5])
            raise self._damaged(name, f"chunk {shown} is missing from storage ({len(missing)} of the array's chunks are); "
                                      f"it would read back as the fill value, not as what was written")

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of an array as numpy; missing chunks and decode failures (a chunk checksum
        that does not match) raise :class:`CorruptShardError` naming the shard, array and rows."""
        array = self._lookup(name)
        self._check_present(name, array, start, stop)
        try:
            return np.asarray(array[slice(start, stop)])
        except MissingPackageError:  # an entropy codec without its coder library: not damage
            raise
        except Exception as exc:
            rows, chunk = int(array.shape[0]), self.chunk_rows(name)
            first, last, _ = slice(start, stop).indices(rows)
            low, high = first // chunk, max(first, last - 1) // chunk
            bad = next((i for i in range(low, high + 1) if not self._readable(array, i * chunk, (i + 1) * chunk)), None) \
                if high > low else low
            where = f"chunk {bad} (rows {bad * chunk}:{min(rows, (bad + 1) * chunk)})" if bad is not None else f"rows {first}:{last}"
            why = "it fails its checksum or does not decode" if self.checksummed(name) else "it does not decode"
            raise self._damaged(name, f"{where} cannot be read: {why} ({exc!r})") from exc

    @staticmethod
    def _readable(array: Any, start: int, stop: int) -> bool:
        try:
            array[start:stop]
        except Exception:
            return False
        return True

    def chunk_rows(self, name: str) -> int:
        """Rows per stored chunk of an array: the cheapest unit to read (a whole array if unchunked)."""
        array = self._lookup(name)
        chunks = getattr(array, "chunks", None)
        return int(chunks[0]) if chunks else max(1, int(array.shape[0]))

    def blocks(self, name: str, block_rows: int = READ_BLOCK_ROWS) -> Iterator[np.ndarray]:
        rows = self.shape(name)[0]
        for start in range(0, rows, block_rows):
            yield self.read(name, start, min(rows, start + block_rows))

    def checksum(self, observe: Callable[[str, int, np.ndarray], None] | None = None) -> str:
        """Recompute the shard checksum by re-reading every array; ``observe(name, first_row, block)``,
        when given, sees every block read (``verify`` checks value ranges in the same pass)."""
        parts = {}
        for name in self.names():
            digest = hashlib.sha256()
            for index, block in enumerate(self.blocks(name)):
                digest.update(np.ascontiguousarray(block).tobytes())
                if observe is not None:
                    observe(name, index * READ_BLOCK_ROWS, block)
            parts[name] = (self.dtype(name).name, self.shape(name), digest.hexdigest())
        return combine_checksum(parts)


class ShardWriter(ABC):
    """Appends rows to a shard's arrays, buffered to whole chunks, hashing as it goes."""

    def __init__(
        self, path: Path, specs: list[ArraySpec], chunk_rows: int, attrs: Mapping[str, Any], rows: Mapping[str, int] | None = None
    ) -> None:
        """Subclasses create the shard's arrays (``attrs`` become its attributes) after this runs."""
        self.path = path
        self.specs = {spec.name: spec for spec in specs}
        self.chunk_rows = {spec.name: spec.chunk_rows or chunk_rows for spec in specs}
        #: Rows each array is created with: the shard's planned size when known, so writes need no
        #: resize (a Zarr resize rewrites the array's metadata file); arrays grow past it if needed.
        self.initial_rows = {name: int((rows or {}).get(name, 0)) for name in self.specs}
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in self.specs}
        self._pending_rows = dict.fromkeys(self.specs, 0)
        self._written = dict.fromkeys(self.specs, 0)
        self._digests = {name: hashlib.sha256() for name in self.specs}
        #: Arrays whose codec is lossy: their checksum is over the rows as they read back (what verify
        #: and readers see), taken from storage after each write instead of from the rows given.
        self._read_back: set[str] = set()

    @abstractmethod
    def _write_rows(self, name: str, start: int, data: np.ndarray) -> None:
        """Store ``data`` at row ``start`` of array ``name``, growing it first if it is too short."""

    @abstractmethod
    def _resize(self, name: str, rows: int) -> None:
        """Set array ``name``'s row count (used at close if fewer rows came than planned)."""

    @abstractmethod
    def _close(self) -> None: ...

    def _read_rows(self, name: str, start: int, rows: int) -> np.ndarray:
        """Rows ``start:start+rows`` of array ``name`` as stored (only backends with lossy codecs need it)."""
        raise NotImplementedError(f"{type(self).__name__} stores no array through a lossy codec")

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Append rows to some or all arrays; dtypes and row shapes must match the specs."""
        for name, data in arrays.items():
            spec = self.specs.get(name)
            if spec is None:
                raise CacheFormatError(f"{self.path}: no array {name!r} was declared for this shard")
            data = np.ascontiguousarray(data)
            if data.dtype != np.dtype(spec.dtype) or data.shape[1:] != spec.row_shape:
                raise CacheFormatError(
                    f"{self.path}: array {name!r} expects rows of shape {spec.row_shape} and dtype {spec.dtype}, "
                    f"got {data.shape[1:]} {data.dtype}"
                )
            if len(data) == 0:
                continue
            if name not in self._read_back:
                self._digests[name].update(data.tobytes())
            self._pending[name].append(data)
            self._pending_rows[name] += len(data)
            if self._pending_rows[name] >= self.chunk_rows[name]:
                self._flush(name, whole_chunks_only=True)

    def _flush(self, name: str, whole_chunks_only: bool) -> None:
        rows = self._pending_rows[name]
        if rows == 0:
            return
        buffered = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else self._pending[name][0]
        chunk = self.chunk_rows[name]
        take = (rows // chunk) * chunk if whole_chunks_only else rows
        if take == 0:
            return
        self._write_rows(name, self._written[name], buffered[:take])
        if name in self._read_back:
            self._digests[name].update(np.ascontiguousarray(self._read_rows(name, self._written[name], take)).tobytes())
        self._written[name] += take
        rest = buffered[take:]
        self._pending[name] = [rest] if len(rest) else []
        self._pending_rows[name] = len(rest)

    def rows_written(self, name: str) -> int:
        return self._written[name] + self._pending_rows[name]

    def close(self) -> str:
        """Flush what is buffered, close, and return the shard checksum."""
        for name in self.specs:
            self._flush(name, whole_chunks_only=False)
            if self._written[name] < self.initial_rows[name]:
                self._resize(name, self._written[name])
        self._close()
        return combine_checksum(
            {
                name: (np.dtype(spec.dtype).name, (self._written[name], *spec.row_shape), self._digests[name].hexdigest())
                for name, spec in self.specs.items()
            }
        )


class Backend:
    """A storage backend: a name, a file suffix, and its shard writer and reader classes."""

    name: str
    suffix: str
    writer_class: type[ShardWriter]
    reader_class: type[ShardReader]
    #: Stores arrays whose spec names an entropy ``codec`` (Zarr: a registered Zarr v3 codec; HDF5 would
    #: need a compiled filter plugin per platform, so it does not).
    supports_codecs: bool = False

    def create(
        self, path: Path, specs: list[ArraySpec], chunk_rows: int, attrs: Mapping[str, Any], rows: Mapping[str, int] | None = None
    ) -> ShardWriter:
        """A writer for a new shard at ``path``; ``rows`` gives each array's planned row count."""
        coded = [spec.name for spec in specs if spec.codec]
        if coded and not self.supports_codecs:
            raise UsageError(f"the {self.name} format cannot store entropy-coded arrays ({', '.join(coded)}): "
                             "the entropy encoding is Zarr only; choose the zarr format or another encoding")
        return self.writer_class(path, specs, chunk_rows, attrs, rows)

    def open(self, path: Path | URLPath, storage_options: Mapping[str, Any] | None = None) -> ShardReader:
        """A reader of the shard at ``path``: a local path, or a :class:`URLPath` read through fsspec."""
        return self.reader_class(path, storage_options=storage_options)

    def shard_name(self, index: int) -> str:
        return f"shard-{index:05d}{self.suffix}"
