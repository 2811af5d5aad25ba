"""What a dump does, counted: torch operations and Python calls of one top-k dump under cProfile.

For refactors that must not change the work (the layout change of issue 11): run it on two commits and
compare the counts, which, unlike times on a shared machine, are exact.

    python scripts/profile_dump_ops.py --json ops.json          # 20,000 samples, top-10 of 1,000 classes
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import ARCH, make_teacher

from logit_cache import DumpConfig, dump_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    dim, hidden, classes = 256, 256, 1000
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher.pt")
        torch.save(make_teacher(dim, hidden, 1, classes, 4.0, 0).state_dict(), teacher)
        config = dict(teacher=teacher, arch=ARCH, arch_kwargs={"in_features": dim, "hidden": hidden, "num_classes": classes, "depth": 1},
                      dataset=str(Path(__file__).resolve().parent / "bench_dump.py") + ":synthetic_dataset",
                      dataset_kwargs={"n": args.samples, "dim": dim, "classes": classes, "seed": 0},
                      k=args.k, device="cpu", quiet=True, batch_size=256)
        dump_cache(DumpConfig(out=os.path.join(tmp, "warm-up"), **config))  # imports and first-call costs
        profile = cProfile.Profile()
        profile.enable()
        dump_cache(DumpConfig(out=os.path.join(tmp, "measured"), **config))
        profile.disable()
    stats = pstats.Stats(profile)
    ops = {name: calls for (_, _, name), (_, calls, _, _, _) in stats.stats.items()
           if "built-in method torch" in name or "of 'torch._C" in name}
    report = {"python_calls": stats.total_calls, "torch_ops": dict(sorted(ops.items())), "samples": args.samples, "k": args.k}
    print(f"{stats.total_calls} Python calls; {len(ops)} distinct torch operations, {sum(ops.values())} calls:")
    for name, calls in sorted(ops.items(), key=lambda item: -item[1]):
        print(f"  {calls:8d}  {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
