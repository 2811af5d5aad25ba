"""The trainer, the ``train`` and ``demo`` commands: results, files written, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCH, make_teacher

from logit_cache import DumpConfig, TrainConfig, dump, train
from logit_cache.datasets import DigitsDataset
from logit_cache.errors import DatasetMismatchError, IncompleteCacheError, TargetMismatchError, UsageError
from logit_cache.models import digits_mlp

STUDENT = "logit_cache.models:digits_mlp"
STUDENT_KWARGS = {"hidden": 16, "depth": 1}
TEACHER_KWARGS = {"hidden": 32}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A seeded teacher and caches of the digits train split: full float32, top-5 float16, top-3 hdf5, and the test split."""
    root = tmp_path_factory.mktemp("train")
    teacher = root / "teacher.pt"
    torch.save(make_teacher().state_dict(), teacher)
    paths = {"root": root, "teacher": teacher}
    for name, mode, k, dtype, backend, split in (
        ("full32", "full", None, "float32", "zarr", "train"),
        ("top5", "topk", 5, "float16", "zarr", "train"),
        ("top3", "topk", 3, "float16", "hdf5", "train"),
        ("test_top5", "topk", 5, "float16", "zarr", "test"),
    ):
        paths[name] = root / name
        dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=TEACHER_KWARGS, dataset="digits", dataset_kwargs={"split": split},
                        out=str(paths[name]), mode=mode, k=k, dtype=dtype, backend=backend, temperature=2.0, quiet=True))
    return paths


def config(out: Path, **kwargs: object) -> TrainConfig:
    base = {"student": STUDENT, "student_kwargs": STUDENT_KWARGS, "dataset": "digits", "epochs": 2, "quiet": True, "device": "cpu"}
    return TrainConfig(out=str(out), **{**base, **kwargs})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_cached_full_kd_trains_the_same_student_as_online_kd(work: dict[str, Path], tmp_path: Path) -> None:
    """The cache changes the cost, not the result.

    Both runs build the student from the same seed, visit the data in the same order (an in-memory
    cache's sampler is the plain seeded permutation the online run uses) and take the same loss.
    The only possible difference is in the teacher's logits: the dump ran the teacher on batches of
    256, the online run on batches of 64, and a BLAS may sum in another order for another batch
    size (last-bit differences, ~1e-7 relative). Over 3 epochs of AdamW on a 1.2k-weight student
    that stays far below 1e-5, the tolerance used here; any real misalignment (a shifted row, a
    different temperature or order) moves weights by 1e-3 or more.
    """
    cached = train(config(tmp_path / "cached.pt", caches=[str(work["full32"])], temperature=4.0, epochs=3))
    online = train(config(tmp_path / "online.pt", teacher=str(work["teacher"]), arch=ARCH, arch_kwargs=TEACHER_KWARGS,
                          temperature=4.0, epochs=3))
    a, b = weights(cached.out), weights(online.out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=f"{name} differs")
    assert [e["train_loss"] for e in cached.epochs] == pytest.approx([e["train_loss"] for e in online.epochs], rel=1e-5)
    assert online.teacher_seconds > 0 and cached.teacher_seconds == 0
    # and the comparison is sensitive: another temperature gives other weights
    other = train(config(tmp_path / "t1.pt", caches=[str(work["full32"])], temperature=1.0, epochs=3))
    assert max((weights(other.out)[n] - a[n]).abs().max().item() for n in a) > 1e-3


def test_kd_window_outside_the_run_is_labels_only_training(work: dict[str, Path], tmp_path: Path) -> None:
    """KD confined to [1.0, 1.0) never applies: the run is then exactly the labels-only run (same order, same init)."""
    labels = train(config(tmp_path / "labels.pt", labels_only=True))
    never = train(config(tmp_path / "never.pt", caches=[str(work["top5"])], kd_start=1.0, kd_end=1.0))
    late = train(config(tmp_path / "late.pt", caches=[str(work["top5"])], kd_start=0.5))
    a, b, c = weights(labels.out), weights(never.out), weights(late.out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # KD from halfway: the first epoch (of 2) is still labels only, the second differs
    assert labels.epochs[0]["train_loss"] == pytest.approx(late.epochs[0]["train_loss"], rel=1e-6)
    assert max((c[n] - a[n]).abs().max().item() for n in a) > 1e-4


def test_train_writes_the_student_its_sidecar_and_metrics(work: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "students" / "kd.pt"
    result = train(config(out, caches=[str(work["top5"])], eval_dataset="digits", eval_dataset_kwargs={"split": "test"},
                          eval_cache=str(work["test_top5"]), tail="renormalize"))
    student = digits_mlp(**STUDENT_KWARGS)
    student.load_state_dict(weights(out))  # a plain state_dict of the student architecture
    sidecar = json.loads(result.sidecar.read_text())
    assert result.sidecar == out.with_suffix(".json")
    assert sidecar["targets"] == "cache" and sidecar["temperature"] == 2.0  # the cache's recorded temperature
    assert sidecar["caches"][0]["key"] == json.loads((work["top5"] / "manifest.json").read_text())["key"]
    assert sidecar["config"]["tail"] == "renormalize" and sidecar["config"]["student_kwargs"] == STUDENT_KWARGS
    metrics = json.loads(result.metrics_path.read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    # the eval figures are what the saved student gives, recomputed independently here
    test = DigitsDataset("test")
    with torch.no_grad():
        logits = student.eval()(test.images)
    accuracy = int((logits.argmax(1) == test.labels).sum()) / len(test)
    assert metrics["epochs"][-1]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    teacher = make_teacher()
    with torch.no_grad():
        t = teacher(test.images)
    v, i = t.half().float().topk(5)
    lse = torch.logsumexp(t, 1)
    # eval KL is the "rest" KL at T=1 against the top-5 cache: teacher mass on top-5 and the rest bucket
    p = torch.exp(v - lse[:, None])
    q_all = torch.log_softmax(logits, 1)
    q = q_all.gather(1, i)
    rest_p = (1 - p.sum(1)).clamp(min=1e-30)
    rest_q = (1 - q.exp().sum(1)).clamp(min=1e-30)
    kl = ((p * (torch.log(p) - q)).sum(1) + rest_p * (torch.log(rest_p) - torch.log(rest_q))).mean().item()
    assert metrics["epochs"][-1]["eval_kl"] == pytest.approx(kl, rel=2e-3)


def test_several_caches_and_a_teacher_subset(work: dict[str, Path], tmp_path: Path) -> None:
    both = train(config(tmp_path / "both.pt", caches=[str(work["top5"]), str(work["top3"])], epochs=1))
    one = train(config(tmp_path / "one.pt", caches=[str(work["top5"]), str(work["top3"])], teachers_per_step=1, epochs=1))
    only5 = train(config(tmp_path / "only5.pt", caches=[str(work["top5"])], epochs=1))
    losses = [r.final["train_loss"] for r in (both, one, only5)]
    assert len(set(losses)) == 3  # averaging, sampling and a single teacher are three different trainings


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, UsageError, "choose where the soft targets come from"),
        ({"labels_only": True, "teacher": "t.pt"}, UsageError, "--teacher and --labels-only"),
        ({"caches": ["top5"], "tail": "nope"}, UsageError, "--tail 'nope'"),
        ({"caches": ["top5"], "dataset_kwargs": {"split": "test"}}, DatasetMismatchError, "360 items"),
        ({"caches": ["full32"], "tail": "renormalize"}, TargetMismatchError, "top-k"),
        ({"caches": ["top5"], "student_kwargs": {"num_classes": 7}}, TargetMismatchError, "7 outputs"),
        ({"caches": ["top5"], "eval_cache": "test_top5"}, UsageError, "--eval-cache needs --eval-dataset"),
    ],
)
def test_train_errors(work: dict[str, Path], tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    kwargs = dict(kwargs)
    if "caches" in kwargs:
        kwargs["caches"] = [str(work[name]) for name in kwargs["caches"]]
    if "eval_cache" in kwargs:
        kwargs["eval_cache"] = str(work[kwargs["eval_cache"]])
    with pytest.raises(error, match=match):
        train(config(tmp_path / "s.pt", **kwargs))
    assert not (tmp_path / "s.pt").exists()


def test_train_refuses_an_incomplete_cache(work: dict[str, Path], tmp_path: Path) -> None:
    manifest = json.loads((work["top5"] / "manifest.json").read_text())
    broken = tmp_path / "incomplete"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(IncompleteCacheError, match="complete=false"):
        train(config(tmp_path / "s.pt", caches=[str(broken)]))


def test_cli_train_and_its_errors(work: dict[str, Path], tmp_path: Path, cli) -> None:
    out = tmp_path / "cli.pt"
    result = cli("train", "--student", STUDENT, "--student-kwargs", json.dumps(STUDENT_KWARGS), "--dataset", "digits",
                 "--cache", work["top5"], "--out", out, "--epochs", "1", "--eval-dataset", "digits",
                 "--eval-dataset-kwargs", '{"split": "test"}', "--quiet")
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.output and "eval accuracy" in result.output
    assert out.exists() and out.with_suffix(".metrics.json").exists()
    bad = cli("train", "--student", STUDENT, "--dataset", "digits", "--dataset-kwargs", '{"split": "test"}',
              "--cache", work["top5"], "--out", tmp_path / "bad.pt", "--quiet")
    assert bad.exit_code == 1
    assert bad.output.count("\n") == 1 and bad.output.startswith("error: ") and "360 items" in bad.output


def test_demo_runs_and_reruns_in_its_workdir(tmp_path: Path, cli) -> None:
    first = cli("demo", "--workdir", tmp_path, "--quick", "--quiet")
    assert first.exit_code == 0, first.output
    assert "these numbers mean nothing" in first.output
    methods = ["labels only", "cached KD, 1 clean view", "cached KD, replayed views", "online KD"]
    for method in methods:
        assert method in first.output
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [r["method"] for r in rows] == methods
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert [r["teacher_seconds"] > 0 for r in rows] == [False, False, False, True]
    # rerun over its own outputs (overwrite=True replaces the caches it dumped): no error, and the same
    # accuracies (deterministic given the seed)
    second = cli("demo", "--workdir", tmp_path, "--quick", "--quiet")
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [(r["method"], r["test_accuracy"]) for r in again] == [(r["method"], r["test_accuracy"]) for r in rows]


def test_worker_processes_do_not_change_the_result(work: dict[str, Path], tmp_path: Path) -> None:
    """The data order comes from the sampler in the main process: 2 forked workers give the same weights as none."""
    alone = train(config(tmp_path / "w0.pt", caches=[str(work["top5"])], epochs=2))
    workers = train(config(tmp_path / "w2.pt", caches=[str(work["top5"])], epochs=2, num_workers=2))
    a, b = weights(alone.out), weights(workers.out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_default_collate_also_works(work: dict[str, Path]) -> None:
    """Without collate_fn=cache.collate, torch's default_collate still pairs each item with its row."""
    from torch.utils.data import DataLoader

    from logit_cache import open_cache

    cache = open_cache(work["top5"])
    inputs, labels, target = next(iter(DataLoader(cache.wrap(DigitsDataset("train")), batch_size=8)))
    assert set(target) == {"topk_logits", "topk_indices", "logsumexp", "topk_log_tail"}
    with torch.no_grad():
        expected = make_teacher()(inputs)
    torch.testing.assert_close(target["topk_indices"].long(), expected.topk(5).indices)  # the dump selects in float32
    assert labels.tolist() == DigitsDataset("train").labels[:8].tolist()


def test_one_loop_both_tasks_mix_their_losses_through_distillation_loss() -> None:
    """The classifier and the language model differ only in their task; both mix KD and ground truth with
    DistillationLoss's weights and window, and the trainer imports nothing private of another module."""
    import ast

    import logit_cache.train as package
    from logit_cache.losses import DistillationLoss, KLDivergence, TokenCrossEntropy, TokenKLDivergence
    from logit_cache.train.tasks import Classification, LanguageModel

    config = TrainConfig(student=ARCH, out="unused.pt", labels_only=True, kd_loss_weight=0.7, org_loss_weight=0.3,
                         kd_start=0.25, kd_end=0.5, tail="ignore")
    for task, kd, ce in ((Classification(), KLDivergence, torch.nn.CrossEntropyLoss), (LanguageModel(), TokenKLDivergence,
                                                                                        TokenCrossEntropy)):
        criterion = task.criterion(config, 2.0)
        assert isinstance(criterion, DistillationLoss) and isinstance(criterion.kd, kd) and isinstance(criterion.ce_loss, ce)
        assert (criterion.kd_loss_weight, criterion.org_loss_weight, criterion.start, criterion.end) == (0.7, 0.3, 0.25, 0.5)
        assert (criterion.kd.temperature, criterion.kd.tail) == (2.0, "ignore")
        assert isinstance(task.criterion(config, None), ce)  # labels only
    private = []
    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []
