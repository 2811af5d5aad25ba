"""One exception tree for logit-cache.

Every error a user can cause derives from :class:`LogitCacheError`, so the CLI can turn any of them
into a one-line message and a non-zero exit instead of a traceback. Each class also subclasses the
builtin exception a Python caller would expect (``FileNotFoundError``, ``ValueError``...), so code
that catches builtins keeps working. Messages name the value, what was expected, and the fix.
"""

from __future__ import annotations


class LogitCacheError(Exception):
    """Base of every error logit-cache raises on purpose."""


class UsageError(LogitCacheError, ValueError):
    """Options that are missing, out of range, or incompatible with each other."""


class SpecError(LogitCacheError, ImportError):
    """A ``module:callable`` spec that cannot be imported or called."""


class CheckpointError(LogitCacheError, ValueError):
    """A teacher checkpoint that cannot be loaded as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The teacher checkpoint path does not exist."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that can only be loaded by unpickling arbitrary code, without --trust-checkpoint."""


class StateDictMismatchError(CheckpointError):
    """A state_dict whose keys or shapes do not fit the architecture."""


class DatasetError(LogitCacheError, ValueError):
    """A dataset spec that cannot be resolved, or a dataset that does not behave as required."""


class TeacherOutputError(LogitCacheError, ValueError):
    """The teacher returned something that is not a [batch, classes] tensor of logits."""


class NonFiniteLogitsError(LogitCacheError, FloatingPointError):
    """The teacher produced NaN or infinite logits (or values beyond the storage dtype's range)."""


class OutputExistsError(LogitCacheError, FileExistsError):
    """The output directory exists and neither --overwrite nor --resume was given."""


class CacheFormatError(LogitCacheError, ValueError):
    """A cache directory, manifest or shard that does not follow the cache format."""


class CacheNotFoundError(CacheFormatError, FileNotFoundError):
    """No cache (no manifest.json) at the given path."""


class IncompleteCacheError(CacheFormatError):
    """A cache whose dump has not finished: it must not be read as a complete cache."""


class CorruptShardError(CacheFormatError):
    """A shard whose bytes do not decode, or whose checksum does not match the manifest."""


class DatasetMismatchError(LogitCacheError, ValueError):
    """A dataset does not match the cache it is paired with (length or fingerprint)."""


class TargetMismatchError(LogitCacheError, ValueError):
    """Cached targets do not fit the loss or the student (mode, class count, tail strategy)."""


class CacheBusyError(LogitCacheError, BlockingIOError):
    """Another process is writing this cache (its lock is held)."""


class MissingPackageError(LogitCacheError, ImportError):
    """An optional package is not installed (fsspec or a protocol's own for URLs; matplotlib for figures);
    the message names the extra to install."""


class OutputError(LogitCacheError, OSError):
    """An output location refused a write: read-only, no permission, a full disk, a file in the way."""
