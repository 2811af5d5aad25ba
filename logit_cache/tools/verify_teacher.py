"""The checks of ``verify`` that re-run the teacher: random (sample, view) pairs through the teacher,
compared with their cached rows; the dataset's length and fingerprint; the teacher file's hash.

What each check means and the tolerances are stated in :mod:`logit_cache.tools.verify`.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from ..data.datasets import ResolvedDataset, recorded_fingerprint, split_batch
from ..data.replay import replay_items
from ..errors import CheckpointError, LogitCacheError
from ..format.manifest import Manifest, ShardEntry
from ..store import ShardReader, get_backend
from ..targets import get_kind
from ..teachers.runtime import PRECISIONS, autocast_for, run_teacher, to_device
from ..teachers.sources import Teacher, load_teacher
from .verify_compare import PRECISION_SLACK, compare_row
from .verify_report import VerifyReport


@dataclass(frozen=True)
class _Pick:
    """One (sample, view) to compare, and where its row lives."""

    index: int
    view: int
    row: int
    shard: int

    def subject(self, views: int) -> str:
        return f"sample {self.index}" + (f" view {self.view}" if views > 1 else "") + f" (row {self.row})"


def _pick(manifest: Manifest, count: int, samples: int, seed: int) -> list[_Pick]:
    """``samples`` random (sample, view) pairs among the first ``count`` samples, sorted by row."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(count, size=min(samples, count), replace=False))
    views = rng.integers(0, manifest.views, size=len(chosen))
    starts = [entry.row_start for entry in manifest.shards]
    picks = []
    for index, view in zip(chosen.tolist(), views.tolist(), strict=True):
        row = index * manifest.views + view
        picks.append(_Pick(index, view, row, bisect_right(starts, row) - 1))
    return picks


def _teacher_logits(teacher: Teacher, items: Sequence[Any], resolved: ResolvedDataset, device: torch.device,
                    precision: str) -> tuple[np.ndarray, list[int | None]]:
    """The teacher's float32 logits [N, C] for the items, and their labels (None without labels)."""
    batch = default_collate(list(items))
    inputs, labels = split_batch(batch, resolved.has_labels)
    with torch.inference_mode(), autocast_for(device, precision):
        logits = run_teacher(teacher.module, to_device(inputs, device))
    label_list: list[int | None] = [int(x) for x in labels] if labels is not None else [None] * len(items)
    return logits.float().cpu().numpy(), label_list


def _read_row(shard: ShardReader, name: str, local: int) -> np.ndarray:
    return shard.read(name, local, local + 1)[0]


def _compare_pick(manifest: Manifest, shard: ShardReader, entry: ShardEntry, pick: _Pick, logits: np.ndarray,
                  label: int | None, slack: float) -> str | None:
    """Why the cached row of ``pick`` is not what the teacher says now, or None."""
    local = pick.row - entry.row_start
    problems = []
    problem = compare_row(get_kind(manifest.mode), lambda name: _read_row(shard, name, local), manifest.arrays.__contains__,
                          logits, manifest.dtype, slack)
    if problem:
        problems.append(problem)
    if label is not None and "labels" in manifest.arrays:
        stored = int(_read_row(shard, "labels", pick.index - entry.sample_start))
        if stored != label:
            problems.append(f"label {stored} is stored, the dataset says {label}")
    return "; ".join(problems) or None


def _check_dataset(report: VerifyReport, manifest: Manifest, resolved: ResolvedDataset) -> int:
    """Length and fingerprint of the dataset against the manifest; returns the samples both have."""
    length = len(resolved)
    recorded = manifest.dataset.get("length", manifest.num_samples)
    if length != manifest.num_samples or length != recorded:
        report.add("dataset_length", "dataset", False,
                   f"{resolved.spec} has {length} items, the manifest records {recorded} (num_samples {manifest.num_samples}): "
                   f"the cache is aligned to its dataset by index, so this is not the cache's dataset")
    else:
        report.add("dataset_length", "dataset", True, f"{length} items, as the manifest records")
    recorded = manifest.dataset.get("fingerprint")
    if recorded:
        # As the loader checks it: over the recorded spec and kwargs, so a spec written another way
        # (a relative path) does not count; what differs is the length or the sampled items.
        try:
            now = recorded_fingerprint(resolved.dataset, manifest)
        except LogitCacheError as exc:
            report.add("dataset_fingerprint", "dataset", True, f"fingerprint not computed ({exc})", notice=True)
        else:
            if now == recorded:
                report.add("dataset_fingerprint", "dataset", True, "fingerprint matches the manifest")
            else:
                report.add("dataset_fingerprint", "dataset", False,
                           f"content differs from what the cache was dumped from (fingerprint {now[:12]} here, "
                           f"{str(recorded)[:12]} in the manifest): training would refuse this pairing")
    return min(length, manifest.num_samples)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (teacher and dataset code may raise multi-line ones)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, LogitCacheError) else f"{type(exc).__name__}: {text}"


def _compare_samples(report: VerifyReport, path: Path, manifest: Manifest, teacher: Teacher, resolved: ResolvedDataset,
                     device: torch.device, picks: list[_Pick], slack: float, precision: str) -> list[str] | None:
    """Run the teacher on the picks and compare each with its cached row; the subjects that differ,
    or None when the teacher's output could not be compared at all (reported as a failure)."""
    if manifest.seed is not None:
        items = replay_items(resolved.dataset, [p.index for p in picks], [p.view for p in picks], manifest.seed)
    else:
        items = [resolved.dataset[p.index] for p in picks]
    shown = ", ".join(str(p.index) for p in picks[:8]) + (", ..." if len(picks) > 8 else "")
    try:
        logits, labels = _teacher_logits(teacher, items, resolved, device, precision)
    except Exception as exc:  # the teacher's or the dataset's own code: its failure is this check's finding
        report.add("teacher_output", "teacher", False, f"failed on samples {shown}: {one_line(exc)}")
        return None
    if logits.shape != (len(picks), manifest.num_classes):
        report.add("teacher_output", "teacher", False,
                   f"returned logits of shape {list(logits.shape)} for samples {shown}; expected "
                   f"{[len(picks), manifest.num_classes]} (the cache holds {manifest.num_classes} classes per row)")
        return None
    backend = get_backend(manifest.backend)
    shards: dict[int, ShardReader] = {}
    differing = []
    try:
        for position, pick in enumerate(picks):
            entry = manifest.shards[pick.shard]
            subject = pick.subject(manifest.views)
            try:
                if pick.shard not in shards:
                    shards[pick.shard] = backend.open(path / entry.path)
                problem = _compare_pick(manifest, shards[pick.shard], entry, pick, logits[position], labels[position], slack)
            except LogitCacheError as exc:
                problem = f"its row cannot be read: {one_line(exc)}"
            if problem:
                differing.append(subject)
                report.add("sample", subject, False, f"{problem} ({entry.path})")
            else:
                report.add("sample", subject, True, "matches the teacher within tolerance")
    finally:
        for shard in shards.values():
            shard.close()
    return differing


def check_teacher(report: VerifyReport, path: Path, manifest: Manifest, teacher: Teacher, resolved: ResolvedDataset,
                   device: torch.device, samples: int, seed: int, opened: set[int]) -> None:
    """The dataset against the manifest, then ``samples`` random rows against the teacher, then its file hash."""
    count = _check_dataset(report, manifest, resolved)
    recorded_arch = manifest.teacher.get("arch"), manifest.teacher.get("arch_kwargs", {})
    if recorded_arch[0] and teacher.arch and (teacher.arch, teacher.arch_kwargs) != recorded_arch:
        report.add("teacher_arch", "teacher", True,
                   f"--arch {teacher.arch} {json.dumps(teacher.arch_kwargs)} differs from the dump's "
                   f"{recorded_arch[0]} {json.dumps(recorded_arch[1])}", notice=True)
    precision = str(manifest.dump.get("precision", "fp32"))
    precision = precision if precision in PRECISIONS else "fp32"
    chosen = _pick(manifest, count, samples, seed) if count else []
    picks = [p for p in chosen if p.shard in opened]
    if len(picks) < len(chosen):
        report.add("sample", "samples", True,
                   f"{len(chosen) - len(picks)} sample(s) picked in shards that could not be opened were not compared", notice=True)
    differing = _compare_samples(report, path, manifest, teacher, resolved, device, picks, PRECISION_SLACK[precision], precision) \
        if picks else []
    recorded = manifest.teacher.get("sha256")
    if not recorded or teacher.sha256 == recorded:
        report.add("teacher_sha256", "teacher", True, "file sha256 matches the manifest")
        return
    detail = f"file sha256 {teacher.sha256[:12]} differs from the manifest's {str(recorded)[:12]}: the teacher file changed since the dump"
    if differing is None:
        report.add("teacher_sha256", "teacher", False, f"{detail}, and its outputs could not be compared with the cache")
    elif differing:
        report.add("teacher_sha256", "teacher", False,
                   f"{detail}, and its outputs differ from the cache on {len(differing)} of {len(picks)} samples")
    else:
        report.add("teacher_sha256", "teacher", True,
                   f"{detail}; its outputs on {len(picks)} samples match the cache within tolerance, so this is not a failure", notice=True)


def load_teacher_for(manifest: Manifest, teacher: str, arch: str | None, arch_kwargs: Mapping[str, Any] | None,
                  trust_checkpoint: bool, device: torch.device) -> Teacher:
    try:
        # as the dump held the weights: in its precision since it records "weights", float32 (autocast) before
        weights = str(manifest.dump.get("weights", "fp32"))
        weights = weights if weights in PRECISIONS else "fp32"
        return load_teacher(teacher, arch=arch, arch_kwargs=dict(arch_kwargs) if arch_kwargs else None,
                            trust_checkpoint=trust_checkpoint, device=device, precision=weights)
    except CheckpointError as exc:
        recorded = manifest.teacher.get("arch")
        if arch is None and recorded and "--arch" in str(exc):
            raise type(exc)(f"{exc} (the cache was dumped with --arch {recorded} --arch-kwargs "
                            f"'{json.dumps(manifest.teacher.get('arch_kwargs', {}))}')") from exc
        raise
