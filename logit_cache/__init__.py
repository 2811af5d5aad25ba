"""logit-cache: run a teacher once, cache its logits, distill from the cache.

See README.md for the command line and the package layout; the public Python names are listed in
``__all__``. ``logit_cache.dump``, ``logit_cache.train`` and ``logit_cache.token_losses`` are modules
(importable as such) that can also be called as the functions they used to be: prefer
:func:`dump_cache`, :func:`train_student` and :func:`token_loss_terms`.
"""

from __future__ import annotations

__version__ = "0.2.0"

import importlib
from typing import TYPE_CHECKING, Any

from . import _legacy

_legacy.install()

#: Public name -> (module, attribute; None: the module itself). Imported on first use (PEP 562), so that
#: importing a light submodule (``logit_cache.store.entropy_codec``, which zarr loads through its entry
#: points to read an entropy-coded array) does not import torch and the whole package first.
#: ``dump``, ``train`` and ``token_losses`` are callable modules (see ``_legacy.callable_module``).
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "CacheReader": ("io.reader", "CacheReader"),
    "CachedDataset": ("data.loader", "CachedDataset"),
    "ChunkShuffleSampler": ("data.loader", "ChunkShuffleSampler"),
    "DistillationLoss": ("losses", "DistillationLoss"),
    "DumpConfig": ("pipeline.dump", "DumpConfig"),
    "DumpResult": ("pipeline.dump", "DumpResult"),
    "KLDivergence": ("losses", "KLDivergence"),
    "LogitCache": ("data.cache", "LogitCache"),
    "LogitCacheError": ("errors", "LogitCacheError"),
    "Manifest": ("format.manifest", "Manifest"),
    "Targets": ("targets", "Targets"),
    "Teacher": ("teachers.sources", "Teacher"),
    "TokenWindows": ("data.tokens", "TokenWindows"),
    "TrainConfig": ("train", "TrainConfig"),
    "TrainResult": ("train", "TrainResult"),
    "collate_tokens": ("data.tokens", "collate_tokens"),
    "convert_cache": ("tools.convert", "convert"),
    "dump": ("pipeline.dump", None),
    "dump_cache": ("pipeline.dump", "dump_cache"),
    "evaluate_tokens": ("train.evaluation", "evaluate_tokens"),
    "kd_loss": ("losses", "kd_loss"),
    "list_caches": ("tools.catalog", "list_caches"),
    "load_teacher": ("teachers.sources", "load_teacher"),
    "masked_token_logits": ("losses", "masked_token_logits"),
    "next_token_mask": ("data.tokens", "next_token_mask"),
    "open_cache": ("data.cache", "open_cache"),
    "open_reader": ("io.reader", "open_reader"),
    "read_manifest": ("format.manifest", "read_manifest"),
    "token_kd_loss": ("losses", "token_kd_loss"),
    "token_loss_terms": ("losses", "token_loss_terms"),
    "token_losses": ("losses.token", None),
    "train": ("train", None),
    "train_student": ("train", "train_student"),
    "verify_cache": ("tools.verify", "verify_cache"),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # once: later reads are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what type checkers and IDEs see: the names themselves
    from .data.cache import LogitCache, open_cache
    from .data.loader import CachedDataset, ChunkShuffleSampler
    from .data.tokens import TokenWindows, collate_tokens, next_token_mask
    from .errors import LogitCacheError
    from .format.manifest import Manifest, read_manifest
    from .io.reader import CacheReader, open_reader
    from .losses import DistillationLoss, KLDivergence, kd_loss, masked_token_logits, token_kd_loss, token_loss_terms
    from .pipeline.dump import DumpConfig, DumpResult, dump_cache
    from .targets import Targets
    from .teachers.sources import Teacher, load_teacher
    from .tools.catalog import list_caches
    from .tools.convert import convert as convert_cache
    from .tools.verify import verify_cache
    from .train import TrainConfig, TrainResult, train_student
    from .train.evaluation import evaluate_tokens

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
