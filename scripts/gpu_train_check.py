"""GPU checks of training from a cache (run by scripts/gpu_check.sh; needs a CUDA GPU; not a test).

1. Cached full-mode float32 KD on cuda trains the same student as online KD on cuda (same seed,
   order and loss). cuBLAS may choose other kernels for the dump's batches of 256 than for the
   trainer's batches of 64, so the teacher logits can differ in the last bits; the check allows
   1e-4 on any weight after 3 epochs (a misalignment moves weights by 1e-2 or more).
2. The loader path on cuda: top-5 float16 cache, 2 workers, pinned host memory, asynchronous
   copies. Checks that batches arrive pinned and that targets land on the GPU as float32/int64.

    python scripts/gpu_train_check.py --out data/gpu_train_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from logit_cache import DumpConfig, TrainConfig, dump_cache, open_cache, train_student
from logit_cache.data import DigitsDataset
from logit_cache.tools import STUDENT, STUDENT_KWARGS, TEACHER_ARCH, train_digits_teacher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/gpu_train_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_check: no CUDA GPU", file=sys.stderr)
        return 2
    report: dict = {"card": torch.cuda.get_device_name(0), "torch_version": torch.__version__}
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        work = Path(tmp)
        teacher = work / "teacher.pt"
        report["teacher_accuracy"] = train_digits_teacher(teacher)
        for name, mode, k, dtype, precision in (("full32", "full", None, "float32", "fp32"), ("top5", "topk", 5, "float16", "bf16")):
            dump_cache(DumpConfig(teacher=str(teacher), arch=TEACHER_ARCH, dataset="digits", out=str(work / name), mode=mode, k=k,
                                  dtype=dtype, precision=precision, device="cuda", quiet=True))
        common = {"student": STUDENT, "student_kwargs": STUDENT_KWARGS, "dataset": "digits", "epochs": 3, "device": "cuda",
                  "temperature": 4.0, "quiet": True, "eval_dataset": "digits", "eval_dataset_kwargs": {"split": "test"}}
        cached = train_student(TrainConfig(out=str(work / "cached.pt"), caches=[str(work / "full32")], **common))
        online = train_student(TrainConfig(out=str(work / "online.pt"), teacher=str(teacher), arch=TEACHER_ARCH, **common))
        a, b = torch.load(cached.out, weights_only=True), torch.load(online.out, weights_only=True)
        diff = max((a[n] - b[n]).abs().max().item() for n in a)
        report["cached_vs_online_max_weight_diff"] = diff
        report["cached"] = {"accuracy": cached.final["eval_accuracy"], "seconds": cached.seconds}
        report["online"] = {"accuracy": online.final["eval_accuracy"], "seconds": online.seconds, "teacher_seconds": online.teacher_seconds}
        print(f"1. cached vs online KD on cuda: max |weight diff| {diff:.3g} (allowed 1e-4); accuracy "
              f"{cached.final['eval_accuracy']:.4f} vs {online.final['eval_accuracy']:.4f}")
        if diff > 1e-4:
            failures.append(f"cached and online KD weights differ by {diff:.3g} on cuda")

        cache = open_cache(work / "top5")
        loader = DataLoader(cache.wrap(DigitsDataset("train")), batch_size=64, sampler=cache.sampler(seed=0),
                            collate_fn=cache.collate, num_workers=2, pin_memory=True)
        model = torch.nn.Linear(64, 10).cuda()
        pinned = seen = 0
        for inputs, labels, target in loader:
            pinned += int(inputs.is_pinned() and labels.is_pinned() and target.values.is_pinned() and target.indices.is_pinned())
            on_gpu = target.to("cuda", non_blocking=True)
            assert on_gpu.values.dtype == torch.float32 and on_gpu.indices.dtype == torch.int64 and on_gpu.values.is_cuda
            model(inputs.cuda(non_blocking=True).flatten(1))
            seen += len(inputs)
        torch.cuda.synchronize()
        report["loader"] = {"batches_pinned": pinned, "samples": seen}
        print(f"2. loader on cuda: {pinned} pinned batches, {seen} samples, targets float32/int64 on the GPU")
        if seen != len(DigitsDataset("train")) or pinned == 0:
            failures.append(f"loader: {seen} samples, {pinned} pinned batches")
    report["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    for failure in failures:
        print(f"gpu_train_check: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
