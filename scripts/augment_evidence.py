"""Evidence: augmented views in the cache (``dump --views V --seed S``) against a one-view cache, online KD and labels.

The question: a student trained on *augmented* inputs from a cache dumped on the *clean* inputs
gets, for each augmented input, the teacher's targets for another input (the clean one). Beyer et
al. 2022 ("Knowledge distillation: A good teacher is patient and consistent") find that the
teacher must see the same view as the student. ``dump --views V --seed S`` caches the teacher's
targets for V replayable augmented views of every sample and the training wrapper replays exactly
those inputs. Does that recover online KD (the teacher run on each augmented input), and what does
the one-view cache lose?

    python scripts/augment_evidence.py                 # defaults: 3 seeds, 8 views, 60 epochs: ~1.5 min on 2 idle CPU cores
    python scripts/augment_evidence.py --quick         # smoke run, a few seconds (its numbers mean nothing)

Steps, all on the built-in ``digits`` data (1,437 train, 360 test images), on the CPU:

1. a teacher (``logit_cache.tools.demo.train_digits_teacher``: ``digits_mlp`` 256 wide, 2 hidden layers)
   trained on the *clean* train split;
2. two caches of the train split, ``--full`` logits in float32 (10 classes): ``clean`` (one view,
   the clean images, the old behaviour) and ``views`` (``augment=True``, V views, seed 0);
3. a check of the replay before any training: batches served by the ``views`` cache's wrapper over
   the augmented dataset (as the trainer's sampler asks for them, ``(index, epoch)``) go through
   the teacher again and must give the cached rows; over V epochs each sample must show V
   different inputs. A failure stops the script. Also measured from the two caches: how often the
   teacher's top class on an augmented view differs from its top class on the clean image (what the
   one-view cache teaches in its place), and the mean KL between the two at T=1;
4. the same student trained on the augmented train split (``DigitsDataset(augment=True)``: shift up
   to one pixel, Gaussian noise std 0.1, horizontal flip p=0.2), evaluated on the clean test split,
   four ways for each seed: cached KD from ``clean`` (``verify="length"``: the naive cache), cached
   KD from ``views`` (replayed views), online KD (the teacher on the student's augmented input) and
   labels only. Same student, epochs, lr, temperature and loss weights (0.9 KD / 0.1 labels) for all.
   Two reference rows (skip with ``--no-reference``): the same student on the *clean* train split,
   from the clean cache and from labels, i.e. what the augmentation costs or gives at all.

Times: ``train s`` is the mean over seeds of ``TrainResult.seconds`` (the training loop, evaluation
excluded), ``(min)`` the fastest seed (other work on a shared machine only slows runs down), and
``in teacher s`` the mean time spent running the teacher (online KD). On digits the teacher is tiny (83k
weights, ~3 us a sample on 2 CPU cores), so online KD is cheap here and the replay's per-item seeding (tens of us
an item, in the data path) is not: these times show the replay's overhead, not what a cache saves
with a teacher that costs more than the student.

Seeding: each run (``run_method``) seeds torch's (``TrainConfig(seed=s)``), numpy's and Python's global generators
with ``s`` (the augmentation draws from all three), so every run is reproducible. For a seed all runs share the
student's initialisation and the order of the samples; online KD, labels only and the one-view
cache also see the very same augmented inputs, the ``views`` run its replayed views.
Methods run interleaved within each seed, so drift in machine load hits all of them alike.

Settings (chosen by a short exploration at 2 seeds, see ``STUDENT_KWARGS`` etc. below) and
per-seed results, with the dump times and sizes and the machine, go to ``--json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logit_cache import DumpConfig, TrainConfig, dump_cache, load_teacher, open_cache, train_student
from logit_cache.data import DigitsDataset, default_view
from logit_cache.format import write_json_atomic
from logit_cache.tools import STUDENT, TEACHER_ARCH, train_digits_teacher

#: ~2.4k weights against the teacher's 83k. At 2 seeds, 30 epochs, hidden 32 beat hidden 16 by 1.4 to 5.6
#: points of test accuracy for every method (T=2; labels only 4 points), with the same ordering of the methods.
STUDENT_KWARGS = {"hidden": 32, "depth": 1}
#: Exploration (hidden 32, 30 epochs, mean of 2 seeds): views cache 0.979 / 0.983 / 0.983 at T=1 / 2 / 4,
#: online KD 0.978 / 0.981 / 0.982, one-view cache 0.904 / 0.903 / 0.869. T=2 is within 0.15 points of
#: the best T of both KD methods that see matching targets and does not handicap the one-view cache (T=4 costs it 3 points).
TEMPERATURE = 2.0
#: The trainer's default lr (cosine decay to 0). 60 epochs: at 30 -> 60, every method gained 0.5
#: to 1.2 points (2 seeds), and with 8 views each view is seen 7.5 times ("patient").
EPOCHS = 60
LR = 1e-2
METHODS = {
    "naive": "cached KD, 1 clean view",
    "views": "cached KD, V replayed views",
    "online": "online KD",
    "labels": "labels only",
}
#: Reference rows, not augmented: the same student trained on the clean train split (what the
#: augmentation costs or gives at all), from the clean cache and from labels.
REFERENCE = {
    "clean_cached": "cached KD, clean inputs",
    "clean_labels": "labels only, clean inputs",
}


def machine_info() -> dict[str, Any]:
    processor = platform.processor()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        processor = names[0] if names else processor
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": processor}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def dump_caches(args: argparse.Namespace, workdir: Path, teacher: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    common: dict[str, Any] = {"teacher": str(teacher), "arch": TEACHER_ARCH, "dataset": "digits", "mode": "full",
                              "dtype": "float32", "quiet": True, "overwrite": True, "device": "cpu"}
    configs = {
        "clean": DumpConfig(out=str(workdir / "cache-clean"), dataset_kwargs={"split": "train"}, **common),
        "views": DumpConfig(out=str(workdir / f"cache-views{args.views}"), dataset_kwargs={"split": "train", "augment": True},
                            views=args.views, seed=0, **common),
    }
    paths, records = {}, {}
    for name, config in configs.items():
        started = time.perf_counter()
        result = dump_cache(config)
        records[name] = {"seconds": time.perf_counter() - started, "compute_seconds": result.compute_seconds,
                         "bytes_on_disk": result.bytes_on_disk, "rows": result.manifest.num_rows,
                         "views": result.manifest.views, "seed": result.manifest.seed, "key": result.manifest.key}
        paths[name] = Path(config.out)
        print(f"dump {name}: {records[name]['rows']} rows, {records[name]['seconds']:.2f} s, "
              f"{records[name]['bytes_on_disk'] / 1e3:.1f} kB", flush=True)
    return paths, records


def check_replay(paths: dict[str, Path], teacher_path: Path, views: int) -> dict[str, Any]:
    """The teacher on the inputs the ``views`` wrapper serves gives the cached rows; samples show V different views."""
    teacher = load_teacher(teacher_path, arch=TEACHER_ARCH, device="cpu").module
    record: dict[str, Any] = {}
    with open_cache(paths["views"]) as cache:
        wrapped = cache.wrap(DigitsDataset("train", augment=True))  # default verify: the fingerprint of view 0
        picks = np.random.default_rng(0).choice(len(wrapped), size=64, replace=False)
        worst = 0.0
        inputs_of: dict[int, list[torch.Tensor]] = {int(i): [] for i in picks[:8]}
        for epoch in range(views):
            inputs, _, target = cache.collate(wrapped.__getitems__([(int(i), epoch) for i in picks]))
            with torch.inference_mode():
                worst = max(worst, float((teacher(inputs) - target.logits.float()).abs().max()))
            for position, index in enumerate(picks[:8]):
                inputs_of[int(index)].append(inputs[position])
        distinct = min(len({x.numpy().tobytes() for x in xs}) for xs in inputs_of.values())
        shown = {int(i): sorted(int(default_view(e, np.array([i]), views)[0]) for e in range(views)) for i in picks[:8]}
    record.update({"samples": len(picks), "epochs": views, "max_abs_logit_diff": worst, "min_distinct_inputs_over_v_epochs": distinct,
                   "views_each_shown_once": all(v == list(range(views)) for v in shown.values())})
    print(f"replay check: teacher on served inputs vs cached rows, max |diff| {worst:.3g} ({len(picks)} samples x {views} epochs); "
          f"fewest distinct inputs of a sample over {views} epochs: {distinct}", flush=True)
    if worst > 1e-4 or distinct != views or not record["views_each_shown_once"]:
        raise SystemExit(f"the replay is not consistent: {record}")
    return record


def target_stats(paths: dict[str, Path], views: int) -> dict[str, Any]:
    """What the one-view cache gives an augmented input, against the teacher's own targets for it."""
    labels = DigitsDataset("train").labels.numpy()
    with open_cache(paths["clean"]) as clean, open_cache(paths["views"]) as viewed:
        clean_logits = torch.from_numpy(clean.rows(np.arange(clean.num_rows))["logits"]).float()
        view_logits = torch.from_numpy(viewed.rows(np.arange(viewed.num_rows))["logits"]).float()
    clean_rep = clean_logits.repeat_interleave(views, dim=0)  # row i*V+v: sample i's clean target
    p_view = view_logits.log_softmax(-1)
    kl = (p_view.exp() * (p_view - clean_rep.log_softmax(-1))).sum(-1)
    labels_rep = np.repeat(labels, views)
    stats = {
        "teacher_train_accuracy_clean": float((clean_logits.argmax(-1).numpy() == labels).mean()),
        "teacher_train_accuracy_augmented_views": float((view_logits.argmax(-1).numpy() == labels_rep).mean()),
        "top_class_differs_view_vs_clean": float((view_logits.argmax(-1) != clean_rep.argmax(-1)).float().mean()),
        "mean_kl_view_to_clean_t1": float(kl.mean()),
    }
    print(f"targets: the teacher's top class on an augmented view differs from the clean image's on "
          f"{stats['top_class_differs_view_vs_clean']:.1%} of views; mean KL(view || clean) at T=1 "
          f"{stats['mean_kl_view_to_clean_t1']:.3f}; "
          f"teacher accuracy on the train split: clean {stats['teacher_train_accuracy_clean']:.4f}, "
          f"augmented views {stats['teacher_train_accuracy_augmented_views']:.4f}", flush=True)
    return stats


def run_method(method: str, seed: int, args: argparse.Namespace, workdir: Path, paths: dict[str, Path], teacher: Path) -> dict[str, Any]:
    source: dict[str, Any] = {
        "naive": {"caches": [str(paths["clean"])], "verify": "length"},
        "views": {"caches": [str(paths["views"])]},
        "online": {"teacher": str(teacher), "arch": TEACHER_ARCH},
        "labels": {"labels_only": True},
        "clean_cached": {"caches": [str(paths["clean"])]},
        "clean_labels": {"labels_only": True},
    }[method]
    augment = method not in REFERENCE
    config = TrainConfig(student=STUDENT, student_kwargs=dict(STUDENT_KWARGS), out=str(workdir / f"student-{method}-seed{seed}.pt"),
                         dataset="digits", dataset_kwargs={"split": "train", "augment": augment}, eval_dataset="digits",
                         eval_dataset_kwargs={"split": "test"}, epochs=args.epochs, lr=LR, temperature=TEMPERATURE,
                         seed=seed, device="cpu", quiet=True, **source)
    # train_student() seeds torch only; the augmentation also draws from numpy's and Python's generators.
    np.random.seed(seed)
    random.seed(seed)
    load = load_average()
    result = train_student(config)
    accuracies = [epoch["eval_accuracy"] for epoch in result.epochs]
    return {"method": method, "seed": seed, "test_accuracy": result.final["eval_accuracy"], "best_epoch_accuracy": max(accuracies),
            "final_train_loss": result.final["train_loss"], "train_seconds": result.seconds,
            "teacher_seconds": result.teacher_seconds, "temperature": result.temperature, "load_before": load}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary = {}
    for method in [*METHODS, *REFERENCE]:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        accuracy = [r["test_accuracy"] for r in rows]
        summary[method] = {
            "test_accuracy_mean": statistics.fmean(accuracy),
            "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rows),
            "train_seconds_min": min(r["train_seconds"] for r in rows),  # other work on the machine only ever slows a run
            "teacher_seconds_mean": statistics.fmean(r["teacher_seconds"] for r in rows),
            "seeds": len(rows),
        }
    return summary


def table(summary: dict[str, dict[str, float]], dumps: dict[str, Any], views: int, seeds: int) -> str:
    lines = [f"{'method':<30} {f'test acc (mean ± std, {seeds} seeds)':>34} {'train s':>8} {'(min)':>6} {'in teacher s':>13}"]
    for method, label in [*METHODS.items(), *REFERENCE.items()]:
        if method not in summary:
            continue
        if method == next(iter(REFERENCE)):
            lines.append("reference, the same student on the clean (not augmented) train split:")
        row = summary[method]
        lines.append(f"{label.replace('V ', f'{views} '):<30} {row['test_accuracy_mean']:>25.4f} ± {row['test_accuracy_std']:.4f} "
                     f"{row['train_seconds_mean']:>8.2f} {row['train_seconds_min']:>6.2f} {row['teacher_seconds_mean']:>13.2f}")
    clean, viewed = dumps["clean"], dumps["views"]
    lines.append(f"dumps: 1 clean view {clean['seconds']:.2f} s, {clean['bytes_on_disk'] / 1e3:.0f} kB ({clean['rows']} rows); "
                 f"{views} views {viewed['seconds']:.2f} s, {viewed['bytes_on_disk'] / 1e3:.0f} kB ({viewed['rows']} rows)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, help="students per method, seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=int, help=f"student epochs (default {EPOCHS}; 2 with --quick)")
    parser.add_argument("--views", type=int, help="views per sample in the views cache (default 8; 2 with --quick)")
    parser.add_argument("--workdir", help="where the teacher, caches and students go (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--json", help="where to write results (default data/augment_evidence.json; "
                        "data/augment_evidence_quick.json with --quick)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference rows (the student on clean inputs)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (its numbers mean nothing)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (2 if args.quick else EPOCHS)
    args.views = args.views or (2 if args.quick else 8)
    args.json = args.json or ("data/augment_evidence_quick.json" if args.quick else "data/augment_evidence.json")
    if min(args.seeds, args.epochs) < 1 or args.views < 2:
        parser.error("--seeds and --epochs must be >= 1 and --views >= 2")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    teacher = workdir / "teacher.pt"
    teacher_started = time.perf_counter()
    teacher_accuracy = train_digits_teacher(teacher, epochs=5 if args.quick else 40)
    teacher_seconds = time.perf_counter() - teacher_started
    print(f"teacher: clean test accuracy {teacher_accuracy:.4f}, trained in {teacher_seconds:.1f} s", flush=True)
    paths, dumps = dump_caches(args, workdir, teacher)
    replay = check_replay(paths, teacher, args.views)
    stats = target_stats(paths, args.views)
    runs = []
    for seed in range(args.seeds):
        for method in [*METHODS, *([] if args.no_reference else REFERENCE)]:
            runs.append(run_method(method, seed, args, workdir, paths, teacher))
            r = runs[-1]
            print(f"seed {seed} {method:<12}: test accuracy {r['test_accuracy']:.4f}, {r['train_seconds']:.2f} s "
                  f"({r['teacher_seconds']:.2f} s in the teacher)", flush=True)
    summary = summarize(runs)
    return {
        "what": "augmented digits students: one-view cache vs replayed views vs online KD vs labels (scripts/augment_evidence.py)",
        "command": " ".join(["python", sys.argv[0], *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"student": STUDENT, "student_kwargs": STUDENT_KWARGS, "epochs": args.epochs, "lr": LR,
                     "temperature": TEMPERATURE, "kd_loss_weight": 0.9, "org_loss_weight": 0.1, "batch_size": 64,
                     "views": args.views, "dump_seed": 0, "seeds": args.seeds, "quick": args.quick,
                     "reference": not args.no_reference},
        "teacher": {"arch": TEACHER_ARCH, "clean_test_accuracy": teacher_accuracy, "train_seconds": teacher_seconds},
        "dumps": dumps, "replay_check": replay, "targets": stats, "runs": runs, "summary": summary,
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"load average {load_average()}; {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, workdir)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="logit-cache-augment-"))
        try:
            results = run(args, workdir)
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results["summary"], results["dumps"], args.views, args.seeds))
    print(f"total {results['total_seconds']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.json), results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
