"""Target kinds (full logits, top-k, sampled): how each is encoded on the device, which arrays it
stores, how it is decoded into a :class:`Targets` batch for the losses."""

from __future__ import annotations

from .batch import (
    LOG_MASS_FLOOR,
    MODES,
    OPTIONAL_TARGET_ARRAYS,
    TARGET_ARRAYS,
    UINT16_CLASSES,
    EncodedBatch,
    Targets,
    count_dtype,
    encode,
    index_dtype,
    sample_unique,
    topk_log_probs,
    topk_mass,
    torch_dtype,
)

__all__ = [
    "LOG_MASS_FLOOR",
    "MODES",
    "OPTIONAL_TARGET_ARRAYS",
    "TARGET_ARRAYS",
    "UINT16_CLASSES",
    "EncodedBatch",
    "Targets",
    "count_dtype",
    "encode",
    "index_dtype",
    "sample_unique",
    "topk_log_probs",
    "topk_mass",
    "torch_dtype",
]
