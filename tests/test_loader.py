"""Reading caches for training: rows by chunk, the dataset wrapper, the sampler, DataLoader workers.

Caches are dumped once per module from the seeded teacher over the built-in digits train split
(1437 items) with 512-row shards, so reads cross shards and chunks; expected targets come from the
teacher run in the test, and raw arrays from plain zarr / h5py.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_teacher
from data_factories import dump_digits, read_plain, spec, unlabeled_images
from torch.utils.data import DataLoader, Dataset

from logit_cache.datasets import DigitsDataset
from logit_cache.errors import DatasetMismatchError, IncompleteCacheError, UsageError
from logit_cache.loader import CachedDataset, ChunkShuffleSampler, collate
from logit_cache.reader import LogitCache, open_cache, open_reader
from logit_cache.store import BACKENDS
from logit_cache.targets import Targets

N, K = 1437, 4
SMALL_CACHE = 4096  # bytes: a two-slot chunk cache for three chunks, so chunks are evicted and batches read in pieces


def dump(root: Path, teacher: Path, name: str, **options) -> Path:
    return dump_digits(root, teacher, name, shard_rows=512, **options)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    teacher = root / "teacher.pt"
    torch.save(make_teacher().state_dict(), teacher)
    return {
        "topk-zarr": dump(root, teacher, "topk-zarr", mode="topk", k=K, dtype="float16", backend="zarr"),
        "topk-hdf5": dump(root, teacher, "topk-hdf5", mode="topk", k=K, dtype="float16", backend="hdf5"),
        "full-zarr": dump(root, teacher, "full-zarr", mode="full", dtype="float16", backend="zarr"),
        "full-hdf5": dump(root, teacher, "full-hdf5", mode="full", dtype="float32", backend="hdf5"),
        "unlabeled": dump(root, teacher, "unlabeled", dataset=spec("unlabeled_images"), dataset_kwargs={"n": 100},
                          mode="topk", k=3, dtype="float32", backend="zarr"),
    }


@pytest.fixture(scope="module")
def data() -> DigitsDataset:
    return DigitsDataset("train")


@pytest.fixture(scope="module")
def expected(data: DigitsDataset) -> np.ndarray:
    """The teacher's float32 logits for every train item, computed here."""
    with torch.no_grad():
        return make_teacher()(data.images).numpy()


def topk64(logits: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (descending), values, float64 logsumexp of raw logits, with numpy."""
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    wide = logits.astype(np.float64)
    lse = np.log(np.exp(wide - wide.max(1, keepdims=True)).sum(1)) + wide.max(1)
    return ids, np.take_along_axis(logits, ids, axis=1), lse


def check_topk(target: Targets, rows: np.ndarray, expected: np.ndarray) -> None:
    ids, values, lse = topk64(expected[rows])
    np.testing.assert_array_equal(target.indices.numpy(), ids)
    np.testing.assert_array_equal(target.values.numpy(), values.astype(np.float16))
    np.testing.assert_allclose(target.logsumexp.numpy(), lse, rtol=1e-6)


def check_full(target: Targets, rows: np.ndarray, expected: np.ndarray) -> None:
    want = expected[rows]
    np.testing.assert_array_equal(target.logits.numpy(), want.astype(target.logits.numpy().dtype))


# -- the cache layout the tests rely on -----------------------------------------------------------


def test_the_caches_have_several_shards_and_chunks(caches):
    cache = open_cache(caches["topk-zarr"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    assert cache.num_samples == N and cache.num_rows == N
    assert [(s.row_start, s.row_stop) for s in cache.manifest.shards] == [(0, 512), (512, 1024), (1024, 1437)]
    assert cache.chunk_starts.tolist() == [0, 512, 1024, 1437]
    assert cache.slots == 2  # fewer slots than chunks
    big = open_cache(caches["topk-zarr"], in_memory=False)
    assert big.slots == 3 and open_cache(caches["topk-zarr"]).in_memory  # small: in memory by default


# -- DataLoader: alignment, order, worker start methods ---------------------------------------------


LOADER_CASES = [
    pytest.param(ctx, backend, in_memory, marks=[pytest.mark.slow] if ctx == "spawn" and (backend, in_memory) != ("hdf5", False) else [])
    for ctx in ("fork", "spawn")
    for backend in sorted(BACKENDS)
    for in_memory in (True, False)
]


@pytest.mark.parametrize(("ctx", "backend", "in_memory"), LOADER_CASES)
def test_loader_targets_are_aligned_with_the_teacher(caches, data, expected, ctx, backend, in_memory):
    cache = open_cache(caches[f"topk-{backend}"], in_memory=in_memory, chunk_cache_bytes=SMALL_CACHE)
    sampler = cache.sampler(shuffle=True, seed=0)
    loader = DataLoader(cache.wrap(DigitsDataset("train")), batch_size=64, sampler=sampler, collate_fn=cache.collate,
                        num_workers=2, multiprocessing_context=ctx)
    teacher = make_teacher()
    epochs = (0, 1) if ctx == "fork" else (0,)
    orders = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        order = np.array(list(sampler))
        assert np.array_equal(np.sort(order), np.arange(N))  # each index once per epoch
        position = 0
        for inputs, labels, target in loader:
            rows = order[position : position + len(inputs)]
            position += len(inputs)
            # the items are the sampler's, in its order
            assert torch.equal(inputs, data.images[rows]) and torch.equal(labels, data.labels[rows])
            assert isinstance(target, Targets) and target.mode == "topk" and len(target) == len(inputs)
            check_topk(target, rows, expected)
            with torch.no_grad():  # and they are what the teacher says on these very inputs
                direct = teacher(inputs).numpy()
            np.testing.assert_array_equal(target.indices.numpy(), topk64(direct)[0])
            np.testing.assert_allclose(target.values.float().numpy(), topk64(direct)[1], rtol=1e-3, atol=1e-3)
        assert position == N
        orders.append(order)
    if len(orders) == 2:
        assert not np.array_equal(orders[0], orders[1])


def test_loader_batches_keep_storage_dtypes_until_moved(caches, expected):
    data = DigitsDataset("train")
    for name, value_dtype in [("topk-zarr", torch.float16), ("full-zarr", torch.float16), ("full-hdf5", torch.float32)]:
        cache = open_cache(caches[name], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
        sampler = cache.sampler(shuffle=True, seed=1)
        loader = DataLoader(cache.wrap(data), batch_size=100, sampler=sampler, collate_fn=cache.collate, num_workers=2,
                            multiprocessing_context="fork", pin_memory=False)
        order = np.array(list(sampler))
        inputs, labels, target = next(iter(loader))
        assert inputs.shape == (100, 1, 8, 8) and labels.dtype == torch.int64
        if target.mode == "topk":
            assert target.values.dtype == value_dtype and target.indices.dtype == torch.uint16
            assert target.logsumexp.dtype == torch.float32 and target.values.shape == (100, K) and target.k == K
            moved = target.to("cpu")
            assert moved.values.dtype == torch.float32 and moved.indices.dtype == torch.int64 and moved.logsumexp.dtype == torch.float32
            assert torch.equal(moved.indices, target.indices.long()) and torch.equal(moved.values, target.values.float())
            check_topk(target, order[:100], expected)
        else:
            assert target.logits.dtype == value_dtype and target.logits.shape == (100, 10) and target.num_classes == 10
            moved = target.to("cpu")
            assert moved.logits.dtype == torch.float32 and torch.equal(moved.logits, target.logits.float())
            check_full(target, order[:100], expected)


# -- LogitCache.rows against plain zarr / h5py --------------------------------------------------------


@pytest.mark.parametrize("name", ["topk-zarr", "topk-hdf5", "full-hdf5"])
@pytest.mark.parametrize(("in_memory", "chunk_cache_bytes"), [(True, SMALL_CACHE), (False, SMALL_CACHE), (False, 128 << 20)])
def test_rows_equal_plain_reads(caches, name, in_memory, chunk_cache_bytes):
    cache = open_cache(caches[name], in_memory=in_memory, chunk_cache_bytes=chunk_cache_bytes)
    plain = {array: read_plain(caches[name], array) for array in cache.names}
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, N, 300),  # unsorted, with duplicates, across all chunks (more than two slots: read in pieces)
        np.array([1436, 0, 511, 512, 1023, 1024, 0, 1436]),  # chunk edges, the partly filled last chunk
        rng.integers(0, 512, 40),  # one chunk
        rng.integers(512, 1437, 40),  # two chunks: evicts on the two-slot cache
        rng.integers(0, 1024, 64),
        np.array([7]),
        np.zeros(0, dtype=np.int64),
    ]
    batches += [rng.integers(0, N, int(rng.integers(1, 80))) for _ in range(20)]
    for rows in batches:
        got = cache.rows(rows)
        assert set(got) == set(cache.names)
        for array in cache.names:
            assert got[array].dtype == plain[array].dtype
            np.testing.assert_array_equal(got[array], plain[array][rows])
    with pytest.raises(UsageError, match="row 1437 is out of range; the cache has 1437 rows"):
        cache.rows([3, 1437])
    with pytest.raises(UsageError, match="row -1 is out of range"):
        cache.rows([-1, 2])


def test_targets_and_plain_arrays_agree_with_the_teacher(caches, expected):
    ids, values, lse = topk64(expected)
    np.testing.assert_array_equal(read_plain(caches["topk-hdf5"], "topk_indices"), ids)
    np.testing.assert_array_equal(read_plain(caches["topk-hdf5"], "topk_logits"), values.astype(np.float16))
    np.testing.assert_allclose(read_plain(caches["topk-hdf5"], "logsumexp"), lse, rtol=1e-6)
    rows = np.array([5, 1400, 5, 600])
    cache = open_cache(caches["topk-hdf5"], in_memory=False)
    target = cache.targets(rows)
    assert target.values.dtype == torch.float16 and target.indices.dtype == torch.uint16
    check_topk(target, rows, expected)
    check_full(open_cache(caches["full-hdf5"]).targets(rows), rows, expected)


# -- pickling (spawned workers) ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk-zarr", "topk-hdf5", "full-hdf5"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_a_used_cache_pickles_and_reads_the_same(caches, name, in_memory):
    cache = open_cache(caches[name], in_memory=in_memory, chunk_cache_bytes=SMALL_CACHE)
    rows = np.random.default_rng(1).integers(0, N, 200)
    before = cache.rows(rows)  # opens shard handles (h5py files) and fills the memory or the chunk slots
    blob = pickle.dumps(cache)
    assert len(blob) < cache.nbytes / 2  # the arrays read so far do not travel in the pickle
    clone = pickle.loads(blob)
    assert isinstance(clone, LogitCache) and clone.in_memory == in_memory
    for array, values in clone.rows(rows).items():
        np.testing.assert_array_equal(values, before[array])
    np.testing.assert_array_equal(clone.rows([1436, 0])[cache.names[0]], read_plain(caches[name], cache.names[0])[[1436, 0]])
    # the original still works after being pickled
    np.testing.assert_array_equal(cache.rows(rows[:5])[cache.names[0]], before[cache.names[0]][:5])


def test_a_wrapped_dataset_pickles(caches, expected):
    ds = open_cache(caches["topk-hdf5"], in_memory=False).wrap(DigitsDataset("train"))
    ds.__getitems__([0, 1000])
    clone = pickle.loads(pickle.dumps(ds))
    _, _, target = collate(clone.__getitems__([1000, 3]))
    check_topk(target, np.array([1000, 3]), expected)


# -- the sampler -------------------------------------------------------------------------------------


def test_sampler_epochs_are_seeded_permutations():
    sampler = ChunkShuffleSampler(100, shuffle=True, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(100)) and len(sampler) == 100
    assert list(sampler) == first  # same (seed, epoch): same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(100)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(ChunkShuffleSampler(100, shuffle=True, seed=1)) != first
    assert first != list(range(100))


def test_sampler_without_shuffle_is_in_order():
    assert list(ChunkShuffleSampler(10, shuffle=False)) == list(range(10))
    shares = [list(ChunkShuffleSampler(12, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert shares == [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]
    # padding repeats the start of the order
    shares = [list(ChunkShuffleSampler(10, shuffle=False, num_replicas=3, rank=r)) for r in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def windows_of_whole_blocks(order: list[int], block: int, per_window: int, n: int) -> list[set[int]]:
    """Cut ``order`` into consecutive runs that are each the union of whole blocks (at most per_window of them)."""
    size = {b: min(n, (b + 1) * block) - b * block for b in range(-(-n // block))}
    windows, position = [], 0
    while position < n:
        seen: set[int] = set()
        end = position
        while end < n:
            seen.add(order[end] // block)
            end += 1
            assert len(seen) <= per_window, f"positions {position}..{end} draw from more than {per_window} blocks"
            if len(seen) == per_window and end - position == sum(size[b] for b in seen):
                break
        assert sorted(order[position:end]) == sorted(i for b in seen for i in range(b * block, b * block + size[b]))
        windows.append(seen)
        position = end
    return windows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_draws_each_window_from_whole_blocks(seed):
    n, block, window = 320, 8, 32
    sampler = ChunkShuffleSampler(n, shuffle=True, seed=seed, block_size=block, window=window)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(n))
        for start in range(0, n, window):
            part = order[start : start + window]
            blocks = {i // block for i in part}
            assert len(blocks) == 4  # exactly four whole blocks per aligned window of 32
            assert sorted(part) == sorted(i for b in blocks for i in range(b * block, (b + 1) * block))
        assert any(order[s : s + window] != sorted(order[s : s + window]) for s in range(0, n, window))  # shuffled within
        assert [min(order[s : s + block]) // block for s in range(0, n, block)] != list(range(n // block))  # blocks moved
    # a last, partly filled block
    sampler = ChunkShuffleSampler(100, shuffle=True, seed=seed, block_size=8, window=32)
    windows = windows_of_whole_blocks(list(sampler), 8, 4, 100)
    assert sorted(b for w in windows for b in w) == list(range(13))


def test_sampler_shares_across_ranks():
    for n in (99, 300):
        shares = [np.array(list(ChunkShuffleSampler(n, seed=5, num_replicas=3, rank=r, block_size=8, window=32))) for r in range(3)]
        assert all(len(s) == n // 3 for s in shares)
        assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(n))  # disjoint and complete
        order = ChunkShuffleSampler(n, seed=5, block_size=8, window=32).order()
        assert np.array_equal(np.concatenate(shares), order)  # contiguous shares of one order
    n = 100
    shares = [list(ChunkShuffleSampler(n, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 34 for s in shares)
    assert set().union(*shares) == set(range(n))
    assert all(len(ChunkShuffleSampler(n, seed=5, num_replicas=3, rank=r)) == 34 for r in range(3))
    dropped = [list(ChunkShuffleSampler(n, seed=5, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert all(len(s) == 33 for s in dropped)
    assert len(set().union(*dropped)) == 99  # disjoint
    # every rank agrees on the epoch's order
    for epoch in (0, 3):
        samplers = [ChunkShuffleSampler(n, seed=5, num_replicas=3, rank=r) for r in range(3)]
        for s in samplers:
            s.set_epoch(epoch)
        assert set().union(*[set(s) for s in samplers]) == set(range(n))


def test_sampler_errors():
    with pytest.raises(UsageError, match=r"rank 3 is not in \[0, num_replicas=3\)"):
        ChunkShuffleSampler(10, num_replicas=3, rank=3)
    with pytest.raises(UsageError, match="rank -1"):
        ChunkShuffleSampler(10, num_replicas=3, rank=-1)
    with pytest.raises(UsageError, match="num_samples must be positive"):
        ChunkShuffleSampler(0)
    with pytest.raises(UsageError, match="block_size must be positive"):
        ChunkShuffleSampler(10, block_size=0)
    with pytest.raises(UsageError, match="cannot give each of 4 ranks one"):
        ChunkShuffleSampler(3, num_replicas=4, rank=0, drop_last=True)


def test_cache_sampler_follows_the_chunk_cache(caches):
    on_disk = open_cache(caches["topk-zarr"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    sampler = on_disk.sampler(shuffle=True, seed=0)
    assert (sampler.block_size, sampler.window) == (512, 512)  # one chunk per block; a window of half the 2 slots
    order = list(sampler)
    windows_of_whole_blocks(order, 512, 1, N)
    roomy = open_cache(caches["topk-zarr"], in_memory=False).sampler()
    assert (roomy.block_size, roomy.window) == (1, None)  # all 3 chunks fit the chunk cache: a plain permutation
    in_memory = open_cache(caches["topk-zarr"], in_memory=True).sampler(seed=0)
    assert (in_memory.block_size, in_memory.window) == (1, None)
    assert list(in_memory) == np.random.default_rng([0, 0]).permutation(N).tolist()


# -- the wrapper: pairing checks and item shapes -------------------------------------------------------


class Reversed(Dataset):
    """The train split in reverse order: same length, other content at each index."""

    def __init__(self) -> None:
        self.inner = DigitsDataset("train")

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        return self.inner[len(self.inner) - 1 - index]


def test_wrap_refuses_a_dataset_of_another_length(caches):
    cache = open_cache(caches["topk-zarr"])
    with pytest.raises(DatasetMismatchError, match="the dataset has 360 items but the cache holds 1437 samples"):
        cache.wrap(DigitsDataset("test"))
    with pytest.raises(DatasetMismatchError, match="360 items"):
        cache.wrap(DigitsDataset("test"), verify="length")


def test_wrap_refuses_other_content_unless_told_to_check_the_length_only(caches, data, expected):
    cache = open_cache(caches["topk-zarr"])
    with pytest.raises(DatasetMismatchError, match="content differs"):
        cache.wrap(Reversed())
    ds = cache.wrap(Reversed(), verify="length")
    image, label, _ = ds[0]
    assert torch.equal(image, data.images[N - 1]) and label == int(data.labels[N - 1])
    _, _, target = collate([ds[0], ds[5]])
    check_topk(target, np.array([0, 5]), expected)  # still by index: row 0 and row 5
    with pytest.raises(UsageError, match="expected one of fingerprint, length"):
        cache.wrap(data, verify="content")
    with pytest.raises(UsageError, match="at least one cache"):
        CachedDataset(data, [])


def test_incomplete_caches_are_refused(caches, tmp_path):
    flagged = tmp_path / "flagged"
    shutil.copytree(caches["topk-zarr"], flagged)
    manifest = json.loads((flagged / "manifest.json").read_text())
    manifest["complete"] = False
    (flagged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompleteCacheError, match="complete=false"):
        open_cache(flagged)
    with open_reader(flagged, allow_incomplete=True) as reader:  # what resumption uses
        assert reader.manifest.complete is False
    unfinished = tmp_path / "unfinished"
    shutil.copytree(caches["topk-zarr"], tmp_path / "unfinished.partial")
    with pytest.raises(IncompleteCacheError, match=r"has not finished.*complete it"):
        open_cache(unfinished)


def test_items_without_labels_give_input_target_pairs(caches):
    cache = open_cache(caches["unlabeled"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    data = unlabeled_images(100)
    ds = cache.wrap(data)
    item = ds[4]
    assert len(item) == 2 and torch.equal(item[0], data.images[4])
    loader = DataLoader(ds, batch_size=32, sampler=cache.sampler(shuffle=True, seed=2), collate_fn=cache.collate)
    seen = []
    teacher = make_teacher()
    for batch in loader:
        assert len(batch) == 2
        inputs, target = batch
        with torch.no_grad():
            logits = teacher(inputs).numpy()
        ids, values, lse = topk64(logits, 3)
        np.testing.assert_array_equal(target.indices.numpy(), ids)
        np.testing.assert_allclose(target.values.numpy(), values, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(target.logsumexp.numpy(), lse, rtol=1e-6)
        seen.append(inputs)
    assert len(torch.cat(seen)) == 100


def test_several_caches_give_a_list_of_targets(caches, data, expected):
    topk_cache = open_cache(caches["topk-hdf5"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    full_cache = open_cache(caches["full-zarr"])
    ds = CachedDataset(DigitsDataset("train"), [topk_cache, full_cache])
    sampler = ChunkShuffleSampler.for_caches([topk_cache, full_cache], shuffle=True, seed=3)
    assert sampler.block_size == 512  # one on-disk cache: chunk-aware
    loader = DataLoader(ds, batch_size=128, sampler=sampler, collate_fn=collate, num_workers=2, multiprocessing_context="fork")
    order = np.array(list(sampler))
    position = 0
    for inputs, labels, targets in loader:
        rows = order[position : position + len(inputs)]
        position += len(inputs)
        assert torch.equal(inputs, data.images[rows]) and torch.equal(labels, data.labels[rows])
        assert isinstance(targets, list) and [t.mode for t in targets] == ["topk", "full"]
        check_topk(targets[0], rows, expected)
        check_full(targets[1], rows, expected)
    assert position == N
    # the one-item path gives the same
    one = collate([ds[3], ds[1400]])
    assert isinstance(one[2], list) and len(one[2]) == 2
    check_topk(one[2][0], np.array([3, 1400]), expected)
    check_full(one[2][1], np.array([3, 1400]), expected)


@pytest.mark.parametrize("name", ["topk-zarr", "full-hdf5"])
def test_single_items_collate_like_batches(caches, data, expected, name):
    ds = open_cache(caches[name], in_memory=False, chunk_cache_bytes=SMALL_CACHE).wrap(data)
    image, label, row = ds[3]
    assert set(row) == set(ds.caches[0].names)  # a view of the row, stacked by collate
    assert torch.equal(image, data.images[3]) and label == int(data.labels[3])
    one_by_one = collate([ds[3], ds[7], ds[1436]])
    batched = collate(ds.__getitems__([3, 7, 1436]))
    rows = np.array([3, 7, 1436])
    for single, batch in zip(one_by_one[:2], batched[:2], strict=True):
        assert torch.equal(single, batch)
    a, b = one_by_one[2], batched[2]
    assert a.mode == b.mode and a.num_classes == b.num_classes == 10
    for field in ("logits", "values", "indices", "logsumexp"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)
    (check_topk if a.mode == "topk" else check_full)(a, rows, expected)
    with pytest.raises(UsageError, match="empty batch"):
        collate([])


# -- layering: the reader knows nothing of the loader ------------------------------------------------------


def test_the_io_reader_serves_the_loader_without_the_data_layer(caches, data):
    """io/ serves rows (TargetReader); the loader wraps any such reader; LogitCache (data/) only hands over to it."""
    import ast
    import importlib

    from logit_cache.io.rows import TargetReader

    reader = TargetReader(caches["topk-zarr"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    wrapped = CachedDataset(data, [reader])
    sampler = ChunkShuffleSampler.for_caches([reader], seed=3)
    assert sampler.block_size > 1 and sampler._forward[0]() is wrapped  # set_epoch reaches the wrapper
    batch = collate(wrapped.__getitems__(sampler.indices()[:8].tolist()))
    cache = open_cache(caches["topk-zarr"], in_memory=False, chunk_cache_bytes=SMALL_CACHE)
    assert isinstance(cache, TargetReader) and cache.wrappers() == []
    rewrapped = cache.wrap(data)
    again = collate(rewrapped.__getitems__(sampler.indices()[:8].tolist()))
    assert torch.equal(batch[2].values, again[2].values) and cache.wrappers() == [rewrapped]
    old = importlib.import_module("logit_cache.reader")
    for name in ("open_cache", "LogitCache", "open_reader", "CacheReader", "shard_location"):
        assert hasattr(old, name), name
    for module in ("reader", "rows", "chunk_cache"):
        tree = ast.parse(Path(importlib.import_module(f"logit_cache.io.{module}").__file__).read_text())
        # the reader's module __getattr__ is a temporary alias of the names that moved to data/cache.py
        code = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")]
        imported = [n.module or "" for top in code for n in ast.walk(top) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.startswith("data") or ".data" in m], (module, imported)
