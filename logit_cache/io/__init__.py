"""Shards on disk: writing a cache (``.partial`` work, resume, finalize), reading it, its writer lock, what is ours to delete."""

from __future__ import annotations

from .locks import is_locked, lock_is_stale, lock_path, writer_lock
from .lookup import directory_bytes, find_by_key
from .ownership import discard_dir, refuse_unless_ours, why_not_ours, write_work_marker
from .reader import CacheReader, open_reader
from .rows import TargetReader
from .writer import ShardedWriter, check_output, finalize, prepare_work_dir, read_progress

__all__ = [
    "CacheReader",
    "ShardedWriter",
    "TargetReader",
    "check_output",
    "directory_bytes",
    "discard_dir",
    "finalize",
    "find_by_key",
    "is_locked",
    "lock_is_stale",
    "lock_path",
    "open_reader",
    "prepare_work_dir",
    "read_progress",
    "refuse_unless_ours",
    "why_not_ours",
    "write_work_marker",
    "writer_lock",
]
