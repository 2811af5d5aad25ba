"""Figures: ``logit-cache info CACHE --plot FILE.png`` and the learning curves.

The plotted quantities are checked against numpy computed here from the raw arrays (read with plain
zarr/h5py, or from the data set itself), never against pixels; the PNGs are decoded and their size checked.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import RaggedTokens, causal_bag, read_plain, spec

from logit_cache import DumpConfig, dump_cache
from logit_cache.errors import MissingPackageError
from logit_cache.store import BACKENDS

matplotlib_image = pytest.importorskip("matplotlib.image")

from logit_cache.tools.plots import plot_cache, plot_learning_curves  # noqa: E402

N = 300
CLASSES = 10
EDGES01 = np.linspace(0.0, 1.0, 51)
EDGES_NATS = np.linspace(0.0, math.log(CLASSES), 51)


def _png_shape(path: Path) -> tuple[int, ...]:
    return matplotlib_image.imread(str(path)).shape


def _counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]


def _entropy(p: np.ndarray) -> np.ndarray:
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plots") / "teacher.pt"
    model = make_teacher()
    with torch.no_grad():  # sharper logits than a fresh init, so the histograms spread over several bins
        for parameter in model.parameters():
            parameter.mul_(4.0)
    torch.save(model.state_dict(), path)
    return path


def _dump(teacher: Path, out: Path, dataset: str = "random_images", dataset_kwargs: dict | None = None, **kw) -> Path:
    config = DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec(dataset),
                        dataset_kwargs={"n": N, **(dataset_kwargs or {})}, out=str(out), quiet=True, device="cpu", **kw)
    return dump_cache(config).out


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_info_plot_of_a_topk_cache(cli, teacher_file: Path, tmp_path: Path, backend: str) -> None:
    out = _dump(teacher_file, tmp_path / "top3", mode="topk", k=3, dtype="float32", backend=backend)
    png = tmp_path / "top3.png"
    result = cli("info", out, "--plot", png)
    assert result.exit_code == 0, result.output
    assert f"plot         {png} (all {N} rows)" in result.output
    assert _png_shape(png) == (800, 1200, 4)  # 12 x 8 in at 100 dpi, RGBA

    drawn = plot_cache(out, tmp_path / "again.png")
    values, lse = read_plain(out, "topk_logits").astype(np.float64), read_plain(out, "logsumexp").astype(np.float64)
    p = np.exp(values - lse[:, None])
    mass = p.sum(axis=1)
    rest = np.clip(1.0 - mass, 0.0, 1.0)
    known = _entropy(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        one_bucket = np.where(rest > 0, -rest * np.log(rest), 0.0)
        spread = np.where(rest > 0, -rest * np.log(rest / (CLASSES - 3)), 0.0)
    np.testing.assert_array_equal(drawn.summary.top1.edges, EDGES01)
    np.testing.assert_array_equal(drawn.summary.entropy[0].edges, EDGES_NATS)
    np.testing.assert_array_equal(drawn.drawn["top1"], _counts(p.max(axis=1), EDGES01))
    np.testing.assert_array_equal(drawn.drawn["coverage"], _counts(mass, EDGES01))
    np.testing.assert_array_equal(drawn.drawn["entropy"], _counts(known + one_bucket, EDGES_NATS))
    np.testing.assert_array_equal(drawn.drawn["entropy_high"], _counts(known + spread, EDGES_NATS))
    np.testing.assert_array_equal(drawn.drawn["labels"], np.bincount(read_plain(out, "labels"), minlength=CLASSES))
    assert (drawn.drawn["top1"] > 0).sum() > 3  # the data spreads over several bins: the comparison means something
    assert "one bucket" in drawn.summary.entropy[0].note and "upper bound" in drawn.summary.entropy[1].note
    assert "tokens" not in drawn.drawn


def test_full_cache_quantities_are_exact(teacher_file: Path, tmp_path: Path) -> None:
    out = _dump(teacher_file, tmp_path / "full", mode="full", dtype="float32")
    drawn = plot_cache(out, tmp_path / "full.png")
    logits = read_plain(out, "logits").astype(np.float64)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(drawn.drawn["top1"], _counts(p.max(axis=1), EDGES01))
    np.testing.assert_array_equal(drawn.drawn["entropy"], _counts(_entropy(p), EDGES_NATS))
    assert len(drawn.summary.entropy) == 1 and drawn.summary.entropy[0].note == "exact"
    assert "coverage" not in drawn.drawn and drawn.summary.top1.mean == pytest.approx(p.max(axis=1).mean())
    assert _png_shape(tmp_path / "full.png") == (800, 1200, 4)


def test_labelled_cache_counts_each_class_and_an_unlabelled_one_draws_without(teacher_file: Path, tmp_path: Path) -> None:
    out = _dump(teacher_file, tmp_path / "labelled", dataset_kwargs={"classes": 7, "seed": 3}, mode="topk", k=2)
    drawn = plot_cache(out, tmp_path / "labelled.png")
    from data_factories import RandomImages

    want = np.bincount(RandomImages(N, seed=3, classes=7).labels.numpy(), minlength=CLASSES)  # classes 7..9: none
    np.testing.assert_array_equal(drawn.drawn["labels"], want)
    np.testing.assert_array_equal(drawn.summary.label_counts, want)

    bare = _dump(teacher_file, tmp_path / "unlabelled", dataset="unlabeled_images", mode="topk", k=2)
    drawn = plot_cache(bare, tmp_path / "unlabelled.png")
    assert "labels" not in drawn.drawn and drawn.summary.label_counts is None
    assert drawn.drawn["top1"].sum() == N and _png_shape(tmp_path / "unlabelled.png") == (800, 1200, 4)


@pytest.mark.parametrize("sample_temperature", [1.0, 2.0])
def test_sampled_per_token_cache(cli, tmp_path: Path, sample_temperature: float) -> None:
    torch.manual_seed(0)
    teacher = tmp_path / "bag.pt"
    torch.save(causal_bag(vocab=50).state_dict(), teacher)
    out = tmp_path / "sampled"
    dump_cache(DumpConfig(teacher=str(teacher), arch=spec("causal_bag"), arch_kwargs={"vocab": 50}, dataset=spec("ragged_tokens"),
                          dataset_kwargs={"vocab": 50, "n": 60}, out=str(out), mode="sampled", m=16,
                          sample_temperature=sample_temperature, quiet=True, device="cpu", shard_rows=150))
    png = tmp_path / "sampled.png"
    assert cli("info", out, "--plot", png).exit_code == 0
    assert _png_shape(png) == (800, 1200, 4)
    drawn = plot_cache(out, tmp_path / "again.png")

    ids, counts = read_plain(out, "sampled_indices"), read_plain(out, "sampled_counts").astype(np.int64)
    assert ids.shape[1] == 16
    edges_nats = np.linspace(0.0, math.log(50), 51)
    if sample_temperature == 1.0:  # counts / M estimates the probabilities
        p = counts / 16.0
        entropy = _entropy(p)
    else:  # the drawn ids' exact probabilities, the undrawn mass as one bucket
        lse = read_plain(out, "logsumexp").astype(np.float64)
        p = np.where(counts > 0, np.exp(read_plain(out, "sampled_logits").astype(np.float64) - lse[:, None]), 0.0)
        rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = _entropy(p) + np.where(rest > 0, -rest * np.log(rest), 0.0)
        assert "lower bound" in drawn.summary.entropy[0].note
    np.testing.assert_array_equal(drawn.drawn["top1"], _counts(p.max(axis=1), EDGES01))
    np.testing.assert_array_equal(drawn.drawn["entropy"], _counts(entropy, edges_nats))
    distinct = (counts > 0).sum(axis=1)
    np.testing.assert_array_equal(drawn.summary.coverage.edges, np.arange(0.5, 17.0))
    np.testing.assert_array_equal(drawn.drawn["coverage"], np.bincount(distinct, minlength=17)[1:])
    lengths = np.asarray(RaggedTokens(n=60, vocab=50).lengths)  # tokens per sequence, from the data set itself
    edges = drawn.summary.tokens.edges
    np.testing.assert_array_equal(edges, np.arange(lengths.min() - 0.5, lengths.max() + 1.5))
    np.testing.assert_array_equal(drawn.drawn["tokens"], np.histogram(lengths, bins=edges)[0])
    assert "labels" not in drawn.drawn


def test_large_caches_are_sampled_seeded_and_bounded(teacher_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _dump(teacher_file, tmp_path / "top4", mode="topk", k=4, dtype="float32", shard_rows=100)
    values, lse = read_plain(out, "topk_logits").astype(np.float64), read_plain(out, "logsumexp").astype(np.float64)
    top1 = np.exp(values[:, 0] - lse)

    first = plot_cache(out, tmp_path / "a.png", max_rows=120, seed=5)
    rows = first.summary.rows
    assert len(rows) == 120 and len(np.unique(rows)) == 120 and np.all(np.diff(rows) > 0)
    assert "120 of 300 rows" in first.summary.sample_note and "seed 5" in first.summary.sample_note
    np.testing.assert_array_equal(first.drawn["top1"], _counts(top1[rows], EDGES01))
    np.testing.assert_array_equal(plot_cache(out, tmp_path / "b.png", max_rows=120, seed=5).summary.rows, rows)  # seeded
    assert not np.array_equal(plot_cache(out, tmp_path / "c.png", max_rows=120, seed=6).summary.rows, rows)

    import logit_cache.io.rows as rows_module

    monkeypatch.setattr(rows_module, "IN_MEMORY_BYTES", 0)  # as a cache too big for memory: whole chunks, bounded reads
    chunked = plot_cache(out, tmp_path / "d.png", max_rows=150, seed=0)
    picked = chunked.summary.rows
    assert len(picked) == 150 and "whole chunks" in chunked.summary.sample_note
    starts = {int(r) for r in picked if r % 100 == 0}  # three shards of 100 rows, one chunk each
    assert len(starts) == 2 and all(r - r % 100 in starts for r in picked)
    np.testing.assert_array_equal(chunked.drawn["top1"], _counts(top1[picked], EDGES01))


def _history(loss0: float, accuracy: bool, kl: bool, epochs: int = 4) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        record = {"epoch": epoch, "train_loss": loss0 / epoch, "seconds": 0.5 + epoch / 10, "teacher_seconds": 0.0}
        if accuracy:
            record["eval_accuracy"] = 1 - 0.3 / epoch
        if kl:
            record["eval_kl"] = 0.2 / epoch
        records.append(record)
    return records


def test_learning_curves_of_two_runs(tmp_path: Path) -> None:
    histories = {"labels only": _history(2.0, accuracy=True, kl=False), "cached KD": _history(1.5, accuracy=True, kl=True)}
    png = tmp_path / "curves.png"
    drawn = plot_learning_curves(histories, png, title="two runs")
    assert _png_shape(png) == (800, 1200, 4)
    assert set(drawn) == {"train_loss", "eval_accuracy", "eval_kl", "seconds"}
    assert set(drawn["eval_kl"]) == {"cached KD"}  # a run that was not evaluated against the teacher draws no KL line
    for field, runs in drawn.items():
        for run, (epochs, values) in runs.items():
            np.testing.assert_array_equal(epochs, [r["epoch"] for r in histories[run]])
            np.testing.assert_allclose(values, [r[field] for r in histories[run]])


def test_learning_curves_of_a_language_model_and_of_nothing(tmp_path: Path) -> None:
    records = [{"epoch": e, "train_loss": 3.0 / e, "seconds": 1.0, "tokens": 500, "eval_perplexity": 20.0 / e} for e in (1, 2, 3)]
    drawn = plot_learning_curves({"lm": records}, tmp_path / "lm.png")
    assert set(drawn) == {"train_loss", "eval_perplexity", "seconds"}
    np.testing.assert_allclose(drawn["eval_perplexity"]["lm"][1], [20.0, 10.0, 20.0 / 3])
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_learning_curves({"empty": [{"epoch": 1}]}, tmp_path / "none.png")


def test_missing_matplotlib_names_the_extra(cli, teacher_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _dump(teacher_file, tmp_path / "top2", mode="topk", k=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    hint = "pip install 'logit-cache[plot]'"
    with pytest.raises(MissingPackageError, match="matplotlib") as caught:
        plot_learning_curves({"run": _history(1.0, True, True)}, tmp_path / "c.png")
    assert hint in str(caught.value)
    with pytest.raises(MissingPackageError, match=r"pip install 'logit-cache\[plot\]'"):
        plot_cache(out, tmp_path / "p.png")
    result = cli("info", out, "--plot", tmp_path / "p.png")
    assert result.exit_code == 1 and hint in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "c.png").exists()
