"""Augmented views: dumped with seeded generators, replayed bitwise in training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import read_plain, spec, three_rng_images
from torch.utils.data import DataLoader

from logit_cache import DumpConfig, dump, open_cache
from logit_cache.errors import DatasetError, DatasetMismatchError
from logit_cache.loader import CachedDataset
from logit_cache.replay import ReplayViews, default_view, replay_items

VIEWS, SEED, N = 3, 5, 120


def dump_views(out: Path, teacher: Path, views: int = VIEWS, seed: int | None = SEED, dataset: str = "three_rng_images",
               **kwargs) -> Path:
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec(dataset), out=str(out),
                    mode="full", dtype="float32", views=views, seed=seed, shard_rows=90, quiet=True, **kwargs))
    return out


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    return dump_views(tmp_path_factory.mktemp("replay") / "views", teacher)


def rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_same_rng(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]


def test_dump_stores_the_teacher_output_of_each_replayed_view(views_cache: Path) -> None:
    manifest = json.loads((views_cache / "manifest.json").read_text())
    assert (manifest["views"], manifest["seed"], manifest["num_rows"]) == (VIEWS, SEED, N * VIEWS)
    logits = read_plain(views_cache, "logits")  # (N * V, 10), row i * V + v
    assert len(read_plain(views_cache, "labels")) == N  # labels stay per sample
    dataset = three_rng_images()
    rows = np.arange(N * VIEWS)
    inputs = torch.stack([x for x, _ in ReplayViews(dataset, VIEWS, SEED).__getitems__(rows.tolist())])
    with torch.no_grad():
        np.testing.assert_array_equal(logits, make_teacher()(inputs).numpy())
    # the views are really different inputs
    assert not torch.equal(inputs[0], inputs[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_replays_the_dumped_inputs_bitwise(views_cache: Path, workers: int) -> None:
    before = rng_states()
    cache = open_cache(views_cache)
    dataset = three_rng_images()
    wrapped = cache.wrap(dataset)
    sampler = cache.sampler(shuffle=True, seed=0)
    # A DataLoader draws its workers' base seed from the global torch generator unless given its own:
    # with its own, any change to the global generators below would be the wrapper's.
    loader = DataLoader(wrapped, batch_size=32, sampler=sampler, collate_fn=cache.collate, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    teacher = make_teacher()
    seen_views: dict[int, set[int]] = {}
    for epoch in range(VIEWS):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        position = 0
        for inputs, _labels, target in loader:
            indices = np.asarray(order[position : position + len(inputs)])
            position += len(inputs)
            views = default_view(epoch, indices, VIEWS)
            expected = torch.stack([x for x, _ in replay_items(dataset, indices, views, SEED)])
            assert torch.equal(inputs, expected)  # bitwise the input the dump saw for (i, v)
            with torch.no_grad():
                torch.testing.assert_close(target.logits.float(), teacher(inputs), rtol=0, atol=0)
            for i, v in zip(indices.tolist(), views.tolist(), strict=True):
                seen_views.setdefault(i, set()).add(v)
        assert position == N
    assert all(views == set(range(VIEWS)) for views in seen_views.values())  # V epochs show every view once
    assert_same_rng(before, rng_states())  # the main process's generators are untouched


def test_plain_indices_follow_set_epoch(views_cache: Path) -> None:
    cache = open_cache(views_cache)
    wrapped = cache.wrap(three_rng_images())
    sampler = cache.sampler(shuffle=False)
    sampler.set_epoch(2)  # forwarded to the wrapper: plain int indices get epoch 2's views
    assert wrapped.epoch == 2
    batch = wrapped.__getitems__([0, 1, 2])
    views = default_view(2, np.arange(3), VIEWS)
    np.testing.assert_array_equal(batch.targets[0].logits.numpy(), read_plain(views_cache, "logits")[np.arange(3) * VIEWS + views])


def test_a_dataset_that_does_not_replay_is_refused(tmp_path: Path, teacher: Path) -> None:
    with pytest.raises(DatasetError, match=r"item 0 \(view 0\) differs when produced twice"):
        dump_views(tmp_path / "private", teacher, dataset="private_rng_images")
    assert not (tmp_path / "private").exists()


def test_caches_of_other_views_cannot_be_combined(views_cache: Path, tmp_path: Path, teacher: Path) -> None:
    other = dump_views(tmp_path / "two", teacher, views=2)
    with pytest.raises(DatasetMismatchError, match="different --views/--seed"):
        CachedDataset(three_rng_images(), [open_cache(views_cache), open_cache(other)])


def test_a_replay_cache_checks_the_replayed_fingerprint(views_cache: Path) -> None:
    with pytest.raises(DatasetMismatchError, match="content differs"):
        open_cache(views_cache).wrap(three_rng_images(seed=1))


def test_default_view_visits_every_view_once_per_cycle() -> None:
    indices = np.arange(1000)
    views = np.stack([default_view(epoch, indices, 8) for epoch in range(8)])  # (epochs, samples)
    assert (np.sort(views, axis=0) == np.arange(8)[:, None]).all()
    assert len(np.unique(views[0])) == 8  # samples start from different views


def test_cli_dump_views(tmp_path: Path, teacher: Path, cli) -> None:
    out = tmp_path / "cli-views"
    result = cli("dump", "--teacher", teacher, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset", spec("three_rng_images"),
                 "--out", out, "--topk", "3", "--views", "2", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["views"], manifest["seed"], manifest["num_rows"]) == (2, 0, 2 * N)  # seed 0 by default with views
    assert "x 2 view(s)" in cli("info", out).output


@pytest.mark.slow
def test_spawned_workers_replay_too(views_cache: Path) -> None:
    cache = open_cache(views_cache)
    dataset = three_rng_images()
    sampler = cache.sampler(shuffle=False)
    loader = DataLoader(cache.wrap(dataset), batch_size=40, sampler=sampler, collate_fn=cache.collate, num_workers=2,
                        multiprocessing_context="spawn")
    sampler.set_epoch(1)
    inputs = torch.cat([x for x, _, _ in loader])
    expected = torch.stack([x for x, _ in replay_items(dataset, np.arange(N), default_view(1, np.arange(N), VIEWS), SEED)])
    assert torch.equal(inputs, expected)


def test_the_trainer_replays_views(views_cache: Path, tmp_path: Path) -> None:
    """``logit-cache train --cache`` on a views cache: same result with and without worker processes."""
    from logit_cache import TrainConfig, train

    common = {"student": ARCH, "student_kwargs": {"hidden": 8, "depth": 1}, "dataset": spec("three_rng_images"), "epochs": 2,
              "quiet": True, "device": "cpu", "caches": [str(views_cache)], "batch_size": 32}
    alone = train(TrainConfig(out=str(tmp_path / "w0.pt"), **common))
    workers = train(TrainConfig(out=str(tmp_path / "w2.pt"), num_workers=2, **common))
    a, b = torch.load(alone.out, weights_only=True), torch.load(workers.out, weights_only=True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_dump_leaves_the_callers_config_as_given(tmp_path: Path, teacher: Path) -> None:
    config = DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("three_rng_images"),
                        cache_root=str(tmp_path), mode="topk", k=3, views=2, quiet=True)
    result = dump(config)
    assert result.manifest.seed == 0  # the default seed of several views...
    assert config.seed is None and config.resume is False  # ...resolved on a copy: the config can be reused as given


def test_batch_seeds_equal_numpy_seed_sequence_word_for_word():
    """The vectorised hash must stay numpy's: caches dumped with views replay through it."""
    from logit_cache.data.replay import item_seeds
    from logit_cache.data.seeds import batch_seed_words

    rng = np.random.default_rng(0)
    indices = np.concatenate([[0, 1, 2**32 - 1], rng.integers(0, 2**32, 40)])
    views = np.concatenate([[0, 7, 0], rng.integers(0, 16, 40)])
    for seed in (0, 1, 12345, 2**32 - 1, 2**32, 2**64 + 3, 2**130 + 1):  # one to five entropy words for the seed
        got = batch_seed_words(seed, indices, views)
        want = np.stack([np.random.SeedSequence([seed, int(i), int(v)]).generate_state(3, dtype=np.uint32)
                         for i, v in zip(indices, views, strict=True)])
        np.testing.assert_array_equal(got, want)
        assert tuple(int(w) for w in got[5]) == item_seeds(seed, int(indices[5]), int(views[5]))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        batch_seed_words(0, [2**32], [0])
