"""logit-cache: run a teacher once, cache its logits, distill from the cache.

See README.md for the command line; the public Python names are listed in ``__all__``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import list_caches
from .convert import convert as convert_cache
from .dump import DumpConfig, DumpResult, dump
from .errors import LogitCacheError
from .loader import CachedDataset, ChunkShuffleSampler
from .losses import DistillationLoss, KLDivergence, kd_loss
from .manifest import Manifest, read_manifest
from .reader import CacheReader, LogitCache, open_cache, open_reader
from .targets import Targets
from .teacher import Teacher, load_teacher
from .token_losses import masked_token_logits, token_kd_loss
from .tokens import collate_tokens, next_token_mask
from .train import TrainConfig, TrainResult, train
from .train_lm import token_losses
from .verify import verify_cache

__all__ = [
    "CacheReader",
    "CachedDataset",
    "ChunkShuffleSampler",
    "DistillationLoss",
    "DumpConfig",
    "DumpResult",
    "KLDivergence",
    "LogitCache",
    "LogitCacheError",
    "Manifest",
    "Targets",
    "Teacher",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "collate_tokens",
    "convert_cache",
    "dump",
    "kd_loss",
    "list_caches",
    "load_teacher",
    "masked_token_logits",
    "next_token_mask",
    "open_cache",
    "open_reader",
    "read_manifest",
    "token_kd_loss",
    "token_losses",
    "train",
    "verify_cache",
]
