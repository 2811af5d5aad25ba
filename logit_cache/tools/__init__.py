"""Commands on caches: verify, convert, the catalog of a shared root (ls, rm, gc), the demo and its small models.

The functions are exported under names that do not hide their modules (``convert_cache`` for
``tools.convert.convert``), so ``logit_cache.tools.convert`` stays the module.
"""

from __future__ import annotations

from .cleanup import GcCandidate, check_removable, gc_candidates, remove_cache
from .convert import ConvertResult
from .convert import convert as convert_cache
from .demo import STUDENT, STUDENT_KWARGS, TEACHER_ARCH, DemoResult, run_demo, train_digits_teacher
from .listing import CacheEntry, caches_by_key, list_caches
from .models import TinyCausalLM, digits_mlp, tiny_lm
from .verify import verify_cache
from .verify_report import Check, VerifyReport

__all__ = [
    "STUDENT",
    "STUDENT_KWARGS",
    "TEACHER_ARCH",
    "CacheEntry",
    "Check",
    "ConvertResult",
    "DemoResult",
    "GcCandidate",
    "TinyCausalLM",
    "VerifyReport",
    "caches_by_key",
    "check_removable",
    "convert_cache",
    "digits_mlp",
    "gc_candidates",
    "list_caches",
    "remove_cache",
    "run_demo",
    "tiny_lm",
    "train_digits_teacher",
    "verify_cache",
]
