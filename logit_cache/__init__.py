"""logit-cache: run a teacher once, cache its logits, distill from the cache.

See README.md for the command line and the package layout; the public Python names are listed in
``__all__``. ``logit_cache.dump``, ``logit_cache.train`` and ``logit_cache.token_losses`` are modules
(importable as such) that can also be called as the functions they used to be: prefer
:func:`dump_cache`, :func:`train_student` and :func:`token_loss_terms`.
"""

from __future__ import annotations

__version__ = "0.2.0"

# ``dump``, ``train`` and ``token_losses``: callable modules (see _legacy.callable_module); bound
# here as the modules so that ``import logit_cache.dump`` and ``logit_cache.dump(...)`` agree.
from . import _legacy, train
from .data.cache import LogitCache, open_cache
from .data.loader import CachedDataset, ChunkShuffleSampler
from .data.tokens import TokenWindows, collate_tokens, next_token_mask
from .errors import LogitCacheError
from .format.manifest import Manifest, read_manifest
from .io.reader import CacheReader, open_reader
from .losses import DistillationLoss, KLDivergence, kd_loss, masked_token_logits, token_kd_loss, token_loss_terms
from .losses import token as token_losses
from .pipeline import dump
from .pipeline.dump import DumpConfig, DumpResult, dump_cache
from .targets import Targets
from .teachers.sources import Teacher, load_teacher
from .tools.catalog import list_caches
from .tools.convert import convert as convert_cache
from .tools.verify import verify_cache
from .train import TrainConfig, TrainResult, train_student
from .train.evaluation import evaluate_tokens

_legacy.install()

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
    "TokenWindows",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "collate_tokens",
    "convert_cache",
    "dump",
    "dump_cache",
    "evaluate_tokens",
    "kd_loss",
    "list_caches",
    "load_teacher",
    "masked_token_logits",
    "next_token_mask",
    "open_cache",
    "open_reader",
    "read_manifest",
    "token_kd_loss",
    "token_loss_terms",
    "token_losses",
    "train",
    "train_student",
    "verify_cache",
]
