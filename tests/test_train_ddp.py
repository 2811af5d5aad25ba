"""``torchrun --nproc_per_node=2 -m logit_cache train`` (gloo on CPU) trains data-parallel.

Each run checks, from the outside: every sample is read exactly once per epoch across the two ranks
(the datasets record the indices each batch read asks for, per rank); one set of output files,
written by rank 0; the final weights are the same on both ranks and are the ones saved (each rank's
student saves its weights when the process exits); only rank 0 logs its epochs.

Equivalence with one process: the sampler gives rank ``r`` the ``r``-th contiguous half of the epoch's
order, so step ``s`` of 2 ranks x batch 16 trains on ``order[16s:16s+16]`` and
``order[half+16s:half+16s+16]``, not on ``order[32s:32s+32]`` as one process with batch 32 does: the
same samples per epoch, other global batches. What is comparable is one process with batch 32 fed
those very global batches (:class:`GlobalBatches`, the sampler with its order rearranged): its steps
are the ranks' steps, so the loss curve, the eval metrics and the weights must agree up to float
summation order (the all-reduce adds two half-batch gradients where one process sums 32 rows). For
the language model, ranks hold different token counts; the trainer weights each rank's mean by its
share of the step's tokens, so a step is the mean over all tokens, as in one process. Tolerance:
1e-5 relative on losses and metrics, 1e-5 absolute on weights, over 2 epochs of AdamW (a wrong
weighting or a misaligned batch moves the losses by 1e-3 or more).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import spec as data_spec
from ddp_factories import spec
from processes import finish, torchrun_argv

import logit_cache.train.loop as loop
from logit_cache import DumpConfig, TrainConfig, dump_cache, train_student
from logit_cache.data.datasets import resolve_dataset
from logit_cache.data.loader import ChunkShuffleSampler
from logit_cache.specs import resolve_callable

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for name in ("LC_TEST_SERVED", "LC_TEST_WEIGHTS", "LC_TEST_FAIL_AT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
    ENV.pop(name, None)
N_IMAGES, N_SEQUENCES = 200, 120
TOL = 1e-5


def torchrun(args: list[str], **env: str) -> subprocess.Popen[str]:
    argv = torchrun_argv("-m", "logit_cache", "train", *args)
    return subprocess.Popen(argv, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class GlobalBatches(ChunkShuffleSampler):
    """One process, fed what 2 ranks of batch ``PER_RANK`` train on together: step by step, rank 0's batch then
    rank 1's (each rank's share is a contiguous half of the epoch's order, see the module docstring)."""

    PER_RANK = 16

    def indices(self) -> np.ndarray:
        half = math.ceil(self.num_samples / 2)
        order = np.resize(self.order(), 2 * half)
        shares = (order[:half], order[half:])
        return np.concatenate([np.concatenate([share[s:s + self.PER_RANK] for share in shares])
                               for s in range(0, half, self.PER_RANK)])

    def __len__(self) -> int:
        return 2 * math.ceil(self.num_samples / 2)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> dict[str, Path]:
    """A top-5 cache of ``counted_images`` and a per-token top-8 cache of ``counted_tokens`` (a CausalBag teacher)."""
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    bag = root / "bag.pt"
    torch.save(resolve_callable(data_spec("causal_bag"), "arch")(vocab=50).state_dict(), bag)
    paths = {"teacher": teacher, "images": root / "images", "tokens": root / "tokens"}
    dump_cache(DumpConfig(teacher=str(teacher), arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32},
                          dataset=spec("counted_images"), out=str(paths["images"]), k=5, device="cpu", quiet=True))
    dump_cache(DumpConfig(teacher=str(bag), arch=data_spec("causal_bag"), arch_kwargs={"vocab": 50},
                          dataset=spec("counted_tokens"), out=str(paths["tokens"]), k=8, device="cpu", quiet=True))
    return paths


def served(folder: Path, batches_per_epoch: int, epochs: int) -> list[list[list[int]]]:
    """``[epoch][rank]``: the indices each rank's batch reads asked for, in order."""
    out: list[list[list[int]]] = [[] for _ in range(epochs)]
    for rank in range(2):
        lines = (folder / f"served.rank{rank}.txt").read_text().splitlines()
        assert len(lines) == batches_per_epoch * epochs, f"rank {rank} read {len(lines)} batches"
        for epoch in range(epochs):
            chunk = lines[epoch * batches_per_epoch:(epoch + 1) * batches_per_epoch]
            out[epoch].append([int(i) for line in chunk for i in line.split()])
    return out


def assert_each_sample_once(per_epoch: list[list[list[int]]], n: int) -> None:
    for epoch, ranks in enumerate(per_epoch):
        assert len(ranks[0]) == len(ranks[1]) == n // 2, f"epoch {epoch}: unequal shares"
        counts = np.bincount(ranks[0] + ranks[1], minlength=n)
        assert counts.min() == counts.max() == 1, f"epoch {epoch}: samples read {counts.max()}x, missing {np.flatnonzero(counts == 0)[:5]}"
    assert per_epoch[0][0] != per_epoch[-1][0] or len(per_epoch) == 1, "every epoch in the same order"


def assert_one_set_of_outputs(tmp_path: Path, out: Path, weights: Path) -> dict:
    """Only rank 0 wrote: exactly the student, its sidecar and metrics; both ranks ended with those weights."""
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.with_suffix(".json").name,
                                                                  out.with_suffix(".metrics.json").name])
    saved = torch.load(out, weights_only=True)
    for rank in range(2):
        final = torch.load(weights / f"rank{rank}.pt", weights_only=True)
        assert final.keys() == saved.keys()  # a plain state_dict: no DDP "module." prefix
        for name in saved:
            assert torch.equal(final[name], saved[name]), f"rank {rank}: {name} differs from the saved weights"
    sidecar = json.loads(out.with_suffix(".json").read_text())
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    for record in (sidecar, metrics):
        assert (record["world_size"], record["batch_size"], record["global_batch_size"]) == (2, 16, 32)
    return metrics


def run_ranks(tmp_path: Path, args: list[str], **env: str) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    out = tmp_path / "out" / "student.pt"
    logs, weights = tmp_path / "served", tmp_path / "weights"
    logs.mkdir()
    weights.mkdir()
    proc = torchrun([*args, "--out", str(out), "--device", "cpu", "--batch-size", "16"],
                    LC_TEST_SERVED=str(logs), LC_TEST_WEIGHTS=str(weights), **env)
    return proc, out, logs, weights


def reference(monkeypatch: pytest.MonkeyPatch, out: Path, **kwargs: object):
    """One process, batch 32, fed the ranks' global batches (:class:`GlobalBatches`)."""
    monkeypatch.setattr(loop, "ChunkShuffleSampler", GlobalBatches)
    return train_student(TrainConfig(out=str(out), batch_size=32, device="cpu", quiet=True, **kwargs))


def assert_same_run(metrics: dict, ref, out: Path, keys: tuple[str, ...]) -> None:
    got, want = metrics["epochs"], ref.epochs
    for key in ("train_loss", *keys):
        assert [e[key] for e in got] == pytest.approx([e[key] for e in want], rel=TOL), key
    a, b = torch.load(out, weights_only=True), torch.load(ref.out, weights_only=True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOL, msg=f"{name} differs from one process's")


def test_per_sample_cache(caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluation = ["--eval-dataset", data_spec("random_images"), "--eval-dataset-kwargs", '{"n": 101, "seed": 1}']
    proc, out, logs, weights = run_ranks(tmp_path, [
        "--student", spec("recorded_mlp"), "--dataset", spec("counted_images"), "--cache", str(caches["images"]),
        "--epochs", "2", *evaluation])  # fmt: skip
    ref = reference(monkeypatch, tmp_path / "ref" / "student.pt", student=spec("recorded_mlp"), dataset=spec("counted_images"),
                    caches=[str(caches["images"])], epochs=2, eval_dataset=data_spec("random_images"),
                    eval_dataset_kwargs={"n": 101, "seed": 1})
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    assert stderr.count("epoch 1/2: loss") == 1 and stderr.count("epoch 2/2: loss") == 1, stderr  # rank 0 alone logs
    assert "2 ranks x batch 16" in stderr
    assert_each_sample_once(served(logs, math.ceil(N_IMAGES / 2 / 16), 2), N_IMAGES)
    metrics = assert_one_set_of_outputs(tmp_path, out, weights)
    assert_same_run(metrics, ref, out, ("eval_accuracy",))
    # the eval accuracy (50 + 51 items, one share per rank, reduced) recomputed from the saved student
    student = resolve_callable(spec("recorded_mlp"), "student")()
    student.load_state_dict(torch.load(out, weights_only=True))
    images = resolve_dataset(data_spec("random_images"), {"n": 101, "seed": 1}).dataset
    with torch.no_grad():
        correct = int((student(images.images).argmax(1) == images.labels).sum())
    assert metrics["epochs"][-1]["eval_accuracy"] == pytest.approx(correct / 101, abs=1e-12)


def test_per_token_cache(caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluation = ["--eval-dataset", data_spec("ragged_tokens"), "--eval-dataset-kwargs", '{"n": 31, "seed": 1}']
    proc, out, logs, weights = run_ranks(tmp_path, [
        "--student", spec("recorded_bag"), "--dataset", spec("counted_tokens"), "--cache", str(caches["tokens"]),
        "--epochs", "2", "--quiet", *evaluation])  # fmt: skip
    ref = reference(monkeypatch, tmp_path / "ref" / "student.pt", student=spec("recorded_bag"), dataset=spec("counted_tokens"),
                    caches=[str(caches["tokens"])], epochs=2, eval_dataset=data_spec("ragged_tokens"),
                    eval_dataset_kwargs={"n": 31, "seed": 1})
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    assert_each_sample_once(served(logs, math.ceil(N_SEQUENCES / 2 / 16), 2), N_SEQUENCES)
    metrics = assert_one_set_of_outputs(tmp_path, out, weights)
    assert [e["tokens"] for e in metrics["epochs"]] == [e["tokens"] for e in ref.epochs]  # every rank's tokens counted
    assert_same_run(metrics, ref, out, ("eval_perplexity", "eval_loss"))


@pytest.mark.parametrize("source", ["labels", "online"])
def test_labels_only_and_online(caches: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    targets = {"labels": ["--labels-only"],
               "online": ["--teacher", str(caches["teacher"]), "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs",
                          '{"hidden": 32}']}[source]
    proc, out, logs, weights = run_ranks(tmp_path, ["--student", spec("recorded_mlp"), "--dataset", spec("counted_images"),
                                                    "--epochs", "1", "--quiet", *targets])
    options = {"labels_only": True} if source == "labels" else {
        "teacher": str(caches["teacher"]), "arch": "logit_cache.models:digits_mlp", "arch_kwargs": {"hidden": 32}}
    ref = reference(monkeypatch, tmp_path / "ref" / "student.pt", student=spec("recorded_mlp"), dataset=spec("counted_images"),
                    epochs=1, **options)
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    assert_each_sample_once(served(logs, math.ceil(N_IMAGES / 2 / 16), 1), N_IMAGES)
    metrics = assert_one_set_of_outputs(tmp_path, out, weights)
    assert_same_run(metrics, ref, out, ())
    assert json.loads(out.with_suffix(".json").read_text())["targets"] == source


def test_a_failing_rank_stops_both(tmp_path: Path) -> None:
    """Rank 1 fails reading its 4th batch: both processes exit (no hang in a collective), non-zero, the error said."""
    sampler = ChunkShuffleSampler(N_IMAGES, seed=0, num_replicas=2, rank=1)
    victim = int(sampler.indices()[3 * 16])
    proc, out, _, _ = run_ranks(tmp_path, ["--student", spec("recorded_mlp"), "--dataset", spec("counted_images"),
                                           "--labels-only", "--epochs", "1", "--quiet"], LC_TEST_FAIL_AT=str(victim))
    code, _, stderr = finish(proc)
    assert code != 0
    assert f"injected failure reading sample {victim} on rank 1" in stderr, stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
