"""Storage dtypes of target arrays: the one list of value dtypes, and the id and count dtypes a
cache of a given class count and width uses (the manifest, the dump, the reader and convert ask here)."""

from __future__ import annotations

import numpy as np
import torch

#: Dtypes logit values may be stored in (``--dtype``; the manifest's ``dtype``).
VALUE_DTYPES = ("float16", "float32")
#: Largest class count whose ids fit uint16 (ids 0..65535).
UINT16_CLASSES = 1 << 16


def index_dtype(num_classes: int) -> np.dtype:
    """Storage dtype of class/token ids: uint16 when they fit, else int32 (never int16: it wraps)."""
    return np.dtype(np.uint16) if num_classes <= UINT16_CLASSES else np.dtype(np.int32)


def count_dtype(m: int) -> np.dtype:
    """Storage dtype of sampled counts: a count is at most M."""
    return np.dtype(np.uint8) if m <= 255 else np.dtype(np.uint16)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a value dtype name (one of :data:`VALUE_DTYPES`)."""
    return {"float16": torch.float16, "float32": torch.float32}[name]
