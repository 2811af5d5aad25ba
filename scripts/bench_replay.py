"""Benchmark: an epoch of cached KD with replayed views against labels-only training on the same augmented data.

The goal (issue 14): cached KD with replayed views costs at most 1.10x an epoch of labels-only
training on the same augmented data. Both pay for the augmentation; the cached run also seeds the
three global generators before every item (``replay.py``: that is what makes view ``v`` of sample
``i`` the input the teacher saw), reads the item's cached row and takes the KD loss.

    python scripts/bench_replay.py                  # ~1 min on 2 idle CPU cores
    PYTHONPATH=/path/to/older/checkout python scripts/bench_replay.py --json before.json   # the same on older code

Workload: the built-in augmented digits (``DigitsDataset("train", augment=True)``: 1,437 8x8 images,
a random shift (torch), Gaussian noise (numpy) and a flip (Python's ``random``) per item), the
demo's student (``digits_mlp(hidden=32, depth=1)``), batch 64, AdamW. The cache: top-5 targets of
``--views`` replayed views a sample (``dump --views V --seed 0``), dumped from a random
``digits_mlp(hidden=256, depth=2)`` teacher (the teacher's cost is not part of what is timed).

Variants, timed over ``--epochs`` epochs each, interleaved per repeat (the order reversed on odd
repeats): ``labels`` (a plain DataLoader over the augmented dataset with a seeded
``ChunkShuffleSampler``, cross-entropy), ``cached views`` (``cache.wrap(ds)``, ``cache.sampler()``,
``cache.collate``, ``DistillationLoss(KLDivergence(2.0))``: the demo's T) and ``cached views, CE
only`` (the same loader, the targets unused: the data path's share). Ratios are medians of
per-repeat ratios. Last, the cost of an item (``dataset[i]``, and ``replay_items`` over the same
batches), interleaved passes over the data set, thread CPU time.

``--draws torch``: the same augmentation with every draw from torch's generator (``torch_only_digits``
below), as torchvision-style transforms draw; replay then seeds one generator an item instead of
three (``replay.py`` learns which ones the items draw from). The report records which it learnt.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import logit_cache
from logit_cache import ChunkShuffleSampler, DistillationLoss, DumpConfig, KLDivergence, dump_cache, open_cache
from logit_cache.data.datasets import DigitsDataset
from logit_cache.tools import digits_mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import write_report  # the scripts' shared helpers

ARCH = "logit_cache.models:digits_mlp"
TEACHER_KWARGS = {"hidden": 256, "depth": 2}
STUDENT_KWARGS = {"hidden": 32, "depth": 1}
GOAL = 1.10


class TorchOnlyDigits(DigitsDataset):
    """``DigitsDataset(augment=True)``'s augmentation (shift, noise of std 0.1, flip with probability 0.2), all from torch."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        shift = torch.randint(-1, 2, (2,))
        image = torch.roll(image, shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
        image = image + 0.1 * torch.randn(image.shape)
        if float(torch.rand(())) < 0.2:
            image = image.flip(2)
        return image, int(self.labels[index])


def torch_only_digits(split: str = "train") -> TorchOnlyDigits:
    return TorchOnlyDigits(split, augment=True)


def workload(draws: str) -> tuple[str, dict[str, Any], Any]:
    """(dataset spec, kwargs, the dataset) of ``--draws``."""
    if draws == "torch":
        return f"{Path(__file__).resolve()}:torch_only_digits", {"split": "train"}, torch_only_digits("train")
    return "digits", {"split": "train", "augment": True}, DigitsDataset("train", augment=True)


def epoch(kind: str, ds: Any, cache: Any, student: torch.nn.Module, batch_size: int, epoch_index: int) -> tuple[float, float]:
    """One epoch of training ``student`` in place; returns (wall seconds, seconds waiting on the loader)."""
    if kind == "labels":
        sampler = ChunkShuffleSampler(len(ds), shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler)
    else:
        sampler = cache.sampler(shuffle=True, seed=0)
        loader = DataLoader(cache.wrap(ds, verify="length"), batch_size=batch_size, sampler=sampler, collate_fn=cache.collate)
    sampler.set_epoch(epoch_index)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    criterion = DistillationLoss(KLDivergence(2.0))
    started = time.perf_counter()
    waited = 0.0
    iterator = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            waited += time.perf_counter() - t0
            break
        waited += time.perf_counter() - t0
        logits = student(batch[0])
        loss = criterion(logits, batch[1], batch[2]) if kind == "cached views" else F.cross_entropy(logits, batch[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started, waited


def per_item(ds: Any, views: int, batch_size: int, repeats: int = 7) -> dict[str, float]:
    """Microseconds an item (thread CPU time, the minimum of ``repeats`` interleaved passes over the data set):
    ``dataset[i]`` alone, and ``replay_items`` over the same batches with views as the sampler gives them."""
    from logit_cache.data.replay import default_view, replay_items

    order = np.random.default_rng(0).permutation(len(ds))
    batches = [(order[s : s + batch_size], default_view(0, order[s : s + batch_size], views)) for s in range(0, len(ds), batch_size)]
    passes = {"item": lambda: [[ds[i] for i in b.tolist()] for b, _ in batches],
              "replayed item": lambda: [replay_items(ds, b, v, 0) for b, v in batches]}
    best = {name: float("inf") for name in passes}
    for name in passes:  # warm-up (and the replay learns its generators)
        passes[name]()
    for repeat in range(repeats):
        for name in passes if repeat % 2 == 0 else list(passes)[::-1]:
            started = time.thread_time()
            passes[name]()
            best[name] = min(best[name], (time.thread_time() - started) / len(ds) * 1e6)
    return best


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    teacher_path = workdir / "teacher.pt"
    torch.save(digits_mlp(**TEACHER_KWARGS).state_dict(), teacher_path)
    started = time.perf_counter()
    spec, kwargs, ds = workload(args.draws)
    dump_cache(DumpConfig(teacher=str(teacher_path), arch=ARCH, arch_kwargs=dict(TEACHER_KWARGS), dataset=spec,
                          dataset_kwargs=kwargs, out=str(workdir / "views"), k=5, views=args.views, seed=0, device="cpu",
                          quiet=True))
    dump_s = time.perf_counter() - started
    cache = open_cache(workdir / "views")
    torch.manual_seed(1)
    student0 = digits_mlp(**STUDENT_KWARGS)
    kinds = ["labels", "cached views", "cached views, CE only"]
    for kind in kinds:  # warm-up
        epoch(kind, ds, cache, copy.deepcopy(student0), args.batch_size, 0)
    records: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            student = copy.deepcopy(student0)
            walls, waits = zip(*(epoch(kind, ds, cache, student, args.batch_size, e) for e in range(args.epochs)), strict=True)
            records.append({"repeat": repeat, "variant": kind, "wall_s": sum(walls) / args.epochs, "data_s": sum(waits) / args.epochs})
            print(f"  repeat {repeat}: {kind}: {records[-1]['wall_s']:.3f} s an epoch", file=sys.stderr, flush=True)
    by = {(r["repeat"], r["variant"]): r for r in records}
    summary = []
    for kind in kinds:
        mine = [by[(i, kind)] for i in range(args.repeats)]
        summary.append({
            "variant": kind,
            "epoch_s": statistics.median(r["wall_s"] for r in mine),
            "best_s": min(r["wall_s"] for r in mine),
            "data_s": statistics.median(r["data_s"] for r in mine),
            "over_labels": statistics.median(r["wall_s"] / by[(r["repeat"], "labels")]["wall_s"] for r in mine),
        })
    try:  # which generators replay learnt to seed (older code: all three, always)
        from logit_cache.data.replay import drawn_generators
        seeded = list(drawn_generators(ds))
    except ImportError:
        seeded = ["torch", "numpy", "random"]
    items_us = per_item(ds, args.views, args.batch_size)
    return {
        "summary": summary, "measurements": records, "dump_s": dump_s, "seeded": seeded, "per_item_us": items_us,
        "config": {"draws": args.draws, "views": args.views, "epochs": args.epochs, "repeats": args.repeats, "batch_size": args.batch_size,
                   "teacher": TEACHER_KWARGS, "student": STUDENT_KWARGS, "samples": len(ds),
                   "command": " ".join(["python", *sys.argv]), "logit_cache": str(Path(logit_cache.__file__).parent)},
        "machine": {"torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=8, help="replayed views a sample in the cache (default 8, the demo's)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs a timed measurement (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64, the trainer's)")
    parser.add_argument("--draws", choices=["all", "torch"], default="all",
                        help="all: DigitsDataset(augment=True), drawing from torch, numpy and random (default); torch: the same "
                             "augmentation drawn from torch alone")
    parser.add_argument("--json", default="data/bench_replay.json", help="where to write the results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        report = run(args, Path(tmp))
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"\naugmented digits ({args.draws} draws; replay seeds {', '.join(report['seeded']) or 'nothing'}), "
          f"{report['config']['samples']} samples, batch {args.batch_size}, {args.views} views; "
          f"logit_cache from {report['config']['logit_cache']}")
    print("| variant               | epoch s | best s | data s | vs labels | goal <= 1.10 |")
    print("|-----------------------|---------|--------|--------|-----------|--------------|")
    for row in report["summary"]:
        goal = "-" if row["variant"] != "cached views" else ("PASS" if row["over_labels"] <= GOAL else "FAIL")
        print(f"| {row['variant']:21s} | {row['epoch_s']:7.3f} | {row['best_s']:6.3f} | {row['data_s']:6.3f} | "
              f"{row['over_labels']:9.3f} | {goal:12s} |")
    items_us = report["per_item_us"]
    print(f"per item (us, thread CPU, minima): dataset[i] {items_us['item']:.1f}, replayed {items_us['replayed item']:.1f} "
          f"(+{items_us['replayed item'] - items_us['item']:.1f})")
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
