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

The checks live in :mod:`.verify_checks` (fields and shards), :mod:`.verify_teacher` (re-running the
teacher) and :mod:`.verify_compare` (tolerances, row comparisons); the report in :mod:`.verify_report`.
This module runs them in order and re-exports their public names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data.datasets import resolve_dataset
from ..errors import CacheFormatError, CacheNotFoundError, UsageError
from ..format.completeness import unfinished_work
from ..format.manifest import Manifest, read_manifest
from ..targets import get_kind
from ..teachers.runtime import resolve_device
from .verify_checks import check_fields, check_shard, expected_rows
from .verify_compare import FLOAT16_MAX, PRECISION_SLACK, comparable, compare_full, compare_topk, value_tolerance
from .verify_report import Check, VerifyReport
from .verify_teacher import check_teacher, load_teacher_for

__all__ = [  # moved to verify_report, verify_compare and verify_checks; importable from here as before
    "FLOAT16_MAX",
    "PRECISION_SLACK",
    "Check",
    "VerifyReport",
    "compare_full",
    "compare_topk",
    "expected_rows",
    "value_tolerance",
    "verify_cache",
]


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
        work = unfinished_work(path)
        if work is not None:
            report.add("manifest", str(path), False,
                       f"incomplete: the dump has not finished, its data is in {work}; not verified "
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
    declared = check_fields(report, manifest)

    loaded = resolved = torch_device = None
    if teacher is not None:
        if manifest.per_token or not comparable(get_kind(manifest.mode)):
            what = "per-token" if manifest.per_token else f"{manifest.mode}-mode"
            raise UsageError(f"{path}: re-running the teacher is only supported for per-sample full and top-k caches, not {what} ones; "
                             f"verify without --teacher to check the shards")
        torch_device = resolve_device(device)
        resolved = resolve_dataset(dataset, dataset_kwargs)  # errors before the long checksum pass
        loaded = load_teacher_for(manifest, str(teacher), arch, arch_kwargs, trust_checkpoint, torch_device)

    opened: set[int] = set()
    bar = tqdm(manifest.shards, desc="verify", unit="shard", disable=None if progress else True)
    try:
        for position, entry in enumerate(bar):
            if check_shard(report, path, manifest, entry, declared):
                opened.add(position)
    finally:
        bar.close()

    if loaded is not None and resolved is not None and torch_device is not None:
        check_teacher(report, path, manifest, loaded, resolved, torch_device, samples, seed, opened)

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
