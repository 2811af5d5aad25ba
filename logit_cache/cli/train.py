"""The commands that train: ``train`` (a student from caches, online KD or labels) and ``demo``."""

from __future__ import annotations

from pathlib import Path

import click

from ..data.loader import VERIFY_CHOICES
from ..errors import LogitCacheError
from ..losses.sample import TAILS
from ..specs import parse_json_kwargs
from ..tools.plots import plot_learning_curves, require_matplotlib
from ..train.config import OPTIMIZERS, TrainConfig, TrainResult
from ..train.loop import train_student
from .common import fail, setup_logging
from .options import dataset_text_options, quiet_option, teacher_options

TRAIN_TEACHER_HELP = "Online KD (a baseline): run this teacher on every batch; loaded as dump loads it."


@click.command("train")
@click.option("--student", required=True, metavar="MODULE:CALLABLE",
              help="Builds the student nn.Module, e.g. logit_cache.models:digits_mlp or models.py:make_student. Imports MODULE "
                   "and runs its code; the current directory is searched after installed packages.")
@click.option("--student-kwargs", metavar="JSON", help="Keyword arguments for --student, e.g. '{\"hidden\": 16, \"depth\": 1}'.")
@click.option("--dataset", required=True, metavar="SPEC",
              help="The training data, as for dump: 'digits', 'text', tokens:PATH.npy, hf:PATH (with the same --text-column, "
                   "--seq-len and --tokenizer) or MODULE:CALLABLE (imports MODULE and runs its code). With --cache "
                   "it must be the data the cache was dumped from (checked by length and fingerprint).")
@click.option("--dataset-kwargs", metavar="JSON", help="Keyword arguments for the dataset, e.g. '{\"split\": \"train\"}'.")
@dataset_text_options()
@click.option("--cache", "caches", multiple=True, metavar="DIR",
              help="Cached KD: targets from this cache (a directory, or an fsspec URL such as s3://bucket/cache). Repeat for "
                   "several teachers (averaged in probability space).")
@teacher_options(TRAIN_TEACHER_HELP, with_teacher=True)
@click.option("--labels-only", is_flag=True, help="No teacher at all (a baseline): cross-entropy on the labels.")
@click.option("--eval-dataset", metavar="SPEC", help="Data to evaluate on after each epoch (accuracy), e.g. digits with "
              "--eval-dataset-kwargs '{\"split\": \"test\"}'; a MODULE:CALLABLE spec imports MODULE and runs its code.")
@click.option("--eval-dataset-kwargs", metavar="JSON", help="Keyword arguments for --eval-dataset.")
@click.option("--eval-cache", metavar="DIR",
              help="A cache of the eval data: also report the eval KL(teacher || student) at T=1.")
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Where the student's state_dict goes; FILE with suffix .json gets how it was trained, .metrics.json the metrics.")
@click.option("--epochs", type=int, default=30, show_default=True, help="Passes over the data.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Samples per step on each process; under torchrun the global batch is this times the number of ranks (WORLD_SIZE).")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Peak learning rate; decays to 0 on a cosine over the run.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="Decoupled (AdamW) or L2 (SGD) weight decay.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="adamw, or sgd with Nesterov momentum 0.9.")
@click.option("--temperature", type=float, default=None,
              help="KD temperature T [default: the first cache's, recorded at dump time; 4 for --teacher].")
@click.option("--kd-loss-weight", type=float, default=0.9, show_default=True, help="Weight of the KD term (Composer's name).")
@click.option("--org-loss-weight", type=float, default=0.1, show_default=True,
              help="Weight of the cross-entropy on the labels (Composer's name); 0 trains on the teacher alone.")
@click.option("--tail", type=click.Choice(TAILS), default=None,
              help="Top-k caches: what to do with the classes outside the top-k [default: rest, a (K+1)-th bucket with "
                   "the tail's mass]. See the README.")
@click.option("--kd-start", type=float, default=0.0, show_default=True,
              help="Fraction of training at which KD starts (before: labels only).")
@click.option("--kd-end", type=float, default=1.0, show_default=True,
              help="Fraction of training at which KD ends (after: labels only).")
@click.option("--teachers-per-step", type=int, default=None,
              help="With several --cache: use a random subset of this many teachers per step [default: all].")
@click.option("--verify", type=click.Choice(VERIFY_CHOICES), default="fingerprint", show_default=True,
              help="How to check that --dataset is the cache's data: fingerprint (length and sampled content) or length only "
                   "(for data you augment on purpose).")
@click.option("--allow-nonfinite-targets", is_flag=True,
              help="Train on cached targets that hold NaN or infinite values instead of stopping. A dump never stores them, "
                   "so they mean a damaged cache (check it with logit-cache verify); without this flag training stops "
                   "naming the cache, shard and rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the student's initialisation and the data order.")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--plot", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Also draw the learning curves (loss, eval accuracy or perplexity, eval KL, epoch time) to FILE.png; "
                   "needs matplotlib (pip install 'logit-cache[plot]').")
@click.option("--metrics", type=click.Path(path_type=Path), metavar="FILE",
              help="JSON metrics file [default: OUT with suffix .metrics.json].")
@quiet_option("No progress bars and no per-epoch lines; only the summary and errors.")
def train_command(student: str, student_kwargs: str | None, dataset: str, dataset_kwargs: str | None, caches: tuple[str, ...],
                  teacher: str | None, arch: str | None, arch_kwargs: str | None, trust_checkpoint: bool, labels_only: bool,
                  eval_dataset: str | None, eval_dataset_kwargs: str | None, eval_cache: str | None, out: Path, epochs: int,
                  batch_size: int, lr: float, weight_decay: float, optimizer: str, temperature: float | None,
                  kd_loss_weight: float, org_loss_weight: float, tail: str | None, kd_start: float, kd_end: float,
                  teachers_per_step: int | None, verify: str, seed: int, device: str, num_workers: int,
                  metrics: Path | None, quiet: bool, allow_nonfinite_targets: bool = False, plot: Path | None = None) -> None:
    """Train a student from cached teacher targets (or a baseline).

    The soft targets come from one of: --cache DIR (cached KD: the teacher never runs), --teacher CKPT
    (online KD: the teacher runs every step) or --labels-only. The loss is
    org_loss_weight * CE(student, labels) + kd_loss_weight * KL(teacher_T || student_T) * T^2.

    \b
    Examples:
      logit-cache train --student logit_cache.models:digits_mlp --student-kwargs '{"hidden": 16, "depth": 1}' \\
          --dataset digits --cache caches/digits-top5 --out students/kd.pt \\
          --eval-dataset digits --eval-dataset-kwargs '{"split": "test"}'
      logit-cache train ... --teacher teacher.pt --arch logit_cache.models:digits_mlp --out students/online.pt
      logit-cache train ... --labels-only --out students/labels.pt
    """
    setup_logging(quiet)
    try:
        config = TrainConfig(
            student=student, out=str(out), dataset=dataset,
            student_kwargs=parse_json_kwargs(student_kwargs, "--student-kwargs"),
            dataset_kwargs=parse_json_kwargs(dataset_kwargs, "--dataset-kwargs"),
            caches=[str(c) for c in caches], teacher=teacher, arch=arch,
            arch_kwargs=parse_json_kwargs(arch_kwargs, "--arch-kwargs"), trust_checkpoint=trust_checkpoint,
            labels_only=labels_only, eval_dataset=eval_dataset,
            eval_dataset_kwargs=parse_json_kwargs(eval_dataset_kwargs, "--eval-dataset-kwargs"),
            eval_cache=str(eval_cache) if eval_cache else None, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, optimizer=optimizer, temperature=temperature, kd_loss_weight=kd_loss_weight,
            org_loss_weight=org_loss_weight, tail=tail, kd_start=kd_start, kd_end=kd_end,
            teachers_per_step=teachers_per_step, verify=verify, seed=seed, device=device, num_workers=num_workers,
            metrics=str(metrics) if metrics else None, quiet=quiet, allow_nonfinite_targets=allow_nonfinite_targets,
        )
        if plot is not None:
            require_matplotlib()
        result = train_student(config)
        if plot is not None and result.rank == 0:  # under torchrun, rank 0 writes and reports for all
            plot_learning_curves({out.stem: result.epochs}, plot, title=f"{student} on {dataset}")
    except LogitCacheError as exc:
        fail(exc)
    if result.rank != 0:
        return
    click.echo(_train_summary(result))
    if plot is not None:
        click.echo(f"learning curves: {plot}")


def _train_summary(result: TrainResult) -> str:
    final = result.final
    parts = [f"train loss {final['train_loss']:.4f}"]
    if "eval_accuracy" in final:
        parts.append(f"eval accuracy {final['eval_accuracy']:.4f}")
    if "eval_kl" in final:
        parts.append(f"eval KL {final['eval_kl']:.4f}")
    timing = f"{result.seconds:.2f} s training"
    if result.teacher_seconds:
        timing += f", {result.teacher_seconds:.2f} s of it in the teacher"
    return (f"saved {result.out} ({len(result.epochs)} epochs): " + ", ".join(parts) + f"; {timing}\n"
            f"  how it was trained: {result.sidecar}\n  metrics: {result.metrics_path}")


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), metavar="DIR",
              help="Keep the teacher, caches, students and demo.json (the table) in DIR, replacing the demo's earlier outputs "
                   "there [default: a temporary folder, removed afterwards].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the teacher; the students use seeds SEED .. SEED+N-1 (--seeds N).")
@click.option("--seeds", type=int, default=None, help="Students per method, for the mean ± std [default: 3; 1 with --quick].")
@click.option("--epochs", type=int, default=None, help="Student training epochs [default: 15; 1 with --quick].")
@click.option("--views", type=int, default=None, help="Augmented views a sample in the views cache [default: 8; 2 with --quick].")
@click.option("--topk", type=int, default=5, show_default=True, help="K of the demo's top-k caches.")
@click.option("--quick", is_flag=True, help="Toy sizes, a few seconds: checks the wiring (its numbers mean nothing).")
@click.option("--plot", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Also draw each method's learning curves (its first seed) on one figure; needs matplotlib.")
@quiet_option("Only the final table.")
def demo_command(workdir: Path | None, seed: int, seeds: int | None, epochs: int | None, views: int | None, topk: int,
                 quick: bool, quiet: bool, plot: Path | None = None) -> None:
    """Why cache a teacher: measured on augmented digits, in a couple of minutes on two CPU cores.

    Trains a teacher far costlier than the student, dumps its top-k logits once (one clean view a
    sample, and 8 replayable augmented views a sample), trains the same small student on augmented
    data four ways (labels only, cached KD from the clean view, cached KD from the replayed views,
    online KD) over a few seeds, and prints test accuracy (mean ± std), time per epoch, time in the
    teacher and bytes on disk, with a PASS/MISS verdict per claim computed from those numbers.
    """
    from ..tools.demo import run_demo

    setup_logging(quiet)
    try:
        if plot is not None:
            require_matplotlib()
        result = run_demo(workdir, seed=seed, epochs=epochs, topk=topk, quiet=quiet, seeds=seeds, views=views, quick=quick)
        if plot is not None:
            plot_learning_curves({name: runs[0].epochs for name, runs in result.runs.items() if runs}, plot,
                                 title="logit-cache demo: the same student, four sources of targets (first seed)")
    except LogitCacheError as exc:
        fail(exc)
    click.echo(result.table())
    if workdir is not None:
        click.echo(f"outputs in {workdir} (demo.json holds the table)")
    if plot is not None:
        click.echo(f"learning curves: {plot}")
