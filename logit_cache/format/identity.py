"""Cache identity: the teacher hash, the dataset fingerprint and the content key.

How identity works
------------------
A cache holds what one teacher said about one dataset under one encoding. Three hashes pin that:

* **Teacher hash** (``teacher.sha256``): SHA-256 of the checkpoint file's bytes, or for a directory
  (``hf:DIR``) :func:`directory_sha256` (every file's relative path, size and bytes in sorted order). It changes whenever the file changes,
  even if the weights are equal; it does not see code outside the file (an ``--arch`` callable's
  source), which is why the manifest also records the arch spec and its kwargs.
* **Dataset fingerprint**: SHA-256 over the dataset's identity (its spec and kwargs as content, not
  spelling: see ``data/datasets.py`` and :func:`~logit_cache.specs.callable_identity`), its length and
  the content of a fixed sample of items (index 0, the last index, and evenly spaced ones between). Items are
  hashed with type tags (dtype and shape for tensors and arrays, sorted keys for dicts), so ``1``
  and ``1.0``, or a float32 and a float64 tensor of equal values, differ. It catches a changed
  length, changed kwargs and changed content at the sampled indices; a change confined to
  unsampled items is not seen (hashing every item would cost a full pass over the data).
* **Key**: a short SHA-256 of the canonical JSON (sorted keys) of what determines the stored
  content: format version, teacher hash, dataset fingerprint, mode, k or m, views, seed and dtype,
  and the teacher's compute precision when it is not fp32 (a bf16 teacher gives other logits), with
  ``weights`` when the teacher's weights were held in that precision too (dumps since 2026-12-03:
  autocast over float32 weights and bf16 weights round differently, so they are different caches).
  Two dumps with equal keys hold the same arrays; the backend, the shard layout and the
  temperature default do not enter the key (they change the container, not the content).
  :func:`key_payload` is the one list of these fields (a target kind adds its own through
  ``key_fields``); :func:`manifest_key` reads them from a manifest, :func:`record_key` from a dump's
  config, :func:`content_key` from fields spelled out.

What cannot be hashed is an error, never a silent random fingerprint: a cache must not be reused
for data it was not made from.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import DatasetError
from ..targets.registry import get_kind

#: Bumped when the rules above change, so old keys can never collide with new ones.
FINGERPRINT_VERSION = 1
#: How many items of a dataset the fingerprint reads (spread over the whole index range).
DATASET_SAMPLE_ITEMS = 16
KEY_LENGTH = 16
_READ_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, or :func:`directory_sha256` of a directory."""
    path = Path(path)
    if path.is_dir():
        return directory_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        _feed(digest, handle)
    return digest.hexdigest()


def skip_hidden(name: str) -> bool:
    """The default ``skip`` of :func:`directory_sha256`: names starting with ``.`` and ``__pycache__``
    (tools keep caches there: ``.cache/huggingface`` from ``hf download --local-dir``, ``.git``)."""
    return name.startswith(".") or name == "__pycache__"


def directory_sha256(directory: str | Path, skip: Callable[[str], bool] | None = skip_hidden) -> str:
    """SHA-256 hex digest of a directory's content: the one rule for every directory hashed.

    For each regular file under ``directory`` (recursive, symlinks followed, a symlink loop entered
    once, skipping every file or folder whose name ``skip`` is true for), in the order of the sorted
    POSIX paths relative to ``directory``, feed ``relative_path + "\\0" + str(size_in_bytes) + "\\0"``
    (UTF-8), then the file's bytes. The size makes the boundary between one file's bytes and the next
    path unambiguous. Raises OSError when a file cannot be read.
    """
    directory = Path(directory)
    skipped = skip or (lambda name: False)
    files: list[tuple[str, Path]] = []
    seen: set[str] = set()  # real paths of the directories walked: a symlink loop is entered once
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not skipped(name)]
        for name in names:
            file = Path(root, name)
            if not skipped(name) and file.is_file():
                files.append((file.relative_to(directory).as_posix(), file))
    digest = hashlib.sha256()
    for relative, file in sorted(files):
        with open(file, "rb") as handle:
            digest.update(f"{relative}\0{os.fstat(handle.fileno()).st_size}\0".encode())
            _feed(digest, handle)
    return digest.hexdigest()


def _feed(digest: Any, handle: BinaryIO) -> None:
    while block := handle.read(_READ_BLOCK):
        digest.update(block)


def _update(digest: Any, value: Any, where: str) -> None:
    """Feed ``value`` into ``digest`` with a type tag; raise DatasetError on unhashable values."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous()
        digest.update(f"tensor:{array.dtype}:{tuple(array.shape)}:".encode())
        if array.dtype == torch.bfloat16:
            array = array.view(torch.int16)
        digest.update(array.numpy().tobytes())
    elif isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype == object:
            raise DatasetError(f"cannot fingerprint {where}: numpy array of Python objects")
        digest.update(f"ndarray:{array.dtype.str}:{array.shape}:".encode())
        digest.update(array.tobytes())
    elif value is None or isinstance(value, (bool, str, bytes, numbers.Number)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, Mapping):
        digest.update(f"map:{len(value)}:".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key!s}=".encode())
            _update(digest, value[key], f"{where}[{key!r}]")
    elif isinstance(value, Sequence):
        digest.update(f"seq:{type(value).__name__}:{len(value)}:".encode())
        for position, item in enumerate(value):
            _update(digest, item, f"{where}[{position}]")
    else:
        raise DatasetError(
            f"cannot fingerprint {where}: values of type {type(value).__name__} are not supported "
            f"(items must be tensors, numpy arrays, numbers, strings, or tuples/lists/dicts of them)"
        )


def sample_indices(length: int, count: int = DATASET_SAMPLE_ITEMS) -> list[int]:
    """The dataset indices the fingerprint reads: 0, length-1 and evenly spaced ones between."""
    if length <= 0:
        return []
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def item_digest(value: Any, where: str = "item") -> str:
    """SHA-256 of one item's content with type tags: equal digests mean bitwise-equal items of equal
    types (NaN-safe), as the dataset fingerprint sees them."""
    digest = hashlib.sha256()
    _update(digest, value, where)
    return digest.hexdigest()


def dataset_fingerprint(dataset: Any, spec: str, kwargs: Mapping[str, Any]) -> str:
    """Fingerprint a map-style dataset by spec, kwargs, length and a fixed sample of its items."""
    length = len(dataset)
    digest = hashlib.sha256()
    digest.update(f"logit-cache-dataset-v{FINGERPRINT_VERSION};".encode())
    digest.update(canonical_json({"spec": spec, "kwargs": dict(kwargs), "length": length}).encode())
    for index in sample_indices(length):
        digest.update(f"item:{index}:".encode())
        _update(digest, _read_item(dataset, index, length, spec), f"dataset item {index}")
    return digest.hexdigest()


def _read_item(dataset: Any, index: int, length: int, spec: str) -> Any:
    """``dataset[index]``, or a DatasetError naming the index (it is one the fingerprint samples)."""
    try:
        return dataset[index]
    except DatasetError:
        raise
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, IndexError):
            fix = (f"its len() is {length}, so every index below that must give an item: make __len__ count "
                   f"only the items __getitem__ can return")
        else:
            fix = "fix the dataset (set LOGIT_CACHE_TRACEBACK=1 for the traceback)"
        raise DatasetError(
            f"--dataset {spec!r}: reading item {index} (one the dataset fingerprint samples: 0, the last and "
            f"evenly spaced ones) failed with {what}; {fix}"
        ) from exc


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"cannot fingerprint {value!r}: not JSON-serialisable ({exc})") from exc


def key_payload(
    record: Any,
    *,
    teacher_sha256: str,
    dataset_fingerprint: str,
    format_version: int,
    precision: str = "fp32",
    dtype: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The identity fields of a cache, the one place that lists them (see the module docstring).

    ``record`` is a Manifest or a DumpConfig (read duck-typed: ``mode``, ``k``, ``views``, ``seed``,
    ``dtype``, ``encoding`` and what the target kind's :meth:`~logit_cache.targets.TargetKind.key_fields`
    reads); ``dtype`` overrides the record's (convert keys float16-rounded float32 values apart).
    Fields added after the first caches were made (precision, the kind's extra fields, the encoding)
    enter only when they differ from their defaults, so the keys of caches made before them stay valid.
    """
    payload = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "format_version": format_version,
        "teacher_sha256": teacher_sha256,
        "dataset_fingerprint": dataset_fingerprint,
        "mode": record.mode,
        "k": record.k,
        "views": record.views,
        "seed": record.seed,
        "dtype": record.dtype if dtype is None else dtype,
    }
    if precision != "fp32":  # bf16/fp16 teachers give other logits; fp32 keys stay as they were
        payload["precision"] = precision
    if weights not in (None, "fp32"):  # the weights' own dtype (None: caches made before it was recorded)
        payload["weights"] = weights
    payload.update(get_kind(record.mode).key_fields(record))
    encoding = getattr(record, "encoding", "plain")
    if encoding != "plain":
        payload["encoding"] = encoding
    return payload


def key_of(payload: Mapping[str, Any]) -> str:
    """The short key of a :func:`key_payload`."""
    return hashlib.sha256(canonical_json(dict(payload)).encode()).hexdigest()[:KEY_LENGTH]


def record_key(record: Any, *, teacher_sha256: str, dataset_fingerprint: str, format_version: int,
               precision: str = "fp32", dtype: str | None = None, weights: str | None = None) -> str:
    """The key of a cache about to be made from ``record`` (a DumpConfig): the dump's key."""
    return key_of(key_payload(record, teacher_sha256=teacher_sha256, dataset_fingerprint=dataset_fingerprint,
                              format_version=format_version, precision=precision, dtype=dtype, weights=weights))


def manifest_key(manifest: Any, *, dtype: str | None = None) -> str:
    """The key of a cache from its manifest's content fields (duck-typed Manifest): what the dump gave
    it, what verify recomputes; ``dtype`` overrides the manifest's dtype field (see :func:`key_payload`)."""
    return record_key(
        manifest,
        teacher_sha256=manifest.teacher.get("sha256"),
        dataset_fingerprint=manifest.dataset.get("fingerprint"),
        format_version=manifest.format_version,
        precision=str(manifest.dump.get("precision", "fp32")),  # as the dump keyed it
        dtype=dtype,
        weights=manifest.dump.get("weights"),
    )


def content_key(
    *,
    teacher_sha256: str,
    dataset_fingerprint: str,
    mode: str,
    k: int | None,
    views: int,
    seed: int | None,
    dtype: str,
    format_version: int,
    precision: str = "fp32",
    m: int | None = None,
    sample_temperature: float = 1.0,
    encoding: str = "plain",
) -> str:
    """The key from fields spelled out (older callers and tests); :func:`manifest_key` and
    :func:`record_key` are the same rule read from a record."""
    record = SimpleNamespace(mode=mode, k=k, views=views, seed=seed, dtype=dtype, m=m,
                             sample_temperature=sample_temperature, encoding=encoding)
    return record_key(record, teacher_sha256=teacher_sha256, dataset_fingerprint=dataset_fingerprint,
                      format_version=format_version, precision=precision)
