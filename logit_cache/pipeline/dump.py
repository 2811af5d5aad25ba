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

This module is the dump's outline (options, result, the phases in order); its parts live beside it:
``prepare.py`` (key, output place, class count, manifest), ``batches.py`` (the batch loop),
``distributed.py`` (ranks and phases), ``failures.py`` (dataset and teacher failures as one line).
The layout (arrays, chunks, shard plans) is ``format/layout.py``; encoding is ``targets/``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._legacy import callable_module
from ..data.hf_datasets import with_teacher_tokenizer
from ..data.tokens import token_lengths
from ..errors import UsageError
from ..format.layout import (  # noqa: F401  (moved to format.layout)
    CHUNK_TARGET_BYTES,
    LABEL_CHUNK_ROWS,
    MAX_CHUNK_ROWS,
    MIN_CHUNK_ROWS,
    SHARD_TARGET_BYTES,
    Layout,
    array_specs,
    chunk_and_shard_rows,
    plan_layout,
    split_for_rank,
)
from ..format.manifest import Manifest, read_manifest
from ..format.naming import ROOT_ENV, cache_dir_name, readable_name  # noqa: F401  (re-exported: old import path)
from ..format.paths import output_errors
from ..io.locks import writer_lock
from ..io.lookup import directory_bytes, find_by_key  # noqa: F401  (re-exported: old import path)
from ..io.workdir import check_output, finalize, prepare_work_dir, read_progress
from ..store import BACKENDS, DEFAULT_BACKEND, get_backend
from ..targets import DEFAULT_KIND, KINDS, VALUE_DTYPES, get_kind
from ..targets.compact import CODED_ENCODINGS, ENCODINGS
from ..targets.tokens import TOKEN_CHUNK, encode_tokens  # noqa: F401  (TOKEN_CHUNK moved to targets.tokens)
from ..teachers.placement import parse_device_map, parse_max_memory
from ..teachers.runtime import PRECISIONS, autocast_for, resolve_device, run_teacher  # noqa: F401  (re-exported: scripts)
from ..teachers.sources import Teacher, is_hf_spec, load_teacher
from .batches import default_num_workers, make_batches, make_loader, run_shards  # noqa: F401  (moved to pipeline.batches)
from .distributed import Dist, destroy, device_kind, init_distributed, phase, reduce_stats, sync
from .prepare import Prepared, in_progress_manifest, prepare, probe_classes, writing

log = logging.getLogger(__name__)


@dataclass
class DumpConfig:
    """What ``logit-cache dump`` was asked to do (one field per CLI option)."""

    teacher: str
    dataset: str
    out: str | None = None  # the cache directory; or name it by content under cache_root
    mode: str = DEFAULT_KIND
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
    backend: str = DEFAULT_BACKEND
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
    #: Split an hf: teacher over devices (teachers/placement.py): auto, balanced, sequential or {"module": device}
    #: (JSON or a dict); max_memory budgets each device ({"0": "20GiB", "cpu": "60GiB", "disk": ...}); under
    #: torchrun, devices_per_rank N gives local rank r the GPUs r*N .. r*N+N-1. None of them enters the key.
    device_map: str | dict[str, Any] | None = None
    max_memory: str | dict[str, Any] | None = None
    devices_per_rank: int | None = None
    #: Host threads that convert/encode batches for the writer (None: min(4, cores)).
    writer_threads: int | None = None

    def validate(self) -> None:
        """Reject bad or incompatible options before any work (or any file) is done."""
        if (self.out is None) == (self.cache_root is None):
            raise UsageError(
                f"say where the cache goes: --out DIR, or --cache-root DIR (or ${ROOT_ENV}) to name it by its content"
                + ("; not both" if self.out is not None else "")
            )
        if self.mode not in KINDS:
            raise UsageError(f"unknown mode {self.mode!r}; use {_options()}")
        kind = get_kind(self.mode)
        kind.check_options(self)
        chosen = [other.flag for other in _kinds_by_option() if _chosen(other, self)]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} are exclusive: pass one of {', '.join(k.option for k in _kinds_by_option())}")
        if not self.sample_temperature > 0:
            raise UsageError(f"--sample-temperature must be > 0, got {self.sample_temperature}")
        if self.sample_temperature != 1.0 and not kind.draws:
            raise UsageError("--sample-temperature applies to --sample M (the distribution ids are drawn from)")
        if self.encoding not in ENCODINGS:
            raise UsageError(f"--encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.encoding != "plain" and not kind.compact:
            raise UsageError(f"--encoding {self.encoding} applies to --topk and --sample caches; full logits are stored plain")
        if self.dtype not in VALUE_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--format {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.encoding in CODED_ENCODINGS and not get_backend(self.backend).supports_codecs:
            coded = ", ".join(name for name in BACKENDS if get_backend(name).supports_codecs)
            raise UsageError(f"--encoding {self.encoding} stores arrays through codecs that only {coded} can register "
                             f"(an HDF5 filter would be a compiled plugin per platform); use --format {coded}, or --encoding compact")
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
        if self.writer_threads is not None and self.writer_threads < 1:
            raise UsageError(f"--writer-threads must be >= 1, got {self.writer_threads}")
        self._validate_placement()

    def _validate_placement(self) -> None:
        """--device-map and its companions: parsed here so a typo fails before any work, naming the flag."""
        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)
        if self.device_map is None:
            given = [flag for flag, value in (("--max-memory", self.max_memory), ("--devices-per-rank", self.devices_per_rank))
                     if value is not None]
            if given:
                raise UsageError(f"{' and '.join(given)} apply to a teacher split by --device-map; add --device-map auto")
            return
        if not is_hf_spec(self.teacher):
            raise UsageError(f"--device-map places hf:DIR teachers (through transformers and accelerate); --teacher {self.teacher} "
                             f"is a checkpoint file: drop --device-map, or save the model with save_pretrained and pass hf:DIR")
        if self.devices_per_rank is not None and self.devices_per_rank < 1:
            raise UsageError(f"--devices-per-rank must be >= 1, got {self.devices_per_rank}")

    def resolved(self) -> DumpConfig:
        """Validated, with the defaults that depend on other options filled in (a copy: the caller's
        config is left as given, so it can be reused for another dump)."""
        self.validate()
        return replace(
            self,
            # several views need seeded replay, sampled targets a seeded draw; 0 is the documented default
            seed=0 if (self.views > 1 or get_kind(self.mode).draws) and self.seed is None else self.seed,
            # Under a root the key is the name: an existing cache of this key is this very content, so
            # reuse it, and resume an unfinished dump of it (a killed writer's work) instead of refusing.
            resume=self.resume or (self.cache_root is not None and not self.overwrite),
            # an hf:PATH text column with no tokenizer is tokenised by an hf:DIR teacher's own (as the CLI does)
            dataset_kwargs=with_teacher_tokenizer(self.dataset, self.dataset_kwargs, self.teacher),
            device_map=parse_device_map(self.device_map),
            max_memory=parse_max_memory(self.max_memory),
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




def _kinds_by_option() -> list[Any]:
    """The kinds in the order messages list their options: those with a width first (--topk K, --sample M, --full)."""
    return sorted(KINDS.values(), key=lambda kind: kind.width_field is None)


def _options() -> str:
    options = [kind.option for kind in _kinds_by_option()]
    return f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else options[0]


def _chosen(kind: Any, config: DumpConfig) -> bool:
    """Whether ``config`` asks for ``kind``: its width is given, or (a kind without one) its mode."""
    return kind.width(config) is not None if kind.width_field is not None else config.mode == kind.name


def dump_cache(config: DumpConfig) -> DumpResult:
    """Run the teacher over the dataset once and write a complete cache at ``config.out``.

    Example::

        dump_cache(DumpConfig(teacher="ckpt.pt", arch="logit_cache.models:digits_mlp", dataset="digits",
                        out="caches/digits-top5", mode="topk", k=5))
    """
    started = time.perf_counter()
    dist_info = init_distributed(device_kind(config.device))
    try:
        prepared, done = phase(dist_info, prepare, config, dist_info)
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
        destroy(dist_info)


def _reused(prepared: Prepared, done: Manifest) -> DumpResult:
    log.info("reused cache %s at %s: nothing to compute", done.key, prepared.out)
    return DumpResult(prepared.out, done, True, 0, len(done.shards), 0.0, 0.0, directory_bytes(prepared.out), None)


def _compute(config: DumpConfig, prepared: Prepared, dist_info: Dist, started: float) -> DumpResult:
    """Load the teacher, run it over this rank's unfinished shards, and finalize (rank 0)."""
    kind = prepared.kind

    def load() -> tuple[Teacher, Prepared, int]:
        teacher = load_teacher(
            config.teacher,
            arch=config.arch,
            arch_kwargs=config.arch_kwargs,
            trust_checkpoint=config.trust_checkpoint,
            device=prepared.device,
            sha256=prepared.teacher_sha256,
            precision=config.precision,
            device_map=prepared.placement,
        )
        # a teacher split by a device map takes its inputs (and gives its logits) on its embeddings' device
        placed = replace(prepared, device=teacher.input_device)
        return teacher, placed, probe_classes(teacher, placed)

    teacher, prepared, num_classes = phase(dist_info, load)
    backend = get_backend(config.backend)
    lengths = phase(dist_info, token_lengths, prepared.resolved.dataset) if prepared.resolved.per_token else None
    layout = plan_layout(config.mode, kind.width(config), num_classes, config.dtype, prepared.resolved.has_labels,
                         len(prepared.resolved), config.views, config.shard_rows, lengths, config.encoding,
                         sampled_logits=kind.draws and config.sample_temperature != 1.0)
    if kind.dense and dist_info.is_main:
        rows = layout.plans[-1].row_stop
        size = rows * num_classes * np.dtype(config.dtype).itemsize
        say = log.info if config.quiet else log.warning  # stated before it starts; --quiet keeps it out of sight
        say("--full stores every logit: %d rows x %d classes x %d B = %.3g GB on disk; --topk K or --sample M store "
            "a fraction of that", rows, num_classes, np.dtype(config.dtype).itemsize, size / 1e9)
    plans = layout.plans
    manifest = in_progress_manifest(prepared, teacher, layout, num_classes, dist_info)
    if dist_info.is_main:
        with writing(prepared):
            manifest = phase(dist_info, prepare_work_dir, prepared.work, manifest, plans, backend, config.overwrite)
    else:
        sync(dist_info, None)
    mine = split_for_rank(plans, dist_info.rank, dist_info.world_size)
    if dist_info.world_size > len(plans) and dist_info.is_main:
        log.warning("%d ranks but only %d shards: some ranks idle; pass a smaller --shard-rows", dist_info.world_size, len(plans))
    todo = [plan for plan in mine if read_progress(prepared.work, backend, plan) is None]
    show = dist_info.is_main and not config.quiet
    rows, mass, compute_seconds = phase(dist_info, run_shards, prepared, teacher, layout, todo, num_classes, show, lengths)
    rows, mass, kept, compute_seconds = reduce_stats(dist_info, rows, mass, len(mine) - len(todo), compute_seconds)
    seconds = time.perf_counter() - started
    if dist_info.is_main:
        manifest.dump["seconds"] = round(seconds, 3)
        with writing(prepared):
            manifest = phase(dist_info, finalize, prepared.work, prepared.out, manifest, plans, backend)
    else:
        sync(dist_info, None)
        manifest = read_manifest(prepared.out)
    mean_mass = mass / rows if rows and kind.width_field is not None else None
    return DumpResult(prepared.out, manifest, False, rows, kept, seconds, compute_seconds, directory_bytes(prepared.out), mean_mass)


def _encode_tokens(logits: torch.Tensor, lengths: list[int], indices: list[int], config: DumpConfig) -> Any:
    """The old per-token encoding entry (scripts/gpu_lm_check.py): :func:`logit_cache.targets.encode_tokens` for ``config``."""
    kind = get_kind(config.mode)
    return encode_tokens(logits, lengths, indices, config.mode, kind.width(config), kind.device_value_dtype(config.dtype, config.encoding),
                         seed=config.seed, sample_temperature=config.sample_temperature)


#: The function's name before the package moved to subpackages (``from logit_cache.dump import dump``).
dump = dump_cache

callable_module(__name__, dump_cache)
