"""Buffered, threaded writing of shards, each finished atomically with its progress record.

The output directory's life (``check_output``, ``prepare_work_dir``, ``finalize``, progress records)
is ``io/workdir.py``, re-exported here under its old import path.

The dump's main thread runs the teacher and hands each encoded batch to a bounded queue. A pool of
``writer_threads`` threads turns batches into host arrays (waiting for the device copy, bad-row checks,
dtype narrowing, compact encoding: numpy work that releases the GIL) several at a time, and one writer
thread appends their results to the current shard in submission order, so shards are the same bytes
whatever the thread count. Disk I/O and compression overlap with inference, and the queue bound keeps
memory flat when the host is slower than the teacher (the main thread then waits).

A shard is written under ``<name>.partial`` and renamed into place when closed; then a progress
record ``progress/<name>.json`` (its ranges and checksum) is written atomically. A shard counts
as done only when its record exists, so after a kill at any moment, ``--resume`` keeps exactly the
shards with records and rewrites the rest from their first sample. Shard boundaries depend only on
the dataset length, views and ``shard_rows`` (never on ranks or batch size), which is what makes
resumed and multi-rank dumps identical to a single uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheFormatError, LogitCacheError, UsageError
from ..format.layout import ShardPlan, plan_shards, plan_token_shards, split_for_rank  # noqa: F401  (moved to format.layout)
from ..format.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_json_atomic, write_manifest  # noqa: F401  (old import path)
from ..format.paths import PARTIAL_SUFFIX, output_error, partial_path  # noqa: F401  (partial_path: old import path)
from ..store import ArraySpec, Backend, ShardWriter
from .ownership import (  # noqa: F401  (moved to io.ownership)
    OUR_MANIFEST_FIELDS,
    TOMBSTONE_INFIX,
    WORK_MARKER,
    WORK_MARKER_TOOL,
    discard_dir,
    is_empty_dir,
    is_our_manifest,
    is_tombstone,
    read_work_marker,
    refuse_unless_ours,
    remove_stray_temps,
    rmtree_tolerant,
    tombstone_path,
    why_not_ours,
    write_work_marker,
)
from .workdir import (  # noqa: F401  (moved to io.workdir)
    PROGRESS_DIR,
    REPLACED_INFIX,
    check_output,
    check_work_intact,
    discard_unfinished,
    finalize,
    move_into_place,
    prepare_work_dir,
    progress_path,
    read_progress,
    remove_path,
)

log = logging.getLogger(__name__)


_STOP = object()


def default_writer_threads() -> int:
    """min(4, cores): enough threads for the per-batch host work (compact encoding above all) to keep up
    with the one thread that writes shards; more would mostly add batches held in memory."""
    return min(4, os.cpu_count() or 1)


class ShardedWriter:
    """A writer thread fed through a bounded queue.

    ``submit(plan, produce)`` queues a callable that returns the batch's host arrays; ``end_shard(plan)``
    closes the shard after its last batch. Errors raised off the main thread come back to the
    caller on its next call.

    The callables run in a small thread pool (``producers`` threads, :func:`default_writer_threads`
    when None), in parallel and off the main thread: waiting for a device copy, narrowing dtypes and
    compact encoding (numpy, which releases the GIL) would otherwise serialise with the writing. The
    writer thread takes their results in submission order, so shards are written exactly as with one
    thread, and the first failure in that order is the one reported. At most ``max_pending`` + 2
    batches are in flight (queued, being written, being submitted).
    """

    def __init__(
        self,
        directory: Path,
        backend: Backend,
        specs: list[ArraySpec],
        chunk_rows: int,
        attrs: Mapping[str, Any],
        max_pending: int = 8,
        producers: int | None = None,
    ) -> None:
        self.directory = directory
        self.backend = backend
        self.specs = specs
        self.chunk_rows = chunk_rows
        self.attrs = dict(attrs)
        self.entries: list[ShardEntry] = []
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        workers = producers if producers is not None else default_writer_threads()
        if workers < 1:
            raise UsageError(f"writer threads must be >= 1, got {workers}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="logit-cache-encode")
        self._error: BaseException | None = None
        self._current: tuple[ShardPlan, ShardWriter] | None = None
        (directory / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="logit-cache-writer", daemon=True)
        self._thread.start()

    # -- main-thread side ---------------------------------------------------------------------
    def submit(self, plan: ShardPlan, produce: Callable[[], Mapping[str, np.ndarray]]) -> None:
        self._raise_if_failed()
        self._put(("batch", plan, self._pool.submit(produce)))

    def end_shard(self, plan: ShardPlan) -> None:
        self._put(("end", plan, None))

    def finish(self) -> list[ShardEntry]:
        """Wait for every queued batch to be written; return the shards closed, in order."""
        self._put(_STOP)
        self._thread.join()
        self._raise_if_failed()
        return self.entries

    def abort(self) -> None:
        """Stop after a failure in the main thread, keeping the work already handed over: queued
        batches are written and shards whose end was queued are closed and recorded (so --resume
        keeps them); the shard still open stays ``.partial`` (resume discards it). If the writer
        thread itself failed, what is still queued is dropped."""
        if self._error is None and self._thread.is_alive():
            try:
                self._put(_STOP)
                self._thread.join()
                return
            except BaseException:  # the writer failed meanwhile: fall through and drop the queue
                pass
        self._error = self._error or RuntimeError("aborted")
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout=30)

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer-thread side -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                kind, plan, produce = item
                if kind == "batch":
                    self._writer_for(plan).append(produce.result())
                else:
                    self._close_shard(plan)
        except OSError as exc:  # a full disk, a read-only mount...: one line for the user, naming the file
            self._error = exc if isinstance(exc, LogitCacheError) else output_error(
                exc, f"the shards in {self.directory}",
                "The unfinished dump is kept: rerun with --resume once fixed (finished shards are kept)")
        except BaseException as exc:  # handed to the main thread by _raise_if_failed
            self._error = exc
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._current is not None:  # stopped with a shard open: close the files, leave it .partial
                try:
                    self._current[1].close()
                except Exception:  # the shard stays .partial either way
                    pass

    def _writer_for(self, plan: ShardPlan) -> ShardWriter:
        if self._current is not None and self._current[0] == plan:
            return self._current[1]
        if self._current is not None:
            raise RuntimeError(f"shard {self._current[0].index} was not ended before shard {plan.index} began")
        name = self.backend.shard_name(plan.index)
        partial = self.directory / (name + PARTIAL_SUFFIX)
        remove_path(partial)
        attrs = {**self.attrs, "shard_index": plan.index, "row_start": plan.row_start, "sample_start": plan.sample_start}
        writer = self.backend.create(partial, self.specs, self.chunk_rows, attrs, plan.planned_rows(self.specs))
        self._current = (plan, writer)
        return writer

    def _close_shard(self, plan: ShardPlan) -> None:
        writer = self._writer_for(plan)
        for name, want in plan.planned_rows(self.specs).items():
            got = writer.rows_written(name)
            if got != want:
                raise CacheFormatError(
                    f"shard {plan.index}: array {name!r} received {got} rows, expected {want}; the dataset "
                    f"returned a different number of items than its length promised"
                )
        checksum = writer.close()
        self._current = None
        name = self.backend.shard_name(plan.index)
        (self.directory / (name + PARTIAL_SUFFIX)).rename(self.directory / name)
        entry = ShardEntry(name, plan.row_start, plan.row_stop, plan.sample_start, plan.sample_stop, checksum)
        write_json_atomic(progress_path(self.directory, name), asdict(entry))
        self.entries.append(entry)
        log.debug("closed %s (%d rows, %s)", name, plan.num_rows, checksum)
