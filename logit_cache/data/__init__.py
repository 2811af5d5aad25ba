"""Training data: dataset specs and built-ins, token sequences, replayed views, and caches as datasets (open_cache, the DataLoader side)."""

from __future__ import annotations

from .cache import LogitCache, open_cache
from .datasets import BUILTIN_DATASETS, DigitsDataset, ResolvedDataset, recorded_fingerprint, resolve_dataset, split_batch
from .loader import VERIFY_CHOICES, CachedDataset, ChunkShuffleSampler, collate
from .replay import ReplayViews, check_replayable, default_view, replay_items
from .tokens import (
    IGNORE_INDEX,
    TEXT_VOCAB,
    ByteText,
    TokenBatch,
    TokenWindows,
    collate_tokens,
    next_token_mask,
    shifted_labels,
    token_lengths,
)

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "TEXT_VOCAB",
    "VERIFY_CHOICES",
    "ByteText",
    "CachedDataset",
    "ChunkShuffleSampler",
    "DigitsDataset",
    "LogitCache",
    "ReplayViews",
    "ResolvedDataset",
    "TokenBatch",
    "TokenWindows",
    "check_replayable",
    "collate",
    "collate_tokens",
    "default_view",
    "next_token_mask",
    "open_cache",
    "recorded_fingerprint",
    "replay_items",
    "resolve_dataset",
    "shifted_labels",
    "split_batch",
    "token_lengths",
]
