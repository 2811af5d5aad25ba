"""The inference stage: teacher + dataset -> encoded logits -> shards + manifest.

Flow (DESIGN.md section 1): resolve the dataset and hash the teacher file (the cache key needs no
weights), check the output place, load the teacher, run it once on item 0 to learn the class
count, plan shards, then stream batches through the teacher on the device, encode them there
(top-k, logsumexp, NaN checks) and hand small host arrays to the writer thread. Batches never
cross a shard boundary, and shard boundaries depend only on the data and ``shard_rows``; so a
resumed or multi-rank dump computes exactly the batches an uninterrupted single-process one does.

Output safety: everything is written under ``OUT.partial`` and renamed to ``OUT`` only after the
manifest says ``complete: true``, so ``OUT`` existing means a whole cache, whatever happened.

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) each rank takes a contiguous run of shards;
rank 0 prepares the directory before and writes the manifest after every rank finished. Every
phase ends in a collective check, so an error on one rank stops all of them with its message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from .. import __version__
from .._legacy import callable_module
from ..data.datasets import ResolvedDataset, resolve_dataset, split_batch
from ..data.replay import ReplayViews, check_replayable
from ..data.tokens import TokenBatch, collate_tokens, token_lengths
from ..errors import (
    CheckpointNotFoundError,
    DatasetError,
    LogitCacheError,
    NonFiniteLogitsError,
    TeacherOutputError,
    UsageError,
)
from ..format.identity import content_key
from ..format.manifest import (
    BACKENDS,
    FORMAT_VERSION,
    VALUE_DTYPES,
    Manifest,
    read_manifest,
)
from ..format.paths import output_errors
from ..io.writer import (
    ShardedWriter,
    ShardPlan,
    check_output,
    finalize,
    partial_path,
    plan_shards,
    plan_token_shards,
    prepare_work_dir,
    read_progress,
    split_for_rank,
)
from ..store import ArraySpec, get_backend
from ..targets.batch import count_dtype, encode, index_dtype
from ..targets.compact import ENCODINGS, encode_arrays, stored_specs
from ..teachers.runtime import PRECISIONS, autocast_for, resolve_device, run_teacher, to_device
from ..teachers.sources import Teacher, is_hf_spec, load_teacher, teacher_sha256
from ..tools.catalog import ROOT_ENV, cache_dir_name, directory_bytes, find_by_key, readable_name, writer_lock

log = logging.getLogger(__name__)


#: A chunk (the reader's unit of I/O) holds about this many bytes of its widest array: big enough
#: that per-chunk costs (~2 ms a Zarr chunk file) stay small, small enough that the partly filled
#: last chunk of a shard (stored whole by HDF5 and by uncompressed Zarr) wastes little.
CHUNK_TARGET_BYTES = 256 << 10
#: Per-sample labels (8 bytes a row) get chunks of their own size, not hundreds of tiny files.
LABEL_CHUNK_ROWS = 16384
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 1 << 16
#: Default shard size: few enough files for big caches, small enough to resume cheaply.
SHARD_TARGET_BYTES = 256 << 20
#: Per-token dumps encode at most this many tokens' logits at a time on the device: with a vocabulary
#: of 250k, a float32 [1024, V] is 1 GB; the teacher's own [B, T, V] output is the only larger tensor.
TOKEN_CHUNK = 1024


@dataclass
class DumpConfig:
    """What ``logit-cache dump`` was asked to do (one field per CLI option)."""

    teacher: str
    dataset: str
    out: str | None = None  # the cache directory; or name it by content under cache_root
    mode: str = "topk"
    k: int | None = None
    #: sampled mode: draws per row (token), and the temperature of the distribution drawn from
    m: int | None = None
    sample_temperature: float = 1.0
    #: "plain" (the format's arrays as they are) or "compact" (compact.py: fewer bytes per token)
    encoding: str = "plain"
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_checkpoint: bool = False
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    dtype: str = "float16"
    backend: str = "zarr"
    batch_size: int = 256
    num_workers: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    shard_rows: int | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    views: int = 1
    seed: int | None = None
    #: A shared root: the cache goes to ROOT/<readable>--<key>, and a complete one of that key is reused.
    cache_root: str | None = None
    #: Wait for another dump writing the same cache (else fail at once).
    wait: bool = True

    def validate(self) -> None:
        """Reject bad or incompatible options before any work (or any file) is done."""
        if (self.out is None) == (self.cache_root is None):
            raise UsageError(
                f"say where the cache goes: --out DIR, or --cache-root DIR (or ${ROOT_ENV}) to name it by its content"
                + ("; not both" if self.out is not None else "")
            )
        if self.mode == "topk":
            if self.k is None:
                raise UsageError("choose what to store: --topk K (the K largest logits per row), --sample M or --full")
            if self.k < 1:
                raise UsageError(f"--topk must be >= 1, got {self.k}")
        elif self.mode == "sampled":
            if self.m is None or not 1 <= self.m <= 65535:
                raise UsageError(f"--sample M draws M ids per row: M must be in [1, 65535], got {self.m}")
        elif self.mode != "full":
            raise UsageError(f"unknown mode {self.mode!r}; use --topk K, --sample M or --full")
        chosen = [flag for flag, on in (("--topk", self.k is not None), ("--sample", self.m is not None),
                                        ("--full", self.mode == "full")) if on]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} are exclusive: pass one of --topk K, --sample M, --full")
        if not self.sample_temperature > 0:
            raise UsageError(f"--sample-temperature must be > 0, got {self.sample_temperature}")
        if self.sample_temperature != 1.0 and self.mode != "sampled":
            raise UsageError("--sample-temperature applies to --sample M (the distribution ids are drawn from)")
        if self.encoding not in ENCODINGS:
            raise UsageError(f"--encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.encoding != "plain" and self.mode == "full":
            raise UsageError("--encoding compact applies to --topk and --sample caches; full logits are stored plain")
        if self.dtype not in VALUE_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--format {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.shard_rows is not None and self.shard_rows < self.views:
            raise UsageError(f"--shard-rows must be >= {self.views} (one sample's rows), got {self.shard_rows}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite are exclusive: resume keeps finished shards, overwrite discards them")
        if self.views < 1:
            raise UsageError(f"--views must be >= 1, got {self.views}")

    def resolved(self) -> DumpConfig:
        """Validated, with the defaults that depend on other options filled in (a copy: the caller's
        config is left as given, so it can be reused for another dump)."""
        self.validate()
        return replace(
            self,
            # several views need seeded replay, sampled targets a seeded draw; 0 is the documented default
            seed=0 if (self.views > 1 or self.mode == "sampled") and self.seed is None else self.seed,
            # Under a root the key is the name: an existing cache of this key is this very content, so
            # reuse it, and resume an unfinished dump of it (a killed writer's work) instead of refusing.
            resume=self.resume or (self.cache_root is not None and not self.overwrite),
        )


@dataclass
class DumpResult:
    """What a dump did, for the CLI summary and for callers."""

    out: Path
    manifest: Manifest
    reused: bool
    rows_computed: int
    resumed_shards: int
    #: Wall time of the whole dump, and of its inference loop alone (no set-up, hashing or finalize).
    seconds: float
    compute_seconds: float
    bytes_on_disk: int
    mean_topk_mass: float | None

    @property
    def samples_per_second(self) -> float:
        """Samples per second of the inference loop (teacher, encoding and writing together)."""
        samples = self.rows_computed / self.manifest.views
        return samples / self.compute_seconds if self.compute_seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Devices, distribution, small helpers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _sync(dist_info: _Dist, error: BaseException | None) -> None:
    """End a phase: if any rank failed, every rank raises (the failing one its own error)."""
    if dist_info.world_size > 1:
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if error is None and flag.item() > 0:
            raise LogitCacheError(f"rank {dist_info.rank}: stopping because another rank failed (see its message)")
    if error is not None:
        raise error


def _phase(dist_info: _Dist, fn: Any, *args: Any) -> Any:
    """Run ``fn`` on this rank, then :func:`_sync` so errors reach every rank."""
    try:
        result = fn(*args)
    except BaseException as exc:
        _sync(dist_info, exc)
        raise
    _sync(dist_info, None)
    return result


def _one_line(exc: BaseException) -> str:
    """An exception as one line. DataLoader workers re-raise with the worker's traceback in the
    message; its last line is the original ``Type: message``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1].strip()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _next_batch(batch_iter: Iterator[Any], indices: list[int], dataset: Any = None) -> Any:
    """The next batch; a dataset that fails is reported with the indices it failed on (and, when
    ``dataset`` is given, the first item of the batch that fails when read again on its own)."""
    try:
        return next(batch_iter)
    except LogitCacheError:
        raise
    except Exception as exc:
        failing = _first_failing_item(dataset, indices) if dataset is not None else None
        at = f" at item {failing}" if failing is not None else ""
        hint = ""
        if isinstance(exc, IndexError) and dataset is not None:
            hint = (f"; the dataset's len() is {len(dataset)}, but an index below it is out of range: __len__ must "
                    f"count only the items __getitem__ can return")
        raise DatasetError(f"loading dataset indices {indices[0]}..{indices[-1]} failed{at}: {_one_line(exc)}{hint}") from exc


def _first_failing_item(dataset: Any, indices: Sequence[int]) -> int | None:
    """The first of ``indices`` whose item raises when read alone (the batch already failed, so
    reading its items again costs nothing that matters); None if each reads fine on its own."""
    for index in dict.fromkeys(indices):
        try:
            dataset[index]
        except Exception:
            return index
    return None


def _call_teacher(module: Any, inputs: Any, indices: list[int]) -> torch.Tensor:
    """``run_teacher``, with a crash inside the teacher reported with the indices it crashed on."""
    try:
        return run_teacher(module, inputs)
    except LogitCacheError:
        raise
    except Exception as exc:
        raise TeacherOutputError(
            f"the teacher failed on dataset indices {indices[0]}..{indices[-1]}: {_one_line(exc)} "
            f"(set LOGIT_CACHE_TRACEBACK=1 for the traceback)"
        ) from exc


def _pow2_at_least(count: int) -> int:
    return 1 << max(0, count - 1).bit_length()


def array_specs(mode: str, k: int | None, num_classes: int, dtype: str, has_labels: bool, num_samples: int,
                per_token: bool = False, encoding: str = "plain", sampled_logits: bool = False) -> list[ArraySpec]:
    """The arrays every shard holds, with names, dtypes and row shapes of the cache format.

    ``k`` is the row width: K in top-k mode, M in sampled mode. Per-token caches add the shard-local
    ``offsets`` and store no labels (the dataset's ids are the labels).
    """
    if mode == "full":
        specs = [ArraySpec("logits", dtype, (num_classes,))]
    else:
        assert k is not None
        specs = stored_specs(mode, k, num_classes, dtype, encoding, sampled_logits=sampled_logits)
    if per_token:
        offsets_chunk = min(LABEL_CHUNK_ROWS, max(MIN_CHUNK_ROWS, _pow2_at_least(num_samples + 1)))
        return [*specs, ArraySpec("offsets", "int64", (), per="offsets", compress=True, chunk_rows=offsets_chunk)]
    if has_labels:
        label_chunk = min(LABEL_CHUNK_ROWS, max(MIN_CHUNK_ROWS, _pow2_at_least(num_samples)))
        specs.append(ArraySpec("labels", "int64", (), per="sample", compress=True, chunk_rows=label_chunk))
    return specs


def chunk_and_shard_rows(specs: list[ArraySpec], shard_rows: int | None, views: int, num_rows: int) -> tuple[int, int]:
    """Rows per chunk and rows per shard.

    A chunk holds about CHUNK_TARGET_BYTES of the widest per-row array (a power of two of rows),
    but never much more rows than the cache has.
    """
    row_specs = [spec for spec in specs if spec.per == "row"]
    widest = max(spec.row_bytes for spec in row_specs)
    chunk = 1 << max(0, (CHUNK_TARGET_BYTES // widest).bit_length() - 1)
    chunk = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, chunk), max(MIN_CHUNK_ROWS, _pow2_at_least(num_rows)))
    if shard_rows is None:
        per_row = sum(spec.row_bytes for spec in row_specs)
        shard_rows = max(chunk, (SHARD_TARGET_BYTES // per_row) // chunk * chunk)
    shard_rows -= shard_rows % views
    return min(chunk, shard_rows), shard_rows


@dataclass(frozen=True)
class Layout:
    """How a cache is cut: its arrays, rows per chunk and per shard, and the shard plans."""

    specs: list[ArraySpec]
    chunk_rows: int
    shard_rows: int
    plans: list[ShardPlan]


def plan_layout(mode: str, k: int | None, num_classes: int, dtype: str, has_labels: bool, num_samples: int,
                views: int = 1, shard_rows: int | None = None, lengths: np.ndarray | None = None,
                encoding: str = "plain", sampled_logits: bool = False) -> Layout:
    """The layout a dump of these settings writes (the benchmark replays its batches from it).

    ``lengths``: tokens per sample for a per-token cache (rows are tokens; shards cut at sample ends).
    """
    per_token = lengths is not None
    specs = array_specs(mode, k, num_classes, dtype, has_labels and not per_token, num_samples, per_token, encoding, sampled_logits)
    num_rows = int(lengths.sum()) if per_token else num_samples * views
    chunk_rows, shard_rows = chunk_and_shard_rows(specs, shard_rows, views, num_rows)
    plans = plan_token_shards(lengths, shard_rows) if per_token else plan_shards(num_samples, views, shard_rows)
    return Layout(specs, chunk_rows, shard_rows, plans)


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
                dataset: Any = None) -> DataLoader:
    """The DataLoader the dump (and the benchmark's bare-inference baseline) iterate; ``dataset``
    replaces the resolved one (the replayed views of :class:`ReplayViews`)."""
    return DataLoader(
        resolved.dataset if dataset is None else dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=default_collate,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def default_num_workers(device: torch.device) -> int:
    """No workers on the CPU (they would compete with the teacher for cores); some on a GPU."""
    if device.type == "cpu":
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------------------------------
# The dump
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Everything decided before the first batch runs."""

    config: DumpConfig
    out: Path
    work: Path
    device: torch.device
    resolved: ResolvedDataset
    teacher_sha256: str
    fingerprint: str
    key: str


def _prepare(config: DumpConfig, dist_info: _Dist) -> tuple[_Prepared, Manifest | None]:
    config = config.resolved()
    device = resolve_device(config.device, dist_info.local_rank)
    out = Path(config.out) if config.out is not None else Path()  # under a root: named once the key is known
    if not is_hf_spec(config.teacher) and not Path(config.teacher).exists():
        raise CheckpointNotFoundError(f"--teacher {config.teacher}: no such file")
    resolved = resolve_dataset(config.dataset, config.dataset_kwargs)
    if config.mode == "sampled" and not resolved.per_token:
        raise UsageError(
            f"--sample M is for per-token (language-model) caches, whose vocabularies make top-k costly; --dataset "
            f"{config.dataset!r} has one distribution per sample: use --topk K or --full"
        )
    if resolved.per_token and config.views > 1:
        raise UsageError(
            f"--views {config.views}: augmented views are for per-sample data; --dataset {config.dataset!r} holds token sequences"
        )
    if config.seed is not None and not resolved.per_token:
        check_replayable(resolved.dataset, config.views, config.seed, config.dataset)
    teacher_digest = teacher_sha256(config.teacher)
    fingerprint = resolved.fingerprint(config.seed if not resolved.per_token else None)
    key = content_key(
        teacher_sha256=teacher_digest,
        dataset_fingerprint=fingerprint,
        mode=config.mode,
        k=config.k,
        views=config.views,
        seed=config.seed,
        dtype=config.dtype,
        format_version=FORMAT_VERSION,
        precision=config.precision,
        m=config.m,
        sample_temperature=config.sample_temperature,
        encoding=config.encoding,
    )
    if config.cache_root is not None:
        root = Path(config.cache_root)
        width = config.m if config.mode == "sampled" else config.k
        readable = readable_name(config.dataset, config.dataset_kwargs, config.mode, width, config.dtype, config.views, config.backend)
        out = find_by_key(root, key, config.backend) or root / cache_dir_name(readable, key)
    done = check_output(out, key, config.backend, config.resume, config.overwrite)
    return _Prepared(config, out, partial_path(out), device, resolved, teacher_digest, fingerprint, key), done


def _probe_classes(teacher: Teacher, prepared: _Prepared) -> int:
    """Run the teacher on item 0 to learn the class (vocabulary) count and check the output's shape."""
    per_token = prepared.resolved.per_token
    if per_token:
        batch = collate_tokens([prepared.resolved.dataset[0]])
        inputs = batch.inputs
    else:
        inputs, _ = split_batch(default_collate([prepared.resolved.dataset[0]]), prepared.resolved.has_labels)
    with torch.inference_mode(), autocast_for(prepared.device, prepared.config.precision):
        try:
            logits = _call_teacher(teacher.module, to_device(inputs, prepared.device), [0])
        except TeacherOutputError as exc:
            if not per_token:
                raise
            raise TeacherOutputError(
                f"{exc}. --dataset {prepared.config.dataset!r} holds token sequences: the teacher must take token ids "
                f"(batch, tokens) and return logits [batch, tokens, vocab]"
            ) from exc
    if per_token:
        length = int(batch.lengths[0])
        if logits.dim() != 3 or logits.shape[:2] != (1, length) or logits.shape[2] < 1:
            raise TeacherOutputError(
                f"--dataset {prepared.config.dataset!r} holds token sequences, so the teacher must return logits "
                f"[batch, tokens, vocab]; for item 0 ({length} tokens) it returned shape {tuple(logits.shape)}"
            )
        num_classes = int(logits.shape[2])
        if prepared.config.mode == "topk" and prepared.config.k > num_classes:
            raise UsageError(f"--topk {prepared.config.k} exceeds the teacher's vocabulary of {num_classes}; use a smaller K")
        return num_classes
    if logits.dim() == 3:
        raise TeacherOutputError(
            f"the teacher returned logits of shape {tuple(logits.shape)} ([batch, tokens, vocab]) but the items of "
            f"--dataset {prepared.config.dataset!r} are not token sequences (1-D integer ids, (ids, labels), or a dict "
            f"with input_ids); per-token caches need token-sequence items"
        )
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
        raise TeacherOutputError(
            f"for a batch of 1 the teacher returned shape {tuple(logits.shape)}; expected [1, classes]"
        )
    num_classes = int(logits.shape[1])
    if prepared.config.mode == "topk" and prepared.config.k > num_classes:
        raise UsageError(
            f"--topk {prepared.config.k} exceeds the teacher's {num_classes} classes; use --topk <= {num_classes} or --full"
        )
    return num_classes


def _in_progress_manifest(prepared: _Prepared, teacher: Teacher, layout: Layout, num_classes: int, dist_info: _Dist) -> Manifest:
    config = prepared.config
    return Manifest(
        backend=config.backend,
        mode=config.mode,
        k=config.k,
        m=config.m,
        sample_temperature=config.sample_temperature,
        encoding=config.encoding,
        num_classes=num_classes,
        dtype=config.dtype,
        temperature=config.temperature,
        num_samples=len(prepared.resolved),
        num_rows=layout.plans[-1].row_stop,
        views=config.views,
        seed=config.seed,
        per_token=prepared.resolved.per_token,
        teacher=teacher.manifest_entry(),
        dataset=prepared.resolved.manifest_entry(prepared.fingerprint),
        key=prepared.key,
        shards=[],
        complete=False,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        tool_version=__version__,
        torch_version=torch.__version__,
        chunk_rows=layout.chunk_rows,
        shard_rows=layout.shard_rows,
        arrays={spec.name: spec.to_json() for spec in layout.specs},
        dump={
            "device": str(prepared.device),
            "precision": config.precision,
            "batch_size": config.batch_size,
            "world_size": dist_info.world_size,
            # not part of the content: the same settings write the same bytes on any thread count (tests/test_determinism.py)
            "torch_threads": torch.get_num_threads(),
        },
    )


@dataclass(frozen=True)
class _Storage:
    """How host arrays become stored arrays: the ids' and counts' dtypes, the encoding."""

    mode: str
    num_classes: int
    dtype: str
    encoding: str
    ids_dtype: np.dtype
    counts_dtype: np.dtype | None

    def store(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in ("topk_indices", "sampled_indices"):
            if name in arrays:
                arrays[name] = arrays[name].astype(self.ids_dtype)
        if "sampled_counts" in arrays:
            arrays["sampled_counts"] = arrays["sampled_counts"].astype(self.counts_dtype)
        if self.encoding == "plain" or self.mode == "full":
            return arrays
        targets = {name: arrays.pop(name) for name in list(arrays) if name not in ("labels", "offsets")}
        return {**encode_arrays(self.mode, targets, self.encoding, self.num_classes), **arrays}


def _host_producer(
    encoded: dict[str, torch.Tensor],
    nonfinite: torch.Tensor,
    overflow: torch.Tensor,
    labels: torch.Tensor | None,
    indices: Sequence[int],
    event: Any,
    storage: _Storage,
    extra: dict[str, np.ndarray] | None = None,
) -> Any:
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


def _write_batches(prepared: _Prepared, layout: Layout, batches: list[tuple[ShardPlan, list[int]]], loader: DataLoader,
                   bar: Any, step: Any, started: float) -> tuple[int, float, float]:
    """The loop both kinds of dump share: for each batch, ``step(plan, batch_rows, batch_iter)`` runs
    the teacher and returns ``(produce, mass, rows, progress)``; the producer goes to the writer
    thread, a shard is ended after its last batch, and on any failure the writer keeps what it was
    handed (finished shards stay for --resume). Returns (rows computed, sum of top-k mass, seconds)."""
    config = prepared.config
    attrs = {"logit_cache_format_version": FORMAT_VERSION, "key": prepared.key}
    with _writing(prepared):
        writer = ShardedWriter(prepared.work, get_backend(config.backend), layout.specs, layout.chunk_rows, attrs)
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


def _run_shards(prepared: _Prepared, teacher: Teacher, layout: Layout,
                todo: list[ShardPlan], num_classes: int, show_progress: bool) -> tuple[int, float, float]:
    """Run the teacher over this rank's unfinished shards; return (rows computed, sum of top-k mass, seconds)."""
    config, device = prepared.config, prepared.device
    if not todo:
        return 0, 0.0, 0.0
    started = time.perf_counter()
    batches = make_batches(todo, config.batch_size, config.views)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(device)
    replayed = ReplayViews(prepared.resolved.dataset, config.views, config.seed) if config.seed is not None else None
    loader = make_loader(prepared.resolved, [indices for _, indices in batches], workers, device.type == "cuda", replayed)
    storage = _storage(config, num_classes)
    total = sum(plan.num_samples for plan in todo)
    bar = tqdm(total=total, unit="sample", unit_scale=True, desc="dump", disable=None if show_progress else True)

    def step(plan: ShardPlan, rows_of_batch: list[int], batch_iter: Iterator[Any]) -> tuple[Any, torch.Tensor, int, int]:
        # messages name dataset indices: with several views a batch's rows are i * views + v
        indices = rows_of_batch if config.views == 1 else [row // config.views for row in rows_of_batch]
        batch = _next_batch(batch_iter, indices, prepared.resolved.dataset)
        inputs, labels = split_batch(batch, prepared.resolved.has_labels)
        if labels is not None and config.views > 1:
            labels = labels[:: config.views]  # rows are whole samples' views; labels are per sample
        with autocast_for(device, config.precision):
            logits = _call_teacher(teacher.module, to_device(inputs, device), indices)  # (B, C)
        if logits.shape != (len(indices), num_classes):
            raise TeacherOutputError(
                f"for dataset indices {indices[0]}..{indices[-1]} the teacher returned shape "
                f"{tuple(logits.shape)}; expected {(len(indices), num_classes)}"
            )
        encoded = encode(logits, config.mode, config.k, _value_dtype(config))
        host, nonfinite, overflow, event = _copy_to_host(encoded, device)
        produce = _host_producer(host, nonfinite, overflow, labels, indices, event, storage)
        return produce, encoded.topk_mass, len(rows_of_batch), len(rows_of_batch) // config.views

    return _write_batches(prepared, layout, batches, loader, bar, step, started)


def _storage(config: DumpConfig, num_classes: int) -> _Storage:
    counts = count_dtype(config.m) if config.mode == "sampled" else None
    return _Storage(config.mode, num_classes, config.dtype, config.encoding, index_dtype(num_classes), counts)


def _copy_to_host(encoded: Any, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, Any]:
    """Start the device-to-host copies of an encoded batch; the event marks their end on a GPU."""
    host = {name: t.to("cpu", non_blocking=True) for name, t in encoded.arrays.items()}
    nonfinite = encoded.nonfinite.to("cpu", non_blocking=True)
    overflow = encoded.overflow.to("cpu", non_blocking=True)
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))  # after the copies to the host
    return host, nonfinite, overflow, event


def _sample_seed(seed: int | None, index: int) -> int:
    """The sampled mode's generator seed for dataset item ``index``: draws depend on the item, not on
    the batch it falls in, so resumed, multi-rank and differently batched dumps draw the same ids.

    32 bits: torch's CPU generator keeps only the low 32 bits of a seed. Items get distinct seeds
    (up to 2^32 of them); the dump's seed shifts them all by a large odd multiple."""
    return (index + (seed or 0) * 0x9E3779B1) & 0xFFFFFFFF


def _encode_tokens(logits: torch.Tensor, lengths: list[int], indices: list[int], config: DumpConfig) -> Any:
    """Encode the real tokens of a right-padded batch, (B, T, V) -> rows (sum(lengths), ...), a
    chunk of at most TOKEN_CHUNK tokens at a time (float32 work stays bounded for any T and V).

    Top-k and full: the padded (B * T, V) view is encoded in chunks (a few large operations
    instead of a few per sequence), then the real tokens' rows are kept. Sampled: sequence by
    sequence, each with its own generator (draws independent of the batching).
    """
    if config.mode == "sampled":
        parts = []
        for row, (length, index) in enumerate(zip(lengths, indices, strict=True)):
            tokens = logits[row, :length]  # (L, V), a view
            generator = torch.Generator(device=logits.device).manual_seed(_sample_seed(config.seed, index))
            for start in range(0, length, TOKEN_CHUNK):
                parts.append(encode(tokens[start : start + TOKEN_CHUNK], config.mode, None, config.dtype, m=config.m,
                                    sample_temperature=config.sample_temperature, generator=generator))
        return _concat_encoded(parts)
    batch, width, vocab = logits.shape
    flat = logits.reshape(batch * width, vocab)  # a view: no copy
    encoded = _concat_encoded([encode(flat[start : start + TOKEN_CHUNK], config.mode, config.k, _value_dtype(config))
                               for start in range(0, len(flat), TOKEN_CHUNK)])
    if sum(lengths) == batch * width:  # no padding
        return encoded
    real = torch.arange(width, device=logits.device)[None, :] < torch.tensor(lengths, device=logits.device)[:, None]
    keep = real.reshape(-1).nonzero().squeeze(1)  # (N,) rows of the real tokens, b-major
    arrays = {name: tensor.index_select(0, keep) for name, tensor in encoded.arrays.items()}
    if config.mode == "topk":
        mass = torch.exp(arrays["topk_logits"].float() - arrays["logsumexp"][:, None]).sum()
    else:
        mass = logits.new_full((), float(len(keep)), dtype=torch.float32)
    return type(encoded)(arrays, encoded.nonfinite.index_select(0, keep), encoded.overflow.index_select(0, keep), mass)


def _value_dtype(config: DumpConfig) -> str:
    """The dtype top-k values leave the device in: float32 for the compact encoding, which stores
    8-bit codes and the tail's log-mass computed from them (float16 rounding of a confident token's
    top logit would turn a small tail into noise); the storage dtype otherwise."""
    return "float32" if config.encoding != "plain" and config.mode == "topk" else config.dtype


def _concat_encoded(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return type(first)(
        {name: torch.cat([p.arrays[name] for p in parts]) for name in first.arrays},
        torch.cat([p.nonfinite for p in parts]),
        torch.cat([p.overflow for p in parts]),
        torch.stack([p.topk_mass.float() for p in parts]).sum(),
    )


def _run_token_shards(prepared: _Prepared, teacher: Teacher, layout: Layout, todo: list[ShardPlan], num_classes: int,
                      lengths: np.ndarray, show_progress: bool) -> tuple[int, float, float]:
    """The per-token twin of :func:`_run_shards`: batches of whole sequences, right-padded; one row
    per real token; each shard's ``offsets`` written as its batches arrive."""
    config, device = prepared.config, prepared.device
    if not todo:
        return 0, 0.0, 0.0
    started = time.perf_counter()
    batches = make_batches(todo, config.batch_size)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(device)
    loader = DataLoader(prepared.resolved.dataset, batch_sampler=[indices for _, indices in batches], num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_tokens, prefetch_factor=4 if workers > 0 else None)
    storage = _storage(config, num_classes)
    ends = np.cumsum(lengths)  # global row after each sample
    bar = tqdm(total=int(sum(plan.num_rows for plan in todo)), unit="tok", unit_scale=True, desc="dump",
               disable=None if show_progress else True)

    def step(plan: ShardPlan, indices: list[int], batch_iter: Iterator[Any]) -> tuple[Any, torch.Tensor, int, int]:
        batch: TokenBatch = _next_batch(batch_iter, indices, prepared.resolved.dataset)
        got = batch.lengths.tolist()
        want = lengths[indices].tolist()
        if got != want:
            wrong = next(i for i, g, w in zip(indices, got, want, strict=True) if g != w)
            raise DatasetError(
                f"dataset item {wrong} has {got[indices.index(wrong)]} tokens now but had "
                f"{want[indices.index(wrong)]} when the dump planned its shards: the dataset must not change during a dump"
            )
        with autocast_for(device, config.precision):
            logits = _call_teacher(teacher.module, to_device(batch.inputs, device), indices)  # (B, T, V)
        expected = (len(indices), int(batch.lengths.max()), num_classes)
        if tuple(logits.shape) != expected:
            raise TeacherOutputError(
                f"for dataset indices {indices[0]}..{indices[-1]} the teacher returned shape {tuple(logits.shape)}; "
                f"expected {expected} ([batch, tokens, vocab])"
            )
        encoded = _encode_tokens(logits, got, indices, config)
        host, nonfinite, overflow, event = _copy_to_host(encoded, device)
        # shard-local offsets: the batch's sequence ends, and the shard's leading 0 with its first batch
        local = ends[indices[0] : indices[-1] + 1] - plan.row_start
        if indices[0] == plan.sample_start:
            local = np.concatenate([[0], local])
        row_samples = np.repeat(indices, got)  # each row's sequence, for error messages (read only then)
        produce = _host_producer(host, nonfinite, overflow, None, row_samples, event, storage, {"offsets": local.astype(np.int64)})
        return produce, encoded.topk_mass, len(row_samples), len(row_samples)

    return _write_batches(prepared, layout, batches, loader, bar, step, started)


def dump_cache(config: DumpConfig) -> DumpResult:
    """Run the teacher over the dataset once and write a complete cache at ``config.out``.

    Example::

        dump_cache(DumpConfig(teacher="ckpt.pt", arch="logit_cache.models:digits_mlp", dataset="digits",
                        out="caches/digits-top5", mode="topk", k=5))
    """
    started = time.perf_counter()
    device_kind = "cuda" if config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    dist_info = _init_distributed(device_kind)
    try:
        prepared, done = _phase(dist_info, _prepare, config, dist_info)
        config = prepared.config  # with its resolved defaults
        if prepared.device.type == "cuda":
            # NCCL, events and the caching allocator follow the current device, not the tensors'.
            torch.cuda.set_device(prepared.device)
        if done is not None:
            return _reused(prepared, done)
        # One writer per cache: a second dump of it waits here (or fails with wait=False). Ranks of a
        # torchrun dump share the work instead, coordinated by rank 0's manifest.
        lock = writer_lock(prepared.out, config.wait) if dist_info.world_size == 1 else contextlib.nullcontext()
        with contextlib.ExitStack() as held:
            with output_errors(f"the cache {prepared.out}"):  # the lock file is the first thing written
                held.enter_context(lock)
            if config.resume:  # whoever held the lock may have finished this very cache
                done = check_output(prepared.out, prepared.key, config.backend, True, False)
                if done is not None:
                    return _reused(prepared, done)
            return _compute(config, prepared, dist_info, started)
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _writing(prepared: _Prepared) -> contextlib.AbstractContextManager[None]:
    """OS errors of writing the cache become one-line OutputErrors, saying whether the unfinished
    dump was kept for --resume (there is none when the work directory could not even be made)."""

    def kept() -> str:
        if not prepared.work.exists():
            return ""
        return f"The unfinished dump stays at {prepared.work}: rerun with --resume once fixed (finished shards are kept)"

    return output_errors(f"the cache {prepared.out}", kept)


def _reused(prepared: _Prepared, done: Manifest) -> DumpResult:
    log.info("reused cache %s at %s: nothing to compute", done.key, prepared.out)
    return DumpResult(prepared.out, done, True, 0, len(done.shards), 0.0, 0.0, directory_bytes(prepared.out), None)


def _compute(config: DumpConfig, prepared: _Prepared, dist_info: _Dist, started: float) -> DumpResult:
    """Load the teacher, run it over this rank's unfinished shards, and finalize (rank 0)."""

    def load() -> tuple[Teacher, int]:
        teacher = load_teacher(
            config.teacher,
            arch=config.arch,
            arch_kwargs=config.arch_kwargs,
            trust_checkpoint=config.trust_checkpoint,
            device=prepared.device,
            sha256=prepared.teacher_sha256,
        )
        return teacher, _probe_classes(teacher, prepared)

    teacher, num_classes = _phase(dist_info, load)
    backend = get_backend(config.backend)
    lengths = _phase(dist_info, token_lengths, prepared.resolved.dataset) if prepared.resolved.per_token else None
    layout = plan_layout(config.mode, config.m if config.mode == "sampled" else config.k, num_classes, config.dtype,
                         prepared.resolved.has_labels, len(prepared.resolved), config.views, config.shard_rows, lengths,
                         config.encoding, sampled_logits=config.mode == "sampled" and config.sample_temperature != 1.0)
    if config.mode == "full" and dist_info.is_main:
        rows = layout.plans[-1].row_stop
        size = rows * num_classes * np.dtype(config.dtype).itemsize
        say = log.info if config.quiet else log.warning  # stated before it starts; --quiet keeps it out of sight
        say("--full stores every logit: %d rows x %d classes x %d B = %.3g GB on disk; --topk K or --sample M store "
            "a fraction of that", rows, num_classes, np.dtype(config.dtype).itemsize, size / 1e9)
    plans = layout.plans
    manifest = _in_progress_manifest(prepared, teacher, layout, num_classes, dist_info)
    if dist_info.is_main:
        with _writing(prepared):
            manifest = _phase(dist_info, prepare_work_dir, prepared.work, manifest, plans, backend, config.overwrite)
    else:
        _sync(dist_info, None)
    mine = split_for_rank(plans, dist_info.rank, dist_info.world_size)
    if dist_info.world_size > len(plans) and dist_info.is_main:
        log.warning("%d ranks but only %d shards: some ranks idle; pass a smaller --shard-rows", dist_info.world_size, len(plans))
    todo = [plan for plan in mine if read_progress(prepared.work, backend, plan) is None]
    show = dist_info.is_main and not config.quiet
    if lengths is not None:
        rows, mass, compute_seconds = _phase(dist_info, _run_token_shards, prepared, teacher, layout, todo, num_classes, lengths, show)
    else:
        rows, mass, compute_seconds = _phase(dist_info, _run_shards, prepared, teacher, layout, todo, num_classes, show)
    rows, mass, kept, compute_seconds = _reduce_stats(dist_info, rows, mass, len(mine) - len(todo), compute_seconds)
    seconds = time.perf_counter() - started
    if dist_info.is_main:
        manifest.dump["seconds"] = round(seconds, 3)
        with _writing(prepared):
            manifest = _phase(dist_info, finalize, prepared.work, prepared.out, manifest, plans, backend)
    else:
        _sync(dist_info, None)
        manifest = read_manifest(prepared.out)
    mean_mass = mass / rows if rows and config.mode in ("topk", "sampled") else None
    return DumpResult(prepared.out, manifest, False, rows, kept, seconds, compute_seconds, directory_bytes(prepared.out), mean_mass)


def _reduce_stats(dist_info: _Dist, rows: int, mass: float, kept: int, compute_seconds: float) -> tuple[int, float, int, float]:
    """Totals over ranks: rows computed, top-k mass, shards kept from before; the slowest rank's time."""
    if dist_info.world_size == 1:
        return rows, mass, kept, compute_seconds
    import torch.distributed as dist

    totals = torch.tensor([float(rows), mass, float(kept)], dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    slowest = torch.tensor([compute_seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return int(totals[0].item()), float(totals[1].item()), int(totals[2].item()), float(slowest.item())


#: The function's name before the package moved to subpackages (``from logit_cache.dump import dump``).
dump = dump_cache

callable_module(__name__, dump_cache)
