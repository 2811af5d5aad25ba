"""The dump: a teacher over a dataset into a cache (one batch loop for per-sample and per-token rows; ranks under torchrun).

``logit_cache.pipeline.dump`` is the module (callable as :func:`dump_cache`, its old function name):
the function is exported as ``dump_cache`` only, so the name never hides the module.
"""

from __future__ import annotations

from .batches import make_batches, make_loader
from .dump import DumpConfig, DumpResult, dump_cache

__all__ = ["DumpConfig", "DumpResult", "dump_cache", "make_batches", "make_loader"]
