"""Target kinds (full logits, top-k, sampled): how each is encoded on the device, which arrays it
stores, how it is decoded into a :class:`Targets` batch for the losses.

``registry.py`` says what a kind is and holds them (:data:`KINDS`); each kind is one module
(``full.py``, ``topk.py``, ``sampled.py``), registered here on import in that order (the order
messages list them in). Another kind is a module whose object is passed to :func:`register`.
``compact`` is the stored encoding of the arrays (exported as the module too, for its constants).
"""

from __future__ import annotations

from typing import Any

from . import compact, full, sampled, topk
from .batch import (
    LOG_MASS_FLOOR,
    OPTIONAL_TARGET_ARRAYS,
    TARGET_ARRAYS,
    Targets,
    encode,
    sample_unique,
    topk_log_probs,
    topk_mass,
)
from .compact import ENCODINGS, decode_arrays, encode_arrays, stored_specs
from .dtypes import UINT16_CLASSES, VALUE_DTYPES, count_dtype, index_dtype, torch_dtype
from .encoded import EncodedBatch
from .registry import KINDS, TargetKind, get_kind, kind_names, register, unregister
from .tokens import encode_tokens

for _kind in (full.KIND, topk.KIND, sampled.KIND):
    register(_kind)

#: What a dump stores when not told (``DumpConfig.mode``, the CLI without --topk/--sample/--full).
DEFAULT_KIND = topk.KIND.name


def __getattr__(name: str) -> Any:
    """``MODES``: the registered kinds' names when read."""
    from . import batch

    return getattr(batch, name)


__all__ = [
    "DEFAULT_KIND",
    "ENCODINGS",
    "KINDS",
    "LOG_MASS_FLOOR",
    "MODES",
    "OPTIONAL_TARGET_ARRAYS",
    "TARGET_ARRAYS",
    "UINT16_CLASSES",
    "VALUE_DTYPES",
    "EncodedBatch",
    "TargetKind",
    "Targets",
    "compact",
    "count_dtype",
    "decode_arrays",
    "encode",
    "encode_arrays",
    "encode_tokens",
    "get_kind",
    "index_dtype",
    "kind_names",
    "register",
    "sample_unique",
    "stored_specs",
    "topk_log_probs",
    "topk_mass",
    "torch_dtype",
    "unregister",
]
