"""Teachers: loading them (checkpoints, exported programs, ``hf:`` directories) through a registry of sources, and running them."""

from __future__ import annotations

from .runtime import PRECISIONS, autocast_for, resolve_device, run_model, run_teacher, to_device
from .sources import SOURCES, Teacher, detect_format, is_hf_spec, load_teacher, register_source, teacher_sha256

__all__ = [
    "PRECISIONS",
    "SOURCES",
    "Teacher",
    "autocast_for",
    "detect_format",
    "is_hf_spec",
    "load_teacher",
    "register_source",
    "resolve_device",
    "run_model",
    "run_teacher",
    "teacher_sha256",
    "to_device",
]
