"""The ``logit-cache`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..errors import LogitCacheError, UsageError
from ..format.manifest import Manifest, read_manifest
from ..format.paths import partial_path
from ..pipeline.dump import DumpConfig, DumpResult, dump_cache
from ..specs import parse_json_kwargs
from ..tools.catalog import ROOT_ENV, caches_by_key, check_removable, directory_bytes, gc_candidates, list_caches, remove_cache
from ..train.loop import OPTIMIZERS, TrainConfig, TrainResult, train_student


def _fail(exc: LogitCacheError) -> None:
    """One line for the user; the whole chain with LOGIT_CACHE_TRACEBACK=1 (for debugging a teacher or dataset)."""
    if os.environ.get("LOGIT_CACHE_TRACEBACK") == "1":
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="logit-cache")
def main() -> None:
    """Run a teacher once, cache its logits, distill from the cache.

    \b
    Typical use:
      logit-cache demo                      # the whole pipeline on built-in data, about a minute
      logit-cache dump --teacher teacher.pt --arch logit_cache.models:digits_mlp \\
                       --dataset digits --out caches/digits-top5 --topk 5
      logit-cache info caches/digits-top5
      logit-cache train --student logit_cache.models:digits_mlp --student-kwargs '{"hidden": 16, "depth": 1}' \\
                        --dataset digits --cache caches/digits-top5 --out student.pt
    """


@main.command("dump")
@click.option("--teacher", "teacher", required=True, metavar="CKPT",
              help="Teacher checkpoint: a state_dict (plain, {'model': ...}, Lightning, Composer; needs --arch), "
                   "a TorchScript archive, a torch.export .pt2 archive (one holding pickles, compiled code or Python source "
                   "needs --trust-checkpoint), a pickled nn.Module (needs --trust-checkpoint), "
                   "or hf:DIR, a local Hugging Face causal-LM directory (save_pretrained; needs the 'hf' extra).")
@click.option("--arch", metavar="MODULE:CALLABLE",
              help="Builds the teacher's architecture for a state_dict, e.g. torchvision.models:resnet18 or models.py:make_net. "
                   "Imports MODULE and runs its code; the current directory is searched after installed packages.")
@click.option("--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as a JSON object, e.g. '{\"num_classes\": 10}'.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow loading a teacher file whose loading runs code from it: a pickled whole nn.Module, or a .pt2 archive "
                   "with pickled parts, AOTInductor code or Python source (guards, shape expressions). Only for files you trust.")
@click.option("--dataset", required=True, metavar="SPEC",
              help="'digits' (built in, scikit-learn's handwritten digits), 'text' (built in, byte-level windows of Python's "
                   "pydoc texts), tokens:PATH.npy (a flat token-id array cut into windows: --dataset-kwargs "
                   "'{\"seq_len\": 128, \"stride\": 128}'), or MODULE:CALLABLE returning a map-style Dataset whose items "
                   "are (input, label) or input; for language models, token ids, (ids, labels) or {input_ids, attention_mask}. "
                   "A MODULE:CALLABLE spec imports MODULE and runs its code; the current directory is searched after installed "
                   "packages (name a local file as path/to/file.py:CALLABLE).")
@click.option("--dataset-kwargs", metavar="JSON", help="Keyword arguments for the dataset, e.g. '{\"split\": \"test\"}'.")
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Cache directory to create. Written as DIR.partial and renamed to DIR once complete.")
@click.option("--cache-root", type=click.Path(path_type=Path), metavar="ROOT",
              help="Instead of --out: put the cache under ROOT, named by what it holds and its content key, and reuse a "
                   "complete cache of that key instead of computing it [default without --out: $LOGIT_CACHE_ROOT].")
@click.option("--no-wait", is_flag=True,
              help="If another dump is writing this cache, fail at once instead of waiting for it (and then reusing it).")
@click.option("--topk", type=int, metavar="K", help="Store the K largest logits per row, their ids and the logsumexp of all logits.")
@click.option("--sample", "sample", type=int, metavar="M",
              help="Random-sampling KD (per-token caches): draw M ids per token from the teacher's distribution with a "
                   "seeded generator and store the distinct ids with their counts (counts/M estimates the probabilities).")
@click.option("--sample-temperature", type=float, default=1.0, show_default=True, metavar="TS",
              help="With --sample: draw from softmax(logits/TS). TS != 1 also stores the drawn ids' logits, so training "
                   "corrects the draws by importance weights.")
@click.option("--full", is_flag=True, help="Store every logit (C values per row); the size is stated before the dump starts.")
@click.option("--encoding", type=click.Choice(["plain", "compact"]), default="plain", show_default=True,
              help="compact: top-k/sampled rows in fewer bytes (ids sorted and delta-coded, values quantized; see "
                   "BENCHMARKS.md for bytes/token and fidelity). plain: float16/32 values and uint16/int32 ids.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="The distillation temperature you mean to use, recorded as the cache's default. Raw logits are "
                   "stored, so any temperature can still be chosen when training.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of logit values. float16 halves the bytes; float32 stores the teacher's values exactly.")
@click.option("--format", "backend", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True,
              help="Shard backend: Zarr v3 groups (top-k compressed with Blosc-zstd) or HDF5 files.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per teacher forward pass.")
@click.option("--num-workers", type=int, default=None,
              help="DataLoader worker processes [default: 0 on CPU, where workers compete with the teacher for cores; "
                   "up to 8 with a GPU].")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Teacher compute precision; bf16/fp16 run under torch.autocast. Top-k and logsumexp are always float32.")
@click.option("--shard-rows", type=int, default=None,
              help="Rows per shard [default: about 256 MiB of arrays per shard]. Smaller shards resume with less rework.")
@click.option("--views", type=int, default=1, show_default=True,
              help="Cache V augmented views per sample (rows i*V+v). Each view is produced with torch's, numpy's and "
                   "Python's random generators seeded from (--seed, i, v), so training replays exactly that input.")
@click.option("--seed", type=int, default=None,
              help="Seed of the views' augmentation [default: 0 with --views > 1; none, i.e. today's unseeded items, "
                   "with --views 1].")
@click.option("--resume", is_flag=True, help="Continue an unfinished dump of the same settings at DIR.partial, keeping finished shards.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at DIR (only a directory holding a logit-cache manifest).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no log lines; only the summary and errors.")
def dump_command(teacher: str, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool, dataset: str,
                 dataset_kwargs: str | None, out: Path | None, cache_root: Path | None, no_wait: bool, topk: int | None,
                 sample: int | None, sample_temperature: float, full: bool, encoding: str, temperature: float, dtype: str,
                 backend: str, batch_size: int, num_workers: int | None, device: str, precision: str,
                 shard_rows: int | None, views: int, seed: int | None, resume: bool, overwrite: bool, quiet: bool) -> None:
    """Run a teacher over a dataset once and cache its logits.

    Writes a cache directory (manifest.json and Zarr or HDF5 shards) holding, for every dataset index,
    the teacher's full logits (--full) or its top-k logits, ids and logsumexp (--topk K). For token
    data (a language model's) there is one row per real token (padding is never stored) and
    --sample M stores M draws from each token's distribution as distinct ids and counts.

    \b
    Examples:
      logit-cache dump --teacher teacher.pt --arch logit_cache.models:digits_mlp \\
          --dataset digits --out caches/digits-top5 --topk 5
      logit-cache dump --teacher model.ts --dataset mydata:make_dataset --out caches/full --full --format hdf5
      logit-cache dump --teacher hf:models/my-lm --dataset tokens:train.npy --out caches/lm-s50 --sample 50
      torchrun --nproc_per_node=2 -m logit_cache dump ...   # each rank writes its own shards
    """
    _setup_logging(quiet)
    try:
        chosen = [flag for flag, on in (("--topk", topk is not None), ("--sample", sample is not None), ("--full", full)) if on]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} are exclusive: pass one of --topk K, --sample M, --full")
        config = DumpConfig(
            teacher=teacher,
            arch=arch,
            arch_kwargs=parse_json_kwargs(arch_kwargs, "--arch-kwargs"),
            trust_checkpoint=trust_checkpoint,
            dataset=dataset,
            dataset_kwargs=parse_json_kwargs(dataset_kwargs, "--dataset-kwargs"),
            out=str(out) if out is not None else None,
            cache_root=str(cache_root) if cache_root is not None else (None if out is not None else os.environ.get(ROOT_ENV)),
            wait=not no_wait,
            mode="full" if full else "sampled" if sample is not None else "topk",
            k=topk,
            m=sample,
            sample_temperature=sample_temperature,
            encoding=encoding,
            temperature=temperature,
            dtype=dtype,
            backend=backend,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            shard_rows=shard_rows,
            views=views,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
        )
        result = dump_cache(config)
    except LogitCacheError as exc:
        _fail(exc)
        return
    if _rank() == 0:
        click.echo(_summary(result))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _what(manifest: Manifest) -> str:
    """A cache's content in a few words: top-5, sampled M=50 (Ts 1), full logits; per token when so."""
    what = {"topk": f"top-{manifest.k}", "sampled": f"sampled M={manifest.m} (Ts {manifest.sample_temperature:g})"}.get(
        manifest.mode, "full logits")
    what += f", {manifest.encoding} encoding" if manifest.encoding != "plain" else ""
    return what + (" per token" if manifest.per_token else "")


def _summary(result: DumpResult) -> str:
    manifest = result.manifest
    size = result.bytes_on_disk
    what = _what(manifest)
    if result.reused:
        return f"reused cache {manifest.key} ({what}, {manifest.backend}) at {result.out}: nothing computed"
    lines = [
        f"wrote {result.out}: {what}, {manifest.dtype}, {manifest.backend}, {manifest.num_classes} classes",
        f"  rows        {manifest.num_rows:,} ({manifest.num_samples:,} {'sequences' if manifest.per_token else 'samples'}) "
        f"in {len(manifest.shards)} shard(s)"
        + (f", {result.resumed_shards} kept from the unfinished dump" if result.resumed_shards else ""),
        f"  on disk     {_human_bytes(size)} ({size / max(1, manifest.num_rows if manifest.per_token else manifest.num_samples):,.1f} "
        f"B/{'token' if manifest.per_token else 'sample'})",
        f"  time        {result.seconds:.2f} s in all, {result.compute_seconds:.2f} s in the inference loop "
        f"({result.samples_per_second:,.0f} {'tokens' if manifest.per_token else 'samples'}/s)",
    ]
    if result.mean_topk_mass is not None and manifest.mode == "topk":
        lines.append(f"  top-{manifest.k} mass  {result.mean_topk_mass:.4f} (mean probability mass at T=1)")
    elif result.mean_topk_mass is not None:
        lines.append(f"  drawn mass  {result.mean_topk_mass:.4f} (mean teacher probability of the distinct drawn ids, T=1)")
    lines.append(f"  key         {manifest.key}")
    return "\n".join(lines)


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


@main.command("info")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the manifest plus size figures.")
def info_command(cache: Path, as_json: bool) -> None:
    """Show what a cache holds: its manifest and its size on disk.

    An unfinished dump (CACHE.partial) is shown too, marked INCOMPLETE.
    """
    try:
        path = cache
        if not path.exists() and partial_path(path).exists():
            path = partial_path(path)
        manifest = read_manifest(path)
    except LogitCacheError as exc:
        _fail(exc)
        return
    record = _info_record(path, manifest)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    teacher, data = manifest.teacher, manifest.dataset
    what = _what(manifest)
    rows = (f"{manifest.num_rows:,} tokens of {manifest.num_samples:,} sequences" if manifest.per_token
            else f"{manifest.num_rows:,} ({manifest.num_samples:,} samples x {manifest.views} view(s))")
    lines = [
        f"{path}" + ("" if manifest.complete else "   INCOMPLETE (resume the dump with --resume)"),
        f"  key          {manifest.key}   (format v{manifest.format_version}, logit-cache {manifest.tool_version}, "
        f"torch {manifest.torch_version}, created {manifest.created_at})",
        f"  content      {what} of {manifest.num_classes} classes, {manifest.dtype}, {manifest.backend}, "
        f"temperature {manifest.temperature:g}",
        f"  rows         {rows} in {len(manifest.shards)} shard(s), {manifest.chunk_rows} rows per chunk",
        f"  teacher      {teacher.get('path')} ({teacher.get('format')}/{teacher.get('layout', '')}, "
        f"sha256 {str(teacher.get('sha256'))[:12]}, arch {teacher.get('arch')})",
        f"  dataset      {data.get('spec')} {json.dumps(data.get('kwargs', {}))} ({data.get('length'):,} items, "
        f"fingerprint {str(data.get('fingerprint'))[:12]})",
        "  arrays       " + ", ".join(f"{name} {spec['dtype']}{spec['row_shape']}" for name, spec in manifest.arrays.items()),
        f"  on disk      {_human_bytes(record['bytes_on_disk'])} ({record['bytes_per_sample']:,.1f} B/sample)",
    ]
    click.echo("\n".join(lines))


def _root_or_env(root: Path | None) -> Path:
    if root is not None:
        return root
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    raise UsageError(f"name the cache root: an argument, or set {ROOT_ENV}")


@main.command("ls")
@click.argument("root", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per cache.")
def ls_command(root: Path | None, as_json: bool) -> None:
    """List the caches under a cache root [default: $LOGIT_CACHE_ROOT].

    One row per cache: key, teacher file and hash, dataset, content, rows, size on disk,
    bytes per sample, status, created. Unfinished dumps are marked INCOMPLETE (or WRITING while
    a dump holds their lock).
    """
    try:
        entries = list_caches(_root_or_env(root))
    except LogitCacheError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    header = ["key", "teacher", "dataset", "content", "rows", "size", "B/sample", "status", "created", "name"]
    lines = []
    for entry in entries:
        record = entry.to_json()
        status = "complete" if entry.complete else ("WRITING" if entry.locked else "INCOMPLETE")
        if entry.manifest is None:
            if entry.unreadable:
                state = f"UNREADABLE: {entry.error}"
            elif entry.unfinished:
                detail = " (no manifest yet)" if entry.error is None else f": {entry.error}"
                state = ("WRITING" if entry.locked else "INCOMPLETE") + detail
            else:
                state = f"DAMAGED: {entry.error}"
            lines.append([entry.key, "?", "?", "?", "?", _human_bytes(entry.bytes_on_disk), "?", state, "?", entry.path.name])
            continue
        what = {"topk": f"top-{record['k']}", "sampled": f"sample-{record.get('m')}"}.get(record["mode"], record["mode"])
        what += f" {record['dtype']} {record['backend']}" + (f" x{record['views']} views" if record["views"] > 1 else "")
        data = record["dataset"] + (f" {json.dumps(record['dataset_kwargs'])}" if record["dataset_kwargs"] else "")
        lines.append([record["key"], f"{Path(str(record['teacher'])).name} ({str(record['teacher_sha256'])[:8]})", data, what,
                      f"{record['rows']:,}", _human_bytes(entry.bytes_on_disk), f"{record['bytes_per_sample']:,.1f}", status,
                      str(record["created_at"])[:19], entry.path.name])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not lines:
        click.echo(f"(no caches under {root or os.environ.get(ROOT_ENV)})")


def _confirm_and_delete(targets: list[tuple[Path, str, Callable[[], None]]], yes: bool) -> None:
    """List ``targets`` (path, why, delete), ask unless ``yes``, delete each; one that cannot be deleted
    (a writer took its lock meanwhile, it vanished, it is not ours) is reported in one line and the rest
    go on; the exit status is 1 if any failed."""
    if not targets:
        click.echo("nothing to delete")
        return
    for path, why, _ in targets:
        click.echo(f"  {path}  ({why}, {_human_bytes(directory_bytes(path))})")
    if not yes and not click.confirm(f"delete these {len(targets)}?", default=False):
        click.echo("nothing deleted")
        return
    failed = 0
    for path, _, delete in targets:
        try:
            delete()
        except LogitCacheError as exc:
            failed += 1
            click.echo(f"error: not deleted: {exc}", err=True)
            continue
        click.echo(f"deleted {path}")
    if failed:
        sys.exit(1)


@main.command("rm")
@click.argument("caches", nargs=-1, required=True, metavar="CACHE...")
@click.option("--root", type=click.Path(path_type=Path), help="Cache root, to name caches by key [default: $LOGIT_CACHE_ROOT].")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
def rm_command(caches: tuple[str, ...], root: Path | None, yes: bool) -> None:
    """Delete caches: directories, or keys under a cache root. Asks first.

    A key must be given whole, or as a prefix of at least 4 characters that starts only one key; the
    readable part of a name is never matched. Only directories that are provably logit-cache's are
    deleted (a logit-cache manifest, or an unfinished .partial dump with its marker), never one that a
    running dump is writing, never through a symbolic link. A cache is renamed to a hidden name before
    it is deleted, so an interrupted rm leaves nothing that can be taken for a cache.
    """
    try:
        targets: list[tuple[Path, str, Callable[[], None]]] = []
        for name in caches:
            path = Path(name)
            if path.exists() or path.is_symlink():
                check_removable(path)  # a link, someone else's folder: refused before anything is listed
                targets.append((path, "named", lambda path=path: remove_cache(path)))
                continue
            for entry in caches_by_key(_root_or_env(root), name):
                targets.append((entry.path, f"key {entry.key}", lambda path=entry.path: remove_cache(path)))
        _confirm_and_delete(targets, yes)
    except LogitCacheError as exc:
        _fail(exc)


@main.command("gc")
@click.argument("root", required=False, type=click.Path(path_type=Path))
@click.option("--unused-days", type=float, default=None,
              help="Also delete complete caches whose manifest was not read for this many days (its access time: updated "
                   "at most daily on relatime mounts, never on noatime ones).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
def gc_command(root: Path | None, unused_days: float | None, yes: bool) -> None:
    """Delete unfinished dumps no one is writing (and, with --unused-days, unused caches) under a root.

    Also deletes what interrupted work left: hidden tombstones of deletions, NAME.replaced-PID of an
    interrupted --overwrite, stale locks, temporary manifests. Never deletes what is not provably
    logit-cache's, what a live writer holds the lock of, or a cache whose manifest cannot be read.
    Lists what it would delete and asks first.
    """
    try:
        candidates = gc_candidates(_root_or_env(root), unused_days)
        _confirm_and_delete([(c.path, c.why, c.delete) for c in candidates], yes)
    except LogitCacheError as exc:
        _fail(exc)


@main.command("train")
@click.option("--student", required=True, metavar="MODULE:CALLABLE",
              help="Builds the student nn.Module, e.g. logit_cache.models:digits_mlp or models.py:make_student. Imports MODULE "
                   "and runs its code; the current directory is searched after installed packages.")
@click.option("--student-kwargs", metavar="JSON", help="Keyword arguments for --student, e.g. '{\"hidden\": 16, \"depth\": 1}'.")
@click.option("--dataset", required=True, metavar="SPEC",
              help="The training data, as for dump: 'digits' or MODULE:CALLABLE (imports MODULE and runs its code). With --cache "
                   "it must be the data the cache was dumped from (checked by length and fingerprint).")
@click.option("--dataset-kwargs", metavar="JSON", help="Keyword arguments for the dataset, e.g. '{\"split\": \"train\"}'.")
@click.option("--cache", "caches", multiple=True, metavar="DIR",
              help="Cached KD: targets from this cache (a directory, or an fsspec URL such as s3://bucket/cache). Repeat for "
                   "several teachers (averaged in probability space).")
@click.option("--teacher", metavar="CKPT", help="Online KD (a baseline): run this teacher on every batch; loaded as dump loads it.")
@click.option("--arch", metavar="MODULE:CALLABLE",
              help="With --teacher: builds its architecture for a state_dict (imports MODULE and runs its code).")
@click.option("--arch-kwargs", metavar="JSON", help="With --teacher: keyword arguments for --arch.")
@click.option("--trust-checkpoint", is_flag=True,
              help="With --teacher: allow a teacher file whose loading runs code from it (a pickled nn.Module; a .pt2 archive "
                   "with pickled parts, AOTInductor code or Python source). Only for files you trust.")
@click.option("--labels-only", is_flag=True, help="No teacher at all (a baseline): cross-entropy on the labels.")
@click.option("--eval-dataset", metavar="SPEC", help="Data to evaluate on after each epoch (accuracy), e.g. digits with "
              "--eval-dataset-kwargs '{\"split\": \"test\"}'; a MODULE:CALLABLE spec imports MODULE and runs its code.")
@click.option("--eval-dataset-kwargs", metavar="JSON", help="Keyword arguments for --eval-dataset.")
@click.option("--eval-cache", metavar="DIR",
              help="A cache of the eval data: also report the eval KL(teacher || student) at T=1.")
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Where the student's state_dict goes; FILE with suffix .json gets how it was trained, .metrics.json the metrics.")
@click.option("--epochs", type=int, default=30, show_default=True, help="Passes over the data.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per step.")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Peak learning rate; decays to 0 on a cosine over the run.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="Decoupled (AdamW) or L2 (SGD) weight decay.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="adamw, or sgd with Nesterov momentum 0.9.")
@click.option("--temperature", type=float, default=None,
              help="KD temperature T [default: the first cache's, recorded at dump time; 4 for --teacher].")
@click.option("--kd-loss-weight", type=float, default=0.9, show_default=True, help="Weight of the KD term (Composer's name).")
@click.option("--org-loss-weight", type=float, default=0.1, show_default=True,
              help="Weight of the cross-entropy on the labels (Composer's name); 0 trains on the teacher alone.")
@click.option("--tail", type=click.Choice(["rest", "renormalize", "ignore"]), default=None,
              help="Top-k caches: what to do with the classes outside the top-k [default: rest, a (K+1)-th bucket with "
                   "the tail's mass]. See the README.")
@click.option("--kd-start", type=float, default=0.0, show_default=True,
              help="Fraction of training at which KD starts (before: labels only).")
@click.option("--kd-end", type=float, default=1.0, show_default=True,
              help="Fraction of training at which KD ends (after: labels only).")
@click.option("--teachers-per-step", type=int, default=None,
              help="With several --cache: use a random subset of this many teachers per step [default: all].")
@click.option("--verify", type=click.Choice(["fingerprint", "length"]), default="fingerprint", show_default=True,
              help="How to check that --dataset is the cache's data: fingerprint (length and sampled content) or length only "
                   "(for data you augment on purpose).")
@click.option("--allow-nonfinite-targets", is_flag=True,
              help="Train on cached targets that hold NaN or infinite values instead of stopping. A dump never stores them, "
                   "so they mean a damaged cache (check it with logit-cache verify); without this flag training stops "
                   "naming the cache, shard and rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the student's initialisation and the data order.")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--metrics", type=click.Path(path_type=Path), metavar="FILE",
              help="JSON metrics file [default: OUT with suffix .metrics.json].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no per-epoch lines; only the summary and errors.")
def train_command(student: str, student_kwargs: str | None, dataset: str, dataset_kwargs: str | None, caches: tuple[str, ...],
                  teacher: str | None, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool, labels_only: bool,
                  eval_dataset: str | None, eval_dataset_kwargs: str | None, eval_cache: str | None, out: Path, epochs: int,
                  batch_size: int, lr: float, weight_decay: float, optimizer: str, temperature: float | None,
                  kd_loss_weight: float, org_loss_weight: float, tail: str | None, kd_start: float, kd_end: float,
                  teachers_per_step: int | None, verify: str, seed: int, device: str, num_workers: int,
                  metrics: Path | None, quiet: bool, allow_nonfinite_targets: bool = False) -> None:
    """Train a student from cached teacher targets (or a baseline).

    The soft targets come from one of: --cache DIR (cached KD: the teacher never runs), --teacher CKPT
    (online KD: the teacher runs every step) or --labels-only. The loss is
    org_loss_weight * CE(student, labels) + kd_loss_weight * KL(teacher_T || student_T) * T^2.

    \b
    Examples:
      logit-cache train --student logit_cache.models:digits_mlp --student-kwargs '{"hidden": 16, "depth": 1}' \\
          --dataset digits --cache caches/digits-top5 --out students/kd.pt \\
          --eval-dataset digits --eval-dataset-kwargs '{"split": "test"}'
      logit-cache train ... --teacher teacher.pt --arch logit_cache.models:digits_mlp --out students/online.pt
      logit-cache train ... --labels-only --out students/labels.pt
    """
    _setup_logging(quiet)
    try:
        config = TrainConfig(
            student=student, out=str(out), dataset=dataset,
            student_kwargs=parse_json_kwargs(student_kwargs, "--student-kwargs"),
            dataset_kwargs=parse_json_kwargs(dataset_kwargs, "--dataset-kwargs"),
            caches=[str(c) for c in caches], teacher=teacher, arch=arch,
            arch_kwargs=parse_json_kwargs(arch_kwargs, "--arch-kwargs"), trust_checkpoint=trust_checkpoint,
            labels_only=labels_only, eval_dataset=eval_dataset,
            eval_dataset_kwargs=parse_json_kwargs(eval_dataset_kwargs, "--eval-dataset-kwargs"),
            eval_cache=str(eval_cache) if eval_cache else None, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, optimizer=optimizer, temperature=temperature, kd_loss_weight=kd_loss_weight,
            org_loss_weight=org_loss_weight, tail=tail, kd_start=kd_start, kd_end=kd_end,
            teachers_per_step=teachers_per_step, verify=verify, seed=seed, device=device, num_workers=num_workers,
            metrics=str(metrics) if metrics else None, quiet=quiet, allow_nonfinite_targets=allow_nonfinite_targets,
        )
        result = train_student(config)
    except LogitCacheError as exc:
        _fail(exc)
        return
    click.echo(_train_summary(result))


def _train_summary(result: TrainResult) -> str:
    final = result.final
    parts = [f"train loss {final['train_loss']:.4f}"]
    if "eval_accuracy" in final:
        parts.append(f"eval accuracy {final['eval_accuracy']:.4f}")
    if "eval_kl" in final:
        parts.append(f"eval KL {final['eval_kl']:.4f}")
    timing = f"{result.seconds:.2f} s training"
    if result.teacher_seconds:
        timing += f", {result.teacher_seconds:.2f} s of it in the teacher"
    return (f"saved {result.out} ({len(result.epochs)} epochs): " + ", ".join(parts) + f"; {timing}\n"
            f"  how it was trained: {result.sidecar}\n  metrics: {result.metrics_path}")


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), metavar="DIR",
              help="Keep the teacher, caches and students in DIR (replacing the demo's earlier outputs there) "
                   "[default: a temporary folder, removed afterwards].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the teacher, the students and the data order.")
@click.option("--epochs", type=int, default=30, show_default=True, help="Student training epochs.")
@click.option("--topk", type=int, default=5, show_default=True, help="K of the demo's top-k cache.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final table.")
def demo_command(workdir: Path | None, seed: int, epochs: int, topk: int, quiet: bool) -> None:
    """The whole pipeline on the built-in digits data, in about a minute on two CPU cores.

    Trains a teacher, dumps its top-k logits once, trains the same small student three ways (labels
    only, online KD, cached KD) with the same seed and data order, and prints test accuracy, eval KL
    to the teacher, student training time and the time spent in the teacher.
    """
    from ..tools.demo import run_demo

    _setup_logging(quiet)
    try:
        result = run_demo(workdir, seed=seed, epochs=epochs, topk=topk, quiet=quiet)
    except LogitCacheError as exc:
        _fail(exc)
        return
    click.echo(result.table())
    if workdir is not None:
        click.echo(f"outputs in {workdir} (demo.json holds the table)")


@main.command("verify")
@click.argument("cache", type=click.Path(path_type=Path), metavar="DIR")
@click.option("--teacher", metavar="CKPT", help="Also re-run this teacher on --samples random samples and compare with the cache "
              "(needs --dataset). Loaded as dump loads it.")
@click.option("--arch", metavar="MODULE:CALLABLE",
              help="With --teacher: builds its architecture for a state_dict (as at dump time; imports MODULE and runs its code).")
@click.option("--arch-kwargs", metavar="JSON", help="With --teacher: keyword arguments for --arch, as a JSON object.")
@click.option("--trust-checkpoint", is_flag=True,
              help="With --teacher: allow a teacher file whose loading runs code from it (a pickled nn.Module; a .pt2 archive "
                   "with pickled parts, AOTInductor code or Python source). Only for files you trust.")
@click.option("--dataset", metavar="SPEC",
              help="With --teacher: the data the cache was dumped from ('digits' or MODULE:CALLABLE, which imports MODULE and runs "
                   "its code).")
@click.option("--dataset-kwargs", metavar="JSON", help="With --teacher: keyword arguments for the dataset.")
@click.option("--samples", type=int, default=32, show_default=True,
              help="With --teacher: how many random samples (and, for caches of several views, random views) to compare.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of samples and views.")
@click.option("--device", default="cpu", show_default=True, help="Where the teacher runs: cpu, cuda, cuda:N or auto.")
@click.option("--json", "as_json", is_flag=True, help='Print one JSON object: {"path", "ok", "checks", "failures", "summary"}.')
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
        _fail(exc)
        return
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


@main.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "backend", type=click.Choice(["zarr", "hdf5"]), default=None,
              help="Backend of the new cache [default: SRC's].")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Dtype of the logit values [default: SRC's]. float32 -> float16 rounds to nearest (refused for values "
                   "beyond float16's range); float16 -> float32 is exact.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at DST (only a directory holding a logit-cache manifest).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no log lines; only the summary and errors.")
def convert_command(src: Path, dst: Path, backend: str | None, dtype: str | None, overwrite: bool, quiet: bool) -> None:
    """Write a complete cache SRC as a new cache DST in the other backend or value dtype.

    The same arrays, shards and chunks; only the container (--format) or the dtype of the logit
    values (--dtype) changes. SRC is only read. DST gets its own manifest; its key is SRC's when
    only the backend changes, else recomputed for the new dtype.

    \b
    Examples:
      logit-cache convert caches/digits-top5 caches/digits-top5-h5 --format hdf5
      logit-cache convert caches/full-fp32 caches/full-fp16 --dtype float16
    """
    from ..tools.convert import convert

    _setup_logging(quiet)
    try:
        result = convert(src, dst, backend=backend, dtype=dtype, overwrite=overwrite, quiet=quiet)
    except LogitCacheError as exc:
        _fail(exc)
        return
    source, manifest = result.source, result.manifest
    what = f"top-{manifest.k}" if manifest.mode == "topk" else f"{manifest.mode} logits"
    key = f"{manifest.key} (unchanged)" if manifest.key == source.key else f"{manifest.key} (was {source.key})"
    click.echo("\n".join([
        f"converted {result.src} -> {result.dst}: {what}, {source.backend} {source.dtype} -> {manifest.backend} {manifest.dtype}",
        f"  rows        {manifest.num_rows:,} ({manifest.num_samples:,} samples) in {len(manifest.shards)} shard(s)",
        f"  on disk     {_human_bytes(result.bytes_before)} -> {_human_bytes(result.bytes_after)}",
        f"  time        {result.seconds:.2f} s",
        f"  key         {key}",
    ]))


if __name__ == "__main__":
    main()
