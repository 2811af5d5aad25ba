"""Benchmark: per-token dumps of an ``hf:`` language-model teacher against bare inference (issue 13).

The issue's goals, measured here: encoding costs at most 1.5x one ``torch.topk`` pass over the same
logits (CPU and GPU); on a GPU, dump/bare <= 1.10 for a ~1B teacher at V=128k (design goal 1.05) and
encoding >= 5M tokens/s at V=128k on an H100-class card.

    python scripts/bench_lm_dump.py               # CPU default: V = 32k and 128k, a tiny body, ~3 min on 2 idle cores
    python scripts/bench_lm_dump.py --quick       # smoke run, ~15 s (its numbers mean nothing)
    python scripts/bench_lm_dump.py --device cuda --json "$OUT/bench_lm_dump_gpu.json"   # ~1.2B teacher, 1M tokens, bf16
    python scripts/bench_lm_dump.py --device cuda --vocabs 131072 --thread-dumps all  # one vocabulary, every thread count

**Teacher.** A random-weight Llama-style causal LM built with ``transformers`` (``--hidden``, ``--layers``,
``--heads`` (default hidden/64), 4x MLP, ``--vocabs``; hidden 2048 x 16 layers with tied embeddings is
about 1.2B parameters at V=128k, Llama-3.2-1B's shape), its final norm scaled so the logits have
standard deviation ``--logit-std`` (a random LM's are nearly flat), saved with ``save_pretrained`` in
the ``--precision`` dtype and dumped as ``hf:DIR``. Defaults on a GPU: V = 32k and 128k, hidden 2048 x 16
layers, 1,048,576 tokens in windows of 2,048, batch 8, bf16. Data: ``--tokens`` Zipf-distributed ids, the
built-in ``tokens:PATH.npy`` dataset in windows of ``--seq-len``, ``--batch`` windows per batch, Zarr.

**Per vocabulary and configuration** (top-64, sampled M=50, top-64 compact; ``dump_cache`` with the
library's defaults otherwise):

* **dump s / loop s**: the wall time of ``dump_cache`` (set-up, hashing, teacher loading, finalize
  included) and its inference loop alone (``DumpResult.compute_seconds``).
* **bare s**: the same teacher (``load_teacher``, the dump's precision, autocast) over the same batches
  (the dump's shards cut into ``--batch`` windows, through ``make_loader`` as the dump builds it): the
  forward pass only, under ``inference_mode``. ``dump/bare`` is loop s over bare s, paired within a
  repeat and the median taken; ``wall/bare`` the same with the dump's wall time.
* **encode**: on the teacher's logits of the first ``--encode-batches`` batches (computed untimed, in
  the dtype the dump sees), ``targets.encode_tokens`` as the dump calls it (value dtype from the kind)
  against ONE ``torch.topk(logits, width)`` over the same [tokens, V] view; best of ``--encode-repeats``
  per batch, summed. ``enc/topk`` is the goal's ratio; ``enc tok/s`` tokens per second of encoding.
* **host rows/s by threads (1, 2, 4)**: the writer's side alone, as the dump organises it: the encoded
  host arrays (from the encode step, repeated to ``--writer-rows`` rows) narrowed to their stored dtypes
  and compact-encoded in a pool of N threads, appended in order to one shard by one writer
  (``store.get_backend(...).create`` with the dump's chunk rows). **dump tok/s by writer_threads**: when
  ``DumpConfig`` has ``writer_threads``, whole dumps at 1, 2, 4 threads for ``--thread-dumps``
  configurations (default: compact top-k at the smallest V, where the host side weighs most against
  the device work; ``-`` for the others); ``n/a`` where the field does not exist (then the "1" column
  is the main dump's own speed: one writer thread was all there was).
* **peak host / device memory**: host: the peak resident set during the dump (or the bare pass) above
  the resident set before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; a
  5 ms sampling thread where that is not allowed). Device: ``torch.cuda.max_memory_allocated`` above
  the memory allocated before. The dump's figures include loading its own copy of the teacher.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logit_cache import DumpConfig, collate_tokens, dump_cache, load_teacher
from logit_cache.data import resolve_dataset
from logit_cache.pipeline import make_loader
from logit_cache.pipeline.batches import default_num_workers
from logit_cache.store import get_backend
from logit_cache.targets import KINDS, encode_arrays, encode_tokens, get_kind, stored_specs
from logit_cache.teachers import PRECISIONS, autocast_for, resolve_device, run_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import machine_info, scratch_dir, table, write_report

ENCODE_GOAL = 1.5
THREADS = (1, 2, 4)
HAS_WRITER_THREADS = "writer_threads" in {f.name for f in dataclasses.fields(DumpConfig)}


def kind_with(width_field: str) -> str:
    """The registered kind whose width is ``width_field`` ("k": top-k, "m": sampled): names come from the registry."""
    return next(kind.name for kind in KINDS.values() if kind.width_field == width_field)


def configurations(k: int, m: int) -> list[dict[str, Any]]:
    """The dumps measured: top-k, sampled and compact top-k (name, DumpConfig fields, width)."""
    topk, sampled = kind_with("k"), kind_with("m")
    return [
        {"name": f"top-{k}", "fields": {"mode": topk, "k": k}, "width": k, "encoding": "plain"},
        {"name": f"sampled-{m}", "fields": {"mode": sampled, "m": m}, "width": m, "encoding": "plain"},
        {"name": f"top-{k} compact", "fields": {"mode": topk, "k": k, "encoding": "compact"}, "width": k, "encoding": "compact"},
    ]


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def peak_memory(record: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Put the peak host RSS above the RSS before (``host_peak_mb``) and on CUDA the peak allocated
    device memory above what was allocated before (``device_peak_mb``) into ``record``."""
    before = _status_kib("VmRSS")
    sampler, stop, peak = None, threading.Event(), [before]
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the kernel tracks the exact peak
        record["host_peak_method"] = "VmHWM"
    except OSError:
        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _status_kib("VmRSS"))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        record["host_peak_method"] = "sampled 5 ms"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    try:
        yield
    finally:
        if sampler is not None:
            stop.set()
            sampler.join()
            high = peak[0]
        else:
            high = _status_kib("VmHWM")
        record["host_peak_mb"] = max(0, high - before) / 1024
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            record["device_peak_mb"] = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------------


def build_teacher(directory: Path, vocab: int, args: argparse.Namespace, device: torch.device) -> int:
    """Save a random Llama-style causal LM of ``vocab`` ids to ``directory``; return its parameter count."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its loading bars would bury the benchmark's own lines
    heads = args.heads or max(1, args.hidden // 64)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads // 4 if heads % 4 == 0 else heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=args.tie, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    dtype = PRECISIONS[args.precision] or torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
        probe = torch.randint(0, vocab, (2, min(64, args.seq_len)), generator=torch.Generator(device).manual_seed(args.seed), device=device)
        with torch.inference_mode():
            std = float(model(probe).logits.float().std())
        with torch.no_grad():  # the final norm's scale sets the logits' scale, tied or not
            model.model.norm.weight.mul_(args.logit_std / std)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def write_tokens(path: Path, count: int, vocab: int, seed: int) -> None:
    ids = np.random.default_rng(seed).zipf(1.3, size=count) % vocab
    np.save(path, ids.astype(np.int32))


def shard_batches(manifest: Any, batch: int) -> list[list[int]]:
    """The dump's batches of window indices: each shard's windows in runs of ``batch`` (make_batches with one view)."""
    return [list(range(start, min(entry.sample_stop, start + batch)))
            for entry in manifest.shards for start in range(entry.sample_start, entry.sample_stop, batch)]


def teacher_logits(module: Any, resolved: Any, batches: list[list[int]], device: torch.device,
                   precision: str) -> Iterator[tuple[Any, torch.Tensor]]:
    """The teacher's logits batch by batch, as the dump's forward path computes them."""
    loader = make_loader(resolved, batches, default_num_workers(device), device.type == "cuda", collate=collate_tokens)
    with torch.inference_mode():
        for batch in loader:
            with autocast_for(device, precision):
                yield batch, run_teacher(module, batch.inputs.to(device, non_blocking=True))


def time_bare(module: Any, resolved: Any, batches: list[list[int]], device: torch.device, precision: str) -> dict[str, Any]:
    record: dict[str, Any] = {}
    with peak_memory(record, device):
        started = time.perf_counter()
        for _ in teacher_logits(module, resolved, batches, device, precision):
            pass
        _sync(device)
        record["wall_s"] = time.perf_counter() - started
    return record


def time_dump(base: dict[str, Any], config: dict[str, Any], out: Path, device: torch.device, threads: int | None = None) -> dict[str, Any]:
    extra = {"writer_threads": threads} if threads is not None else {}
    dump = DumpConfig(out=str(out), overwrite=True, quiet=True, **base, **config["fields"], **extra)
    record: dict[str, Any] = {}
    with peak_memory(record, device):
        started = time.perf_counter()
        result = dump_cache(dump)
        record["wall_s"] = time.perf_counter() - started
    record.update(loop_s=result.compute_seconds, rows=result.rows_computed, bytes_on_disk=result.bytes_on_disk,
                  chunk_rows=result.manifest.chunk_rows, shards=len(result.manifest.shards), mean_topk_mass=result.mean_topk_mass)
    record["manifest"] = result.manifest
    return record


def time_encode(logits: torch.Tensor, lengths: list[int], indices: list[int], config: dict[str, Any], dtype: str,
                seed: int, repeats: int, device: torch.device) -> tuple[float, float, dict[str, np.ndarray]]:
    """Best-of-``repeats`` seconds of encode_tokens and of one torch.topk over the same logits, and the host arrays."""
    kind = get_kind(config["fields"]["mode"])
    value_dtype = kind.device_value_dtype(dtype, config["encoding"])
    flat = logits.reshape(-1, logits.shape[-1])
    best_encode = best_topk = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        encoded = encode_tokens(logits, lengths, indices, kind.name, config["width"], value_dtype, seed=seed)
        _sync(device)
        best_encode = min(best_encode, time.perf_counter() - started)
        started = time.perf_counter()
        torch.topk(flat, config["width"], dim=1)
        _sync(device)
        best_topk = min(best_topk, time.perf_counter() - started)
    host = {name: tensor.cpu().numpy() for name, tensor in encoded.arrays.items()}
    return best_encode, best_topk, host


def host_writer_rows_per_s(blocks: list[dict[str, np.ndarray]], config: dict[str, Any], vocab: int, dtype: str,
                           chunk_rows: int, rows: int, threads: int, path: Path) -> float:
    """Rows/s of the host side: narrowing + compact encoding in ``threads`` threads, one writer appending in order."""
    kind = get_kind(config["fields"]["mode"])
    width, encoding = config["width"], config["encoding"]
    sampled_logits = any("sampled_logits" in block for block in blocks)
    logical = kind.array_specs(width, vocab, dtype, sampled_logits=True)
    casts = {spec.name: np.dtype(spec.dtype) for spec in logical if np.dtype(spec.dtype).kind in "iu"}
    specs = stored_specs(kind.name, width, vocab, dtype, encoding, sampled_logits=sampled_logits)
    names = {spec.name for spec in specs}
    order, total = [], 0
    while total < rows:
        for block in blocks:
            order.append(block)
            total += len(next(iter(block.values())))
            if total >= rows:
                break

    def produce(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: value.astype(casts[name]) if name in casts else value for name, value in block.items()}
        stored = encode_arrays(kind.name, arrays, encoding, vocab) if encoding != "plain" else arrays
        return {name: value for name, value in stored.items() if name in names}

    started = time.perf_counter()
    writer = get_backend(base_backend()).create(path, specs, chunk_rows, {})
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for stored in pool.map(produce, order):  # in submission order, a few blocks ahead
            writer.append(stored)
    writer.close()
    seconds = time.perf_counter() - started
    shutil.rmtree(path)
    return total / seconds


def base_backend() -> str:
    return DumpConfig(teacher="", dataset="").backend  # the dump's default backend


# --------------------------------------------------------------------------------------------------
# One vocabulary
# --------------------------------------------------------------------------------------------------


def run_vocab(vocab: int, args: argparse.Namespace, device: torch.device, workdir: Path, first: bool) -> dict[str, Any]:
    root = workdir / f"v{vocab}"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    params = build_teacher(root / "teacher", vocab, args, device)
    _progress(f"V={vocab}: teacher of {params / 1e6:.1f}M params saved in {time.perf_counter() - started:.1f} s")
    write_tokens(root / "ids.npy", args.tokens, vocab, args.seed)
    write_tokens(root / "warm.npy", min(args.tokens, args.batch * args.seq_len), vocab, args.seed + 1)
    base = {"teacher": f"hf:{root / 'teacher'}", "dataset": f"tokens:{root / 'ids.npy'}", "dataset_kwargs": {"seq_len": args.seq_len},
            "batch_size": args.batch, "device": str(device), "precision": args.precision, "dtype": args.dtype, "seed": args.seed}
    configs = configurations(args.k, args.m)
    if first and not args.quick:  # first-use costs (imports, codecs, kernels) off the clock
        for config in configs:
            time_dump({**base, "dataset": f"tokens:{root / 'warm.npy'}"}, config, root / "warm", device)
    teacher = load_teacher(base["teacher"], device=device, **({"precision": args.precision} if _load_takes_precision() else {}))
    module = teacher.module
    resolved = resolve_dataset(base["dataset"], base["dataset_kwargs"])
    records: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
    bare: dict[tuple[int, str], dict[str, Any]] = {}
    manifests: dict[str, Any] = {}
    for repeat in range(args.repeats):
        for config in configs:
            measured = time_dump(base, config, root / f"cache-{configs.index(config)}", device)
            manifests[config["name"]] = measured.pop("manifest")
            batches = shard_batches(manifests[config["name"]], args.batch)
            key = (repeat, repr(batches))
            if key not in bare:
                time_bare(module, resolved, batches[:1], device, args.precision)  # warm-up
                bare[key] = time_bare(module, resolved, batches, device, args.precision)
                _progress(f"V={vocab} repeat {repeat}: bare {bare[key]['wall_s']:.2f} s")
            measured["bare"] = bare[key]
            records[config["name"]].append(measured)
            _progress(f"V={vocab} repeat {repeat}: {config['name']} loop {measured['loop_s']:.2f} s, wall {measured['wall_s']:.2f} s")
    # encoding alone, on the teacher's logits of the first batches
    batches = shard_batches(manifests[configs[0]["name"]], args.batch)[: args.encode_batches]
    enc = {c["name"]: {"encode_s": 0.0, "topk_s": 0.0, "tokens": 0, "blocks": []} for c in configs}
    for batch, logits in teacher_logits(module, resolved, batches, device, args.precision):
        lengths = batch.lengths.tolist()
        first_index = batches[len(enc[configs[0]["name"]]["blocks"])][0]
        for config in configs:
            encode_s, topk_s, host = time_encode(logits, lengths, list(range(first_index, first_index + len(lengths))), config,
                                                 args.dtype, args.seed, args.encode_repeats, device)
            entry = enc[config["name"]]
            entry["encode_s"] += encode_s
            entry["topk_s"] += topk_s
            entry["tokens"] += sum(lengths)
            entry["blocks"].append(host)
        logits_dtype = str(logits.dtype)
        del logits
    rows = []
    for config in configs:
        mine, entry = records[config["name"]], enc[config["name"]]
        row: dict[str, Any] = {
            "vocab": vocab, "what": config["name"], "teacher_params": params, "tokens": mine[-1]["rows"],
            "dump_wall_s": statistics.median(r["wall_s"] for r in mine), "loop_s": statistics.median(r["loop_s"] for r in mine),
            "bare_s": statistics.median(r["bare"]["wall_s"] for r in mine),
            "dump_over_bare": statistics.median(r["loop_s"] / r["bare"]["wall_s"] for r in mine),
            "wall_over_bare": statistics.median(r["wall_s"] / r["bare"]["wall_s"] for r in mine),
            "encode_s": entry["encode_s"], "topk_s": entry["topk_s"], "encode_tokens": entry["tokens"], "logits_dtype": logits_dtype,
            "encode_over_topk": entry["encode_s"] / entry["topk_s"], "encode_goal": ENCODE_GOAL,
            "encode_tokens_per_s": entry["tokens"] / entry["encode_s"],
            "bytes_per_token": mine[-1]["bytes_on_disk"] / mine[-1]["rows"], "mean_topk_mass": mine[-1]["mean_topk_mass"],
            "dump_host_peak_mb": max(r["host_peak_mb"] for r in mine), "bare_host_peak_mb": max(r["bare"]["host_peak_mb"] for r in mine),
            "host_peak_method": mine[-1]["host_peak_method"], "measurements": mine,
        }
        if device.type == "cuda":
            row["dump_device_peak_mb"] = max(r["device_peak_mb"] for r in mine)
            row["bare_device_peak_mb"] = max(r["bare"]["device_peak_mb"] for r in mine)
        chunk_rows = mine[-1]["chunk_rows"]
        row["host_rows_per_s"] = {str(n): host_writer_rows_per_s(entry["blocks"], config, vocab, args.dtype, chunk_rows, args.writer_rows,
                                                                  n, root / f"writer-{n}.zarr") for n in THREADS}
        row["dump_tokens_per_s_by_writer_threads"] = {str(n): None for n in THREADS}
        chosen = args.thread_dumps == "all" or (args.thread_dumps == "one" and config is configs[-1] and vocab == min(args.vocabs))
        if HAS_WRITER_THREADS and chosen:
            for n in THREADS:
                measured = time_dump(base, config, root / f"cache-{configs.index(config)}", device, threads=n)
                row["dump_tokens_per_s_by_writer_threads"][str(n)] = measured["rows"] / measured["loop_s"]
        elif not HAS_WRITER_THREADS:  # one writer thread: the main dump's own figure
            row["dump_tokens_per_s_by_writer_threads"]["1"] = row["tokens"] / row["loop_s"]
        _progress(f"V={vocab}: {config['name']} encode/topk {row['encode_over_topk']:.2f}, host rows/s "
                  + ", ".join(f"{n}: {v:,.0f}" for n, v in row["host_rows_per_s"].items()))
        rows.append(row)
    del module, teacher
    return {"vocab": vocab, "teacher_params": params, "rows": rows}


def _load_takes_precision() -> bool:
    import inspect

    return "precision" in inspect.signature(load_teacher).parameters


# --------------------------------------------------------------------------------------------------
# Reporting and main
# --------------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]], device_type: str) -> str:
    header = ["V", "what", "bare s", "loop s", "dump/bare", "wall/bare", "enc/topk", "enc tok/s", "host rows/s 1/2/4 thr",
              "dump tok/s by writer_threads 1/2/4", "peak host MB dump/bare", *(["peak dev MB dump/bare"] if device_type == "cuda" else []),
              "B/token"]
    lines = []
    for row in rows:
        verdict = " ok" if row["encode_over_topk"] <= ENCODE_GOAL else " MISS"
        lines.append([
            f"{row['vocab']:,}", row["what"], f"{row['bare_s']:.2f}", f"{row['loop_s']:.2f}", f"{row['dump_over_bare']:.2f}",
            f"{row['wall_over_bare']:.2f}", f"{row['encode_over_topk']:.2f}{verdict}", f"{row['encode_tokens_per_s']:,.0f}",
            " / ".join(f"{v:,.0f}" for v in row["host_rows_per_s"].values()),
            " / ".join(("-" if HAS_WRITER_THREADS else "n/a") if v is None else f"{v:,.0f}"  # -: not asked (--thread-dumps)
                       for v in row["dump_tokens_per_s_by_writer_threads"].values()),
            f"{row['dump_host_peak_mb']:,.0f} / {row['bare_host_peak_mb']:,.0f}",
            *([f"{row['dump_device_peak_mb']:,.0f} / {row['bare_device_peak_mb']:,.0f}"] if device_type == "cuda" else []),
            f"{row['bytes_per_token']:.1f}",
        ])
    return table(header, lines)


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", help="comma list of vocabulary sizes (default 32768,131072; 1024,4096 with --quick)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 64 on the CPU, 2048 on a GPU; 32 with --quick)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 2 on the CPU, 16 on a GPU; 1 with --quick)")
    parser.add_argument("--heads", type=int, help="attention heads (default hidden / 64, at least 1)")
    parser.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True, help="tie the head to the embeddings (default yes)")
    parser.add_argument("--logit-std", type=float, default=4.0, help="std of the teacher's logits (default 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 256 on the CPU, 2048 on a GPU; 64 with --quick)")
    parser.add_argument("--batch", type=int, help="windows per batch (default 4 on the CPU, 8 on a GPU; 4 with --quick)")
    parser.add_argument("--tokens", type=int, help="tokens per dump (default 4096 on the CPU, 1048576 on a GPU; 1024 with --quick)")
    parser.add_argument("--k", type=int, default=64, help="top-k width (default 64)")
    parser.add_argument("--m", type=int, default=50, help="sampled draws per token (default 50)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored value dtype (default float16)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), help="teacher precision (default fp32 on the CPU, bf16 on a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of bare and dumps, medians reported (default 1)")
    parser.add_argument("--encode-batches", type=int, default=2, help="batches whose logits are encoded alone (default 2)")
    parser.add_argument("--encode-repeats", type=int, default=2, help="repeats per batch of encode and topk, best taken (default 2)")
    parser.add_argument("--writer-rows", type=int, help="rows per host-writer measurement (default 16384 on the CPU, 1048576 on a GPU)")
    parser.add_argument("--thread-dumps", default="one", choices=("none", "one", "all"),
                        help="whole dumps at writer_threads 1/2/4: none, the compact one at the smallest V (default), all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the teacher and the data (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of ~15 s (its numbers mean nothing)")
    parser.add_argument("--json", default="data/bench_lm_dump.json", help="where to write results (default data/bench_lm_dump.json)")
    parser.add_argument("--workdir", help="scratch directory (default: a fresh temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (teachers and caches)")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    gpu, quick = args.device.type == "cuda", args.quick
    pick = lambda value, cpu, cuda, small: value if value is not None else (small if quick else cuda if gpu else cpu)  # noqa: E731
    args.vocabs = [int(v) for v in pick(args.vocabs, "32768,131072", "32768,131072", "1024,4096").split(",") if v.strip()]
    args.hidden = pick(args.hidden, 64, 2048, 32)
    args.precision = pick(args.precision, "fp32", "bf16", "fp32")
    args.layers = pick(args.layers, 2, 16, 1)
    args.seq_len = pick(args.seq_len, 256, 2048, 64)
    args.batch = pick(args.batch, 4, 8, 4)
    args.tokens = pick(args.tokens, 4096, 1_048_576, 1024)
    args.writer_rows = pick(args.writer_rows, 16_384, 1_048_576, 2048)
    if quick:
        args.encode_batches, args.encode_repeats = min(args.encode_batches, 2), 1
    if min(args.hidden, args.layers, args.seq_len, args.batch, args.tokens, args.writer_rows, args.repeats, args.encode_batches,
           args.encode_repeats, *args.vocabs) < 1 or not args.vocabs:
        parser.error("sizes, counts and --vocabs must be positive")
    if args.tokens < args.seq_len:
        parser.error(f"--tokens {args.tokens} is less than one window (--seq-len {args.seq_len})")
    if max(args.k, args.m) > min(args.vocabs):
        parser.error(f"--k {args.k} and --m {args.m} must not exceed the smallest vocabulary {min(args.vocabs)}")
    return args


def _progress(text: str) -> None:
    print("  " + text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = args.device
    with scratch_dir(args.workdir, args.keep, "bench-lm-dump-") as workdir:
        vocabs = [run_vocab(vocab, args, device, workdir, first=i == 0) for i, vocab in enumerate(args.vocabs)]
    machine = machine_info(device)
    machine["cpu_model"] = cpu_model()
    machine["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    config = {name: (str(value) if isinstance(value, torch.device) else value) for name, value in vars(args).items()}
    config.update(writer_threads_field=HAS_WRITER_THREADS, load_teacher_precision=_load_takes_precision(),
                  command=" ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    rows = [row for entry in vocabs for row in entry["rows"]]
    report = {"config": config, "machine": machine, "summary": [{k: v for k, v in r.items() if k != "measurements"} for r in rows],
              "measurements": {f"{r['vocab']} {r['what']}": r["measurements"] for r in rows},
              "total_seconds": time.perf_counter() - started}
    print(f"\ndevice {device} ({machine['card'] or machine['cpu_model']}), torch {machine['torch_version']}, "
          f"{machine['torch_threads']} torch threads; Llama {args.hidden}x{args.layers}, "
          + ", ".join(f"V={e['vocab']}: {e['teacher_params'] / 1e6:.1f}M params" for e in vocabs)
          + f"; {args.tokens:,} tokens in windows of {args.seq_len}, batch {args.batch}, {args.precision}, values {args.dtype}; "
          f"logits {rows[0]['logits_dtype']}; writer_threads field: {'yes' if HAS_WRITER_THREADS else 'no'}")
    print(format_table(rows, device.type))
    print(f"total {report['total_seconds']:.0f} s")
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
