"""The commands that look at one cache: ``info`` (what it holds) and ``verify`` (whether it is sound)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import LogitCacheError
from ..format.completeness import shown_location
from ..format.manifest import Manifest, read_manifest
from ..io.lookup import directory_bytes
from ..specs import parse_json_kwargs
from .common import fail, human_bytes, what
from .options import dataset_text_options, json_option, teacher_options

VERIFY_TEACHER_HELP = (
    "Also re-run this teacher on --samples random samples and compare with the cache "
              "(needs --dataset). Loaded as dump loads it."
)


def _info_record(path: Path, manifest: Manifest) -> dict[str, Any]:
    size = directory_bytes(path)
    return {
        "path": str(path),
        "complete": manifest.complete,
        "bytes_on_disk": size,
        "bytes_per_sample": size / max(1, manifest.num_samples),
        "bytes_per_row": size / max(1, manifest.num_rows),
        "manifest": manifest.to_dict(),
    }


@click.command("info")
@click.argument("cache", type=click.Path(path_type=Path))
@json_option("Print one JSON object: the manifest plus size figures.")
@click.option("--plot", "plot", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE.png",
              help="Also draw what the cache holds to FILE.png: the teacher's top-1 probability and entropy, the top-k mass kept "
                   "(or distinct drawn ids), labels per class or tokens per sequence. Needs matplotlib: "
                   "pip install 'logit-cache[plot]'.")
@click.option("--plot-rows", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="With --plot: at most this many rows are read (a seeded sample of a larger cache, said on the figure).")
def info_command(cache: Path, as_json: bool, plot: Path | None, plot_rows: int) -> None:
    """Show what a cache holds: its manifest and its size on disk.

    An unfinished dump (CACHE.partial) is shown too, marked INCOMPLETE. With --plot FILE.png, a
    figure of its contents as well (of a complete cache).
    """
    try:
        path = shown_location(cache)
        manifest = read_manifest(path)
        drawn = _draw(path, plot, plot_rows) if plot is not None else None
    except LogitCacheError as exc:
        fail(exc)
    record = _info_record(path, manifest)
    if drawn is not None:
        record["plot"] = {"path": str(plot), "rows": drawn}
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    teacher, data = manifest.teacher, manifest.dataset
    content = what(manifest)
    rows = (f"{manifest.num_rows:,} tokens of {manifest.num_samples:,} sequences" if manifest.per_token
            else f"{manifest.num_rows:,} ({manifest.num_samples:,} samples x {manifest.views} view(s))")
    lines = [
        f"{path}" + ("" if manifest.complete else "   INCOMPLETE (resume the dump with --resume)"),
        f"  key          {manifest.key}   (format v{manifest.format_version}, logit-cache {manifest.tool_version}, "
        f"torch {manifest.torch_version}, created {manifest.created_at})",
        f"  content      {content} of {manifest.num_classes} classes, {manifest.dtype}, {manifest.backend}, "
        f"temperature {manifest.temperature:g}",
        f"  rows         {rows} in {len(manifest.shards)} shard(s), {manifest.chunk_rows} rows per chunk",
        f"  teacher      {teacher.get('path')} ({teacher.get('format')}/{teacher.get('layout', '')}, "
        f"sha256 {str(teacher.get('sha256'))[:12]}, arch {teacher.get('arch')})",
        f"  dataset      {data.get('spec')} {json.dumps(data.get('kwargs', {}))} ({data.get('length'):,} items, "
        f"fingerprint {str(data.get('fingerprint'))[:12]})",
        "  arrays       " + ", ".join(f"{name} {spec['dtype']}{spec['row_shape']}" for name, spec in manifest.arrays.items()),
        f"  on disk      {human_bytes(record['bytes_on_disk'])} ({record['bytes_per_sample']:,.1f} B/sample)",
    ]
    if drawn is not None:
        lines.append(f"  plot         {plot} ({drawn})")
    click.echo("\n".join(lines))


def _draw(path: Path, out: Path, max_rows: int) -> str:
    """Draw the cache at ``path`` to ``out``; return which rows the figure's histograms count."""
    from ..tools.plots import plot_cache

    return plot_cache(path, out, max_rows=max_rows).summary.sample_note


@click.command("verify")
@click.argument("cache", type=click.Path(path_type=Path), metavar="DIR")
@teacher_options(VERIFY_TEACHER_HELP, with_teacher=True)
@click.option("--dataset", metavar="SPEC",
              help="With --teacher: the data the cache was dumped from ('digits' or MODULE:CALLABLE, which imports MODULE and runs "
                   "its code).")
@click.option("--dataset-kwargs", metavar="JSON", help="With --teacher: keyword arguments for the dataset.")
@dataset_text_options()
@click.option("--samples", type=int, default=32, show_default=True,
              help="With --teacher: how many random samples (and, for caches of several views, random views) to compare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of samples and views.")
@click.option("--device", default="cpu", show_default=True, help="Where the teacher runs: cpu, cuda, cuda:N or auto.")
@json_option('Print one JSON object: {"path", "ok", "checks", "failures", "summary"}.')
def verify_command(cache: Path, teacher: str | None, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool,
                   dataset: str | None, dataset_kwargs: str | None, samples: int, seed: int, device: str, as_json: bool) -> None:
    """Check a cache: every shard's checksum, arrays, dtypes and shapes against its manifest.

    With --teacher and --dataset, also re-run the teacher on --samples random samples and compare
    with the cached rows: float32 caches within 1e-4 relative plus 1e-4 absolute, float16 caches
    within half a float16 ulp plus that (looser for fp16/bf16 dumps); top-k ids as sets, allowing
    swaps among logits tied at the k-th place. A teacher file whose sha256 changed since the dump
    is reported, and fails only if its outputs differ.

    Exits 0 when every check holds, 1 otherwise, with one line per failed shard, array or sample
    and a summary line.

    \b
    Examples:
      logit-cache verify caches/digits-top5
      logit-cache verify caches/digits-top5 --teacher teacher.pt --arch logit_cache.models:digits_mlp \\
          --arch-kwargs '{"hidden": 32}' --dataset digits --samples 64
    """
    from ..tools.verify import verify_cache

    try:
        report = verify_cache(
            cache, teacher=teacher, arch=arch, arch_kwargs=parse_json_kwargs(arch_kwargs, "--arch-kwargs"),
            trust_checkpoint=trust_checkpoint, dataset=dataset,
            dataset_kwargs=parse_json_kwargs(dataset_kwargs, "--dataset-kwargs"),
            samples=samples, seed=seed, device=device,
        )
    except LogitCacheError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for failure in report.failures:
            click.echo(f"FAIL {failure}")
        for notice in report.notices:
            click.echo(f"note {notice}")
        click.echo(report.summary)
    if not report.ok:
        sys.exit(1)

