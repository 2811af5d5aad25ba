"""logit-cache: run a teacher once, cache its logits, distill from the cache.

See README.md for the command line; the public Python names are listed in ``__all__``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .dump import DumpConfig, DumpResult, dump
from .errors import LogitCacheError
from .manifest import Manifest, read_manifest
from .reader import CacheReader, open_reader
from .teacher import Teacher, load_teacher

__all__ = [
    "CacheReader",
    "DumpConfig",
    "DumpResult",
    "LogitCacheError",
    "Manifest",
    "Teacher",
    "__version__",
    "dump",
    "load_teacher",
    "open_reader",
    "read_manifest",
]
