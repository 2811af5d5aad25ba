"""Benchmark: the distillation loss alone, fused (one pass, ``losses/fused.py``) against unfused.

``DistillationLoss(KLDivergence(T), 0.9, 0.1)`` computes its CE and KD terms in one pass with the
gradient made in the forward; before that it summed ``0.9 * kd_loss + 0.1 * cross_entropy``, which
is still what the two public functions compute, so both are timed here in one process, interleaved:
forward and backward of the loss on fixed student logits (a fresh leaf each call), targets in their
storage dtypes as a cache delivers them (float16 values, uint16 ids). Cross-entropy alone is the
floor. Medians and minima over ``--repeats`` blocks of ``--calls`` calls each; ``--threads 1``
(default) times CPU time of the thread, which other load on a shared machine disturbs least.

    python scripts/bench_loss.py                 # ~1 min on 2 CPU cores
    python scripts/bench_loss.py --threads 2     # wall time with 2 torch threads
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from logit_cache import DistillationLoss, KLDivergence, Targets, kd_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import write_report  # the scripts' shared helpers

CASES = [  # (name, rows, classes, k or None for full logits, temperature)
    ("bench_train top-10, T=4", 256, 1000, 10, 4.0),
    ("bench_train full, T=4", 256, 1000, None, 4.0),
    ("bench_train top-10, T=1", 256, 1000, 10, 1.0),
    ("digits top-5, T=2 (batch 64)", 64, 10, 5, 2.0),
]


def targets(logits: torch.Tensor, k: int | None) -> Targets:
    classes = logits.shape[1]
    if k is None:
        return Targets.from_arrays("full", classes, {"logits": logits.half().numpy()})
    values, ids = logits.topk(k, dim=1)
    return Targets.from_arrays("topk", classes, {"topk_logits": values.half().numpy(), "topk_indices": ids.numpy().astype(np.uint16),
                                                 "logsumexp": logits.logsumexp(dim=1).numpy()})


def variants(rows: int, classes: int, k: int | None, temperature: float) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, classes, generator=generator) * 2
    labels = torch.randint(0, classes, (rows,), generator=generator)
    target = targets(torch.randn(rows, classes, generator=generator) * 4, k)
    fused = DistillationLoss(KLDivergence(temperature), kd_loss_weight=0.9, org_loss_weight=0.1)

    def run(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            leaf = student.clone().requires_grad_()
            loss_of(leaf).backward()
        return call

    return {
        "cross_entropy": run(lambda s: F.cross_entropy(s, labels)),
        "unfused": run(lambda s: 0.9 * kd_loss(s, target, temperature) + 0.1 * F.cross_entropy(s, labels)),
        "fused": run(lambda s: fused(s, labels, target)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time of the thread; else wall time)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved blocks per variant (default 15)")
    parser.add_argument("--calls", type=int, default=40, help="calls per block (default 40)")
    parser.add_argument("--json", default="data/bench_loss.json", help="where to write the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rows_out = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), {'thread CPU' if args.threads == 1 else 'wall'} time; "
          f"medians (min) of {args.repeats} blocks of {args.calls} calls, forward + backward")
    print("| case                          | cross_entropy ms | unfused ms      | fused ms        | fused/unfused "
          "| (fused-CE)/(unfused-CE) |")
    print("|-------------------------------|------------------|-----------------|-----------------|---------------"
          "|-------------------------|")
    for name, rows, classes, k, temperature in CASES:
        fns = variants(rows, classes, k, temperature)
        times: dict[str, list[float]] = {v: [] for v in fns}
        for fn in fns.values():
            for _ in range(5):
                fn()
        for _ in range(args.repeats):
            for variant, fn in fns.items():
                start = clock()
                for _ in range(args.calls):
                    fn()
                times[variant].append((clock() - start) / args.calls * 1e3)
        med = {v: statistics.median(t) for v, t in times.items()}
        low = {v: min(t) for v, t in times.items()}
        extra = (med["fused"] - med["cross_entropy"]) / (med["unfused"] - med["cross_entropy"])
        rows_out.append({"case": name, "rows": rows, "classes": classes, "k": k, "temperature": temperature,
                         "median_ms": med, "min_ms": low, "fused_over_unfused": med["fused"] / med["unfused"],
                         "fused_extra_over_unfused_extra": extra, "times_ms": times})
        print(f"| {name:29s} | {med['cross_entropy']:7.3f} ({low['cross_entropy']:6.3f}) | {med['unfused']:6.3f} ({low['unfused']:6.3f}) "
              f"| {med['fused']:6.3f} ({low['fused']:6.3f}) | {med['fused'] / med['unfused']:13.2f} | {extra:23.2f} |")
    report = {"cases": rows_out, "threads": args.threads, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
