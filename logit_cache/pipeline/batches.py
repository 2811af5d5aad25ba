"""The dump's batch loop: batches that never cross a shard boundary go through the teacher on the
device, are encoded there, and their small host arrays go to the writer thread.

One loop (:func:`run_shards`) for both kinds of dataset; what differs is in a rows object:
:class:`SampleRows` (one row per sample view, labels per sample) and :class:`TokenRows` (batches of
whole sequences, right-padded; one row per real token; each shard's ``offsets`` written as its
batches arrive). Batches never cross a shard boundary, and shard boundaries depend only on the data
and ``shard_rows``, so a resumed or multi-rank dump computes exactly the batches an uninterrupted
single-process one does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from ..data.datasets import ResolvedDataset, split_batch
from ..data.replay import ReplayViews
from ..data.tokens import TokenBatch, collate_tokens
from ..errors import DatasetError, NonFiniteLogitsError, TeacherOutputError
from ..format.layout import Layout, ShardPlan
from ..format.manifest import FORMAT_VERSION
from ..io.writer import ShardedWriter
from ..store import get_backend
from ..targets import TargetKind, encode_tokens
from ..targets.compact import encode_arrays
from ..targets.encoded import EncodedBatch
from ..teachers.lm_head import ChunkedHead, choose_head
from ..teachers.runtime import autocast_for, to_device
from ..teachers.sources import Teacher
from .failures import call_teacher, next_batch
from .prepare import Prepared, writing


def make_batches(plans: list[ShardPlan], batch_size: int, views: int = 1) -> list[tuple[ShardPlan, list[int]]]:
    """Batches of row indices (sample indices when ``views`` is 1) that never cross a shard boundary, in
    order; with several views a batch holds every view of ``batch_size // views`` whole samples."""
    samples = max(1, batch_size // views)
    return [
        (plan, list(range(start * views, min(plan.sample_stop, start + samples) * views)))
        for plan in plans
        for start in range(plan.sample_start, plan.sample_stop, samples)
    ]


def make_loader(resolved: ResolvedDataset, batches: list[list[int]], num_workers: int, pin_memory: bool,
                dataset: Any = None, collate: Callable[[list[Any]], Any] = default_collate) -> DataLoader:
    """The DataLoader the dump (and the benchmark's bare-inference baseline) iterate; ``dataset``
    replaces the resolved one (the replayed views of :class:`ReplayViews`)."""
    return DataLoader(
        resolved.dataset if dataset is None else dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def default_num_workers(device: torch.device) -> int:
    """No workers on the CPU (they would compete with the teacher for cores); some on a GPU."""
    if device.type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------------------------------
# Host side: from device tensors to the arrays a shard stores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storage:
    """How host arrays become stored arrays: ids and counts narrowed to their storage dtypes (the
    integer arrays of the kind's plain layout), then the encoding."""

    kind: TargetKind
    num_classes: int
    dtype: str
    encoding: str
    casts: dict[str, np.dtype]

    @classmethod
    def of(cls, kind: TargetKind, config: Any, num_classes: int) -> Storage:
        """For a dump of ``config`` (a DumpConfig) of ``kind`` with ``num_classes`` classes."""
        specs = kind.array_specs(kind.width(config), num_classes, config.dtype, sampled_logits=True)
        casts = {spec.name: np.dtype(spec.dtype) for spec in specs if np.dtype(spec.dtype).kind in "iu"}
        return cls(kind, num_classes, config.dtype, config.encoding, casts)

    def store(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, dtype in self.casts.items():
            if name in arrays:
                arrays[name] = arrays[name].astype(dtype)
        if self.encoding == "plain" or not self.kind.compact:
            return arrays
        targets = {name: arrays.pop(name) for name in list(arrays) if name not in ("labels", "offsets")}
        return {**encode_arrays(self.kind.name, targets, self.encoding, self.num_classes), **arrays}


def host_producer(
    encoded: dict[str, torch.Tensor],
    nonfinite: torch.Tensor,
    overflow: torch.Tensor,
    labels: torch.Tensor | None,
    indices: Sequence[int],
    event: Any,
    storage: Storage,
    extra: dict[str, np.ndarray] | None = None,
) -> Callable[[], dict[str, np.ndarray]]:
    """A callable for the writer thread: wait for the copies, check for bad rows, convert to numpy.

    ``indices`` gives each row's dataset index (per token: the index of its sequence); ``extra``
    holds host arrays written as they are (a per-token batch's offsets).
    """
    dtype = storage.dtype

    def produce() -> dict[str, np.ndarray]:
        if event is not None:
            event.synchronize()
        bad = nonfinite.numpy()
        if bad.any():
            rows = list(dict.fromkeys(int(indices[i]) for i in np.flatnonzero(bad)))
            shown = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
            raise NonFiniteLogitsError(
                f"the teacher produced NaN or infinite logits for dataset indices {shown}; nothing is stored "
                f"for them. Check the teacher and these inputs (the unfinished dump is kept for --resume)"
            )
        over = overflow.numpy()
        if over.any():
            rows = list(dict.fromkeys(int(indices[i]) for i in np.flatnonzero(over)))[:20]
            raise NonFiniteLogitsError(
                f"logits of dataset indices {', '.join(map(str, rows))} do not fit --dtype {dtype} "
                f"(|logit| > 65504 in float16); dump with --dtype float32"
            )
        arrays = {name: tensor.numpy() for name, tensor in encoded.items()}
        if labels is not None:
            arrays["labels"] = labels.numpy().astype(np.int64, copy=False)
        return storage.store({**arrays, **(extra or {})})

    return produce


#: One side stream per GPU for the device-to-host copies of encoded batches.
_COPY_STREAMS: dict[torch.device, Any] = {}


def copy_to_host(encoded: EncodedBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any]:
    """Start the device-to-host copies of an encoded batch; the event marks their end on a GPU.

    On a GPU the copies go into pinned host memory on a side stream that first waits for the encoding,
    so the next batch's forward, queued on the compute stream meanwhile, runs while they copy. The
    sources are marked used by that stream, or the allocator could hand their memory to the next forward
    before the copy has read it. The device is the encoded tensors' own: a teacher placed over several
    devices encodes where its head is.
    """
    source = encoded.nonfinite.device
    tensors = [*encoded.arrays.values(), encoded.nonfinite, encoded.overflow]
    if source.type != "cuda":
        copies = [tensor.to("cpu") for tensor in tensors]
        event = None
    else:
        stream = _COPY_STREAMS.get(source)
        if stream is None:
            stream = _COPY_STREAMS[source] = torch.cuda.Stream(source)
        stream.wait_stream(torch.cuda.current_stream(source))
        with torch.cuda.stream(stream):
            copies = [torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
                      for tensor in tensors]
        for tensor in tensors:
            tensor.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)  # after the copies to the host
    host = dict(zip(encoded.arrays, copies[: len(encoded.arrays)], strict=True))
    return host, copies[-2], copies[-1], event


# --------------------------------------------------------------------------------------------------
# What differs between per-sample and per-token dumps
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch read from the loader, ready for the teacher."""

    inputs: Any
    #: each sample's dataset index (for messages)
    indices: list[int]
    #: the teacher output's shape, and how to say it in a message
    expected: tuple[int, ...]
    shape_hint: str = ""
    labels: torch.Tensor | None = None
    #: per token: each sequence's token count, each row's sequence, the shard-local offsets
    lengths: list[int] | None = None
    row_indices: Sequence[int] | None = None
    extra: dict[str, np.ndarray] | None = None


class SampleRows:
    """Per-sample data: a row per view of each sample; with several views, item ``i * views + v`` of
    the replayed dataset; labels per sample."""

    unit = "sample"
    collate = staticmethod(default_collate)

    def __init__(self, prepared: Prepared, num_classes: int) -> None:
        self.prepared, self.num_classes = prepared, num_classes
        self.views = prepared.config.views

    def dataset(self) -> Any:
        config = self.prepared.config
        return ReplayViews(self.prepared.resolved.dataset, config.views, config.seed) if config.seed is not None else None

    def total(self, todo: list[ShardPlan]) -> int:
        return sum(plan.num_samples for plan in todo)

    def read(self, plan: ShardPlan, batch_rows: list[int], batch_iter: Iterator[Any]) -> Batch:
        # messages name dataset indices: with several views a batch's rows are i * views + v
        indices = batch_rows if self.views == 1 else [row // self.views for row in batch_rows]
        resolved = self.prepared.resolved
        inputs, labels = split_batch(next_batch(batch_iter, indices, resolved.dataset), resolved.has_labels)
        if labels is not None and self.views > 1:
            labels = labels[:: self.views]  # rows are whole samples' views; labels are per sample
        return Batch(inputs, indices, (len(indices), self.num_classes), labels=labels)


class TokenRows:
    """Per-token data: batches of whole sequences, right-padded; one row per real token."""

    unit = "tok"
    collate = staticmethod(collate_tokens)

    def __init__(self, prepared: Prepared, num_classes: int, lengths: np.ndarray) -> None:
        self.prepared, self.num_classes, self.lengths = prepared, num_classes, lengths
        self.ends = np.cumsum(lengths)  # global row after each sample

    def dataset(self) -> Any:
        return None

    def total(self, todo: list[ShardPlan]) -> int:
        return int(sum(plan.num_rows for plan in todo))

    def read(self, plan: ShardPlan, indices: list[int], batch_iter: Iterator[Any]) -> Batch:
        batch: TokenBatch = next_batch(batch_iter, indices, self.prepared.resolved.dataset)
        got = batch.lengths.tolist()
        want = self.lengths[indices].tolist()
        if got != want:
            wrong = next(i for i, g, w in zip(indices, got, want, strict=True) if g != w)
            raise DatasetError(
                f"dataset item {wrong} has {got[indices.index(wrong)]} tokens now but had "
                f"{want[indices.index(wrong)]} when the dump planned its shards: the dataset must not change during a dump"
            )
        # shard-local offsets: the batch's sequence ends, and the shard's leading 0 with its first batch
        local = self.ends[indices[0] : indices[-1] + 1] - plan.row_start
        if indices[0] == plan.sample_start:
            local = np.concatenate([[0], local])
        return Batch(batch.inputs, indices, (len(indices), int(batch.lengths.max()), self.num_classes),
                     " ([batch, tokens, vocab])", lengths=got,
                     row_indices=np.repeat(indices, got),  # each row's sequence, for error messages (read only then)
                     extra={"offsets": local.astype(np.int64)})


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def run_shards(prepared: Prepared, teacher: Teacher, layout: Layout, todo: list[ShardPlan], num_classes: int,
               show_progress: bool, lengths: np.ndarray | None = None) -> tuple[int, float, float]:
    """Run the teacher over this rank's unfinished shards (per token when ``lengths`` gives each
    sequence's token count); return (rows computed, sum of top-k mass, seconds)."""
    config, device, kind = prepared.config, prepared.device, prepared.kind
    if not todo:
        return 0, 0.0, 0.0
    started = time.perf_counter()
    rows_of = TokenRows(prepared, num_classes, lengths) if lengths is not None else SampleRows(prepared, num_classes)
    batches = make_batches(todo, config.batch_size, config.views)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(device)
    loader = make_loader(prepared.resolved, [indices for _, indices in batches], workers, device.type == "cuda",
                         rows_of.dataset(), rows_of.collate)
    storage = Storage.of(kind, config, num_classes)
    width, value_dtype = kind.width(config), kind.device_value_dtype(config.dtype, config.encoding)
    bar = tqdm(total=rows_of.total(todo), unit=rows_of.unit, unit_scale=True, desc="dump", disable=None if show_progress else True)

    autocast = partial(autocast_for, device, config.precision)
    heads: list[ChunkedHead | None] = []  # the one decision, forward or chunked head, taken on the first per-token batch

    def step(plan: ShardPlan, batch_rows: list[int], batch_iter: Iterator[Any]) -> tuple[Any, torch.Tensor, int, int]:
        batch = rows_of.read(plan, batch_rows, batch_iter)
        indices = batch.indices
        inputs = to_device(batch.inputs, device)
        if batch.lengths is not None and not heads:
            forward = partial(call_teacher, teacher.module, indices=indices)
            heads.append(choose_head(teacher.module, inputs, batch.lengths, forward, autocast))
        head = heads[0] if batch.lengths is not None else None
        expected, hint = batch.expected, batch.shape_hint
        if head is not None:  # the body's last hidden states; encode_tokens applies the head per chunk of tokens
            expected, hint = (*batch.expected[:2], head.hidden_size), " ([batch, tokens, hidden size] from its body)"
        with autocast():
            output = call_teacher(teacher.module if head is None else head.hidden, inputs, indices)
        if tuple(output.shape) != expected:
            raise TeacherOutputError(
                f"for dataset indices {indices[0]}..{indices[-1]} the teacher returned shape {tuple(output.shape)}; "
                f"expected {expected}{hint}"
            )
        if batch.lengths is None:
            encoded = kind.encode(output, width, value_dtype)
            rows, progress = len(batch_rows), len(batch_rows) // config.views
        else:
            encoded = encode_tokens(output, batch.lengths, indices, kind.name, width, value_dtype, seed=config.seed,
                                    sample_temperature=config.sample_temperature, head=head)
            rows = progress = len(batch.row_indices)
        del output
        host, nonfinite, overflow, event = copy_to_host(encoded)
        row_indices = indices if batch.row_indices is None else batch.row_indices
        produce = host_producer(host, nonfinite, overflow, batch.labels, row_indices, event, storage, batch.extra)
        return produce, encoded.topk_mass, rows, progress

    return write_batches(prepared, layout, batches, loader, bar, step, started)


def write_batches(prepared: Prepared, layout: Layout, batches: list[tuple[ShardPlan, list[int]]], loader: DataLoader,
                  bar: Any, step: Any, started: float) -> tuple[int, float, float]:
    """For each batch, ``step(plan, batch_rows, batch_iter)`` runs the teacher and returns ``(produce,
    mass, rows, progress)``; the producer goes to the writer thread, a shard is ended after its last
    batch, and on any failure the writer keeps what it was handed (finished shards stay for --resume).
    Returns (rows computed, sum of top-k mass, seconds)."""
    attrs = {"logit_cache_format_version": FORMAT_VERSION, "key": prepared.key}
    with writing(prepared):
        writer = ShardedWriter(prepared.work, get_backend(prepared.config.backend), layout.specs, layout.chunk_rows, attrs,
                               producers=getattr(prepared.config, "writer_threads", None))
    mass_total = torch.zeros((), dtype=torch.float64, device=prepared.device)
    rows = 0
    try:
        with torch.inference_mode():
            batch_iter = iter(loader)
            for position, (plan, batch_rows) in enumerate(batches):
                produce, mass, count, progress = step(plan, batch_rows, batch_iter)
                mass_total += mass
                writer.submit(plan, produce)
                if position + 1 == len(batches) or batches[position + 1][0] != plan:
                    writer.end_shard(plan)
                rows += count
                bar.update(progress)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return rows, float(mass_total.item()), time.perf_counter() - started
