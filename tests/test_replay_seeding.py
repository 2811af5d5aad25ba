"""Replay seeds only the generators a dataset draws from, and stays bit for bit the replay of seeding all three.

The reference here is the replay every existing cache was dumped with, written out independently:
before each item, ``SeedSequence([seed, i, v]).generate_state(3)`` seeds torch's CPU generator, numpy's
global ``RandomState`` and Python's ``random``, in that order, and nothing else is touched.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from data_factories import private_rng_images, three_rng_images

from logit_cache.data.replay import check_replayable, drawn_generators, preserved_rng, replay_items
from logit_cache.data.seeds import batch_seed_words
from logit_cache.errors import DatasetError

SEED = 11


def reference_items(dataset, indices, views, seed: int = SEED) -> list:
    """Each item produced right after seeding all three generators from (seed, i, v); the caller's states are lost."""
    items = []
    for index, view in zip(indices, views, strict=True):
        words = np.random.SeedSequence([seed, int(index), int(view)]).generate_state(3, dtype=np.uint32)
        torch.default_generator.manual_seed(int(words[0]))
        np.random.seed(int(words[1]))
        random.seed(int(words[2]))
        items.append(dataset[int(index)])
    return items


class Draws(torch.utils.data.Dataset):
    """Items drawing from the generators named in ``uses`` (including each one's cached normal), optionally
    only for some items (``every``: index % every == 0 draws, the others draw nothing from that generator)."""

    def __init__(self, uses: tuple[str, ...], n: int = 96, every: dict[str, int] | None = None) -> None:
        self.uses, self.n, self.every = uses, n, every or {}
        self.base = torch.arange(n * 4, dtype=torch.float64).reshape(n, 4)

    def __len__(self) -> int:
        return self.n

    def _draws(self, name: str, index: int) -> bool:
        return name in self.uses and index % self.every.get(name, 1) == 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.base[index].clone()
        if self._draws("torch", index):
            x += torch.randn(4, dtype=torch.float64) + torch.randint(0, 100, (1,)).double()
        if self._draws("numpy", index):
            x += torch.from_numpy(np.random.normal(size=3).sum() + np.random.uniform(size=4))  # odd normals: a cached one
        if self._draws("random", index):
            x += random.gauss(0.0, 1.0) + random.random()  # gauss caches its second value
        return x, index


class Unhashable(Draws):
    """Cannot be remembered (not hashable): replayed with all three generators seeded."""

    __hash__ = None  # type: ignore[assignment]


def numpy_state() -> tuple:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return name, key.tobytes(), pos, has_gauss, gauss


def caller_states() -> tuple:
    return torch.get_rng_state().clone(), numpy_state(), random.getstate()


def messy_caller_states(seed: int) -> tuple:
    """Caller states with a cached normal pending in each generator, which a restore must bring back too."""
    torch.manual_seed(seed)
    torch.randn(1, dtype=torch.float64)
    np.random.seed(seed)
    np.random.normal()  # has_gauss = 1
    random.seed(seed)
    random.gauss(0.0, 1.0)  # gauss_next set
    return caller_states()


def assert_states(expected: tuple) -> None:
    now = caller_states()
    assert torch.equal(expected[0], now[0])
    assert expected[1] == now[1]
    assert expected[2] == now[2]


def assert_same_items(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (x, i), (y, j) in zip(got, want, strict=True):
        assert i == j and torch.equal(x, y), f"item {i} differs from the reference replay"


CASES = {
    "torch": (("torch",), {}),
    "numpy": (("numpy",), {}),
    "random": (("random",), {}),
    "all three": (("torch", "numpy", "random"), {}),
    "none": ((), {}),
    "numpy now and then": (("torch", "numpy"), {"numpy": 37}),  # first drawn by a later batch: learnt there, batch redone
}


@pytest.mark.parametrize("case", list(CASES))
def test_items_equal_the_all_seeded_replay_and_caller_states_come_back(case: str) -> None:
    uses, every = CASES[case]
    dataset = Draws(uses, every=every)
    rng = np.random.default_rng(3)
    for batch in range(6):
        indices = rng.permutation(len(dataset))[:16] if batch else np.arange(1, 17)  # no multiple of 37 in the first
        if batch == 3:
            indices[0] = 37 if 37 not in indices else indices[0]  # drawn from numpy "now and then": here at the latest
        views = rng.integers(0, 5, len(indices))
        before = messy_caller_states(batch)
        got = replay_items(dataset, indices, views, SEED)
        assert_states(before)
        assert_same_items(got, reference_items(dataset, indices, views))
    expected = {"numpy now and then": ("torch", "numpy"), "none": ()}.get(case, uses)
    assert drawn_generators(dataset) == expected


def test_a_dataset_that_cannot_be_remembered_seeds_all_three() -> None:
    dataset = Unhashable(("numpy",))
    indices, views = np.arange(10), np.arange(10) % 3
    before = messy_caller_states(5)
    got = replay_items(dataset, indices, views, SEED)
    assert_states(before)
    assert_same_items(got, reference_items(dataset, indices, views))
    assert drawn_generators(dataset) == ("torch", "numpy", "random")


def test_states_come_back_when_an_item_raises() -> None:
    class Fails(Draws):
        def __getitem__(self, index: int):
            item = super().__getitem__(index)
            if index == 5:
                raise RuntimeError("item 5 is broken")
            return item

    dataset = Fails(("torch", "numpy", "random"))
    for attempt in range(2):  # before and after the generators are learnt
        before = messy_caller_states(attempt)
        with pytest.raises(RuntimeError, match="item 5 is broken"):
            replay_items(dataset, [1, 2, 5, 3], [0, 1, 2, 0], SEED)
        assert_states(before)


def test_preserved_rng_restores_cached_normals() -> None:
    before = messy_caller_states(7)
    with preserved_rng():
        torch.randn(5)
        np.random.normal(size=5)
        random.gauss(0.0, 1.0)
        np.random.seed(1)
    assert_states(before)
    # and behaviour, not only the recorded state: the pending normals come out next
    after = (torch.randn(1, dtype=torch.float64).item(), np.random.normal(), random.gauss(0.0, 1.0))
    messy_caller_states(7)
    assert (torch.randn(1, dtype=torch.float64).item(), np.random.normal(), random.gauss(0.0, 1.0)) == after


def test_three_generator_dataset_of_the_dump_tests_replays_as_before() -> None:
    dataset = three_rng_images(n=40)
    indices = np.arange(40)
    views = indices % 3
    assert_same_items(replay_items(dataset, indices, views, 5), reference_items(dataset, indices, views, seed=5))
    assert drawn_generators(dataset) == ("torch", "numpy", "random")


def test_check_replayable_still_refuses_a_private_generator() -> None:
    with pytest.raises(DatasetError, match=r"'private': item 0 \(view 0\) differs when produced twice"):
        check_replayable(private_rng_images(), 2, 0, "private")
    check_replayable(Draws(("torch", "numpy", "random")), 2, 0, "draws")  # a replayable one passes


def test_batch_seed_words_for_other_counts_and_long_seeds() -> None:
    rng = np.random.default_rng(1)
    indices, views = rng.integers(0, 2**32, 50), rng.integers(0, 2**32, 50)
    for seed in (0, 2**32 + 7, 2**96 + 5, 2**200 + 1):  # 1, 2, 4 and 7 entropy words of seed
        for count in (1, 4, 9):
            want = np.stack([np.random.SeedSequence([seed, int(i), int(v)]).generate_state(count, dtype=np.uint32)
                             for i, v in zip(indices, views, strict=True)])
            got = batch_seed_words(seed, indices, views, count)
            assert got.dtype == np.uint32 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want)
    assert batch_seed_words(3, [], []).shape == (0, 3)
