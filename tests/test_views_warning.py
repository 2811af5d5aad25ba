"""A views cache read through a plain DataLoader (no cache sampler, no set_epoch) would serve the views of
epoch 0 every epoch: the wrapper warns once, with the fix; the sampler's path and set_epoch stay silent."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ARCH, ARCH_KWARGS
from data_factories import read_plain, spec, three_rng_images
from torch.utils.data import DataLoader

from logit_cache import DumpConfig, dump, open_cache
from logit_cache.replay import default_view

VIEWS, SEED, N = 2, 3, 40


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    out = tmp_path_factory.mktemp("views") / "cache"
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("three_rng_images"),
                    dataset_kwargs={"n": N}, out=str(out), mode="full", dtype="float32", views=VIEWS, seed=SEED, quiet=True))
    return out


def epochs_of_logits(loader: DataLoader, epochs: int) -> list[np.ndarray]:
    return [np.concatenate([target.logits.numpy() for _, _, target in loader]) for _ in range(epochs)]


def test_plain_indices_without_set_epoch_warn_once_with_the_fix(views_cache: Path) -> None:
    cache = open_cache(views_cache)
    loader = DataLoader(cache.wrap(three_rng_images(n=N)), batch_size=8, collate_fn=cache.collate)
    with pytest.warns(UserWarning) as caught:
        served = epochs_of_logits(loader, 3)
    relevant = [w for w in caught if "views per sample" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    message = str(relevant[0].message)
    assert f"{VIEWS} views per sample" in message and str(views_cache) in message
    assert "cache.sampler(" in message and "set_epoch(epoch)" in message
    # what it warns about: every epoch served the same rows, epoch 0's views
    stored = read_plain(views_cache, "logits")
    expected = stored[np.arange(N) * VIEWS + default_view(0, np.arange(N), VIEWS)]
    for logits in served:
        np.testing.assert_array_equal(logits, expected)


def test_the_single_item_path_warns_too(views_cache: Path) -> None:
    wrapped = open_cache(views_cache).wrap(three_rng_images(n=N))
    with pytest.warns(UserWarning, match="set_epoch was never called"):
        wrapped[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_no_warning_with_the_cache_sampler(views_cache: Path, workers: int) -> None:
    cache = open_cache(views_cache)
    sampler = cache.sampler(shuffle=True, seed=0)
    loader = DataLoader(cache.wrap(three_rng_images(n=N)), batch_size=8, sampler=sampler, collate_fn=cache.collate,
                        num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            sampler.set_epoch(epoch)
            assert sum(len(labels) for _, labels, _ in loader) == N


def test_no_warning_after_set_epoch(views_cache: Path) -> None:
    cache = open_cache(views_cache)
    wrapped = cache.wrap(three_rng_images(n=N))
    loader = DataLoader(wrapped, batch_size=8, collate_fn=cache.collate)
    stored = read_plain(views_cache, "logits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(2):
            wrapped.set_epoch(epoch)
            served = np.concatenate([target.logits.numpy() for _, _, target in loader])
            np.testing.assert_array_equal(served, stored[np.arange(N) * VIEWS + default_view(epoch, np.arange(N), VIEWS)])


def test_a_single_view_cache_never_warns(tmp_path: Path, teacher: Path) -> None:
    out = tmp_path / "one"
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("three_rng_images"),
                    dataset_kwargs={"n": N}, out=str(out), mode="full", dtype="float32", seed=SEED, quiet=True))
    cache = open_cache(out)  # one seeded view: nothing to rotate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(len(labels) for _, labels, _ in DataLoader(cache.wrap(three_rng_images(n=N)), batch_size=8,
                                                               collate_fn=cache.collate)) == N
