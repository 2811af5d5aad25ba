"""Benchmark: what a dump costs on top of bare teacher inference.

The issue's goal: a dump (teacher + encode + write) runs at most 1.10x the time of bare teacher
inference over the same data on a CPU, 1.05x on a GPU. This script measures that ratio on a
synthetic workload, for each storage backend (``logit_cache.store.BACKENDS``: zarr, hdf5) and mode (top-k, full), and reports bytes on
disk, compression and the mean top-k mass.

    python scripts/bench_dump.py                  # defaults: ~15 s per pass on 2 idle CPU cores, ~4 min in all
    python scripts/bench_dump.py --quick          # smoke run, a few seconds (its ratios are all fixed cost)
    python scripts/bench_dump.py --device cuda --precision bf16 --json "$OUT/bench_dump_gpu.json"

Workload: a ``digits_mlp`` teacher (``--dim`` inputs, ``--depth`` hidden layers of ``--hidden``,
``--classes`` outputs; its head is rescaled so logits have standard deviation ``--logit-std``,
which makes the distribution peaked like a trained teacher's instead of nearly uniform) over
``--samples`` random float32 inputs held in memory (:func:`synthetic_dataset`, used by the dump
as the dataset spec ``<this file>:synthetic_dataset``).

What is timed, per repeat and interleaved (bare, then every dump configuration), so that drift in
machine load hits all of them alike:

* **bare**: the teacher over the same DataLoader the dump builds (``make_batches`` over the same
  shard plan, ``make_loader`` with the same workers and pinning), on the same device and precision,
  under ``torch.inference_mode()``; no encoding, no writing.
* **dump**: the wall time of ``dump_cache(...)`` around the call (it includes resolving the dataset,
  hashing the teacher file, loading the teacher, writing, finalizing); ``DumpResult.seconds`` is
  recorded too.
* **encode** (only with ``--split``): bare inference plus the dump's on-device encoding, no writing;
  (encode - bare) is the encoding's share, (dump - encode) the writing's and fixed costs' share.

Reported per configuration: medians over ``--repeats`` of the wall times; ``extra s``, the median of
(dump - bare) within each repeat; ``dump/bare``, the median of the per-repeat ratios (paired with the
bare pass of the same repeat, so slow phases of a busy machine cancel out; this is the figure held
against the goal); ``best/best``, the fastest dump over the fastest bare pass (other work on the
machine only ever slows a pass down, so this estimates the ratio on an idle machine); ``loop/bare``,
the dump's own inference-loop time (``DumpResult.compute_seconds``: no set-up, teacher loading,
hashing or finalize) over bare, paired, i.e. the per-sample overhead alone; ``CPU ratio``,
the median paired ratio of this process's CPU seconds (all threads; DataLoader workers excluded);
samples/s; bytes per sample on disk; the compression ratio (logical bytes of the stored arrays,
itemsize * prod(row_shape) * rows from the manifest, over bytes on disk); and the mean top-k mass.
Each measurement also records the 1-minute load average before and after it. Everything goes to
``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from logit_cache import DumpConfig, Manifest, dump_cache, load_teacher
from logit_cache.data import ResolvedDataset, resolve_dataset, split_batch
from logit_cache.format import file_sha256, plan_layout
from logit_cache.pipeline import make_batches, make_loader
from logit_cache.store import BACKENDS
from logit_cache.targets import encode
from logit_cache.teachers import PRECISIONS, autocast_for, resolve_device, run_teacher
from logit_cache.tools import digits_mlp

ARCH = "logit_cache.tools.models:digits_mlp"
GOAL = {"cpu": 1.10, "cuda": 1.05}
ALL_BACKENDS = tuple(BACKENDS)
ALL_MODES = ("topk", "full")


# --------------------------------------------------------------------------------------------------
# The synthetic workload
# --------------------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """``n`` random float32 vectors of ``dim`` with int labels in ``[0, classes)``, held in memory."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.labels[index])


def synthetic_dataset(n: int = 50_000, dim: int = 256, classes: int = 1000, seed: int = 0) -> SyntheticDataset:
    """The benchmark's dataset: deterministic given its arguments (a dataset spec for ``dump``)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, dim, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return SyntheticDataset(inputs, labels)


def make_teacher(dim: int, hidden: int, depth: int, classes: int, logit_std: float, seed: int) -> torch.nn.Module:
    """A randomly initialised ``digits_mlp`` whose head is scaled to give logits of std ``logit_std``."""
    torch.manual_seed(seed)
    model = digits_mlp(in_features=dim, hidden=hidden, num_classes=classes, depth=depth).eval()
    head = model[-1]
    assert isinstance(head, torch.nn.Linear)
    probe = synthetic_dataset(512, dim, classes, seed + 1).inputs
    with torch.no_grad():
        std = float(model(probe).std())
        head.weight.mul_(logit_std / std)
        head.bias.mul_(logit_std / std)
    return model


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Everything the timed passes share."""

    teacher_path: Path
    dataset_spec: str
    dataset_kwargs: dict[str, Any]
    arch_kwargs: dict[str, Any]
    device: torch.device
    precision: str
    batch_size: int
    num_workers: int
    k: int
    dtype: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dump_batches(resolved: ResolvedDataset, mode: str, k: int, num_classes: int, dtype: str,
                 batch_size: int) -> tuple[int, list[list[int]]]:
    """Rows per shard and the batches of sample indices a dump of this mode runs (same plan, same cuts)."""
    layout = plan_layout(mode, k if mode == "topk" else None, num_classes, dtype, resolved.has_labels, len(resolved))
    return layout.shard_rows, [indices for _, indices in make_batches(layout.plans, batch_size)]


def _teacher_passes(module: Any, resolved: ResolvedDataset, batches: list[list[int]], work: Workload) -> Iterator[torch.Tensor]:
    """Yield the teacher's logits batch by batch, exactly as the dump computes them."""
    pin = work.device.type == "cuda"
    loader = make_loader(resolved, batches, work.num_workers, pin)
    with torch.inference_mode():
        for batch in loader:
            inputs, _ = split_batch(batch, resolved.has_labels)
            with autocast_for(work.device, work.precision):
                yield run_teacher(module, inputs.to(work.device, non_blocking=True))


@contextlib.contextmanager
def timed(record: dict[str, Any]) -> Iterator[None]:
    """Put wall seconds (``wall_s``), this process's CPU seconds, all threads (``cpu_s``), and the
    1-minute load average before and after (other work on the machine) into ``record``."""
    record["load_before"] = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    record["wall_s"] = time.perf_counter() - wall
    record["cpu_s"] = time.process_time() - cpu
    record["load_after"] = os.getloadavg()[0]


def time_bare(module: Any, resolved: ResolvedDataset, batches: list[list[int]], work: Workload) -> dict[str, Any]:
    """Time bare teacher inference over ``batches`` (no encoding, no writing)."""
    record: dict[str, Any] = {}
    with timed(record):
        for _ in _teacher_passes(module, resolved, batches, work):
            pass
        _sync(work.device)
    return record


def time_encode(module: Any, resolved: ResolvedDataset, batches: list[list[int]], work: Workload, mode: str) -> dict[str, Any]:
    """Time inference plus the dump's encoding and device-to-host copies (no writing)."""
    record: dict[str, Any] = {}
    with timed(record):
        _encode_pass(module, resolved, batches, work, mode)
    return record


def _encode_pass(module: Any, resolved: ResolvedDataset, batches: list[list[int]], work: Workload, mode: str) -> None:
    mass = torch.zeros((), dtype=torch.float64, device=work.device)
    with torch.inference_mode():
        for logits in _teacher_passes(module, resolved, batches, work):
            encoded = encode(logits, mode, work.k if mode == "topk" else None, work.dtype)
            mass += encoded.topk_mass
            for tensor in (*encoded.arrays.values(), encoded.nonfinite, encoded.overflow):
                tensor.to("cpu", non_blocking=True)
        float(mass.item())
    _sync(work.device)


def logical_bytes(manifest: Manifest) -> int:
    """Uncompressed bytes of the stored arrays: itemsize * prod(row_shape) * rows, summed."""
    total = 0
    for entry in manifest.arrays.values():
        rows = manifest.num_samples if entry.get("per") == "sample" else manifest.num_rows
        row_items = int(np.prod(entry["row_shape"], dtype=np.int64))
        total += np.dtype(entry["dtype"]).itemsize * row_items * rows
    return int(total)


def time_dump(work: Workload, out: Path, backend: str, mode: str) -> dict[str, Any]:
    """Run one dump; return its wall time and what it wrote."""
    config = DumpConfig(
        teacher=str(work.teacher_path),
        arch=ARCH,
        arch_kwargs=work.arch_kwargs,
        dataset=work.dataset_spec,
        dataset_kwargs=work.dataset_kwargs,
        out=str(out),
        mode=mode,
        k=work.k if mode == "topk" else None,
        dtype=work.dtype,
        backend=backend,
        batch_size=work.batch_size,
        num_workers=work.num_workers,
        device=str(work.device),
        precision=work.precision,
        overwrite=True,
        quiet=True,
    )
    record: dict[str, Any] = {}
    with timed(record):
        result = dump_cache(config)
    logical = logical_bytes(result.manifest)
    return {
        **record,
        "result_seconds": result.seconds,
        # the inference loop alone (teacher, encoding, writing; no set-up or finalize), where the library reports it
        "loop_seconds": getattr(result, "compute_seconds", None),
        "bytes_on_disk": result.bytes_on_disk,
        "logical_bytes": logical,
        "shards": len(result.manifest.shards),
        "chunk_rows": result.manifest.chunk_rows,
        "shard_rows": result.manifest.shard_rows,
        "mean_topk_mass": result.mean_topk_mass,
    }


def time_setup(work: Workload) -> dict[str, float]:
    """The dump's fixed costs before its first batch, timed once: dataset, fingerprint, hash, teacher."""
    times = {}
    started = time.perf_counter()
    resolved = resolve_dataset(work.dataset_spec, work.dataset_kwargs)
    times["resolve_dataset_s"] = time.perf_counter() - started
    started = time.perf_counter()
    resolved.fingerprint()
    times["fingerprint_s"] = time.perf_counter() - started
    started = time.perf_counter()
    file_sha256(work.teacher_path)
    times["teacher_sha256_s"] = time.perf_counter() - started
    started = time.perf_counter()
    load_teacher(str(work.teacher_path), arch=ARCH, arch_kwargs=work.arch_kwargs, device=work.device)
    _sync(work.device)
    times["load_teacher_s"] = time.perf_counter() - started
    return times


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]], samples: int, device_type: str) -> list[dict[str, Any]]:
    """Medians per (backend, mode); ratios are paired with the bare pass of the same repeat."""
    bare = {(r["repeat"], r["batches_id"]): r for r in records if r["kind"] == "bare"}
    encodes = {(r["repeat"], r["mode"]): r for r in records if r["kind"] == "encode"}
    dumps = [r for r in records if r["kind"] == "dump"]
    rows = []
    for backend, mode in dict.fromkeys((r["backend"], r["mode"]) for r in dumps):
        mine = [r for r in dumps if (r["backend"], r["mode"]) == (backend, mode)]
        paired = [bare[(r["repeat"], r["batches_id"])] for r in mine]
        bare_s = statistics.median(p["wall_s"] for p in paired)
        dump_s = statistics.median(r["wall_s"] for r in mine)
        last = mine[-1]
        row = {
            "backend": backend,
            "mode": mode,
            "repeats": len(mine),
            "bare_s": bare_s,
            "dump_s": dump_s,
            "dump_result_s": statistics.median(r["result_seconds"] for r in mine),
            "ratio": statistics.median(r["wall_s"] / p["wall_s"] for r, p in zip(mine, paired, strict=True)),
            "ratios": [r["wall_s"] / p["wall_s"] for r, p in zip(mine, paired, strict=True)],
            "overhead_s": statistics.median(r["wall_s"] - p["wall_s"] for r, p in zip(mine, paired, strict=True)),
            "best_ratio": min(r["wall_s"] for r in mine) / min(p["wall_s"] for p in paired),
            "loop_ratio": (statistics.median(r["loop_seconds"] / p["wall_s"] for r, p in zip(mine, paired, strict=True))
                           if all(r.get("loop_seconds") for r in mine) else None),
            "cpu_ratio": statistics.median(r["cpu_s"] / p["cpu_s"] for r, p in zip(mine, paired, strict=True)),
            "goal": GOAL.get(device_type),
            "bare_samples_per_s": samples / bare_s,
            "dump_samples_per_s": samples / dump_s,
            "bytes_on_disk": last["bytes_on_disk"],
            "bytes_per_sample": last["bytes_on_disk"] / samples,
            "logical_bytes": last["logical_bytes"],
            "compression": last["logical_bytes"] / last["bytes_on_disk"],
            "mean_topk_mass": last["mean_topk_mass"],
        }
        mine_encodes = [encodes[(r["repeat"], mode)]["wall_s"] for r in mine if (r["repeat"], mode) in encodes]
        if mine_encodes:
            row["encode_s"] = statistics.median(mine_encodes)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    split = any("encode_s" in row for row in rows)
    header = ["backend", "mode", "bare s", *(["encode s"] if split else []), "dump s", "extra s", "dump/bare", "goal",
              "best/best", "loop/bare", "CPU ratio", "bare samp/s", "dump samp/s", "B/sample", "compr.", "top-k mass"]
    lines = []
    for row in rows:
        goal = row["goal"]
        verdict = "" if goal is None else (" ok" if row["ratio"] <= goal else " MISS")
        lines.append([
            row["backend"],
            row["mode"],
            f"{row['bare_s']:.2f}",
            *([f"{row['encode_s']:.2f}" if "encode_s" in row else "-"] if split else []),
            f"{row['dump_s']:.2f}",
            f"{row['overhead_s']:+.2f}",
            f"{row['ratio']:.3f}",
            ("-" if goal is None else f"{goal:.2f}") + verdict,
            f"{row['best_ratio']:.3f}",
            "-" if row["loop_ratio"] is None else f"{row['loop_ratio']:.3f}",
            f"{row['cpu_ratio']:.3f}",
            f"{row['bare_samples_per_s']:,.0f}",
            f"{row['dump_samples_per_s']:,.0f}",
            f"{row['bytes_per_sample']:.1f}",
            f"{row['compression']:.2f}x",
            "-" if row["mean_topk_mass"] is None else f"{row['mean_topk_mass']:.3f}",
        ])
    return table(header, lines)


def table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table, columns padded to their widest cell (what every benchmark here prints)."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(line) for line in lines)])


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """The benchmark's JSON, its folder created if needed (values JSON cannot hold are written as strings)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(ImportError):
        import h5py
        import zarr

        info["zarr_version"] = zarr.__version__
        info["h5py_version"] = h5py.__version__
        info["hdf5_version"] = h5py.version.hdf5_version
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="dataset size (default 50000; 4000 with --quick)")
    parser.add_argument("--dim", type=int, default=256, help="input features (default 256)")
    parser.add_argument("--hidden", type=int, help="teacher hidden width (default 4096; 512 with --quick)")
    parser.add_argument("--depth", type=int, default=3, help="teacher hidden layers (default 3)")
    parser.add_argument("--classes", type=int, default=1000, help="teacher classes (default 1000)")
    parser.add_argument("--logit-std", type=float, default=4.0, help="std of the teacher's logits (default 4)")
    parser.add_argument("--k", type=int, default=10, help="top-k size (default 10)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored value dtype")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help=f"comma list of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help="comma list of topk,full")
    parser.add_argument("--batch-size", type=int, help="batch size (default 256 on cpu, 1024 on cuda)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="teacher precision (default fp32)")
    parser.add_argument("--repeats", type=int, help="timed repeats, medians reported (default 3; 1 with --quick)")
    parser.add_argument("--split", action="store_true", help="also time inference + encoding without writing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the teacher and the data (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (its ratios mean nothing)")
    parser.add_argument("--json", default="data/bench_dump.json", help="where to write results (default data/bench_dump.json)")
    parser.add_argument("--workdir", help="scratch directory (default: a fresh temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (teacher and caches)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (4_000 if quick else 50_000)
    args.hidden = args.hidden or (512 if quick else 4096)
    args.repeats = args.repeats or (1 if quick else 3)
    args.backends = _choices(parser, "--backends", args.backends, ALL_BACKENDS)
    args.modes = _choices(parser, "--modes", args.modes, ALL_MODES)
    if min(args.samples, args.hidden, args.repeats, args.dim, args.classes) < 1 or not 1 <= args.k <= args.classes:
        parser.error("sizes must be positive and --k in [1, --classes]")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    if not chosen or any(item not in allowed for item in chosen):
        parser.error(f"{flag} {text!r}: use a comma list of {', '.join(allowed)}")
    return chosen


def _progress(what: str, record: dict[str, Any]) -> None:
    print(f"  {what}: {record['wall_s']:.2f} s wall, {record['cpu_s']:.2f} s CPU, load {record['load_before']:.1f}",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    batch_size = args.batch_size or (1024 if device.type == "cuda" else 256)
    arch_kwargs = {"in_features": args.dim, "hidden": args.hidden, "num_classes": args.classes, "depth": args.depth}
    teacher_path = workdir / "teacher.pt"
    teacher = make_teacher(args.dim, args.hidden, args.depth, args.classes, args.logit_std, args.seed)
    torch.save(teacher.state_dict(), teacher_path)
    work = Workload(
        teacher_path=teacher_path,
        dataset_spec=f"{Path(__file__).resolve()}:synthetic_dataset",
        dataset_kwargs={"n": args.samples, "dim": args.dim, "classes": args.classes, "seed": args.seed},
        arch_kwargs=arch_kwargs,
        device=device,
        precision=args.precision,
        batch_size=batch_size,
        num_workers=args.num_workers,
        k=args.k,
        dtype=args.dtype,
    )
    setup = time_setup(work)
    resolved = resolve_dataset(work.dataset_spec, work.dataset_kwargs)
    module = load_teacher(str(teacher_path), arch=ARCH, arch_kwargs=arch_kwargs, device=device).module
    plans = {mode: dump_batches(resolved, mode, args.k, args.classes, args.dtype, batch_size) for mode in args.modes}
    batch_lists = {mode: batches for mode, (_, batches) in plans.items()}
    distinct = list({json.dumps(b): b for b in batch_lists.values()}.values())  # modes usually share one batch list
    batches_id = {mode: distinct.index(batch_lists[mode]) for mode in args.modes}
    records: list[dict[str, Any]] = []
    configs = [(backend, mode) for backend in args.backends for mode in args.modes]
    # Warm up, untimed: kernels, allocator and CUDA context; then one small dump per configuration, so
    # that imports (zarr, h5py, codecs) and first-use costs do not land on the first timed dump.
    time_bare(module, resolved, distinct[0][:3], work)
    small = replace(work, dataset_kwargs={**work.dataset_kwargs, "n": min(args.samples, 2 * batch_size)})
    for backend, mode in configs:
        time_dump(small, workdir / "warmup", backend, mode)
    shutil.rmtree(workdir / "warmup")
    print(f"{len(configs)} dumps x {args.repeats} repeats, {args.samples} samples, device {device}", file=sys.stderr)
    for repeat in range(args.repeats):
        for index, batches in enumerate(distinct):
            measured = time_bare(module, resolved, batches, work)
            records.append({"repeat": repeat, "kind": "bare", "batches_id": index, **measured})
            _progress(f"repeat {repeat}: bare", measured)
        if args.split:
            for mode in args.modes:
                measured = time_encode(module, resolved, batch_lists[mode], work, mode)
                records.append({"repeat": repeat, "kind": "encode", "mode": mode, "batches_id": batches_id[mode], **measured})
                _progress(f"repeat {repeat}: encode {mode}", measured)
        for backend, mode in configs:
            out = workdir / f"cache-{backend}-{mode}"
            measured = time_dump(work, out, backend, mode)
            if measured["shard_rows"] != plans[mode][0]:
                raise RuntimeError(f"the dump cut shards of {measured['shard_rows']} rows, the baseline assumed "
                                   f"{plans[mode][0]}: their batches differ, so the comparison would be unfair")
            records.append({"repeat": repeat, "kind": "dump", "backend": backend, "mode": mode,
                            "batches_id": batches_id[mode], **measured})
            _progress(f"repeat {repeat}: dump {backend} {mode}", measured)
            if not args.keep:
                shutil.rmtree(out)

    summary = summarize(records, args.samples, device.type)
    config = {
        "samples": args.samples, "dim": args.dim, "hidden": args.hidden, "depth": args.depth, "classes": args.classes,
        "logit_std": args.logit_std, "k": args.k, "dtype": args.dtype, "batch_size": batch_size,
        "num_workers": args.num_workers, "precision": args.precision, "repeats": args.repeats, "seed": args.seed,
        "backends": args.backends, "modes": args.modes, "quick": args.quick,
        "teacher_params": sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else None,
        "teacher_file_bytes": teacher_path.stat().st_size,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    return {"config": config, "machine": machine_info(device), "setup": setup, "summary": summary, "measurements": records}


@contextlib.contextmanager
def scratch_dir(workdir: str | None, keep: bool, prefix: str) -> Iterator[Path]:
    """``workdir`` (created if needed), or a fresh folder under data/ that is removed afterwards unless ``keep``."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=Path("data") if Path("data").is_dir() else None))
    try:
        yield scratch
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with scratch_dir(args.workdir, args.keep, "bench-dump-") as workdir:
        report = run(args, workdir)
    report["total_seconds"] = time.perf_counter() - started
    machine, config, setup = report["machine"], report["config"], report["setup"]
    print(f"\ndevice {machine['device']}{' (' + machine['card'] + ')' if 'card' in machine else ''}, "
          f"torch {machine['torch_version']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads); "
          f"{config['samples']} samples, teacher {config['dim']}-{config['hidden']}x{config['depth']}-{config['classes']} "
          f"({config['teacher_params'] / 1e6:.1f}M params), batch {config['batch_size']}, workers {config['num_workers']}, "
          f"{config['precision']}, top-{config['k']} / full as {config['dtype']}; medians of {config['repeats']}")
    print(format_table(report["summary"]))
    print("dump setup (once per dump, included in dump s): " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in setup.items()))
    print(f"total {report['total_seconds']:.0f} s")
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
