"""Failures of the dataset or the teacher during a dump, reported with the dataset indices they
happened on (and, for a batch, the first item that fails on its own), as one line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import DatasetError, LogitCacheError, TeacherOutputError
from ..teachers.runtime import run_teacher


def one_line(exc: BaseException) -> str:
    """An exception as one line. DataLoader workers re-raise with the worker's traceback in the
    message; its last line is the original ``Type: message``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1].strip()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def next_batch(batch_iter: Iterator[Any], indices: list[int], dataset: Any = None) -> Any:
    """The next batch; a dataset that fails is reported with the indices it failed on (and, when
    ``dataset`` is given, the first item of the batch that fails when read again on its own)."""
    try:
        return next(batch_iter)
    except LogitCacheError:
        raise
    except Exception as exc:
        failing = first_failing_item(dataset, indices) if dataset is not None else None
        at = f" at item {failing}" if failing is not None else ""
        hint = ""
        if isinstance(exc, IndexError) and dataset is not None:
            hint = (f"; the dataset's len() is {len(dataset)}, but an index below it is out of range: __len__ must "
                    f"count only the items __getitem__ can return")
        raise DatasetError(f"loading dataset indices {indices[0]}..{indices[-1]} failed{at}: {one_line(exc)}{hint}") from exc


def first_failing_item(dataset: Any, indices: Sequence[int]) -> int | None:
    """The first of ``indices`` whose item raises when read alone (the batch already failed, so
    reading its items again costs nothing that matters); None if each reads fine on its own."""
    for index in dict.fromkeys(indices):
        try:
            dataset[index]
        except Exception:
            return index
    return None


def call_teacher(module: Any, inputs: Any, indices: list[int]) -> torch.Tensor:
    """``run_teacher``, with a crash inside the teacher reported with the indices it crashed on."""
    try:
        return run_teacher(module, inputs)
    except LogitCacheError:
        raise
    except Exception as exc:
        raise TeacherOutputError(
            f"the teacher failed on dataset indices {indices[0]}..{indices[-1]}: {one_line(exc)} "
            f"(set LOGIT_CACHE_TRACEBACK=1 for the traceback)"
        ) from exc
