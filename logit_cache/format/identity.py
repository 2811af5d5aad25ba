"""Cache identity: the teacher hash, the dataset fingerprint and the content key.

How identity works
------------------
A cache holds what one teacher said about one dataset under one encoding. Three hashes pin that:

* **Teacher hash** (``teacher.sha256``): SHA-256 of the checkpoint file's bytes (for a directory,
  of every file's relative path and bytes in sorted order). It changes whenever the file changes,
  even if the weights are equal; it does not see code outside the file (an ``--arch`` callable's
  source), which is why the manifest also records the arch spec and its kwargs.
* **Dataset fingerprint**: SHA-256 over the dataset spec, its kwargs, its length and the content of
  a fixed sample of items (index 0, the last index, and evenly spaced ones between). Items are
  hashed with type tags (dtype and shape for tensors and arrays, sorted keys for dicts), so ``1``
  and ``1.0``, or a float32 and a float64 tensor of equal values, differ. It catches a changed
  length, changed kwargs and changed content at the sampled indices; a change confined to
  unsampled items is not seen (hashing every item would cost a full pass over the data).
* **Key**: a short SHA-256 of the canonical JSON (sorted keys) of what determines the stored
  content: format version, teacher hash, dataset fingerprint, mode, k or m, views, seed and dtype,
  and the teacher's compute precision when it is not fp32 (a bf16 teacher gives other logits).
  Two dumps with equal keys hold the same arrays; the backend, the shard layout and the
  temperature default do not enter the key (they change the container, not the content).

What cannot be hashed is an error, never a silent random fingerprint: a cache must not be reused
for data it was not made from.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError

#: Bumped when the rules above change, so old keys can never collide with new ones.
FINGERPRINT_VERSION = 1
#: How many items of a dataset the fingerprint reads (spread over the whole index range).
DATASET_SAMPLE_ITEMS = 16
KEY_LENGTH = 16
_READ_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, or of a directory's files (relative paths and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(_READ_BLOCK):
                digest.update(block)
    return digest.hexdigest()


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
    """The short key that names a cache's content (see the module docstring).

    Fields added after the first caches were made (precision, the sampled mode's m and sample
    temperature, the encoding) enter the payload only when they differ from their defaults, so
    the keys of caches made before them stay valid.
    """
    payload = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "format_version": format_version,
        "teacher_sha256": teacher_sha256,
        "dataset_fingerprint": dataset_fingerprint,
        "mode": mode,
        "k": k,
        "views": views,
        "seed": seed,
        "dtype": dtype,
    }
    if precision != "fp32":  # bf16/fp16 teachers give other logits; fp32 keys stay as they were
        payload["precision"] = precision
    if mode == "sampled":
        payload["m"] = m
        payload["sample_temperature"] = float(sample_temperature)
    if encoding != "plain":
        payload["encoding"] = encoding
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]
