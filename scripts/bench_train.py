"""Benchmark: training a student from a cache, against labels only and against online distillation.

The goals for training from a cache: an epoch of cached KD costs at most 1.10x an epoch of
labels-only training (cached/labels <= 1.10), online KD (the teacher run on every batch) costs at
least 5x cached KD (online/cached >= 5), and the reader serves shuffled top-k rows from disk at
>= 500k rows/s, at least 0.8x its sequential speed. This script measures all of them on a
synthetic workload where the teacher's forward costs about 10x the student's training step.

    python scripts/bench_train.py                 # defaults: ~3.5 min on 2 idle CPU cores
    python scripts/bench_train.py --quick         # smoke run, well under a minute (its ratios mean little)

Workload: ``--samples`` random float32 vectors of ``--dim`` features with int labels in
``[0, --classes)``, held in memory as a map-style dataset of ``(input, label)`` items
(``bench_dump.synthetic_dataset``, the dump benchmark's workload). The teacher is a
``logit_cache.tools.models.digits_mlp`` (``--teacher-depth`` hidden layers of ``--teacher-hidden``), random
but seeded, with its head rescaled so its logits have standard deviation ``--logit-std`` (peaked like a
trained teacher's; ``bench_dump.make_teacher``); it is saved as a state_dict and dumped with
``arch="logit_cache.tools.models:digits_mlp"`` and ``dataset="scripts/bench_dump.py:synthetic_dataset"``.
The student is a ``digits_mlp`` with ``--student-depth`` hidden layers of ``--student-hidden``. Four caches are dumped: top-k
and full logits (float16), each in every storage backend (zarr and hdf5).

What is timed:

1. **Cost model**: the teacher's forward on a batch (``torch.inference_mode``) over the student's
   training step (forward, CE backward, AdamW step) on the same batch; also the student's step with
   the KD loss against a fixed top-k and full target (what the loss alone adds); medians of
   interleaved blocks of steps.
2. **Epochs** (one full pass, ``--batch-size``, AdamW, a fresh copy of the same initial student
   each time), interleaved per repeat so that drift in machine load hits all variants alike:
   ``labels`` (CE only, a plain DataLoader over the dataset with a ``ChunkShuffleSampler``),
   ``cached`` for each cache (a DataLoader over ``cache.wrap(ds)`` with ``cache.sampler(shuffle=True,
   seed=0)`` and ``cache.collate``; loss ``DistillationLoss(KLDivergence(4.0), 0.9, 0.1)``, the
   trainer's, which fuses its CE and KD terms into one pass; caches
   opened with the default ``in_memory=None``, which holds these small caches in memory), the top-k
   zarr cache read from disk (``in_memory=False``), with 2 workers, with CE alone (the cache is
   read but its targets unused: the data path's share of the overhead), with the loss unfused
   (``0.1 * cross_entropy + 0.9 * kd_loss``: the loss before the fused pass, for a before/after in
   one run), and ``online`` (the teacher
   on every batch, the same loss with its logits as target). Opening and wrapping (fingerprint check,
   loading) happen before the clock starts and are reported as ``setup s``; an epoch with workers
   includes starting them. ``data s`` is the time the loop waited on the loader (starting workers
   included), ``step ms`` the rest of the epoch per step (forward, loss, backward, optimizer).
3. **Reader throughput** (top-k caches, page cache warm; a fresh ``LogitCache`` per repetition,
   since its chunk cache lives in the object): (a) ``cache.rows(batch)`` over the sampler's shuffled
   order, ``in_memory=False``; (b) the same rows fancy-indexed from numpy arrays in memory (the upper
   bound); (c) ``shuffle=False`` order through the same reader; (d) shuffled with ``in_memory=True``
   (loading excluded); (e) whole DataLoaders over ``cache.wrap(ds)`` (inputs, labels and targets)
   with 0 and 2 workers, ``in_memory=False``, next to the same DataLoader over the bare dataset;
   (f) eviction: ``chunk_cache_bytes`` set to ``--evict-fraction`` of the decoded cache (at least 2
   chunks), for the top-k and the full cache, with the cache's own chunk-aware sampler, and (g) the
   same small top-k chunk cache read in a plain permutation (a sampler that ignores chunks).
   ``decodes`` counts chunk reads per epoch (one read per chunk and array, divided by the arrays),
   against ``chunks`` in the cache.

Ratios are medians of per-repeat ratios (paired within a repeat); ``best`` columns use the fastest
run of each variant (other work only ever slows a run down). Everything, with the 1-minute load
average around each measurement, goes to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from logit_cache import (
    ChunkShuffleSampler,
    DistillationLoss,
    DumpConfig,
    KLDivergence,
    LogitCache,
    Targets,
    dump_cache,
    kd_loss,
    open_cache,
)
from logit_cache.store import BACKENDS
from logit_cache.targets import index_dtype
from logit_cache.tools import digits_mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import ARCH, SyntheticDataset, machine_info, make_teacher, scratch_dir, synthetic_dataset, table, timed, write_report

BENCH_DUMP = Path(__file__).resolve().parent / "bench_dump.py"
ALL_BACKENDS = tuple(BACKENDS)
ALL_MODES = ("topk", "full")
TEMPERATURE = 4.0
KD_WEIGHT, CE_WEIGHT = 0.9, 0.1
GOALS = {
    "cached_over_labels": 1.10,  # at most
    "online_over_cached": 5.0,  # at least
    "shuffled_rows_per_s": 500_000,  # at least, (a)
    "shuffled_over_sequential": 0.8,  # at least, (a)/(c)
}


# --------------------------------------------------------------------------------------------------
# The synthetic workload (the dump imports these through "<this file>:name" specs)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def distillation_loss() -> DistillationLoss:
    """The trainer's loss: ``KD_WEIGHT * KL_T + CE_WEIGHT * CE`` (fused into one pass for one teacher)."""
    return DistillationLoss(KLDivergence(TEMPERATURE), kd_loss_weight=KD_WEIGHT, org_loss_weight=CE_WEIGHT)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_of(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def count_decodes(cache: LogitCache) -> list[int]:
    """Count the shard reads the cache makes from now on (one per chunk and array); returns the counter."""
    counter = [0]
    opened = cache.shard

    def shard(position: int) -> Any:
        reader = opened(position)
        if not getattr(reader, "_bench_counted", False):
            read = reader.read

            def counted(name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
                counter[0] += 1
                return read(name, start, stop)

            reader.read = counted
            reader._bench_counted = True
        return reader

    cache.shard = shard  # instance attribute: _fill and read call self.shard(...)
    return counter


def _progress(what: str, record: dict[str, Any], extra: str = "") -> None:
    print(f"  {what}: {record['wall_s']:.3f} s wall, {record['cpu_s']:.2f} s CPU, load {record['load_before']:.1f}{extra}",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Cost model: teacher forward vs student step
# --------------------------------------------------------------------------------------------------


def time_cost_model(teacher: nn.Module, student: nn.Module, ds: SyntheticDataset, batch_size: int, k: int,
                    steps: int) -> dict[str, Any]:
    """Median ms of: the teacher's forward, the student's CE step, and the student's step with the KD loss
    against a top-k and a full target of the same batch (in storage dtypes, as a cache delivers them)."""
    device = next(teacher.parameters()).device
    inputs, labels = ds.inputs[:batch_size].to(device), ds.labels[:batch_size].to(device)
    with torch.inference_mode():
        logits = teacher(inputs).float().cpu()
    values, ids = logits.topk(k, dim=1)
    topk = Targets.from_arrays("topk", logits.shape[1], {
        "topk_logits": values.half().numpy(), "topk_indices": ids.numpy().astype(index_dtype(logits.shape[1])),
        "logsumexp": logits.logsumexp(dim=1).numpy()})
    full = Targets.from_arrays("full", logits.shape[1], {"logits": logits.half().numpy()})
    student = copy.deepcopy(student).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    criterion = distillation_loss()

    def student_step(target: Targets | None = None, fused: bool = True) -> None:
        out = student(inputs)
        if target is None:
            loss = F.cross_entropy(out, labels)
        elif fused:  # the trainer's loss: CE and KD in one pass (losses/fused.py)
            loss = criterion(out, labels, target)
        else:  # the two public functions, summed: what DistillationLoss did before the fused pass
            loss = CE_WEIGHT * F.cross_entropy(out, labels) + KD_WEIGHT * kd_loss(out, target, temperature=TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def teacher_forward() -> None:
        with torch.inference_mode():
            teacher(inputs)

    fns: dict[str, Callable[[], None]] = {
        "student_step": student_step,
        "teacher_forward": teacher_forward,
        "student_step_kd_topk": lambda: student_step(topk),
        "student_step_kd_full": lambda: student_step(full),
        "student_step_kd_topk_unfused": lambda: student_step(topk, fused=False),
        "student_step_kd_full_unfused": lambda: student_step(full, fused=False),
    }
    for fn in fns.values():
        fn()
    # Rounds of ``block`` consecutive calls of each, so that every one runs warm (not just after the
    # teacher has flushed the caches) and drift hits all alike; medians over all calls.
    block = 5
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, steps // block)):
        for name, fn in fns.items():
            for _ in range(block):
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    ms = {f"{name}_ms": statistics.median(values) * 1e3 for name, values in times.items()}
    return {**ms, "teacher_over_student": ms["teacher_forward_ms"] / ms["student_step_ms"], "steps": steps, "times_s": times}


# --------------------------------------------------------------------------------------------------
# 2. Epochs
# --------------------------------------------------------------------------------------------------


class EpochVariant:
    """One way of training an epoch: what loader it builds and what loss it takes."""

    def __init__(self, name: str, kind: str, backend: str | None = None, mode: str | None = None, path: Path | None = None,
                 in_memory: bool | None = None, workers: int = 0, kd: bool = True, fused: bool = True) -> None:
        self.name, self.kind, self.backend, self.mode, self.path = name, kind, backend, mode, path
        self.in_memory, self.workers = in_memory, workers
        self.kd = kd and kind != "labels"  # False: read the cache but train on CE alone (the data path's cost)
        self.fused = fused  # False: kd_loss + cross_entropy summed, the loss before losses/fused.py

    def describe(self) -> dict[str, Any]:
        return {"variant": self.name, "kind": self.kind, "backend": self.backend, "mode": self.mode,
                "in_memory": self.in_memory, "workers": self.workers, "kd": self.kd, "fused": self.fused}


def make_epoch_loader(variant: EpochVariant, ds: SyntheticDataset, batch_size: int,
                      pin: bool = False) -> tuple[DataLoader, LogitCache | None]:
    """The DataLoader of one epoch (and its cache), built before the clock starts; ``pin``: pinned batches (GPU)."""
    if variant.kind == "cached":
        assert variant.path is not None
        cache = open_cache(variant.path, in_memory=variant.in_memory)
        wrapped = cache.wrap(ds)  # checks the fingerprint and loads an in-memory cache
        loader = DataLoader(wrapped, batch_size=batch_size, sampler=cache.sampler(shuffle=True, seed=0),
                            collate_fn=cache.collate, num_workers=variant.workers, pin_memory=pin)
        return loader, cache
    sampler = ChunkShuffleSampler(len(ds), shuffle=True, seed=0)  # a plain seeded permutation
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=variant.workers, pin_memory=pin), None


def run_epoch(variant: EpochVariant, loader: DataLoader, student: nn.Module, teacher: nn.Module,
              max_batches: int | None = None) -> dict[str, Any]:
    """Train ``student`` (in place) for one pass of ``loader``; returns steps, data-wait seconds and the last loss."""
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    criterion = distillation_loss()
    steps, loss = 0, None
    started = time.perf_counter()
    iterator = iter(loader)  # starts workers, if any: counted as waiting on data
    data_s = time.perf_counter() - started
    while max_batches is None or steps < max_batches:
        waited = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        data_s += time.perf_counter() - waited
        if variant.kind == "cached":
            inputs, labels, target = batch
        else:
            inputs, labels = batch
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = student(inputs)
        if variant.kind == "online":
            with torch.inference_mode():
                target = teacher(inputs).clone()  # an ordinary tensor, as the trainer passes it
        if variant.kind == "labels" or not variant.kd:
            loss = F.cross_entropy(logits, labels)
        elif variant.fused:
            loss = criterion(logits, labels, target)
        else:
            loss = CE_WEIGHT * F.cross_entropy(logits, labels) + KD_WEIGHT * kd_loss(logits, target, temperature=TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    loss_value = float("nan") if loss is None else float(loss.detach())  # one sync, at the end (GPU)
    del iterator  # shuts workers down
    return {"steps": steps, "data_s": data_s, "last_loss": loss_value}


def time_epoch(variant: EpochVariant, ds: SyntheticDataset, batch_size: int, student0: nn.Module, teacher: nn.Module,
               max_batches: int | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {}
    setup_started = time.perf_counter()
    device = next(teacher.parameters()).device
    loader, cache = make_epoch_loader(variant, ds, batch_size, pin=device.type == "cuda")
    student = copy.deepcopy(student0).to(device).train()
    record["setup_s"] = time.perf_counter() - setup_started
    with timed(record):
        record.update(run_epoch(variant, loader, student, teacher, max_batches))
    if cache is not None:
        cache.close()
    return record


def summarize_epochs(records: list[dict[str, Any]], variants: list[EpochVariant], samples: int) -> list[dict[str, Any]]:
    by = {(r["repeat"], r["variant"]): r for r in records}
    repeats = sorted({r["repeat"] for r in records})
    rows = []
    for variant in variants:
        mine = [by[(i, variant.name)] for i in repeats]
        labels = [by[(i, "labels")] for i in repeats]
        online = [by[(i, "online")] for i in repeats] if any(v.name == "online" for v in variants) else []
        row = {
            **variant.describe(),
            "repeats": len(mine),
            "epoch_s": statistics.median(r["wall_s"] for r in mine),
            "best_s": min(r["wall_s"] for r in mine),
            "epochs_s": [r["wall_s"] for r in mine],
            "data_s": statistics.median(r["data_s"] for r in mine),
            "setup_s": statistics.median(r["setup_s"] for r in mine),
            "cpu_s": statistics.median(r["cpu_s"] for r in mine),
            "samples_per_s": samples / statistics.median(r["wall_s"] for r in mine),
            "steps": mine[-1]["steps"],
            "step_ms": statistics.median((r["wall_s"] - r["data_s"]) / max(1, r["steps"]) for r in mine) * 1e3,
            "last_loss": mine[-1]["last_loss"],
            "over_labels": statistics.median(r["wall_s"] / p["wall_s"] for r, p in zip(mine, labels, strict=True)),
            "best_over_labels": min(r["wall_s"] for r in mine) / min(p["wall_s"] for p in labels),
        }
        if online:
            row["online_over_this"] = statistics.median(o["wall_s"] / r["wall_s"] for r, o in zip(mine, online, strict=True))
            row["best_online_over_this"] = min(o["wall_s"] for o in online) / min(r["wall_s"] for r in mine)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# 3. Reader throughput
# --------------------------------------------------------------------------------------------------


class ReadCase:
    """One reader-throughput measurement: ``run()`` does one timed epoch on fresh objects and returns rows and decodes."""

    def __init__(self, name: str, label: str, backend: str, mode: str, goal: str | None,
                 run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.name, self.label, self.backend, self.mode, self.goal, self.run = name, label, backend, mode, goal, run


def reader_cases(paths: dict[tuple[str, str], Path], ds: SyntheticDataset, args: argparse.Namespace) -> list[ReadCase]:
    batch_size = args.batch_size
    cases: list[ReadCase] = []

    def rows_case(path: Path, in_memory: bool, order_of: Callable[[LogitCache], np.ndarray], chunk_cache_bytes: int | None = None,
                  ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def run(record: dict[str, Any]) -> dict[str, Any]:
            kwargs = {} if chunk_cache_bytes is None else {"chunk_cache_bytes": chunk_cache_bytes}
            cache = open_cache(path, in_memory=in_memory, **kwargs)  # fresh: an empty chunk cache
            batches = batches_of(order_of(cache), batch_size)
            if in_memory:
                started = time.perf_counter()
                cache.load()
                record["load_s"] = time.perf_counter() - started
            decodes = count_decodes(cache)
            rows = 0
            with timed(record):
                for batch in batches:
                    rows += len(next(iter(cache.rows(batch).values())))
            info = {"rows": rows, "decodes": decodes[0] / len(cache.names), "chunks": cache.num_chunks, "slots": cache.slots}
            cache.close()
            return info
        return run

    def numpy_case(path: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
        with open_cache(path, in_memory=False) as cache:
            arrays = {name: cache.read(name) for name in cache.names}
            order = cache.sampler(shuffle=True, seed=0).indices()

        def run(record: dict[str, Any]) -> dict[str, Any]:
            rows = 0
            with timed(record):
                for batch in batches_of(order, batch_size):
                    rows += len(next(iter({name: array[batch] for name, array in arrays.items()}.values())))
            return {"rows": rows}
        return run

    def loader_case(path: Path | None, workers: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def run(record: dict[str, Any]) -> dict[str, Any]:
            if path is None:
                loader = DataLoader(ds, batch_size=batch_size, sampler=ChunkShuffleSampler(len(ds), shuffle=True, seed=0),
                                    num_workers=workers)
            else:
                cache = open_cache(path, in_memory=False)
                loader = DataLoader(cache.wrap(ds), batch_size=batch_size, sampler=cache.sampler(shuffle=True, seed=0),
                                    collate_fn=cache.collate, num_workers=workers)
            rows = 0
            with timed(record):
                for batch in loader:
                    rows += len(batch[1])
            return {"rows": rows}
        return run

    def shuffled(cache: LogitCache) -> np.ndarray:
        return cache.sampler(shuffle=True, seed=0).indices()

    def sequential(cache: LogitCache) -> np.ndarray:
        return cache.sampler(shuffle=False).indices()

    def permutation(cache: LogitCache) -> np.ndarray:
        return ChunkShuffleSampler(cache.num_samples, shuffle=True, seed=0).indices()

    def small_cache_bytes(path: Path) -> int:
        with open_cache(path, in_memory=False) as cache:
            chunk_bytes = cache.chunk_rows * cache.row_bytes
            return max(2 * chunk_bytes, int(args.evict_fraction * cache.nbytes) // chunk_bytes * chunk_bytes)

    for backend in args.backends:
        topk = paths.get((backend, "topk"))
        if topk is None:
            continue
        cases += [
            ReadCase("a_shuffled", "(a) rows(), shuffled, disk", backend, "topk", "a", rows_case(topk, False, shuffled)),
            ReadCase("b_numpy", "(b) numpy fancy index, shuffled", backend, "topk", None, numpy_case(topk)),
            ReadCase("c_sequential", "(c) rows(), sequential, disk", backend, "topk", None, rows_case(topk, False, sequential)),
            ReadCase("d_in_memory", "(d) rows(), shuffled, in_memory", backend, "topk", None, rows_case(topk, True, shuffled)),
            ReadCase("e_loader_w0", "(e) DataLoader(wrap), 0 workers", backend, "topk", None, loader_case(topk, 0)),
            ReadCase("e_loader_w2", "(e) DataLoader(wrap), 2 workers", backend, "topk", None, loader_case(topk, 2)),
        ]
        small = small_cache_bytes(topk)
        cases += [
            ReadCase("f_evict_topk", "(f) rows(), shuffled, small chunk cache", backend, "topk", None,
                     rows_case(topk, False, shuffled, small)),
            ReadCase("g_evict_perm", "(g) small chunk cache, plain permutation", backend, "topk", None,
                     rows_case(topk, False, permutation, small)),
        ]
        full = paths.get((backend, "full"))
        if full is not None:
            cases.append(ReadCase("f_evict_full", "(f) rows(), shuffled, small chunk cache", backend, "full", None,
                                  rows_case(full, False, shuffled, small_cache_bytes(full))))
    cases.append(ReadCase("e_plain_w0", "(e') DataLoader(dataset), 0 workers, no cache", "-", "-", None, loader_case(None, 0)))
    cases.append(ReadCase("e_plain_w2", "(e') DataLoader(dataset), 2 workers, no cache", "-", "-", None, loader_case(None, 2)))
    return cases


def summarize_reads(records: list[dict[str, Any]], cases: list[ReadCase]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        mine = [r for r in records if (r["case"], r["backend"], r["mode"]) == (case.name, case.backend, case.mode)]
        rates = [r["rows"] / r["wall_s"] for r in mine]
        row = {"case": case.name, "label": case.label, "backend": case.backend, "mode": case.mode, "repeats": len(mine),
               "rows_per_s": statistics.median(rates), "best_rows_per_s": max(rates), "rates": rates,
               "seconds": statistics.median(r["wall_s"] for r in mine)}
        for key in ("decodes", "chunks", "slots", "load_s"):
            if key in mine[-1]:
                row[key] = statistics.median(r[key] for r in mine)
        rows.append(row)
    # (a)/(c), paired per repeat
    for backend in {c.backend for c in cases}:
        a = [r for r in records if (r["case"], r["backend"]) == ("a_shuffled", backend)]
        c = [r for r in records if (r["case"], r["backend"]) == ("c_sequential", backend)]
        if a and c:
            ratio = statistics.median((x["rows"] / x["wall_s"]) / (y["rows"] / y["wall_s"]) for x, y in zip(a, c, strict=True))
            for row in rows:
                if (row["case"], row["backend"]) == ("a_shuffled", backend):
                    row["over_sequential"] = ratio
    return rows


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_epochs(rows: list[dict[str, Any]]) -> str:
    header = ["variant", "workers", "epoch s", "best s", "data s", "step ms", "setup s", "samp/s", "vs labels", "goal <= 1.10",
              "online/this", "goal >= 5", "last loss"]
    lines = []
    for row in rows:
        cached = row["kind"] == "cached" and row["kd"]
        over = row["over_labels"]
        online = row.get("online_over_this")
        lines.append([
            row["variant"],
            str(row["workers"]),
            f"{row['epoch_s']:.2f}",
            f"{row['best_s']:.2f}",
            f"{row['data_s']:.2f}",
            f"{row['step_ms']:.2f}",
            f"{row['setup_s']:.2f}",
            f"{row['samples_per_s']:,.0f}",
            f"{over:.3f}",
            verdict(over <= GOALS["cached_over_labels"]) if cached else "-",
            "-" if online is None else f"{online:.2f}",
            verdict(online >= GOALS["online_over_cached"]) if cached and online is not None else "-",
            f"{row['last_loss']:.3f}",
        ])
    return table(header, lines)


def format_reads(rows: list[dict[str, Any]]) -> str:
    header = ["case", "backend", "mode", "rows/s", "best rows/s", "goal", "decodes/chunks", "slots"]
    lines = []
    for row in rows:
        goal = "-"
        if row["case"] == "a_shuffled":
            ratio = row.get("over_sequential")
            goal = f">= 500k {verdict(row['rows_per_s'] >= GOALS['shuffled_rows_per_s'])}"
            if ratio is not None:
                goal += f"; (a)/(c) {ratio:.2f} >= 0.8 {verdict(ratio >= GOALS['shuffled_over_sequential'])}"
        decodes = f"{row['decodes']:.0f}/{row['chunks']:.0f}" if "decodes" in row else "-"
        if "load_s" in row:
            decodes = f"load {row['load_s']:.3f} s"
        lines.append([row["label"], row["backend"], row["mode"], f"{row['rows_per_s']:,.0f}", f"{row['best_rows_per_s']:,.0f}",
                      goal, decodes, f"{row['slots']:.0f}" if "slots" in row and "load_s" not in row else "-"])
    return table(header, lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="dataset size (default 50000; 4096 with --quick)")
    parser.add_argument("--dim", type=int, default=256, help="input features (default 256)")
    parser.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    parser.add_argument("--teacher-hidden", type=int, help="teacher hidden width (default 3584; 1024 with --quick)")
    parser.add_argument("--teacher-depth", type=int, default=3, help="teacher hidden layers (default 3)")
    parser.add_argument("--student-hidden", type=int, default=512, help="student hidden width (default 512)")
    parser.add_argument("--student-depth", type=int, default=1, help="student hidden layers (default 1)")
    parser.add_argument("--logit-std", type=float, default=4.0, help="std of the teacher's logits (default 4)")
    parser.add_argument("--k", type=int, default=10, help="top-k size (default 10)")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help=f"comma list of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--repeats", type=int, help="timed epochs per variant, interleaved (default 3; 1 with --quick)")
    parser.add_argument("--read-repeats", type=int, help="timed passes per reader case (default 5; 2 with --quick)")
    parser.add_argument("--evict-fraction", type=float, default=0.125,
                        help="chunk cache of the eviction cases, as a fraction of the decoded cache (default 0.125; at least 2 chunks)")
    parser.add_argument("--skip-epochs", action="store_true", help="only the cost model and the reader throughput")
    parser.add_argument("--skip-reads", action="store_true", help="only the cost model and the epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and the data (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the teacher and student run (default cpu); "
                        "on cuda the loaders pin memory and the dumps run there too")
    parser.add_argument("--dump-precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of the dumps (default fp32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (small sizes, under a minute; its ratios mean little)")
    parser.add_argument("--json", default="data/bench_train.json", help="where to write results (default data/bench_train.json)")
    parser.add_argument("--workdir", help="scratch directory for the teacher and caches (default: a fresh temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--reuse", action="store_true",
                        help="with --workdir: reuse complete caches of the same teacher and data there instead of dumping again")
    args = parser.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (4_096 if quick else 50_000)
    args.teacher_hidden = args.teacher_hidden or (1024 if quick else 3584)
    args.repeats = args.repeats or (1 if quick else 3)
    args.read_repeats = args.read_repeats or (2 if quick else 5)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in ALL_BACKENDS for b in args.backends):
        parser.error(f"--backends: use a comma list of {', '.join(ALL_BACKENDS)}")
    if min(args.samples, args.dim, args.classes, args.teacher_hidden, args.student_hidden, args.repeats, args.read_repeats) < 1:
        parser.error("sizes and repeats must be positive")
    if not 1 <= args.k <= args.classes or not 0 < args.evict_fraction <= 1:
        parser.error("--k must be in [1, --classes] and --evict-fraction in (0, 1]")
    return args


def dump_caches(args: argparse.Namespace, workdir: Path, teacher_path: Path, arch_kwargs: dict[str, Any],
                dataset_kwargs: dict[str, Any]) -> tuple[dict[tuple[str, str], Path], list[dict[str, Any]]]:
    paths, records = {}, []
    for backend in args.backends:
        for mode in ALL_MODES:
            out = workdir / f"cache-{backend}-{mode}"
            config = DumpConfig(teacher=str(teacher_path), arch=ARCH, arch_kwargs=arch_kwargs,
                                dataset=f"{BENCH_DUMP}:synthetic_dataset", dataset_kwargs=dataset_kwargs, out=str(out),
                                mode=mode, k=args.k if mode == "topk" else None, dtype="float16", backend=backend,
                                batch_size=args.batch_size, num_workers=0, device=args.device,
                                precision=args.dump_precision, overwrite=not args.reuse, resume=args.reuse, quiet=True)
            record: dict[str, Any] = {"backend": backend, "mode": mode}
            with timed(record):
                result = dump_cache(config)
            record.update({"bytes_on_disk": result.bytes_on_disk, "compute_s": result.compute_seconds,
                           "mean_topk_mass": result.mean_topk_mass, "chunk_rows": result.manifest.chunk_rows,
                           "shards": len(result.manifest.shards), "reused": result.reused})
            _progress(f"dump {backend} {mode}", record)
            paths[(backend, mode)] = out
            records.append(record)
    return paths, records


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    dataset_kwargs = {"n": args.samples, "dim": args.dim, "classes": args.classes, "seed": args.seed}
    ds = synthetic_dataset(**dataset_kwargs)
    arch_kwargs = {"in_features": args.dim, "hidden": args.teacher_hidden, "depth": args.teacher_depth, "num_classes": args.classes}
    teacher = make_teacher(args.dim, args.teacher_hidden, args.teacher_depth, args.classes, args.logit_std, args.seed)
    teacher_path = workdir / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_path)
    teacher = teacher.to(args.device)
    torch.manual_seed(args.seed + 7)
    student0 = digits_mlp(in_features=args.dim, hidden=args.student_hidden, depth=args.student_depth, num_classes=args.classes)
    report: dict[str, Any] = {}

    cost = time_cost_model(teacher, student0, ds, args.batch_size, args.k, steps=5 if args.quick else 30)
    report["cost_model"] = cost
    print(f"cost model: teacher forward {cost['teacher_forward_ms']:.1f} ms, student step {cost['student_step_ms']:.1f} ms "
          f"per batch of {args.batch_size}: ratio {cost['teacher_over_student']:.1f} (target ~10)", file=sys.stderr, flush=True)

    paths, dumps = dump_caches(args, workdir, teacher_path, arch_kwargs, dataset_kwargs)
    report["dumps"] = dumps

    if not args.skip_epochs:
        variants = [EpochVariant("labels", "labels")]
        for backend in args.backends:
            for mode in ALL_MODES:
                variants.append(EpochVariant(f"cached {backend} {mode}", "cached", backend, mode, paths[(backend, mode)]))
        first = args.backends[0]
        variants.append(EpochVariant(f"cached {first} topk disk", "cached", first, "topk", paths[(first, "topk")], in_memory=False))
        variants.append(EpochVariant(f"cached {first} topk w2", "cached", first, "topk", paths[(first, "topk")], workers=2))
        variants.append(EpochVariant(f"cached {first} topk, CE only", "cached", first, "topk", paths[(first, "topk")], kd=False))
        for mode in ALL_MODES:  # the loss before the fused pass, in the same run: the before/after of that lever
            variants.append(EpochVariant(f"cached {first} {mode}, unfused", "cached", first, mode, paths[(first, mode)], fused=False))
        variants.append(EpochVariant("online", "online"))
        warm = 3 if args.quick else 10
        for variant in variants:  # warm-up: kernels, allocator, imports, page cache, worker start
            time_epoch(variant, ds, args.batch_size, student0, teacher, max_batches=warm)
        records = []
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]  # alternate, so no variant always follows the same one
            for variant in order:
                record = {"repeat": repeat, **variant.describe(), **time_epoch(variant, ds, args.batch_size, student0, teacher)}
                records.append(record)
                _progress(f"repeat {repeat}: {variant.name}", record, f", data {record['data_s']:.2f} s")
        report["epochs"] = {"summary": summarize_epochs(records, variants, args.samples), "measurements": records}

    if not args.skip_reads:
        cases = reader_cases(paths, ds, args)
        for case in cases:  # warm the page cache and first-use costs
            case.run({})
        records = []
        for repeat in range(args.read_repeats):
            for case in cases:
                record: dict[str, Any] = {"repeat": repeat, "case": case.name, "backend": case.backend, "mode": case.mode}
                record.update(case.run(record))
                records.append(record)
            print(f"  reads repeat {repeat}: done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        report["reads"] = {"summary": summarize_reads(records, cases), "measurements": records}

    report["config"] = {
        "samples": args.samples, "dim": args.dim, "classes": args.classes, "teacher": arch_kwargs, "logit_std": args.logit_std,
        "student": {"in_features": args.dim, "hidden": args.student_hidden, "depth": args.student_depth, "num_classes": args.classes},
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student0.parameters()),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "dump_precision": args.dump_precision, "k": args.k, "batch_size": args.batch_size, "repeats": args.repeats,
        "read_repeats": args.read_repeats,
        "evict_fraction": args.evict_fraction, "backends": args.backends, "seed": args.seed, "quick": args.quick,
        "temperature": TEMPERATURE, "kd_weight": KD_WEIGHT, "ce_weight": CE_WEIGHT, "goals": GOALS,
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    report["machine"] = {**machine_info(torch.device(args.device)), "numpy_version": np.__version__}
    return report


def print_report(report: dict[str, Any]) -> None:
    config, machine, cost = report["config"], report["machine"], report["cost_model"]
    teacher, student = config["teacher"], config["student"]
    print(f"\ntorch {machine['torch_version']}, {machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads), "
          f"zarr {machine.get('zarr_version')}, h5py {machine.get('h5py_version')}; {config['samples']} samples x {config['dim']} "
          f"features, {config['classes']} classes, batch {config['batch_size']}")
    print(f"teacher {teacher['in_features']}-{teacher['hidden']}x{teacher['depth']}-{teacher['num_classes']} "
          f"({config['teacher_params'] / 1e6:.1f}M params), student {student['in_features']}-{student['hidden']}x{student['depth']}-"
          f"{student['num_classes']} ({config['student_params'] / 1e6:.2f}M params): teacher forward {cost['teacher_forward_ms']:.1f} ms "
          f"/ student step {cost['student_step_ms']:.1f} ms = {cost['teacher_over_student']:.1f}x (target ~10)")
    base = cost["student_step_ms"]
    print(f"student step with the KD loss (fixed target): top-{config['k']} {cost['student_step_kd_topk_ms']:.2f} ms "
          f"({cost['student_step_kd_topk_ms'] / base:.3f}x the CE step), full {cost['student_step_kd_full_ms']:.2f} ms "
          f"({cost['student_step_kd_full_ms'] / base:.3f}x); unfused (kd_loss + cross_entropy): top-{config['k']} "
          f"{cost['student_step_kd_topk_unfused_ms']:.2f} ms ({cost['student_step_kd_topk_unfused_ms'] / base:.3f}x), full "
          f"{cost['student_step_kd_full_unfused_ms']:.2f} ms ({cost['student_step_kd_full_unfused_ms'] / base:.3f}x)")
    print("dumps: " + ", ".join(f"{d['backend']} {d['mode']} {d['wall_s']:.1f} s ({d['bytes_on_disk'] / config['samples']:.1f} B/sample, "
                                f"chunks of {d['chunk_rows']} rows)" for d in report["dumps"]))
    if "epochs" in report:
        print(f"\nEpochs (medians of {config['repeats']}; vs labels and online/this: medians of per-repeat ratios):")
        print(format_epochs(report["epochs"]["summary"]))
    if "reads" in report:
        print(f"\nReader throughput, top-{config['k']} unless noted (medians of {config['read_repeats']}; fresh cache object per pass):")
        print(format_reads(report["reads"]["summary"]))
    print("\nGoals:")
    for line in goal_lines(report):
        print("  " + line)


def goal_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for row in report.get("epochs", {}).get("summary", []):
        if row["kind"] != "cached" or not row["kd"] or row["workers"] or not row.get("fused", True):
            continue
        over, online = row["over_labels"], row.get("online_over_this")
        lines.append(f"{row['variant']}: cached/labels {over:.3f} <= 1.10 {verdict(over <= GOALS['cached_over_labels'])}"
                     + ("" if online is None else f"; online/cached {online:.2f} >= 5 {verdict(online >= GOALS['online_over_cached'])}"))
    for row in report.get("reads", {}).get("summary", []):
        if row["case"] != "a_shuffled":
            continue
        rate, ratio = row["rows_per_s"], row.get("over_sequential")
        line = f"reader {row['backend']} top-k shuffled from disk: {rate:,.0f} rows/s >= 500,000 "
        line += verdict(rate >= GOALS["shuffled_rows_per_s"])
        if ratio is not None:
            line += f"; shuffled/sequential {ratio:.2f} >= 0.8 {verdict(ratio >= GOALS['shuffled_over_sequential'])}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with scratch_dir(args.workdir, args.keep, "bench-train-") as workdir:
        report = run(args, workdir)
    report["total_seconds"] = time.perf_counter() - started
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print_report(report)
    print(f"total {report['total_seconds']:.0f} s")
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
