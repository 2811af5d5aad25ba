"""Before the first batch: resolve the dataset, key the cache, pick the output place, learn the class
count from item 0, and describe the cache in its in-progress manifest."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from .. import __version__
from ..data.datasets import ResolvedDataset, resolve_dataset, split_batch
from ..data.replay import check_replayable
from ..data.tokens import collate_tokens
from ..errors import CheckpointNotFoundError, TeacherOutputError, UsageError
from ..format.identity import record_key
from ..format.layout import Layout
from ..format.manifest import FORMAT_VERSION, Manifest
from ..format.naming import cache_dir_name, readable_name
from ..format.paths import output_errors, partial_path
from ..io.lookup import find_by_key
from ..io.workdir import check_output
from ..targets import TargetKind, get_kind
from ..teachers.placement import Placement, resolve_placement
from ..teachers.runtime import autocast_for, resolve_device, to_device
from ..teachers.sources import Teacher, is_hf_spec, teacher_sha256
from .distributed import Dist
from .failures import call_teacher


@dataclass
class Prepared:
    """Everything decided before the first batch runs."""

    #: the resolved DumpConfig (pipeline/dump.py)
    config: Any
    out: Path
    work: Path
    device: torch.device
    resolved: ResolvedDataset
    teacher_sha256: str
    fingerprint: str
    key: str
    #: where an hf: teacher split by --device-map goes on this rank (None: whole, on ``device``)
    placement: Placement | None = None

    @property
    def kind(self) -> TargetKind:
        return get_kind(self.config.mode)


def prepare(config: Any, dist_info: Dist) -> tuple[Prepared, Manifest | None]:
    """Resolve ``config`` (a DumpConfig), key it and check its output; also the complete manifest when
    a cache of this key is already there (then nothing needs computing)."""
    config = config.resolved()
    kind = get_kind(config.mode)
    placement = _placement(config, dist_info)
    device = resolve_device(config.device, dist_info.local_rank) if placement is None else placement.first_device
    out = Path(config.out) if config.out is not None else Path()  # under a root: named once the key is known
    if not is_hf_spec(config.teacher) and not Path(config.teacher).exists():
        raise CheckpointNotFoundError(f"--teacher {config.teacher}: no such file")
    resolved = resolve_dataset(config.dataset, config.dataset_kwargs)
    if kind.per_token_only and not resolved.per_token:
        raise UsageError(
            f"{kind.option} is for per-token (language-model) caches, whose vocabularies make top-k costly; --dataset "
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
    key = record_key(config, teacher_sha256=teacher_digest, dataset_fingerprint=fingerprint, format_version=FORMAT_VERSION,
                     precision=config.precision, weights=config.precision)  # the weights are held in it too
    if config.cache_root is not None:
        root = Path(config.cache_root)
        readable = readable_name(config.dataset, config.dataset_kwargs, config.mode, kind.width(config), config.dtype,
                                 config.views, config.backend)
        out = find_by_key(root, key, config.backend) or root / cache_dir_name(readable, key)
    done = check_output(out, key, config.backend, config.resume, config.overwrite)
    return Prepared(config, out, partial_path(out), device, resolved, teacher_digest, fingerprint, key, placement), done


def _placement(config: Any, dist_info: Dist) -> Placement | None:
    """This rank's share of the devices for a --device-map teacher (its GPUs: see teachers/placement.py)."""
    if config.device_map is None:
        return None
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    return resolve_placement(config.device_map, config.max_memory, config.devices_per_rank, config.device,
                             dist_info.local_rank, dist_info.world_size, ranks_on_node)


def probe_classes(teacher: Teacher, prepared: Prepared) -> int:
    """Run the teacher on item 0 to learn the class (vocabulary) count and check the output's shape."""
    config, kind = prepared.config, prepared.kind
    per_token = prepared.resolved.per_token
    if per_token:
        batch = collate_tokens([prepared.resolved.dataset[0]])
        inputs = batch.inputs
    else:
        inputs, _ = split_batch(default_collate([prepared.resolved.dataset[0]]), prepared.resolved.has_labels)
    with torch.inference_mode(), autocast_for(prepared.device, config.precision):
        try:
            logits = call_teacher(teacher.module, to_device(inputs, prepared.device), [0])
        except TeacherOutputError as exc:
            if not per_token:
                raise
            raise TeacherOutputError(
                f"{exc}. --dataset {config.dataset!r} holds token sequences: the teacher must take token ids "
                f"(batch, tokens) and return logits [batch, tokens, vocab]"
            ) from exc
    width = kind.width(config)
    if per_token:
        length = int(batch.lengths[0])
        if logits.dim() != 3 or logits.shape[:2] != (1, length) or logits.shape[2] < 1:
            raise TeacherOutputError(
                f"--dataset {config.dataset!r} holds token sequences, so the teacher must return logits "
                f"[batch, tokens, vocab]; for item 0 ({length} tokens) it returned shape {tuple(logits.shape)}"
            )
        num_classes = int(logits.shape[2])
        limit = kind.max_width(num_classes)
        if limit is not None and width > limit:
            raise UsageError(f"{kind.flag} {width} exceeds the teacher's vocabulary of {num_classes}; use a smaller K")
        return num_classes
    if logits.dim() == 3:
        raise TeacherOutputError(
            f"the teacher returned logits of shape {tuple(logits.shape)} ([batch, tokens, vocab]) but the items of "
            f"--dataset {config.dataset!r} are not token sequences (1-D integer ids, (ids, labels), or a dict "
            f"with input_ids); per-token caches need token-sequence items"
        )
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
        raise TeacherOutputError(
            f"for a batch of 1 the teacher returned shape {tuple(logits.shape)}; expected [1, classes]"
        )
    num_classes = int(logits.shape[1])
    limit = kind.max_width(num_classes)
    if limit is not None and width > limit:
        raise UsageError(
            f"{kind.flag} {width} exceeds the teacher's {num_classes} classes; use {kind.flag} <= {num_classes} or --full"
        )
    return num_classes


def in_progress_manifest(prepared: Prepared, teacher: Teacher, layout: Layout, num_classes: int, dist_info: Dist) -> Manifest:
    """The manifest a dump writes before its first shard (``complete: false``)."""
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
            # the teacher's weights were held in the precision (not autocast over float32 ones): part of the key
            "weights": config.precision,
            "batch_size": config.batch_size,
            "world_size": dist_info.world_size,
            # not part of the content: the same settings write the same bytes on any thread count (tests/test_determinism.py)
            "torch_threads": torch.get_num_threads(),
            # where the teacher's parts ran; not part of the content either (a split teacher gives the same logits)
            **_placement_entry(prepared, teacher),
        },
    )


def _placement_entry(prepared: Prepared, teacher: Teacher) -> dict[str, Any]:
    if prepared.placement is None:
        return {}
    return {"placement": {**prepared.placement.describe(), "placed": teacher.device_map or {}}}


def writing(prepared: Prepared) -> contextlib.AbstractContextManager[None]:
    """OS errors of writing the cache become one-line OutputErrors, saying whether the unfinished
    dump was kept for --resume (there is none when the work directory could not even be made)."""

    def kept() -> str:
        if not prepared.work.exists():
            return ""
        return f"The unfinished dump stays at {prepared.work}: rerun with --resume once fixed (finished shards are kept)"

    return output_errors(f"the cache {prepared.out}", kept)
