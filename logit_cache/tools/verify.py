"""Verify a cache: its shards against the manifest and, optionally, its values against the teacher.

What is checked (``logit-cache verify DIR``):

* **the manifest**: it is readable and valid, and ``complete`` is true. An incomplete cache (or a
  dump still in ``DIR.partial``) is a failure and nothing else is checked: it is not a cache yet.
* **the manifest's fields against its arrays and its key**: the arrays that ``mode``, ``k``/``m``,
  ``num_classes``, ``dtype``, ``encoding`` and ``per_token`` call for (names, dtypes, row shapes, as
  a dump lays them out) must be those ``manifest.arrays`` lists, and so those the shards hold; the
  ``key`` must be the one recomputed from the content fields (teacher sha256, dataset fingerprint,
  mode, k/m, views, seed, dtype, precision, encoding), as ``convert`` recomputes it; ``num_rows`` is
  ``num_samples * views`` for per-sample caches. Shard paths that are absolute or leave the cache
  directory make the manifest invalid (nothing is opened); a symlink that resolves outside it fails.
* **every shard** listed in the manifest: it exists and opens; it holds exactly the arrays of
  ``manifest.arrays``, each with the manifest's dtype and shape (``row_stop - row_start`` rows for
  ``per="row"`` arrays, ``sample_stop - sample_start`` for ``per="sample"`` ones such as labels,
  ``(sample_stop - sample_start) * views + 1`` for offsets, then ``row_shape``); and its checksum,
  recomputed by re-reading every array, equals the manifest's. In the same pass: every class/token
  id is in ``[0, num_classes)`` (compact layouts: the ids their gaps decode to), and a per-token
  shard's offsets run from 0 to its row count without decreasing. Reading checks each chunk's own
  checksum (crc32c, fletcher32) and that no chunk is missing, as training reads do.
* **with a teacher and its dataset**: ``samples`` random samples (seeded by ``seed``) are run
  through the teacher (eval mode, ``torch.inference_mode``, the dump's ``precision``) and compared
  with their cached rows. A cache of several views (or a seeded one) stores view ``v`` of sample
  ``i`` at row ``i * V + v``; the view of each sample is drawn at random too, and its input is
  replayed with :func:`~logit_cache.replay.replay_items`. Stored labels are compared with the
  dataset's. Also reported: a teacher file whose SHA-256 differs from the manifest's (a failure only
  when the outputs differ beyond tolerance; said either way), a dataset whose length differs from
  the manifest's, and a dataset fingerprint that differs (both failures: the cache is aligned to
  its dataset by index, and training refuses such a pairing; the fingerprint is recomputed over the
  manifest's spec and kwargs, as the loader does, so a spec written another way does not count).

Tolerance. Let ``x`` be the teacher's float32 logit now and ``s`` the stored value. ``slack`` is
``1e-4`` for caches dumped in fp32, ``5e-3`` in fp16 and ``3e-2`` in bf16 autocast (kernels, batch
sizes and devices differ between the dump and this run; reduced precision differs more):

* ``float32`` storage: ``|s - x| <= slack * (1 + |x|)`` (1e-4 relative plus 1e-4 absolute in fp32);
* ``float16`` storage: the same plus half a float16 ulp at ``|x|`` (the rounding the dump applied):
  ``|s - x| <= 0.5 * ulp16(x) + slack * (1 + |x|)``;
* ``logsumexp`` (always float32): ``|s - logsumexp(x)| <= slack * (1 + |logsumexp(x)|)``;
* top-k ids: equal to the teacher's top-k as sets, except that ids may swap with ids whose logits
  are tied within the noise (``2 * slack * (1 + |x|)``) at the k-th place; the values stored for
  the ids must match the teacher's logits at those ids as above, in descending order; ids must be
  distinct and below ``num_classes``.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..data.datasets import ResolvedDataset, recorded_fingerprint, resolve_dataset, split_batch
from ..data.replay import replay_items
from ..errors import CacheFormatError, CacheNotFoundError, CheckpointError, LogitCacheError, UsageError
from ..format.manifest import Manifest, ShardEntry, read_manifest
from ..format.paths import partial_path
from ..io.reader import shard_location
from ..pipeline.dump import array_specs
from ..store import ArraySpec, ShardReader, get_backend
from ..teachers.runtime import PRECISIONS, autocast_for, resolve_device, run_teacher, to_device
from ..teachers.sources import Teacher, load_teacher
from .convert import source_precision

#: Relative-and-absolute slack between the dump's teacher run and this one, by the dump's precision.
PRECISION_SLACK = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
#: Largest finite float16: beyond it the dump refuses to store (its ulp there is 32).
FLOAT16_MAX = 65504.0


@dataclass
class Check:
    """One thing verified: its kind, what it is about, whether it held, and what was found.

    ``notice`` marks a check worth telling even when it holds (a teacher file that changed but
    still gives the cached outputs).
    """

    kind: str
    subject: str
    ok: bool
    detail: str
    notice: bool = False

    def line(self) -> str:
        return f"{self.subject}: {self.detail}"


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_cache`: ``ok`` only when every check held."""

    path: str
    ok: bool = True
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    summary: str = ""

    def add(self, kind: str, subject: str, ok: bool, detail: str, notice: bool = False) -> Check:
        check = Check(kind, subject, bool(ok), detail, notice)
        self.checks.append(check)
        if not check.ok:
            self.failures.append(check.line())
            self.ok = False
        return check

    @property
    def notices(self) -> list[str]:
        return [check.line() for check in self.checks if check.ok and check.notice]

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "ok", "checks", "failures"}`` (plus the summary line): what ``--json`` prints."""
        return {
            "path": self.path,
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
            "failures": list(self.failures),
            "summary": self.summary,
        }


# --------------------------------------------------------------------------------------------------
# Tolerances and row comparisons (pure numpy, one row at a time)
# --------------------------------------------------------------------------------------------------


def value_tolerance(teacher: np.ndarray, dtype: str, slack: float) -> np.ndarray:
    """Allowed ``|stored - teacher|`` for each teacher float32 logit, by storage dtype (module docstring)."""
    magnitude = np.abs(np.asarray(teacher, dtype=np.float64))
    tolerance = slack * (1.0 + magnitude)
    if dtype == "float16":
        ulp = np.spacing(np.minimum(magnitude, FLOAT16_MAX).astype(np.float16)).astype(np.float64)
        tolerance = tolerance + 0.5 * ulp
    return tolerance


def _worst(stored: np.ndarray, teacher: np.ndarray, tolerance: np.ndarray) -> tuple[np.ndarray, int]:
    """Mask of entries beyond tolerance (NaN counts as beyond) and the position of the worst excess."""
    diff = np.abs(stored.astype(np.float64) - teacher.astype(np.float64))
    bad = ~(diff <= tolerance)
    excess = np.where(np.isnan(diff), np.inf, diff - tolerance)
    return bad, int(np.argmax(excess))


def compare_full(stored: np.ndarray, teacher: np.ndarray, dtype: str, slack: float) -> str | None:
    """Why a stored row of full logits is not the teacher's, or None when it is (within tolerance)."""
    tolerance = value_tolerance(teacher, dtype, slack)
    bad, at = _worst(stored, teacher, tolerance)
    if not bad.any():
        return None
    return (
        f"logits differ from the teacher's at {int(bad.sum())} of {len(teacher)} classes; worst class {at}: "
        f"stored {float(stored[at]):.6g}, teacher {float(teacher[at]):.6g} (tolerance {float(tolerance[at]):.2g})"
    )


def compare_topk(
    ids: np.ndarray, values: np.ndarray, logsumexp: float | None, teacher: np.ndarray, dtype: str, slack: float
) -> str | None:
    """Why a stored top-k row is not the teacher's, or None when it is.

    Ids must be the teacher's top-k as a set, except for swaps among logits tied (within the noise
    of two runs) at the k-th place; values must match the teacher's logits at the stored ids.
    """
    num_classes, k = len(teacher), len(ids)
    ids = np.asarray(ids, dtype=np.int64)
    if (ids < 0).any() or (ids >= num_classes).any():
        return f"top-{k} ids {ids.tolist()} hold ids outside [0, {num_classes})"
    if len(np.unique(ids)) != k:
        return f"top-{k} ids {ids.tolist()} repeat an id"
    teacher = np.asarray(teacher, dtype=np.float32)
    noise = slack * (1.0 + np.abs(teacher.astype(np.float64)))
    order = np.argsort(-teacher, kind="stable")
    extra = np.setdiff1d(ids, order[:k])  # stored, but not among the teacher's k largest
    missing = np.setdiff1d(order[:k], ids)  # among the teacher's k largest, but not stored
    if len(extra):
        gap = float(teacher[missing].max()) - float(teacher[extra].min())
        allowed = float(noise[missing].max() + noise[extra].max())
        if not gap <= allowed:
            return (
                f"top-{k} ids {sorted(ids.tolist())} are not the teacher's {sorted(order[:k].tolist())}: class "
                f"{int(extra[np.argmin(teacher[extra])])} (teacher {float(teacher[extra].min()):.6g}) is stored, class "
                f"{int(missing[np.argmax(teacher[missing])])} (teacher {float(teacher[missing].max()):.6g}) is not "
                f"(beyond a tie within {allowed:.2g})"
            )
    expected = teacher[ids]
    tolerance = value_tolerance(expected, dtype, slack)
    bad, at = _worst(values, expected, tolerance)
    if bad.any():
        return (
            f"top-{k} values differ from the teacher's logits at {int(bad.sum())} of {k} ids; worst class {int(ids[at])}: "
            f"stored {float(values[at]):.6g}, teacher {float(expected[at]):.6g} (tolerance {float(tolerance[at]):.2g})"
        )
    if (np.diff(values.astype(np.float64)) > 0).any():
        return f"top-{k} values {values.tolist()} are not in descending order"
    if logsumexp is not None:
        want = float(torch.logsumexp(torch.from_numpy(teacher), dim=0))
        allowed = slack * (1.0 + abs(want))
        if not abs(float(logsumexp) - want) <= allowed:
            return f"logsumexp is {float(logsumexp):.6g}, the teacher's is {want:.6g} (tolerance {allowed:.2g})"
    return None


# --------------------------------------------------------------------------------------------------
# Shards against the manifest
# --------------------------------------------------------------------------------------------------


def expected_rows(manifest: Manifest, entry: ShardEntry, per: str) -> int:
    """Rows an array of kind ``per`` has in the shard ``entry`` (DESIGN.md section 3)."""
    samples = entry.sample_stop - entry.sample_start
    if per == "sample":
        return samples
    if per == "offsets":
        return samples * manifest.views + 1
    return entry.row_stop - entry.row_start


def _check_arrays(report: VerifyReport, manifest: Manifest, entry: ShardEntry, shard: ShardReader,
                  declared: Mapping[str, Mapping[str, Any]]) -> None:
    """Names, dtypes and shapes of one shard's arrays against ``declared`` (``manifest.arrays``, or for a
    manifest without that field, the arrays its other fields call for)."""
    held = set(shard.names())
    for name in sorted(held - set(declared)) if manifest.arrays else ():
        report.add("arrays", f"{entry.path}/{name}", False, "the shard holds this array but the manifest lists no such array")
    for name, spec in declared.items():
        subject = f"{entry.path}/{name}"
        if name not in held:
            report.add("arrays", subject, False, "missing: the manifest lists this array but the shard does not hold it")
            continue
        want_dtype = np.dtype(spec["dtype"])
        want_shape = (expected_rows(manifest, entry, spec.get("per", "row")), *map(int, spec.get("row_shape", [])))
        try:
            dtype, shape = shard.dtype(name), shard.shape(name)
        except LogitCacheError as exc:
            report.add("arrays", subject, False, f"cannot be inspected: {exc}")
            continue
        problems = []
        if dtype != want_dtype:
            problems.append(f"dtype {dtype.name}, the manifest says {want_dtype.name}")
        if shape != want_shape:
            problems.append(f"shape {list(shape)}, the manifest says {list(want_shape)}")
        if problems:
            report.add("arrays", subject, False, "; ".join(problems))
        else:
            report.add("arrays", subject, True, f"{dtype.name} {list(shape)} as the manifest says")


def _check_shard(report: VerifyReport, path: Path, manifest: Manifest, entry: ShardEntry,
                 declared: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Existence, arrays, checksum and value ranges of one shard; True when it opened (its rows can be compared)."""
    backend = get_backend(manifest.backend)
    try:
        where = Path(shard_location(path, entry.path))
    except LogitCacheError as exc:
        report.add("shard", entry.path, False, f"not opened: {exc}")
        return False
    if not where.exists():
        report.add("shard", entry.path, False, f"missing: listed in the manifest but {where} does not exist")
        return False
    try:
        shard = backend.open(where)
    except LogitCacheError as exc:
        report.add("shard", entry.path, False, f"cannot be opened: {exc}")
        return False
    with shard:
        report.add("shard", entry.path, True, f"exists and opens as {manifest.backend}")
        declared = manifest.arrays or declared
        if declared:
            _check_arrays(report, manifest, entry, shard, declared)
        ranges = _Ranges(manifest, entry)
        try:
            actual = shard.checksum(ranges)
        except LogitCacheError as exc:
            report.add("checksum", entry.path, False, f"cannot be read whole: {exc}")
            return True
        if actual != entry.checksum:
            report.add("checksum", entry.path, False, f"checksum {actual} does not match the manifest's {entry.checksum}")
        else:
            report.add("checksum", entry.path, True, "checksum matches the manifest")
        ranges.report(report)
    return True


class _Ranges:
    """What the checksum pass sees of one shard's ids and offsets, checked against the manifest after it.

    Ids: plain arrays hold them; compact ones hold gaps, whose row sums give each row's largest id
    (sampled rows: pads have gap 0 and count 0, so ``sum(gap + 1) - (number of zero counts)`` is the
    largest real id plus one).
    """

    def __init__(self, manifest: Manifest, entry: ShardEntry) -> None:
        self.manifest, self.entry = manifest, entry
        self.rows = entry.row_stop - entry.row_start
        self.lowest: int | None = None  # the smallest id (or gap) seen
        self.highest: int | None = None  # the largest id seen
        self.sampled_sums: np.ndarray | None = None  # compact sampled: per row, largest id + 1
        self.offsets: list[np.ndarray] = []

    def _seen(self, low: int, high: int | None) -> None:
        self.lowest = low if self.lowest is None else min(self.lowest, low)
        if high is not None:
            self.highest = high if self.highest is None else max(self.highest, high)

    def __call__(self, name: str, start: int, block: np.ndarray) -> None:
        if not len(block):
            return
        if name in ("topk_indices", "sampled_indices"):
            self._seen(int(block.min()), int(block.max()))
        elif name == "topk_id_gaps":
            self._seen(int(block.min()), int((block.astype(np.int64) + 1).sum(axis=1).max()) - 1)
        elif name.startswith(("sampled_id_gaps_", "sampled_counts_")):
            if self.sampled_sums is None or len(self.sampled_sums) < start + len(block):  # (longer than the entry says: reported)
                grown = np.zeros(max(self.rows, start + len(block)), dtype=np.int64)
                if self.sampled_sums is not None:
                    grown[: len(self.sampled_sums)] = self.sampled_sums
                self.sampled_sums = grown
            part = self.sampled_sums[start : start + len(block)]
            if name.startswith("sampled_id_gaps_"):
                self._seen(int(block.min()), None)
                part += (block.astype(np.int64) + 1).sum(axis=1)
            else:
                part -= (block == 0).sum(axis=1)
        elif name == "offsets":
            self.offsets.append(np.asarray(block, dtype=np.int64))

    def report(self, report: VerifyReport) -> None:
        manifest, path = self.manifest, self.entry.path
        if self.sampled_sums is not None and len(self.sampled_sums):
            self._seen(self.lowest or 0, int(self.sampled_sums.max()) - 1)
        if self.lowest is not None:
            classes = manifest.num_classes
            if self.lowest < 0 or (self.highest is not None and self.highest >= classes):
                report.add("ranges", path, False,
                           f"ids (or their gaps) range from {self.lowest} to {self.highest}, outside [0, num_classes={classes}): "
                           f"the manifest's num_classes does not fit the ids stored, or the shard is damaged")
            else:
                report.add("ranges", path, True, f"ids within [0, num_classes={classes})")
        if self.offsets:
            offsets = np.concatenate(self.offsets)
            decrease = bool((np.diff(offsets) < 0).any())
            if len(offsets) and (offsets[0] != 0 or offsets[-1] != self.rows or decrease):
                report.add("ranges", f"{path}/offsets", False,
                           f"offsets run from {int(offsets[0])} to {int(offsets[-1])}{' and decrease' if decrease else ''}; "
                           f"expected a non-decreasing run from 0 to the shard's {self.rows} rows")
            else:
                report.add("ranges", f"{path}/offsets", True, f"offsets run from 0 to {self.rows}")


def _check_fields(report: VerifyReport, manifest: Manifest) -> dict[str, dict[str, Any]] | None:
    """The manifest's content fields against the arrays it lists and against its key; returns the
    arrays the fields call for (name -> {"dtype", "row_shape", "per"}), or None if they call for none."""
    if source_precision(manifest) is None:
        report.add("key", "manifest.json", False,
                   f"key {manifest.key} is not the key of the manifest's content fields (teacher sha256, dataset fingerprint, mode, "
                   f"k/m, views, seed, dtype, precision, encoding): a field or the key was edited (or another version of logit-cache "
                   f"with other key rules wrote it), so the cache's identity cannot be trusted; dump it again")
    else:
        report.add("key", "manifest.json", True, "key matches the manifest's content fields")
    if manifest.per_token:
        expected_rows = None
    else:
        expected_rows = manifest.num_samples * manifest.views
        if manifest.num_rows != expected_rows:
            report.add("fields", "manifest.json", False,
                       f"num_rows is {manifest.num_rows}, but num_samples {manifest.num_samples} x views {manifest.views} "
                       f"= {expected_rows} (one row per sample and view)")
    length = manifest.dataset.get("length")
    if length is not None and length != manifest.num_samples:
        report.add("fields", "manifest.json", False, f"dataset.length is {length!r}, but num_samples is {manifest.num_samples}")
    width = manifest.m if manifest.mode == "sampled" else manifest.k
    fields_shown = (f"mode={manifest.mode}, {'m' if manifest.mode == 'sampled' else 'k'}={width}, num_classes={manifest.num_classes}, "
                    f"dtype={manifest.dtype}, encoding={manifest.encoding}")
    try:
        specs: list[ArraySpec] = array_specs(
            manifest.mode, width, manifest.num_classes, manifest.dtype, "labels" in manifest.arrays, manifest.num_samples,
            per_token=manifest.per_token, encoding=manifest.encoding, sampled_logits="sampled_logits" in manifest.arrays)
    except LogitCacheError as exc:
        report.add("fields", "manifest.json", False, f"{fields_shown} describe no cache layout: {exc}")
        return None
    wanted = {spec.name: spec.to_json() for spec in specs}
    if manifest.arrays:
        problems = []
        for name, spec in wanted.items():
            listed = manifest.arrays.get(name)
            if listed is None:
                problems.append(f"they call for an array {name!r}, which the manifest's arrays do not list")
            elif (np.dtype(listed.get("dtype")), list(listed.get("row_shape", []))) != (np.dtype(spec["dtype"]), spec["row_shape"]):
                problems.append(f"they call for {name!r} as {spec['dtype']} {spec['row_shape']}, the manifest's arrays list "
                                f"{listed.get('dtype')} {list(listed.get('row_shape', []))}")
        problems += [f"the manifest's arrays list {name!r}, which they do not call for" for name in manifest.arrays if name not in wanted]
        if problems:
            report.add("fields", "manifest.json", False,
                       f"the manifest's fields ({fields_shown}) do not fit its arrays: {'; '.join(problems)} "
                       f"(a field was edited; the shards hold what the arrays list)")
            return wanted
    rows = f" and the {manifest.num_rows} rows" if expected_rows else ""
    report.add("fields", "manifest.json", True, f"{fields_shown} fit the arrays{rows}")
    return wanted


# --------------------------------------------------------------------------------------------------
# Values against the teacher
# --------------------------------------------------------------------------------------------------


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
    if manifest.mode == "full":
        problem = compare_full(_read_row(shard, "logits", local), logits, manifest.dtype, slack)
    else:
        lse = _read_row(shard, "logsumexp", local) if "logsumexp" in manifest.arrays else None
        problem = compare_topk(_read_row(shard, "topk_indices", local), _read_row(shard, "topk_logits", local),
                               None if lse is None else float(lse), logits, manifest.dtype, slack)
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


def _one_line(exc: BaseException) -> str:
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
        report.add("teacher_output", "teacher", False, f"failed on samples {shown}: {_one_line(exc)}")
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
                problem = f"its row cannot be read: {_one_line(exc)}"
            if problem:
                differing.append(subject)
                report.add("sample", subject, False, f"{problem} ({entry.path})")
            else:
                report.add("sample", subject, True, "matches the teacher within tolerance")
    finally:
        for shard in shards.values():
            shard.close()
    return differing


def _check_teacher(report: VerifyReport, path: Path, manifest: Manifest, teacher: Teacher, resolved: ResolvedDataset,
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


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------


def _load_teacher(manifest: Manifest, teacher: str, arch: str | None, arch_kwargs: Mapping[str, Any] | None,
                  trust_checkpoint: bool, device: torch.device) -> Teacher:
    try:
        return load_teacher(teacher, arch=arch, arch_kwargs=dict(arch_kwargs) if arch_kwargs else None,
                            trust_checkpoint=trust_checkpoint, device=device)
    except CheckpointError as exc:
        recorded = manifest.teacher.get("arch")
        if arch is None and recorded and "--arch" in str(exc):
            raise type(exc)(f"{exc} (the cache was dumped with --arch {recorded} --arch-kwargs "
                            f"'{json.dumps(manifest.teacher.get('arch_kwargs', {}))}')") from exc
        raise


def verify_cache(
    path: str | Path,
    *,
    teacher: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
    dataset: str | None = None,
    dataset_kwargs: Mapping[str, Any] | None = None,
    samples: int = 32,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> VerifyReport:
    """Check a cache's shards against its manifest and, given a teacher and dataset, its values.

    Returns a report whose ``ok`` is true only when every check held; failures are one line each,
    naming the shard, array or sample. Raises a :class:`~logit_cache.errors.LogitCacheError` for
    errors of usage: no cache at ``path``, a teacher without a dataset (or the reverse), a teacher
    or dataset that cannot be loaded. See the module docstring for what is checked and the tolerances.

    Example::

        report = verify_cache("caches/digits-top5", teacher="teacher.pt", arch="logit_cache.models:digits_mlp",
                              arch_kwargs={"hidden": 32}, dataset="digits")
        assert report.ok, "\\n".join(report.failures)
    """
    path = Path(path)
    if teacher is not None and dataset is None:
        raise UsageError("--teacher needs --dataset: the teacher is re-run on samples of the cache's dataset")
    if dataset is not None and teacher is None:
        raise UsageError("--dataset needs --teacher: the dataset is only used to re-run the teacher on some samples")
    if teacher is None and (arch is not None or arch_kwargs or trust_checkpoint):
        raise UsageError("--arch, --arch-kwargs and --trust-checkpoint describe a --teacher; pass --teacher (and --dataset)")
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    report = VerifyReport(str(path))
    if not path.exists():
        if partial_path(path).exists():
            report.add("manifest", str(path), False,
                       f"incomplete: the dump has not finished, its data is in {partial_path(path)}; not verified "
                       f"(finish it with dump --resume)")
            report.summary = f"FAILED: {path} is incomplete, not verified"
            return report
        raise CacheNotFoundError(f"{path}: no such cache directory")
    try:
        manifest = read_manifest(path)
    except CacheNotFoundError:
        raise
    except CacheFormatError as exc:
        report.add("manifest", "manifest.json", False, f"invalid: {exc}")
        report.summary = f"FAILED: {path}: its manifest is invalid, nothing else verified"
        return report
    if not manifest.complete:
        report.add("manifest", "manifest.json", False,
                   "incomplete: complete=false, the dump that writes it has not finished; not verified (finish it with dump --resume)")
        report.summary = f"FAILED: {path} is incomplete, not verified"
        return report
    report.add("manifest", "manifest.json", True,
               f"complete {manifest.mode} cache of {manifest.num_rows} rows in {len(manifest.shards)} shard(s)")
    declared = _check_fields(report, manifest)

    loaded = resolved = torch_device = None
    if teacher is not None:
        if manifest.per_token or manifest.mode not in ("full", "topk"):
            what = "per-token" if manifest.per_token else f"{manifest.mode}-mode"
            raise UsageError(f"{path}: re-running the teacher is only supported for per-sample full and top-k caches, not {what} ones; "
                             f"verify without --teacher to check the shards")
        torch_device = resolve_device(device)
        resolved = resolve_dataset(dataset, dataset_kwargs)  # errors before the long checksum pass
        loaded = _load_teacher(manifest, str(teacher), arch, arch_kwargs, trust_checkpoint, torch_device)

    opened: set[int] = set()
    bar = tqdm(manifest.shards, desc="verify", unit="shard", disable=None if progress else True)
    try:
        for position, entry in enumerate(bar):
            if _check_shard(report, path, manifest, entry, declared):
                opened.add(position)
    finally:
        bar.close()

    if loaded is not None and resolved is not None and torch_device is not None:
        _check_teacher(report, path, manifest, loaded, resolved, torch_device, samples, seed, opened)

    report.summary = _summary(report, manifest)
    return report


def _summary(report: VerifyReport, manifest: Manifest) -> str:
    """The last line of the report: what was verified, or how many checks failed and of which kinds."""
    count = {kind: sum(1 for c in report.checks if c.kind == kind) for kind in ("arrays", "sample")}
    samples = sum(1 for c in report.checks if c.kind == "sample" and c.subject != "samples")
    what = f"{len(manifest.shards)} shard(s), {count['arrays']} array(s)"
    if any(c.kind == "teacher_sha256" for c in report.checks):
        what += f", {samples} sample(s) against the teacher"
    if report.ok:
        return f"ok: {report.path}: {what} verified"
    failed: dict[str, int] = {}
    for check in report.checks:
        if not check.ok:
            failed[check.kind] = failed.get(check.kind, 0) + 1
    kinds = ", ".join(f"{number} {kind}" for kind, number in failed.items())
    return f"FAILED: {report.path}: {len(report.failures)} of {len(report.checks)} checks failed ({kinds}); checked {what}"
