"""The checks of ``verify`` that need no teacher: the manifest's fields against its arrays and key, and
every shard against the manifest (arrays, dtypes, shapes, checksum, id and offset ranges).

What each check means is stated in :mod:`logit_cache.tools.verify`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LogitCacheError
from ..format.layout import array_specs
from ..format.manifest import Manifest, ShardEntry
from ..io.reader import shard_location
from ..store import ArraySpec, ShardReader, get_backend
from ..targets import get_kind
from .convert import source_precision
from .verify_report import VerifyReport


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


def check_shard(report: VerifyReport, path: Path, manifest: Manifest, entry: ShardEntry,
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


def check_fields(report: VerifyReport, manifest: Manifest) -> dict[str, dict[str, Any]] | None:
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
    kind = get_kind(manifest.mode)
    width = kind.width(manifest)
    shown_width = f"{kind.width_field}={width}, " if kind.width_field else ""
    fields_shown = (f"mode={manifest.mode}, {shown_width}num_classes={manifest.num_classes}, "
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
        for name, spec in list(wanted.items()):
            listed = manifest.arrays.get(name)
            older = kind.older_dtypes.get(name, ())
            if listed is None and name in kind.optional_arrays:
                del wanted[name]  # a cache written before the array existed (readers do without it)
            elif listed is None:
                problems.append(f"they call for an array {name!r}, which the manifest's arrays do not list")
            elif older and np.dtype(listed.get("dtype")) in [np.dtype(d) for d in older]:
                wanted[name] = {**spec, "dtype": listed.get("dtype")}  # the dtype it had in older caches, read alike
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
