"""GPU check of per-token (language-model) dumps: speed against bare inference, AMP fidelity, sampled draws.

Not a test (it needs a GPU for meaningful numbers; ``--device cpu --quick`` runs it anywhere):

    python scripts/gpu_lm_check.py --device cuda --json data/gpu_lm_check.json

1. Speed: a ``tiny_lm`` teacher scaled up (vocab 32k by default) over windows of a synthetic token
   array; tokens/s of bare inference (the teacher's forward over the same batches, no encoding, no
   writing) against ``dump_cache`` with ``--topk 64`` and ``--sample 50`` at bf16 (the inference loop's time).
2. AMP fidelity: top-64 dumps at bf16 and fp32 of the same data: top-1 agreement, top-64 id overlap.
3. Sampled draws on the device: counts sum to M in every row; a second dump draws the same ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import machine_info, write_report

from logit_cache import DumpConfig, TokenWindows, collate_tokens, dump_cache, open_reader
from logit_cache.format import array_specs
from logit_cache.store import get_backend
from logit_cache.targets import encode_arrays, encode_tokens, get_kind
from logit_cache.teachers import autocast_for
from logit_cache.tools import tiny_lm

COMPACT = "--no-compact" not in sys.argv


def bare_tokens_per_second(model: torch.nn.Module, windows: TokenWindows, batch_size: int, device: torch.device, precision: str) -> float:
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size, collate_fn=collate_tokens, pin_memory=device.type == "cuda",
                                         num_workers=2 if device.type == "cuda" else 0)
    tokens = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), autocast_for(device, precision):
        for batch in loader:
            logits = model(batch.inputs.to(device, non_blocking=True))
            tokens += int(batch.lengths.sum())
            del logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens / (time.perf_counter() - started)


def encode_tokens_per_second(model: torch.nn.Module, windows: TokenWindows, config: DumpConfig, device: torch.device) -> float:
    """The dump's device work without writing: teacher, per-token encoding, copies to the host."""
    loader = torch.utils.data.DataLoader(windows, batch_size=config.batch_size, collate_fn=collate_tokens,
                                         pin_memory=device.type == "cuda", num_workers=2 if device.type == "cuda" else 0)
    kind = get_kind(config.mode)  # what the dump's batch loop passes to encode_tokens
    width, value_dtype = kind.width(config), kind.device_value_dtype(config.dtype, config.encoding)
    tokens, first = 0, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            with autocast_for(device, config.precision):
                logits = model(batch.inputs.to(device, non_blocking=True))
            lengths = batch.lengths.tolist()
            encoded = encode_tokens(logits, lengths, list(range(first, first + len(lengths))), kind.name, width, value_dtype,
                                    seed=config.seed, sample_temperature=config.sample_temperature)
            host = [t.to("cpu", non_blocking=True) for t in encoded.arrays.values()]
            first += len(lengths)
            tokens += sum(lengths)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del host
    return tokens / (time.perf_counter() - started)


def write_rows_per_second(cache_dir: Path, out: Path, encoding: str) -> float:
    """The writer's part alone: a cache's stored rows appended to a new shard (Zarr), with the
    compact encoding applied on the way when asked (what the dump's producer threads do)."""
    reader = open_reader(cache_dir)
    manifest = reader.manifest
    names = [n for n in ("topk_logits", "topk_indices", "logsumexp", "sampled_indices", "sampled_counts") if n in manifest.arrays]
    arrays = {name: reader.read(name) for name in names}
    rows = len(arrays["logsumexp"])
    k = manifest.k or manifest.m
    specs = array_specs(manifest.mode, k, manifest.num_classes, manifest.dtype, False, manifest.num_samples, encoding=encoding)
    writer = get_backend("zarr").create(out, specs, manifest.chunk_rows, {})
    started = time.perf_counter()
    for start in range(0, rows, 16384):
        part = {name: value[start : start + 16384] for name, value in arrays.items()}
        writer.append(encode_arrays(manifest.mode, part, encoding, manifest.num_classes) if encoding != "plain" else part)
    writer.close()
    return rows / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--no-compact", action="store_true", help="skip the compact-encoding dump")
    parser.add_argument("--json", default="data/gpu_lm_check.json")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.tokens, args.seq_len, args.batch_size = 2048, 20_000, 128, 8
    device = torch.device(args.device)
    report: dict = {"machine": machine_info(device), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="gpu-lm-", dir="data" if Path("data").is_dir() else None) as tmp:
        root = Path(tmp)
        ids = np.random.default_rng(0).zipf(1.3, size=args.tokens) % args.vocab
        np.save(root / "ids.npy", ids.astype(np.int32))
        arch_kwargs = {"vocab_size": args.vocab, "d_model": 512, "n_layers": 4, "n_heads": 8, "max_len": args.seq_len}
        if args.quick:
            arch_kwargs.update(d_model=64, n_layers=1, n_heads=2)
        torch.manual_seed(0)
        model = tiny_lm(**arch_kwargs)
        torch.save(model.state_dict(), root / "teacher.pt")
        model = model.to(device).eval()
        windows = TokenWindows(root / "ids.npy", seq_len=args.seq_len)
        common = dict(teacher=str(root / "teacher.pt"), arch="logit_cache.tools.models:tiny_lm", arch_kwargs=arch_kwargs,
                      dataset=f"tokens:{root / 'ids.npy'}", dataset_kwargs={"seq_len": args.seq_len}, batch_size=args.batch_size,
                      device=args.device, quiet=True)
        bare_tokens_per_second(model, windows, args.batch_size, device, "bf16")  # warm-up (kernels, allocator)
        bare = bare_tokens_per_second(model, windows, args.batch_size, device, "bf16")
        rows = []
        for name, extra in [("top64", {"mode": "topk", "k": 64}), ("sample50", {"mode": "sampled", "m": 50}),
                            ("top64-compact", {"mode": "topk", "k": 64, "encoding": "compact"})][: None if COMPACT else 2]:
            result = dump_cache(DumpConfig(out=str(root / name), precision="bf16", **common, **extra))
            tps = result.rows_computed / result.compute_seconds
            rows.append({"what": name, "tokens_per_s": tps, "bare_tokens_per_s": bare, "dump_over_bare_time": bare / tps,
                         "bytes_per_token": result.bytes_on_disk / result.manifest.num_rows})
            print(f"{name:14s} dump {tps:12,.0f} tok/s   bare {bare:12,.0f} tok/s   time ratio {bare / tps:5.2f}   "
                  f"{rows[-1]['bytes_per_token']:.1f} B/token", flush=True)
        report["speed"] = rows
        # where the time goes: the device part alone, and the writer's part alone
        parts = {}
        for name, extra in [("top64", {"mode": "topk", "k": 64}), ("sample50", {"mode": "sampled", "m": 50})]:
            config = DumpConfig(out="unused", precision="bf16", **common, **extra).resolved()
            parts[f"{name}_device_tokens_per_s"] = encode_tokens_per_second(model, windows, config, device)
        parts["top64_write_plain_rows_per_s"] = write_rows_per_second(root / "top64", root / "w1.zarr", "plain")
        parts["top64_write_compact_rows_per_s"] = write_rows_per_second(root / "top64", root / "w2.zarr", "compact")
        parts["sample50_write_plain_rows_per_s"] = write_rows_per_second(root / "sample50", root / "w3.zarr", "plain")
        report["breakdown"] = parts
        for name, value in parts.items():
            print(f"{name:34s} {value:12,.0f}", flush=True)
        # AMP fidelity: bf16 vs fp32 of the same data (the first 200 windows)
        few = dict(common, dataset_kwargs={"seq_len": args.seq_len}, mode="topk", k=64)
        dump_cache(DumpConfig(out=str(root / "fp32"), precision="fp32", **few))
        bf16, fp32 = open_reader(root / "top64"), open_reader(root / "fp32")
        a, b = bf16.read("topk_indices").astype(np.int64), fp32.read("topk_indices").astype(np.int64)
        top1 = float((a[:, 0] == b[:, 0]).mean())
        overlap = float(np.mean([len(np.intersect1d(x, y)) / x.size for x, y in zip(a[:2000], b[:2000], strict=True)]))
        report["amp"] = {"top1_agreement": top1, "top64_overlap": overlap}
        print(f"AMP bf16 vs fp32: top-1 agreement {top1:.4f}, top-64 id overlap {overlap:.4f}", flush=True)
        # sampled on the device: counts sum to M; a second dump draws the same ids
        again = dump_cache(DumpConfig(out=str(root / "sample50-again"), precision="bf16", mode="sampled", m=50, **common))
        first, second = open_reader(root / "sample50"), open_reader(again.out)
        counts = first.read("sampled_counts")
        same = bool(np.array_equal(first.read("sampled_indices"), second.read("sampled_indices"))
                    and np.array_equal(counts, second.read("sampled_counts")))
        report["sampled"] = {"counts_sum_to_m": bool((counts.astype(np.int64).sum(1) == 50).all()), "repeatable": same,
                             "mean_distinct_ids": float((counts > 0).sum(1).mean())}
        print(f"sampled: {report['sampled']}", flush=True)
    write_report(args.json, report)
    ok = top1 >= 0.9 and report["sampled"]["counts_sum_to_m"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
