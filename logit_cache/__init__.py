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
from .train import TrainConfig, TrainResult, train
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
    "convert_cache",
    "dump",
    "kd_loss",
    "list_caches",
    "load_teacher",
    "open_cache",
    "open_reader",
    "read_manifest",
    "train",
    "verify_cache",
]
