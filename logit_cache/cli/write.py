"""The commands that write a cache: ``dump`` (run a teacher once) and ``convert`` (another backend or dtype)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import LogitCacheError
from ..format.naming import ROOT_ENV
from ..pipeline.dump import DumpConfig, DumpResult, dump_cache
from ..specs import parse_json_kwargs
from ..targets.compact import ENCODINGS
from ..teachers.runtime import PRECISIONS
from .common import describe_targets, fail, human_bytes, rank, setup_logging, what
from .options import (
    BACKEND_CHOICE,
    DTYPE_CHOICE,
    chosen_kind,
    dataset_text_options,
    placement_options,
    quiet_option,
    target_options,
    teacher_options,
)

TEACHER_HELP = (
    "Teacher checkpoint: a state_dict (plain, {'model': ...}, Lightning, Composer; needs --arch), "
    "a TorchScript archive, a torch.export .pt2 archive (one holding pickles, compiled code or Python source "
    "needs --trust-checkpoint), a pickled nn.Module (needs --trust-checkpoint), "
    "or hf:DIR, a local Hugging Face causal-LM directory (save_pretrained; needs the 'hf' extra)."
)


@click.command("dump")
@teacher_options(TEACHER_HELP, required=True)
@click.option("--dataset", required=True, metavar="SPEC",
              help="'digits' (built in, scikit-learn's handwritten digits), 'text' (built in, byte-level windows of Python's "
                   "pydoc texts), tokens:PATH.npy (a flat token-id array cut into windows: --dataset-kwargs "
                   "'{\"seq_len\": 128, \"stride\": 128}'), hf:PATH (a Hugging Face datasets save_to_disk directory, "
                   "with '{\"split\": NAME}' for a DatasetDict, or a .json/.jsonl/.parquet/.csv/.txt file or folder of them; "
                   "a text column with --text-column), or MODULE:CALLABLE returning a map-style Dataset whose items "
                   "are (input, label) or input; for language models, token ids, (ids, labels) or {input_ids, attention_mask}. "
                   "A MODULE:CALLABLE spec imports MODULE and runs its code; the current directory is searched after installed "
                   "packages (name a local file as path/to/file.py:CALLABLE).")
@click.option("--dataset-kwargs", metavar="JSON", help="Keyword arguments for the dataset, e.g. '{\"split\": \"test\"}'.")
@dataset_text_options()
@click.option("--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Cache directory to create. Written as DIR.partial and renamed to DIR once complete.")
@click.option("--cache-root", type=click.Path(path_type=Path), metavar="ROOT", envvar=ROOT_ENV, show_envvar=True,
              help="Instead of --out: put the cache under ROOT, named by what it holds and its content key, and reuse a "
                   "complete cache of that key instead of computing it [default without --out: $LOGIT_CACHE_ROOT].")
@click.option("--no-wait", is_flag=True,
              help="If another dump is writing this cache, fail at once instead of waiting for it (and then reusing it).")
@target_options()
@click.option("--encoding", type=click.Choice(ENCODINGS), default="plain", show_default=True,
              help="compact: top-k/sampled rows in fewer bytes (ids sorted and delta-coded, values quantized; see "
                   "BENCHMARKS.md for bytes/token and fidelity). entropy (Zarr only, the 'entropy' extra): the plain "
                   "arrays entropy-coded by Zarr codecs plain zarr reads where logit-cache is installed; smallest "
                   "for --sample, slower to read. plain: float16/32 values and uint16/int32 ids.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="The distillation temperature you mean to use, recorded as the cache's default. Raw logits are "
                   "stored, so any temperature can still be chosen when training.")
@click.option("--dtype", type=DTYPE_CHOICE, default=DumpConfig.dtype, show_default=True,
              help="Storage dtype of logit values. float16 halves the bytes; float32 stores the teacher's values exactly.")
@click.option("--format", "backend", type=BACKEND_CHOICE, default=DumpConfig.backend, show_default=True,
              help="Shard backend: Zarr v3 groups (top-k compressed with Blosc-zstd) or HDF5 files.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Samples per teacher forward pass.")
@click.option("--num-workers", type=int, default=None,
              help="DataLoader worker processes [default: 0 on CPU, where workers compete with the teacher for cores; "
                   "up to 8 with a GPU].")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="Teacher precision: bf16/fp16 load and hold the weights in that dtype (hf:DIR and state dicts are read "
                   "straight into it; TorchScript, .pt2 and pickled modules are cast after loading) and run under "
                   "torch.autocast. Top-k, logsumexp and the tail mass are always float32.")
@placement_options()
@click.option("--writer-threads", type=int, default=None, metavar="N",
              help="Host threads that convert/encode batches for the writer [default: min(4, cores)].")
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
@quiet_option()
def dump_command(teacher: str, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool, dataset: str,
                 dataset_kwargs: str | None, out: Path | None, cache_root: Path | None, no_wait: bool, topk: int | None,
                 sample: int | None, sample_temperature: float, full: bool, encoding: str, temperature: float, dtype: str,
                 backend: str, batch_size: int, num_workers: int | None, device: str, precision: str,
                 device_map: str | None, max_memory: str | None, devices_per_rank: int | None, writer_threads: int | None,
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
      logit-cache dump --teacher hf:models/my-lm --dataset hf:data/train.jsonl --text-column text --seq-len 512 \\
          --out caches/lm-top32 --topk 32
      logit-cache dump --teacher hf:models/llama-70b --precision bf16 --device-map auto ...  # split over the GPUs
      torchrun --nproc_per_node=2 -m logit_cache dump ...   # each rank writes its own shards
      torchrun --nproc_per_node=2 -m logit_cache dump --device-map auto --devices-per-rank 4 ...  # 2 ranks x 4 GPUs
    """
    setup_logging(quiet)
    if out is not None and click.get_current_context().get_parameter_source("cache_root") is ParameterSource.ENVIRONMENT:
        cache_root = None  # $LOGIT_CACHE_ROOT is the default without --out only
    mode, k, m = chosen_kind(topk, sample, full)
    try:
        config = DumpConfig(
            teacher=teacher,
            arch=arch,
            arch_kwargs=parse_json_kwargs(arch_kwargs, "--arch-kwargs"),
            trust_checkpoint=trust_checkpoint,
            dataset=dataset,
            dataset_kwargs=parse_json_kwargs(dataset_kwargs, "--dataset-kwargs"),
            out=str(out) if out is not None else None,
            cache_root=str(cache_root) if cache_root is not None else None,
            wait=not no_wait,
            mode=mode,
            k=k,
            m=m,
            sample_temperature=sample_temperature,
            encoding=encoding,
            temperature=temperature,
            dtype=dtype,
            backend=backend,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            device_map=device_map,
            max_memory=max_memory,
            devices_per_rank=devices_per_rank,
            writer_threads=writer_threads,
            shard_rows=shard_rows,
            views=views,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            quiet=quiet,
        )
        result = dump_cache(config)
    except LogitCacheError as exc:
        fail(exc)
    if rank() == 0:
        click.echo(_summary(result))


def _summary(result: DumpResult) -> str:
    manifest = result.manifest
    size = result.bytes_on_disk
    content = what(manifest)
    if result.reused:
        return f"reused cache {manifest.key} ({content}, {manifest.backend}) at {result.out}: nothing computed"
    lines = [
        f"wrote {result.out}: {content}, {manifest.dtype}, {manifest.backend}, {manifest.num_classes} classes",
        f"  rows        {manifest.num_rows:,} ({manifest.num_samples:,} {'sequences' if manifest.per_token else 'samples'}) "
        f"in {len(manifest.shards)} shard(s)"
        + (f", {result.resumed_shards} kept from the unfinished dump" if result.resumed_shards else ""),
        f"  on disk     {human_bytes(size)} ({size / max(1, manifest.num_rows if manifest.per_token else manifest.num_samples):,.1f} "
        f"B/{'token' if manifest.per_token else 'sample'})",
        f"  time        {result.seconds:.2f} s in all, {result.compute_seconds:.2f} s in the inference loop "
        f"({result.samples_per_second:,.0f} {'tokens' if manifest.per_token else 'samples'}/s)",
    ]
    if result.mean_topk_mass is not None:
        lines.append(f"  {describe_targets(manifest)} mass  {result.mean_topk_mass:.4f} "
                     f"(mean teacher probability mass of the stored ids, T=1)")
    lines.append(f"  key         {manifest.key}")
    return "\n".join(lines)



@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "backend", type=BACKEND_CHOICE, default=None,
              help="Backend of the new cache [default: SRC's].")
@click.option("--dtype", type=DTYPE_CHOICE, default=None,
              help="Dtype of the logit values [default: SRC's]. float32 -> float16 rounds to nearest (refused for values "
                   "beyond float16's range); float16 -> float32 is exact.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache at DST (only a directory holding a logit-cache manifest).")
@quiet_option()
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

    setup_logging(quiet)
    try:
        result = convert(src, dst, backend=backend, dtype=dtype, overwrite=overwrite, quiet=quiet)
    except LogitCacheError as exc:
        fail(exc)
    source, manifest = result.source, result.manifest
    what = describe_targets(manifest)
    key = f"{manifest.key} (unchanged)" if manifest.key == source.key else f"{manifest.key} (was {source.key})"
    click.echo("\n".join([
        f"converted {result.src} -> {result.dst}: {what}, {source.backend} {source.dtype} -> {manifest.backend} {manifest.dtype}",
        f"  rows        {manifest.num_rows:,} ({manifest.num_samples:,} samples) in {len(manifest.shards)} shard(s)",
        f"  on disk     {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)}",
        f"  time        {result.seconds:.2f} s",
        f"  key         {key}",
    ]))

