"""Output locations: the operating system's refusals as one-line errors, and writability checked up front.

A dump or a training run writes where the user said (``--out``, ``--cache-root``, ``--metrics``). The
system can refuse for reasons only the user can fix: a read-only mount (EROFS), no permission
(EACCES, EPERM; root is refused only by the first), a full disk or quota (ENOSPC, EDQUOT), a file
where a directory should be. Each such ``OSError`` becomes an :class:`~logit_cache.errors.OutputError`
naming the path, the system's words and the fix, so the CLI prints one line instead of a traceback.
The conversion sits where outputs are written (the writer thread, the work directory, the lock, the
trainer's files), never around reading the teacher or the dataset, whose OS errors mean something else.

What a conversion does not do: undo work. A dump that fails this way keeps ``OUT.partial`` with its
finished shards, so ``--resume`` continues it once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import LogitCacheError, OutputError

#: ``OUT.partial``: where a dump or conversion into ``OUT`` works until the cache is complete.
PARTIAL_SUFFIX = ".partial"


def partial_path(out: Path) -> Path:
    """Where a dump into ``out`` works until it is complete (renamed to ``out`` then)."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def partial_location(location: str) -> str:
    """:func:`partial_path` for a location that may be an fsspec URL (a plain string join)."""
    return f"{location}{PARTIAL_SUFFIX}"

#: What the user can do, by errno.
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose another location",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another location",
    errno.EROFS: "the file system is mounted read-only: choose another location",
    errno.EACCES: "you may not write there: choose another location, or get write permission on the directory",
    errno.EPERM: "you may not write there: choose another location, or get write permission on the directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another location",
    errno.EEXIST: "a file is in the way of a directory: choose another location",
    errno.EISDIR: "that is a directory, not a file: name a file",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def output_error(exc: OSError, what: str, after: str = "") -> OutputError:
    """``exc`` (raised while writing ``what``) as an OutputError: the path, the system's words, the fix,
    then ``after`` (what became of the work done so far)."""
    path = exc.filename if exc.filename is not None else what
    words = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0, "fix the location or choose another one")
    error = OutputError(f"cannot write {what}: {words} ({path}); {fix}" + (f". {after}" if after else ""))
    error.errno = exc.errno  # for callers that test it; strerror and filename stay unset: they would replace the message
    return error


@contextlib.contextmanager
def output_errors(what: str, after: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn OSErrors raised inside into :func:`output_error`'s (our own errors pass through: several
    of them are OSErrors too, such as ``OutputExistsError``). ``after`` may be a callable, asked only
    when an error happens (what was kept depends on how far the work got)."""
    try:
        yield
    except LogitCacheError:
        raise
    except OSError as exc:
        raise output_error(exc, what, after() if callable(after) else after) from exc


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, with an :class:`OutputError`, if a file cannot be created at ``path``: make its
    directory, then create and delete a probe file in it (``os.access`` trusts permission bits that do
    not stop root and cannot see every refusal). ``what`` names the file in the message.

    Call it before long work whose result goes to ``path`` (a training run), not after.
    """
    path = Path(path)
    with output_errors(f"{what} {path}"):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{secrets.token_hex(4)}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
