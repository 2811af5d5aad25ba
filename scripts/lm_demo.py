"""Evidence for language models: which soft targets to cache (top-k K, sampled M, full logits).

A small byte-level causal transformer teacher is trained on the spot on the built-in ``text`` data
(Python's pydoc topics, byte ids 0..255; split ``train``, the first 90%), its targets on the train
split are dumped in several representations, and one smaller student is trained from each cache,
plus two baselines with the same budget: labels only (next-byte cross-entropy) and full-logit KD
(the ``full`` cache). Every student is evaluated on the held-out ``test`` split.

    python scripts/lm_demo.py            # defaults: 8 students x 2 seeds, ~7.5 min on 2 idle CPU cores (README.md)
    python scripts/lm_demo.py --quick    # smoke run, ~20 s (1/8 of the train split, 1 seed, 1 epoch; its numbers mean nothing)

Steps, all on the CPU:

1. the teacher, ``logit_cache.tools.models:tiny_lm`` (``TEACHER_KWARGS``), trained here with plain
   next-token cross-entropy (AdamW, linear warm-up then cosine decay, gradient clipping) for
   ``--teacher-steps`` batches of ``--batch-size`` windows of ``--seq-len`` bytes, seed 0; its
   state_dict is saved to the scratch folder and dumped with ``arch="logit_cache.tools.models:tiny_lm"``.
   Its held-out perplexity is printed next to unigram and bigram byte models counted on the train
   split (add-alpha smoothing, the best alpha of a few on the test split: a generous baseline);
2. caches of the train split, plain encoding, float16 values, Zarr: top-k for each ``--topk`` K,
   sampled for each ``--sample`` M (M draws per token from softmax(logits / Ts), Ts = 1, or ``M@Ts``)
   and full logits. Recorded per dump: ``dump s``, the wall time of the whole ``dump_cache()`` call
   (teacher inference included), ``B/token``, its bytes on disk per token (``bytes_on_disk /
   num_rows``, compressed), and ``raw B/tok``, the stored arrays' bytes per token uncompressed.
   With ``logit_cache.targets.compact`` finished (``--compact auto``, the default, checks that its
   ``stored_specs`` works) every top-k and sampled cache is dumped again with ``encoding="compact"``
   (top-k with ``dtype="float32"``, as ``compact.py`` advises: the stored bytes are the same and
   float16 values would round away the tail mass it stores) and gets a row; students are trained
   from compact caches only with ``--compact-students``. Instead, on the tokens of 256 random train
   windows, every top-k cache's targets as the loss reads them (K probabilities and the rest's mass,
   ``targets.topk_log_probs``) are compared with the teacher's exact distribution (KL in nats per
   token over the K ids and one bucket for the rest), and every compact sampled cache's decoded rows
   with its plain twin's;
3. the students, ``tiny_lm`` (``STUDENT_KWARGS``), trained by ``logit_cache.train_student`` for the same
   number of steps (``--epochs`` over the same windows, same ``--batch-size``, lr, seed: the same
   initialisation and, checked before training, the same order of windows for every method). KD runs
   use the loss ``0.9 * KD + 0.1 * CE`` (the trainer's defaults; ``--kd-weight 1`` for pure KD) at
   T = 1 and the top-k tail ``rest`` (the default). Sampled caches with Ts != 1 are reweighted to
   T = 1 with their stored logits (``logit_cache.losses.sampled_weights``). Every method is trained with
   seeds 0..``--seeds``-1 (the teacher and the caches stay the same);
4. per student, over every next-token position of the test split: ``held-out ppl``, the trainer's
   ``eval_perplexity`` (recomputed here, and checked to agree), and ``KL to teacher``, the true
   ``KL(teacher || student)`` at T = 1 in nats per token (dense: the teacher is run here over the
   test split, V = 256); the top-1 agreement with the teacher goes to ``--json``. ``train s`` is the
   trainer's training-loop time (evaluation excluded; on a shared machine it mostly measures the load).

Columns comparing with full KD, seed by seed (a student and the full-KD student of the same seed share
their initialisation and data order): ``vs full``, the mean over seeds of ``ppl / ppl_full - 1``;
``<full``, on how many seeds the method's perplexity was lower than full KD's; ``KD gain kept``,
``(ppl_labels - ppl) / (ppl_labels - ppl_full)`` from the means. The lines under the table name the
best method and the smallest cache within ``--tolerance`` of full KD, and the seed-to-seed spread
that differences must beat. Everything (settings, machine, per-seed numbers) goes to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from logit_cache import ChunkShuffleSampler, DumpConfig, TrainConfig, collate_tokens, dump_cache, next_token_mask, open_cache, train_student
from logit_cache.data import TEXT_VOCAB, ByteText
from logit_cache.format import write_json_atomic
from logit_cache.targets import LOG_MASS_FLOOR, topk_log_probs
from logit_cache.tools import tiny_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import machine_info, scratch_dir

ARCH = "logit_cache.tools.models:tiny_lm"
#: Bytes per window and windows per batch (4096 bytes a step), for the teacher and the students.
SEQ_LEN, BATCH_SIZE = 32, 128
#: ~0.47M weights. 800 steps (7.8 epochs) give it a held-out perplexity of ~3.7, against ~10 for a bigram model.
TEACHER_KWARGS = {"d_model": 128, "n_layers": 2, "n_heads": 4}
#: ~0.09M weights, a fifth of the teacher.
STUDENT_KWARGS = {"d_model": 64, "n_layers": 1, "n_heads": 2}
TEACHER_LR, TEACHER_WARMUP, TEACHER_WEIGHT_DECAY, CLIP = 3e-3, 30, 0.01, 1.0
#: Students: 6 epochs at lr 1e-2 (the trainer's AdamW, cosine decay, no warm-up). From a short exploration
#: (seeds 0-2): with windows of 128 bytes (32 a batch) a student sits on a bigram-like plateau
#: (held-out perplexity ~9) for a time the seed decides; after 6 epochs the same method ended
#: anywhere from 5.0 to 6.5, which swamped the differences between caches. With windows of 32 bytes
#: (128 a batch: the same bytes per step) students leave it within 2 epochs and end within +-0.03 of
#: each other across seeds. lr 1e-2 beat 3e-3 (held-out 8.95 against 9.49 after 2 epochs of 128-byte
#: windows, labels only). Two seeds by default.
STUDENT_LR = 1e-2
STUDENT_EPOCHS = 6
TEACHER_STEPS = 800
DEFAULT_TOPK = (2, 8, 32)
DEFAULT_SAMPLE = ("4", "16", "64")
DEFAULT_SEEDS = 2
SMOOTHING_ALPHAS = (1.0, 0.1, 0.01)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_info() -> dict[str, Any]:
    """``bench_dump.machine_info`` for the CPU, with the processor's name."""
    processor = platform.processor()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        processor = names[0] if names else processor
    return {**machine_info(torch.device("cpu")), "processor": processor}


@dataclass
class Method:
    """One student: where its targets come from, and the cache's dump record."""

    name: str
    label: str
    source: dict[str, Any]
    dump: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: Compact caches get students only with --compact-students (sampled ones decode to the plain
    #: cache's very rows); their targets are checked instead (``topk_fidelity``, ``identical_rows``).
    train: bool = True
    plain: str | None = None  # a compact cache's plain twin (the method name)


# --------------------------------------------------------------------------------------------------
# Teacher and evaluation
# --------------------------------------------------------------------------------------------------


def lm_loss(model: torch.nn.Module, items: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of ``model`` on a batch of windows, and the number of positions."""
    batch = collate_tokens(items)
    mask = next_token_mask(batch.labels, batch.lengths)
    following = torch.roll(batch.labels, -1, dims=1)  # position t predicts t + 1 (the mask drops the wrapped last one)
    logits = model(batch.input_ids)
    return F.cross_entropy(logits[mask], following[mask]), int(mask.sum())


def train_teacher(path: Path, data: ByteText, steps: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Plain next-token training of the teacher; its state_dict goes to ``path``."""
    torch.manual_seed(seed)
    model = tiny_lm(**TEACHER_KWARGS, max_len=data.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR, weight_decay=TEACHER_WEIGHT_DECAY)
    warmup = min(TEACHER_WARMUP, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    cursor, losses = 0, []
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):  # a new epoch: a new permutation
            order, cursor = torch.randperm(len(data), generator=generator), 0
        items = [data[int(i)] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss, _ = lm_loss(model, items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  teacher step {step + 1}/{steps}: train loss {statistics.fmean(losses[-20:]):.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    torch.save(model.eval().state_dict(), path)
    return {"steps": steps, "batch_size": batch_size, "epochs": steps * batch_size / len(data), "seconds": seconds,
            "final_train_loss": statistics.fmean(losses[-20:]), "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def position_log_probs(model: torch.nn.Module, data: ByteText, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax (N, V) at every next-token position of ``data`` (in order), and the next tokens (N,)."""
    model.eval()
    outputs, targets = [], []
    for start in range(0, len(data), batch_size):
        batch = collate_tokens([data[i] for i in range(start, min(len(data), start + batch_size))])
        mask = next_token_mask(batch.labels, batch.lengths)
        outputs.append(model(batch.input_ids)[mask].float().log_softmax(-1))
        targets.append(torch.roll(batch.labels, -1, dims=1)[mask])
    return torch.cat(outputs), torch.cat(targets)


def compare(log_q: torch.Tensor, targets: torch.Tensor, log_p: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``log_q`` on ``targets``, KL(p || q) per token, top-1 agreement with p."""
    nll = float(F.nll_loss(log_q, targets))
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agree = float((log_q.argmax(-1) == log_p.argmax(-1)).float().mean())
    return {"perplexity": math.exp(nll), "kl_to_teacher": kl, "top1_agreement": agree}


def ngram_baselines(train: ByteText, test_targets: torch.Tensor, test_previous: torch.Tensor) -> dict[str, Any]:
    """Held-out perplexity of add-alpha unigram and bigram byte models counted on the train split's bytes."""
    ids = torch.from_numpy(np.asarray(train.ids, dtype=np.int64))
    unigram = torch.bincount(ids, minlength=TEXT_VOCAB).double()
    pairs = torch.bincount(ids[:-1] * TEXT_VOCAB + ids[1:], minlength=TEXT_VOCAB**2).double().view(TEXT_VOCAB, TEXT_VOCAB)
    result: dict[str, Any] = {}
    for name, counts in (("unigram", unigram[None, :].expand(TEXT_VOCAB, -1)), ("bigram", pairs)):
        best = None
        for alpha in SMOOTHING_ALPHAS:
            log_probs = ((counts + alpha) / (counts + alpha).sum(-1, keepdim=True)).log()
            ppl = math.exp(-float(log_probs[test_previous, test_targets].mean()))
            if best is None or ppl < best[0]:
                best = (ppl, alpha)
        assert best is not None
        result[name] = {"perplexity": best[0], "alpha": best[1]}
    return result


# --------------------------------------------------------------------------------------------------
# Caches and students
# --------------------------------------------------------------------------------------------------


def compact_available() -> str | None:
    """None if ``encoding="compact"`` can be dumped here, else why not."""
    try:
        from logit_cache.targets import stored_specs

        stored_specs("topk", 8, TEXT_VOCAB, "float16", "compact")
        stored_specs("sampled", 8, TEXT_VOCAB, "float16", "compact")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def parse_sample(spec: str) -> tuple[int, float]:
    m, _, ts = spec.partition("@")
    return int(m), float(ts) if ts else 1.0


def cache_specs(args: argparse.Namespace, compact: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, label, DumpConfig fields) of every cache, in table order; compact twins are named NAME-compact."""
    specs: list[tuple[str, str, dict[str, Any]]] = [("full", "full logits (KD baseline)", {"mode": "full"})]
    for encoding in ["plain", "compact"] if compact else ["plain"]:
        name_suffix, label_suffix = ("", "") if encoding == "plain" else ("-compact", ", compact")
        for k in args.topk:
            # compact top-k: float32 values, as compact.py advises (same stored bytes; float16 would round away the tail it keeps)
            dtype = {"dtype": "float32"} if encoding == "compact" else {}
            specs.append((f"top{k}{name_suffix}", f"top-{k}{label_suffix}{' (f32)' if dtype else ''}",
                          {"mode": "topk", "k": k, "encoding": encoding, **dtype}))
        for m, ts in args.sample:
            ts_name = "" if ts == 1.0 else f"-ts{ts:g}"
            specs.append((f"sample{m}{ts_name}{name_suffix}", f"sampled M={m}, Ts={ts:g}{label_suffix}",
                          {"mode": "sampled", "m": m, "sample_temperature": ts, "encoding": encoding}))
    return specs


def array_bytes(arrays: dict[str, dict[str, Any]]) -> int:
    """Bytes of one row (token) of the stored per-row arrays, uncompressed."""
    rows = [spec for spec in arrays.values() if spec.get("per", "row") == "row"]
    return sum(np.dtype(spec["dtype"]).itemsize * math.prod(spec["row_shape"]) for spec in rows)


def dump_caches(args: argparse.Namespace, workdir: Path, teacher: Path, compact: bool) -> list[Method]:
    methods = [Method("labels", "labels only (baseline)", {"labels_only": True})]
    for name, label, fields in cache_specs(args, compact):
        out = workdir / f"cache-{name}"
        config = DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs={**TEACHER_KWARGS, "max_len": args.seq_len}, dataset="text",
                            dataset_kwargs=args.train_kwargs, out=str(out), device="cpu", quiet=True, overwrite=True, **fields)
        started = time.perf_counter()
        result = dump_cache(config)
        seconds = time.perf_counter() - started
        manifest = result.manifest
        record = {"seconds": seconds, "compute_seconds": result.compute_seconds, "bytes_on_disk": result.bytes_on_disk,
                  "rows": manifest.num_rows, "bytes_per_token": result.bytes_on_disk / manifest.num_rows,
                  "raw_bytes_per_token": array_bytes(manifest.arrays), "arrays": manifest.arrays, "mean_topk_mass": result.mean_topk_mass,
                  **fields}
        compact = fields.get("encoding") == "compact"
        methods.append(Method(name, label, {"caches": [str(out)]}, record, train=not compact or args.compact_students,
                              plain=name.removesuffix("-compact") if compact else None))
        print(f"dump {name}: {record['rows']} tokens, {seconds:.1f} s, {record['bytes_per_token']:.1f} B/token on disk "
              f"({record['raw_bytes_per_token']} raw)", flush=True)
    return methods


def fidelity_rows(data: ByteText, teacher: torch.nn.Module, windows: int = 256, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Cache rows of ``windows`` random windows of ``data`` (a cache's rows are their tokens, in order), and the
    teacher's exact log-probabilities (float64, (rows, V)) at them."""
    lengths = data.token_lengths()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    picked = np.sort(np.random.default_rng(seed).choice(len(data), size=min(windows, len(data)), replace=False))
    rows = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in picked])
    with torch.no_grad():
        batch = collate_tokens([data[int(i)] for i in picked])
        logits = teacher(batch.input_ids).double()
        real = torch.arange(batch.input_ids.shape[1])[None, :] < batch.lengths[:, None]
        return rows, logits[real].log_softmax(-1)


def topk_fidelity(cache_dir: Path, rows: np.ndarray, true_log_p: torch.Tensor) -> dict[str, Any]:
    """How far a top-k cache's targets, as the loss reads them at T = 1, are from the teacher's distribution.

    The loss sees K probabilities and the rest's mass (``targets.topk_log_probs``: 1 - their sum, floored at
    ``exp(LOG_MASS_FLOOR)``); this is KL(teacher || that), both over the K stored ids and one bucket for the rest,
    in nats per token. Also: the share of rows whose stored values sum to more than 1 (their rest is floored).
    """
    with open_cache(cache_dir) as cache:
        target = cache.targets(rows)
    log_p, log_rest = topk_log_probs(target.values, target.logsumexp, 1.0, target.num_classes)
    true_top = true_log_p.gather(1, target.indices.long())  # the teacher's exact log-probabilities at the stored ids
    true_rest = (-true_top.exp().sum(-1)).log1p().clamp_min(LOG_MASS_FLOOR)
    kl = (true_top.exp() * (true_top - log_p.double())).sum(-1) + true_rest.exp() * (true_rest - log_rest.double())
    stored_sum = (target.values.double() - target.logsumexp.double()[:, None]).exp().sum(-1)
    return {"rows": len(rows), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "rows_rest_floored": float((stored_sum >= 1).double().mean()), "true_rest_median": float(true_rest.exp().median())}


def identical_rows(plain: Path, compact: Path, rows: np.ndarray) -> dict[str, Any]:
    """Whether a compact cache's decoded rows are its plain twin's (sampled rows: compact is lossless)."""
    with open_cache(plain) as a, open_cache(compact) as b:
        ra, rb = a.rows(rows), b.rows(rows)
    return {"rows": len(rows), "identical": sorted(ra) == sorted(rb) and all(np.array_equal(ra[k], rb[k]) for k in ra)}


def describe_fidelity(record: dict[str, Any]) -> str:
    if "identical" in record:
        return f"decoded rows {'identical to' if record['identical'] else 'DIFFERENT from'} the plain cache's ({record['rows']} tokens)"
    return (f"KL(teacher || targets as the loss reads them) {record['kl_mean']:.1e} nats/token (max {record['kl_max']:.1e}); "
            f"values summing to >= 1 (rest floored) on {record['rows_rest_floored']:.1%} of {record['rows']} tokens")


def check_same_order(methods: list[Method], num_windows: int, seed: int, epochs: int) -> bool:
    """Every cache's training sampler gives the labels-only run's order of windows (so runs differ only in targets)."""
    reference = ChunkShuffleSampler(num_windows, shuffle=True, seed=seed)
    for method in methods:
        if "caches" not in method.source:
            continue
        cache = open_cache(method.source["caches"][0])
        try:
            sampler = ChunkShuffleSampler.for_caches([cache], shuffle=True, seed=seed)
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                reference.set_epoch(epoch)
                if not np.array_equal(sampler.order(), reference.order()):
                    print(f"note: {method.name}'s sampler orders the windows differently from labels only "
                          f"(a cache too large for memory is read in chunk order)", flush=True)
                    return False
        finally:
            cache.close()
    return True


def run_method(method: Method, seed: int, args: argparse.Namespace, workdir: Path, teacher_log_p: torch.Tensor,
               test_targets: torch.Tensor, test: ByteText) -> dict[str, Any]:
    kd = {} if "labels_only" in method.source else {"kd_loss_weight": args.kd_weight, "org_loss_weight": 1.0 - args.kd_weight}
    student_kwargs = {**STUDENT_KWARGS, "max_len": args.seq_len}
    config = TrainConfig(student=ARCH, student_kwargs=student_kwargs, out=str(workdir / f"student-{method.name}-seed{seed}.pt"),
                         dataset="text", dataset_kwargs=args.train_kwargs, eval_dataset="text", eval_dataset_kwargs=args.test_kwargs,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, device="cpu", quiet=True,
                         **method.source, **kd)
    load = load_average()
    result = train_student(config)
    student = tiny_lm(**student_kwargs)
    student.load_state_dict(torch.load(result.out, map_location="cpu", weights_only=True))
    log_q, targets = position_log_probs(student, test)
    if not torch.equal(targets, test_targets):
        raise SystemExit("the test positions differ between the teacher's and the student's pass")
    metrics = compare(log_q, targets, teacher_log_p)
    trainer_ppl = result.final["eval_perplexity"]
    if not math.isclose(trainer_ppl, metrics["perplexity"], rel_tol=1e-3):
        raise SystemExit(f"{method.name}: the trainer's eval perplexity {trainer_ppl:.4f} differs from "
                         f"this script's {metrics['perplexity']:.4f}")
    steps = math.ceil(len(ByteText(**args.train_kwargs)) / args.batch_size) * args.epochs
    return {"method": method.name, "seed": seed, "held_out_perplexity": trainer_ppl, "kl_to_teacher": metrics["kl_to_teacher"],
            "top1_agreement": metrics["top1_agreement"], "train_seconds": result.seconds, "steps": steps,
            "final_train_loss": result.final["train_loss"], "temperature": result.temperature, "load_before": load,
            "epochs": result.epochs}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def summarize(methods: list[Method]) -> dict[str, dict[str, Any]]:
    """Means over seeds (with the half range), and each method paired with full KD seed by seed."""
    full_runs = {run["seed"]: run for method in methods if method.name == "full" for run in method.runs}
    summary = {}
    for method in methods:
        row: dict[str, Any] = {"label": method.label, "seeds": len(method.runs), "plain": method.plain}
        if method.dump is not None:
            row.update({"bytes_per_token": method.dump["bytes_per_token"], "raw_bytes_per_token": method.dump["raw_bytes_per_token"],
                        "dump_seconds": method.dump["seconds"], "fidelity": method.dump.get("fidelity")})
        summary[method.name] = row
        if not method.runs:
            continue
        for key in ("held_out_perplexity", "kl_to_teacher", "top1_agreement", "train_seconds"):
            values = [run[key] for run in method.runs]
            row[key] = statistics.fmean(values)
            row[key + "_spread"] = (max(values) - min(values)) / 2 if len(values) > 1 else None
            row[key + "_per_seed"] = values
        # paired with full KD of the same seed (same initialisation, same order of windows)
        ratios = [run["held_out_perplexity"] / full_runs[run["seed"]]["held_out_perplexity"] - 1 for run in method.runs]
        row["ppl_vs_full"] = statistics.fmean(ratios)
        row["ppl_vs_full_per_seed"] = ratios
        row["seeds_better_than_full"] = sum(r < 0 for r in ratios)
    labels, full = summary["labels"]["held_out_perplexity"], summary["full"]["held_out_perplexity"]
    for row in trained(summary).values():
        gain = labels - full
        row["kd_gain_kept"] = (labels - row["held_out_perplexity"]) / gain if gain > 0 else None  # None: full KD did not beat labels
    return summary


def trained(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: row for name, row in summary.items() if row["seeds"]}


def format_table(summary: dict[str, dict[str, Any]], teacher: dict[str, Any], baselines: dict[str, Any]) -> str:
    seeds = max(row["seeds"] for row in summary.values())
    pm = " (± half range)" if seeds > 1 else ""
    ppl_w, kl_w = 12 + len(pm), 13 + len(pm)
    header = (f"{'method':<26} {'B/token':>8} {'raw B/tok':>9} {'dump s':>7} {'train s':>8} {'held-out ppl' + pm:>{ppl_w}} "
              f"{'KL to teacher' + pm:>{kl_w}} {'vs full':>8} {'<full':>5} {'KD gain kept':>12}")
    lines = [header, "-" * len(header)]
    lines.append(f"{'teacher (trained here)':<26} {'':>8} {'':>9} {'':>7} {teacher['seconds']:>8.1f} "
                 f"{teacher['held_out_perplexity']:>{ppl_w}.3f} {0.0:>{kl_w}.4f}")
    for name in ("unigram", "bigram"):
        lines.append(f"{name + ' byte counts':<26} {'':>8} {'':>9} {'':>7} {'':>8} {baselines[name]['perplexity']:>{ppl_w}.3f}")

    def cell(row: dict[str, Any], key: str, width: int, digits: int) -> str:
        text = f"{row[key]:.{digits}f}"
        if row[key + "_spread"] is not None:
            text += f" ± {row[key + '_spread']:.{digits}f}"
        return f"{text:>{width}}"

    for name, row in summary.items():
        bytes_cells = (f"{row['bytes_per_token']:>8.1f} {row['raw_bytes_per_token']:>9d} {row['dump_seconds']:>7.1f}"
                       if "bytes_per_token" in row else f"{'-':>8} {'-':>9} {'-':>7}")
        if not row["seeds"]:
            note = "not trained: target check below"
            lines.append(f"{row['label']:<26} {bytes_cells} {'-':>8} {note:>{ppl_w + kl_w + 1}}")
            continue
        kept = "" if row["kd_gain_kept"] is None else f"{row['kd_gain_kept']:.0%}"
        better = "" if name == "full" else f"{row['seeds_better_than_full']}/{row['seeds']}"
        lines.append(f"{row['label']:<26} {bytes_cells} {row['train_seconds']:>8.1f} {cell(row, 'held_out_perplexity', ppl_w, 3)} "
                     f"{cell(row, 'kl_to_teacher', kl_w, 4)} {row['ppl_vs_full']:>+8.1%} {better:>5} {kept:>12}")
    return "\n".join(lines)


def findings(summary: dict[str, dict[str, Any]], tolerance: float) -> list[str]:
    """What the table says, computed from it: the best methods, the gain of KD, the cheapest cache near full KD."""
    rows = trained(summary)
    labels, full = rows["labels"], rows["full"]
    seeds = full["seeds"]
    best_ppl = min(rows, key=lambda n: rows[n]["held_out_perplexity"])
    best_kl = min(rows, key=lambda n: rows[n]["kl_to_teacher"])
    lines = [
        f"lowest held-out perplexity: {rows[best_ppl]['label']} ({rows[best_ppl]['held_out_perplexity']:.3f}); "
        f"lowest KL to the teacher: {rows[best_kl]['label']} ({rows[best_kl]['kl_to_teacher']:.4f} nats/token)",
        f"full-logit KD against labels only: perplexity {labels['held_out_perplexity']:.3f} -> {full['held_out_perplexity']:.3f} "
        f"({full['held_out_perplexity'] / labels['held_out_perplexity'] - 1:+.1%}), KL {labels['kl_to_teacher']:.4f} -> "
        f"{full['kl_to_teacher']:.4f} ({full['kl_to_teacher'] / labels['kl_to_teacher'] - 1:+.1%}); labels only beat full KD "
        f"on {labels['seeds_better_than_full']} of {seeds} seed(s)",
    ]
    near = [n for n, r in rows.items() if "bytes_per_token" in r and n != "full" and r["ppl_vs_full"] <= tolerance]
    if near:
        cheapest = min(near, key=lambda n: rows[n]["bytes_per_token"])
        c = rows[cheapest]
        lines.append(f"caches within {tolerance:.1%} of full KD's perplexity or better (mean of per-seed ratios): "
                     + ", ".join(f"{rows[n]['label']} ({rows[n]['ppl_vs_full']:+.1%})" for n in near))
        lines.append(f"the smallest of them: {c['label']}, {c['bytes_per_token']:.1f} B/token on disk against "
                     f"{full['bytes_per_token']:.1f} for full logits ({full['bytes_per_token'] / c['bytes_per_token']:.0f}x smaller)")
        twin = summary.get(cheapest + "-compact")
        if twin is not None and twin["seeds"] == 0:
            lines.append(f"  its compact encoding: {twin['bytes_per_token']:.1f} B/token "
                         f"({full['bytes_per_token'] / twin['bytes_per_token']:.0f}x smaller than full; "
                         f"{describe_fidelity(twin['fidelity'])})")
    else:
        lines.append(f"no sparse cache is within {tolerance:.1%} of full KD's perplexity")
    checked = [(name, row) for name, row in summary.items() if row.get("fidelity") is not None]
    if checked:
        lines.append("targets against the teacher, on the tokens of 256 random train windows:")
        lines += [f"  {row['label']}: {describe_fidelity(row['fidelity'])}" for _, row in checked]
    spreads = [r["held_out_perplexity_spread"] for r in rows.values() if r["held_out_perplexity_spread"] is not None]
    if spreads:
        lines.append(f"seed to seed, a method's held-out perplexity varies by ± {statistics.median(spreads):.3f} (median half range "
                     f"over methods, {seeds} seeds): smaller differences are not evidence")
    else:
        lines.append("one seed per method: differences smaller than the seed-to-seed spread (--seeds N) are not evidence")
    return lines


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"bytes per window (default {SEQ_LEN})")
    parser.add_argument("--teacher-steps", type=int, help=f"teacher batches (default {TEACHER_STEPS}; 40 with --quick)")
    parser.add_argument("--epochs", type=int, help=f"student epochs over the train split (default {STUDENT_EPOCHS}; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"windows a batch, teacher and students (default {BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=STUDENT_LR, help=f"students' peak lr, AdamW with cosine decay (default {STUDENT_LR:g})")
    parser.add_argument("--kd-weight", type=float, default=0.9, help="KD loss weight; the CE weight is 1 minus it (default 0.9)")
    parser.add_argument("--topk", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_TOPK),
                        help=f"top-k caches, comma-separated K (default {','.join(map(str, DEFAULT_TOPK))})")
    parser.add_argument("--sample", type=lambda s: [parse_sample(x) for x in s.split(",")],
                        default=[parse_sample(x) for x in DEFAULT_SAMPLE],
                        help=f"sampled caches, comma-separated M or M@Ts (default {','.join(DEFAULT_SAMPLE)})")
    parser.add_argument("--compact", choices=["auto", "off"], default="auto",
                        help="auto (default): also dump every top-k and sampled cache with encoding=compact if the compact encoding works")
    parser.add_argument("--compact-students", action="store_true",
                        help="also train students from the compact caches (default: compare their decoded rows with the plain caches')")
    parser.add_argument("--seeds", type=int, help=f"students per method, seeds 0..N-1 (default {DEFAULT_SEEDS}; 1 with --quick)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="'near full KD': perplexity at most this much above (default 0.01)")
    parser.add_argument("--workdir", help="where the teacher, caches and students go (default: a folder under data/, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--json", help="where to write results (default data/lm_demo.json; data/lm_demo_quick.json with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about a minute (1/8 of the train split; its numbers mean little)")
    args = parser.parse_args(argv)
    args.teacher_steps = args.teacher_steps or (40 if args.quick else TEACHER_STEPS)
    args.epochs = args.epochs or (1 if args.quick else STUDENT_EPOCHS)
    args.seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    args.json = args.json or ("data/lm_demo_quick.json" if args.quick else "data/lm_demo.json")
    if min(args.teacher_steps, args.epochs, args.seeds, args.batch_size) < 1 or args.seq_len < 2:
        parser.error("--teacher-steps, --epochs, --seeds and --batch-size must be >= 1, --seq-len >= 2")
    if not 0 <= args.kd_weight <= 1:
        parser.error("--kd-weight must be in [0, 1]")
    # --quick: windows every 8 * seq_len bytes (1/8 of the train split); the test split is always whole
    args.train_kwargs = {"split": "train", "seq_len": args.seq_len, **({"stride": 8 * args.seq_len} if args.quick else {})}
    args.test_kwargs = {"split": "test", "seq_len": args.seq_len}
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    train_data, test_data = ByteText(**args.train_kwargs), ByteText(**args.test_kwargs)
    print(f"text: {len(train_data)} train windows ({int(train_data.token_lengths().sum())} bytes), "
          f"{len(test_data)} test windows ({int(test_data.token_lengths().sum())} bytes), seq_len {args.seq_len}", flush=True)

    teacher_path = workdir / "teacher.pt"
    teacher_record = train_teacher(teacher_path, train_data, args.teacher_steps, args.batch_size, seed=0)
    teacher = tiny_lm(**TEACHER_KWARGS, max_len=args.seq_len)
    teacher.load_state_dict(torch.load(teacher_path, map_location="cpu", weights_only=True))
    teacher_log_p, test_targets = position_log_probs(teacher, test_data)
    teacher_record["held_out_perplexity"] = math.exp(float(F.nll_loss(teacher_log_p, test_targets)))
    batch = collate_tokens([test_data[i] for i in range(len(test_data))])
    previous = batch.input_ids[next_token_mask(batch.labels, batch.lengths)]  # the byte before each predicted one
    baselines = ngram_baselines(train_data, test_targets, previous)  # counts over the whole split's bytes, whatever the stride
    print(f"teacher: {teacher_record['params'] / 1e6:.2f}M weights, {args.teacher_steps} steps ({teacher_record['epochs']:.1f} epochs) "
          f"in {teacher_record['seconds']:.0f} s; held-out perplexity {teacher_record['held_out_perplexity']:.3f} "
          f"(unigram {baselines['unigram']['perplexity']:.2f}, bigram {baselines['bigram']['perplexity']:.2f})", flush=True)

    why_not = None if args.compact == "off" else compact_available()
    if args.compact == "auto" and why_not is not None:
        print(f"compact encoding skipped: logit_cache.targets.stored_specs does not work here ({why_not})", flush=True)
    methods = dump_caches(args, workdir, teacher_path, compact=args.compact == "auto" and why_not is None)
    same_order = all(check_same_order(methods, len(train_data), seed, args.epochs) for seed in range(args.seeds))
    by_name = {m.name: m for m in methods}
    rows, true_log_p = fidelity_rows(train_data, teacher)
    for method in methods:
        if method.dump is None or method.dump["mode"] == "full" or (method.dump["mode"] == "sampled" and method.plain is None):
            continue
        cache_dir = Path(method.source["caches"][0])
        if method.dump["mode"] == "topk":
            method.dump["fidelity"] = topk_fidelity(cache_dir, rows, true_log_p)
        else:
            method.dump["fidelity"] = identical_rows(Path(by_name[str(method.plain)].source["caches"][0]), cache_dir, rows)
        print(f"{method.name}: {describe_fidelity(method.dump['fidelity'])}", flush=True)

    for seed in range(args.seeds):
        for method in [m for m in methods if m.train]:
            run_record = run_method(method, seed, args, workdir, teacher_log_p, test_targets, test_data)
            method.runs.append(run_record)
            print(f"seed {seed} {method.name:<16}: held-out ppl {run_record['held_out_perplexity']:.3f}, "
                  f"KL {run_record['kl_to_teacher']:.4f}, {run_record['train_seconds']:.1f} s", flush=True)
    summary = summarize(methods)
    return {
        "what": "byte-level LM students from top-k, sampled and full caches vs labels only (scripts/lm_demo.py)",
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "settings": {"arch": ARCH, "teacher_kwargs": TEACHER_KWARGS, "student_kwargs": STUDENT_KWARGS, "seq_len": args.seq_len,
                     "train_kwargs": args.train_kwargs, "test_kwargs": args.test_kwargs, "teacher_steps": args.teacher_steps,
                     "teacher_lr": TEACHER_LR, "student_epochs": args.epochs, "batch_size": args.batch_size, "student_lr": args.lr,
                     "kd_loss_weight": args.kd_weight, "org_loss_weight": 1.0 - args.kd_weight, "temperature": 1.0, "tail": "rest",
                     "dtype": "float16 (compact top-k: float32)", "backend": "zarr", "seeds": args.seeds, "quick": args.quick,
                     "tolerance": args.tolerance, "compact": "skipped: " + why_not if why_not else args.compact,
                     "compact_students": args.compact_students},
        "teacher": teacher_record, "ngram_baselines": baselines, "same_order_every_run": same_order,
        "dumps": {m.name: m.dump for m in methods if m.dump is not None},
        "runs": [run for m in methods for run in m.runs], "summary": summary,
        "findings": findings(summary, args.tolerance),
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"load average {load_average()}; {torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)
    with scratch_dir(args.workdir, args.keep, "lm-demo-") as workdir:
        if args.keep:
            print(f"scratch folder: {workdir}", flush=True)
        results = run(args, workdir)
    machine = results["machine"]
    print(f"\n{machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch_version']}; teacher tiny_lm {TEACHER_KWARGS}, "
          f"student tiny_lm {STUDENT_KWARGS}, {args.epochs} epochs x {results['runs'][0]['steps'] // args.epochs} steps of "
          f"{args.batch_size} x {args.seq_len} bytes, lr {args.lr:g}, loss {args.kd_weight:g} KD + {1 - args.kd_weight:g} CE at T=1, "
          f"{args.seeds} seed(s); caches float16, zarr, plain")
    print(format_table(results["summary"], results["teacher"], results["ngram_baselines"]))
    for line in results["findings"]:
        print(line)
    print(f"total {results['total_seconds']:.0f} s")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
