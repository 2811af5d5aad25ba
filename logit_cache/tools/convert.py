"""Convert a complete cache to the other backend or another value dtype, as a new cache.

A complete cache is never modified (DESIGN.md section 3): ``convert`` reads ``SRC`` and writes a
new cache at ``DST`` with the same shard layout (the same row and sample ranges, the same chunk
rows per array), the same arrays under the same names, and only the container (Zarr or HDF5) or
the dtype of the logit values (``logits`` / ``topk_logits``) changed. Ids, ``logsumexp`` and
``labels`` are copied as they are. Like a dump, it writes into ``DST.partial`` and renames it to
``DST`` only after every shard is closed and the complete manifest is written, so ``DST`` existing
means a whole cache; a conversion that fails removes its ``DST.partial`` (there is nothing to
resume: a conversion is cheap to rerun), one that is killed leaves it for ``--overwrite``. Like a
dump, it holds the writer's lock of ``DST`` (:func:`logit_cache.io.locks.writer_lock`) throughout, so ``gc`` and ``rm``
leave its ``DST.partial`` alone, and if that directory vanishes anyway (deleted by hand) it fails
with a message instead of putting a broken cache in place.

Reading is shard by shard and, within a shard, array by array in blocks of whole chunks of about
``convert_shard.BLOCK_BYTES``, so memory stays flat whatever the shard size.

Integrity: the source's content is checked against its manifest's shard checksums on the way
(checksums are over the stored bytes, independent of the backend, so when the dtype is unchanged
the new shard's checksum must equal the old one; otherwise the source blocks are hashed as they
are read). A damaged source is refused, never copied into a cache that looks healthy.

Identity (the key). The key covers the content, not the container: converting the backend only
keeps the key. Changing the dtype recomputes it with :func:`~logit_cache.format.identity.manifest_key`
from the manifest's content fields (teacher hash, dataset fingerprint, mode, k, views, seed...):

* narrowing float32 -> float16 rounds to nearest even, exactly what a float16 dump stores (both
  round the float32 logits), so the result gets the key a float16 dump of the same teacher and
  data would get. Values beyond float16's range are refused, naming the rows.
* widening float16 -> float32 is exact, but the values are still float16-rounded: a float32 dump
  would hold other values, so the widened cache must not share its key. Its key is computed with
  the dtype field ``"float32 rounded to float16"`` (and the manifest's ``dump.value_precision``
  says ``float16``); narrowing it back gives the original float16 key again.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import (
    CacheFormatError,
    CorruptShardError,
    IncompleteCacheError,
    OutputExistsError,
    UsageError,
)
from ..format.identity import manifest_key
from ..format.layout import array_specs
from ..format.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_manifest
from ..format.paths import partial_path
from ..io.locks import writer_lock
from ..io.lookup import directory_bytes
from ..io.ownership import discard_dir, refuse_unless_ours, write_work_marker
from ..io.reader import CacheReader, open_reader
from ..io.workdir import check_work_intact, move_into_place
from ..store import BACKENDS, ArraySpec, Backend, ShardReader, get_backend
from ..targets import KINDS, VALUE_DTYPES, get_kind
from .convert_shard import convert_shard, source_bytes

log = logging.getLogger(__name__)

#: Arrays holding logit values, of the kinds registered at import (each kind's ``value_arrays``): the
#: only ones whose dtype ``--dtype`` changes. Convert asks the source's kind; this is for old callers.
VALUE_ARRAYS = tuple(dict.fromkeys(name for kind in KINDS.values() for name in kind.value_arrays))


@dataclass
class ConvertResult:
    """What a conversion did, for the CLI summary and for callers."""

    src: Path
    dst: Path
    source: Manifest
    manifest: Manifest
    bytes_before: int
    bytes_after: int
    seconds: float


def _key_dtype(dtype: str, precision: str) -> str:
    """The dtype field of the key: the storage dtype, qualified when the values were rounded narrower."""
    return dtype if dtype == precision else f"{dtype} rounded to {precision}"


def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def source_precision(manifest: Manifest) -> str | None:
    """The narrowest dtype the source's values went through (its key says), or None if its key
    cannot be recomputed from its manifest (another fingerprint version, a hand-edited manifest)."""
    if manifest_key(manifest, dtype=manifest.dtype) == manifest.key:
        return manifest.dtype
    for precision in VALUE_DTYPES:
        narrower = _itemsize(precision) < _itemsize(manifest.dtype)
        if narrower and manifest_key(manifest, dtype=_key_dtype(manifest.dtype, precision)) == manifest.key:
            return precision
    return None


def _others(choices: Any, chosen: str) -> str:
    """The choices other than ``chosen``, for a message: ``hdf5``, or ``a or b`` with more registered."""
    return " or ".join(name for name in choices if name != chosen)


def _check_paths(src: Path, dst: Path) -> None:
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(
            f"DST {dst} is SRC {src} or lies inside it (or contains it): a complete cache is never modified; "
            f"choose a DST outside SRC"
        )


def _check_destination(dst: Path, work: Path, overwrite: bool, key: str, backend: str) -> None:
    """Refuse to clobber anything but a logit-cache cache, and that only with ``overwrite``."""
    if dst.exists() or dst.is_symlink():
        has_manifest = (dst / MANIFEST_NAME).is_file()
        if not overwrite:
            same = ""
            if has_manifest:
                try:
                    existing = read_manifest(dst)
                    if existing.complete and existing.key == key and existing.backend == backend:
                        same = f" (it already holds this content: key {key}, {backend})"
                except CacheFormatError:
                    pass
            raise OutputExistsError(f"{dst} already exists{same}; pass --overwrite to replace it, or choose another DST")
        refuse_unless_ours(dst, "exists and is not a logit-cache cache", "refusing to delete it with --overwrite; choose another DST")
    if work.exists() or work.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"{work} exists: an unfinished dump or conversion into {dst}; pass --overwrite to discard it, or choose another DST"
            )
        refuse_unless_ours(work, "exists and is not an unfinished logit-cache dump or conversion",
                           "refusing to delete it with --overwrite; move it away or choose another DST")


def _target_specs(source: Manifest, first_shard: ShardReader, dtype: str) -> list[ArraySpec]:
    """The arrays of the new cache: the source's names, row shapes and chunk rows; values in ``dtype``;
    compressed (in Zarr) exactly as a dump of these settings compresses them."""
    if not source.arrays:
        raise CacheFormatError(f"the manifest of {first_shard.path.parent} lists no arrays; it cannot be converted")
    kind = get_kind(source.mode)
    dumped = array_specs(source.mode, kind.width(source), source.num_classes, dtype, "labels" in source.arrays, source.num_samples,
                         per_token=source.per_token, encoding=source.encoding, sampled_logits="sampled_logits" in source.arrays)
    compressed = {spec.name for spec in dumped if spec.compress}
    value_arrays = set(kind.value_arrays)
    specs = []
    for name, info in source.arrays.items():
        if name not in first_shard.names():
            raise CorruptShardError(f"{first_shard.path}: has no array {name!r}, which the manifest lists; the shard is damaged")
        specs.append(
            ArraySpec(
                name,
                dtype if name in value_arrays else str(info["dtype"]),
                tuple(info["row_shape"]),
                per=str(info.get("per", "row")),
                compress=name in compressed,
                chunk_rows=first_shard.chunk_rows(name),
            )
        )
    return specs


def _new_manifest(src: Path, source: Manifest, backend: str, dtype: str, key: str, precision: str,
                  specs: list[ArraySpec], shards: list[ShardEntry]) -> Manifest:
    manifest = copy.deepcopy(source)
    manifest.backend = backend
    manifest.dtype = dtype
    manifest.key = key
    manifest.shards = shards
    manifest.complete = True
    manifest.created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    manifest.tool_version = __version__
    manifest.arrays = {spec.name: {**source.arrays[spec.name], "dtype": spec.dtype} for spec in specs}
    info = {name: value for name, value in source.dump.items() if name not in ("converted_from", "value_precision")}
    info["converted_from"] = {
        "path": str(src.resolve()),
        "key": source.key,
        "backend": source.backend,
        "dtype": source.dtype,
        "created_at": source.created_at,
    }
    if precision != dtype:
        info["value_precision"] = precision
    manifest.dump = info
    return manifest


def _convert_into(work: Path, dst: Path, reader: CacheReader, src: Path, source: Manifest, target: Backend, specs: list[ArraySpec],
                  chunk_rows: int, backend: str, dtype: str, key: str, precision: str, quiet: bool, started: float) -> Manifest:
    """Write every shard into ``work``, then the manifest, then rename ``work`` to ``dst``. On any failure
    ``work`` is removed; if it vanished meanwhile (deleted by someone else) the error says so."""
    log.info("converting %s (%s, %s) into %s (%s, %s); written as %s until complete",
             src, source.backend, source.dtype, dst, backend, dtype, work)
    attrs = {"logit_cache_format_version": FORMAT_VERSION, "key": key}
    # in bytes read, not shards: a cache of one large shard still shows how far it got
    bar = tqdm(total=source_bytes(source), unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=True if quiet else None)
    try:
        shards = []
        for position in range(len(source.shards)):
            try:
                shards.append(convert_shard(reader, position, target, work, specs, chunk_rows, attrs, bar))
            except OSError as exc:
                check_work_intact(work)  # a vanished work directory is the cause to report
                raise CacheFormatError(f"{work}: writing shard {position} failed ({exc})") from exc
            reader.shard(position).close()  # one open HDF5 handle at a time
            bar.set_postfix_str(f"shard {position + 1}/{len(source.shards)}", refresh=False)
        check_work_intact(work, [shard.path for shard in shards])
        manifest = _new_manifest(src, source, backend, dtype, key, precision, specs, shards)
        manifest.dump["converted_from"]["seconds"] = round(time.perf_counter() - started, 3)
        write_manifest(work, manifest)
        move_into_place(work, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            if work.exists():
                discard_dir(work)
        raise
    finally:
        bar.close()
    return manifest


def convert(
    src: str | Path,
    dst: str | Path,
    backend: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> ConvertResult:
    """Write the complete cache ``src`` as a new cache at ``dst`` in ``backend`` and/or value ``dtype``
    (each defaults to the source's; at least one must differ).

    Example::

        convert("caches/digits-top5", "caches/digits-top5-h5", backend="hdf5")
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--format {backend!r} is not one of {', '.join(BACKENDS)}")
    if dtype is not None and dtype not in VALUE_DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    try:
        reader = open_reader(src)
    except IncompleteCacheError as exc:
        raise IncompleteCacheError(f"{exc}; only a complete cache can be converted") from exc
    with reader:
        source = reader.manifest
        backend = backend or source.backend
        dtype = dtype or source.dtype
        if backend == source.backend and dtype == source.dtype:
            raise UsageError(
                f"{src} is already a {backend} cache of {dtype} values: nothing to convert; pass --format "
                f"{_others(BACKENDS, backend)} and/or --dtype {_others(VALUE_DTYPES, dtype)}"
            )
        if source.encoding != "plain":
            raise CacheFormatError(f"{src}: encoding {source.encoding!r} cannot be converted by this version (only 'plain')")
        if dtype != source.dtype and source.encoding != "plain":
            raise UsageError(f"{src}: a {source.encoding}-encoded cache stores quantized values, not {source.dtype} ones: "
                             f"--dtype cannot change them; convert only its --format, or dump again with --dtype {dtype}")
        value_arrays = get_kind(source.mode).value_arrays
        if dtype != source.dtype and not any(name in source.arrays for name in value_arrays):
            raise UsageError(f"{src}: a {source.mode} cache holds no logit values ({', '.join(value_arrays)}) whose dtype could change")
        _check_paths(src, dst)

        precision = source_precision(source)
        if dtype == source.dtype:
            key = source.key  # same content, same key
            precision = precision or source.dump.get("value_precision") or source.dtype
        elif precision is None:
            raise CacheFormatError(
                f"{src}: its key {source.key} cannot be recomputed from its manifest (teacher sha256, dataset fingerprint, mode, "
                f"k, views, seed, dtype), so the converted cache's key could not be trusted; it was written by another version "
                f"of logit-cache or its manifest was edited: re-dump it with --dtype {dtype}, or convert without --dtype"
            )
        else:
            precision = min(precision, dtype, key=_itemsize)
            key = manifest_key(source, dtype=_key_dtype(dtype, precision))

        work = partial_path(dst)
        _check_destination(dst, work, overwrite, key, backend)
        target = get_backend(backend)
        if not source.shards:
            raise CacheFormatError(f"{src}: the manifest lists no shards; nothing to convert")
        specs = _target_specs(source, reader.shard(0), dtype)
        chunk_rows = int(source.chunk_rows) or max(spec.chunk_rows or 1 for spec in specs)
        bytes_before = directory_bytes(src)

        dst.parent.mkdir(parents=True, exist_ok=True)
        # A writer into a root like a dump: `gc` and `rm` leave DST.partial alone while this runs.
        with writer_lock(dst):
            _check_destination(dst, work, overwrite, key, backend)  # again: another writer may have finished meanwhile
            if work.exists():
                discard_dir(work)  # only with --overwrite, and only ours (checked above)
            work.mkdir()
            write_work_marker(work, key, backend, "convert")
            manifest = _convert_into(work, dst, reader, src, source, target, specs, chunk_rows, backend, dtype, key, precision,
                                     quiet, started)
    return ConvertResult(src, dst, source, manifest, bytes_before, directory_bytes(dst), time.perf_counter() - started)
