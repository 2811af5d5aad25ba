"""``torchrun --nproc_per_node=2 -m logit_cache dump`` (gloo on CPU) writes the cache a single process writes.

Each rank writes a contiguous run of the 5 shards (300 samples, 64 rows per shard); rank 0 writes the
manifest. An error on one rank must stop every rank with a non-zero exit, not hang in a collective; the
shards finished before it are kept for ``--resume``, which completes the dump under torchrun too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from data_factories import spec
from processes import finish, torchrun_argv

from logit_cache.reader import open_reader
from logit_cache.store import BACKENDS

pytestmark = pytest.mark.slow

ARRAYS = ("topk_logits", "topk_indices", "logsumexp", "labels")
NUM_SHARDS = 5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("LC_TEST_FAIL", None)


def dump_args(teacher: Path, out: Path, backend: str, dataset: str, *extra: str) -> list[str]:
    return [
        "-m", "logit_cache", "dump", "--teacher", str(teacher),
        "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs", '{"hidden": 32}',
        "--dataset", dataset, "--dataset-kwargs", '{"n": 300}', "--shard-rows", "64", "--topk", "5",
        "--device", "cpu", "--quiet", "--format", backend, "--out", str(out), *extra,
    ]  # fmt: skip


def torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    argv = torchrun_argv(*args)
    return subprocess.Popen(argv, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def single(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_raw(cache: Path) -> dict[str, np.ndarray]:
    """Every array across the shards, read with plain zarr / h5py."""
    manifest = json.loads((cache / "manifest.json").read_text())
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    for shard in manifest["shards"]:
        if manifest["backend"] == "zarr":
            group = zarr.open_group(cache / shard["path"], mode="r")
            for name in ARRAYS:
                parts[name].append(group[name][:])
        else:
            with h5py.File(cache / shard["path"], "r") as handle:
                for name in ARRAYS:
                    parts[name].append(handle[name][:])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def assert_same_content(got: Path, want: Path, same_key: bool = True) -> None:
    got_manifest = json.loads((got / "manifest.json").read_text())
    want_manifest = json.loads((want / "manifest.json").read_text())
    assert got_manifest["complete"] is True
    assert len(got_manifest["shards"]) == NUM_SHARDS
    assert not (got / "progress").exists()
    assert not got.with_name(got.name + ".partial").exists()
    names = ["backend", "mode", "k", "dtype", "num_classes", "num_samples", "num_rows", "shards", "arrays"]
    for name in names + (["key"] if same_key else []):
        assert got_manifest[name] == want_manifest[name], name
    got_raw, want_raw = read_raw(got), read_raw(want)
    with open_reader(got) as reader:
        assert reader.verify_checksums() == []
        for name in ARRAYS:
            via_reader = reader.read(name)
            assert via_reader.shape[0] == 300, name
            for actual in (via_reader, got_raw[name]):
                assert actual.dtype == want_raw[name].dtype, name
                assert np.array_equal(actual, want_raw[name]), name


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_torchrun_dump_equals_single_process(tmp_path: Path, teacher: Path, backend: str) -> None:
    # The single-process reference runs alongside (each is mostly start-up).
    reference = single(dump_args(teacher, tmp_path / "single", backend, spec("random_images")))
    ranks = torchrun(dump_args(teacher, tmp_path / "ranks", backend, spec("random_images")))
    code, stdout, stderr = finish(ranks)
    assert code == 0, stderr
    assert stdout.count("wrote ") == 1, stdout  # only rank 0 prints the summary
    ref_code, _, ref_stderr = finish(reference)
    assert ref_code == 0, ref_stderr
    manifest = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert manifest["dump"]["world_size"] == 2
    assert_same_content(tmp_path / "ranks", tmp_path / "single")


def test_torchrun_dataset_import_error(tmp_path: Path, teacher: Path) -> None:
    broken = tmp_path / "broken_import.py"
    broken.write_text("import logit_cache_test_no_such_module\n\n\ndef make(n=300):\n    return None\n")
    out = tmp_path / "cache"
    code, _, stderr = finish(torchrun(dump_args(teacher, out, "zarr", f"{broken}:make")))
    assert code != 0
    assert "logit_cache_test_no_such_module" in stderr, stderr
    assert str(broken) in stderr, stderr
    assert not out.exists()
    assert not out.with_name("cache.partial").exists()


FLAKY_DATASET = textwrap.dedent(
    f"""
    import os
    import sys

    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
    from data_factories import random_images


    class FailOnRankOne:
        # random_images, except that rank 1 fails on item 250 (in its second shard) when LC_TEST_FAIL=1.
        def __init__(self, n):
            self.inner = random_images(n)

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            if index == 250 and os.environ.get("LC_TEST_FAIL") == "1" and os.environ.get("RANK") == "1":
                raise RuntimeError("injected failure at item 250")
            return self.inner[index]


    def make(n=300):
        return FailOnRankOne(n)
    """
)


def test_torchrun_error_on_one_rank_stops_all_then_resumes(tmp_path: Path, teacher: Path) -> None:
    flaky = tmp_path / "flaky.py"
    flaky.write_text(FLAKY_DATASET)
    out = tmp_path / "cache"
    work = tmp_path / "cache.partial"
    args = dump_args(teacher, out, "zarr", f"{flaky}:make")
    reference = single(dump_args(teacher, tmp_path / "single", "zarr", spec("random_images")))

    code, _, stderr = finish(torchrun(args, env={**ENV, "LC_TEST_FAIL": "1"}))
    assert code != 0
    assert "injected failure at item 250" in stderr, stderr
    assert not out.exists()
    assert json.loads((work / "manifest.json").read_text())["complete"] is False
    # Rank 0's shards (0, 1) finished; rank 1's shard 3 failed and 4 never began. Rank 1's shard 2 was
    # computed, but whether its writer thread closed it before the abort is a matter of timing.
    finished = sorted(path.name for path in (work / "progress").glob("shard-*.json"))
    assert finished[:2] == [f"shard-{i:05d}.zarr.json" for i in range(2)]
    assert finished in ([f"shard-{i:05d}.zarr.json" for i in range(n)] for n in (2, 3))

    code, stdout, stderr = finish(torchrun([*args, "--resume"]))
    assert code == 0, stderr
    assert f"{len(finished)} kept from the unfinished dump" in stdout, stdout
    ref_code, _, ref_stderr = finish(reference)
    assert ref_code == 0, ref_stderr
    # Another dataset spec, so another key; the same items, so the same arrays and shard checksums.
    assert_same_content(out, tmp_path / "single", same_key=False)


def test_torchrun_per_token_sampled_dump_equals_single_process(tmp_path: Path) -> None:
    """Ranks write per-token shards (shard-local offsets) and draw the same ids a single process draws."""
    import data_factories

    torch.manual_seed(0)
    teacher = tmp_path / "bag.pt"
    torch.save(data_factories.causal_bag(vocab=50).state_dict(), teacher)

    def args(out: Path) -> list[str]:
        return ["-m", "logit_cache", "dump", "--teacher", str(teacher), "--arch", spec("causal_bag"), "--arch-kwargs", '{"vocab": 50}',
                "--dataset", spec("ragged_tokens"), "--dataset-kwargs", '{"vocab": 50}', "--shard-rows", "40", "--sample", "16",
                "--device", "cpu", "--quiet", "--out", str(out)]

    reference = single(args(tmp_path / "single"))
    code, _, stderr = finish(torchrun(args(tmp_path / "ranks")))
    assert code == 0, stderr
    assert finish(reference)[0] == 0
    got, want = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ranks", "single"))
    assert got["dump"]["world_size"] == 2 and got["per_token"] is True and len(got["shards"]) > 2
    assert got["key"] == want["key"] and got["shards"] == want["shards"]  # same ranges and checksums


#: Each rank reads the cache through ``cache.wrap`` + ``cache.sampler()`` + a DataLoader (2 workers), for
#: two epochs, and records the dataset indices it was served (the inputs are the indices) and the
#: cached top-k row each came with; rank 0 writes them all.
SERVE = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from logit_cache import open_cache

    dist.init_process_group("gloo")
    cache = open_cache(sys.argv[1])
    indices = TensorDataset(torch.arange(cache.num_samples), torch.zeros(cache.num_samples, dtype=torch.long))
    sampler = cache.sampler(shuffle=True, seed=3)  # ranks from torch.distributed
    loader = DataLoader(cache.wrap(indices, verify="length"), batch_size=32, sampler=sampler, collate_fn=cache.collate,
                        num_workers=2, multiprocessing_context="fork")
    served = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        served[epoch] = [[int(i), row.tolist()] for inputs, _, target in loader for i, row in zip(inputs, target.values.float())]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": dist.get_rank(), "served": served})
    if dist.get_rank() == 0:
        json.dump(everyone, open(sys.argv[2], "w"))
    dist.destroy_process_group()
''')


@pytest.mark.parametrize("num_samples", [300, 301])
def test_torchrun_ranks_are_served_every_sample_once_per_epoch(tmp_path: Path, teacher: Path, num_samples: int) -> None:
    """The loading side under DDP: across 2 gloo ranks each epoch serves every sample once (an odd count is
    padded with the start of the epoch's order, like DistributedSampler), each with its own cached row."""
    from logit_cache import DumpConfig, dump_cache

    cache = tmp_path / "cache"
    dump_cache(DumpConfig(teacher=str(teacher), arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32},
                          dataset=spec("random_images"), dataset_kwargs={"n": num_samples}, shard_rows=64, k=5,
                          device="cpu", quiet=True, out=str(cache)))
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    code, _, stderr = finish(torchrun([str(script), str(cache), str(tmp_path / "served.json")]))
    assert code == 0, stderr
    ranks = json.loads((tmp_path / "served.json").read_text())
    with open_reader(cache) as reader:
        rows = reader.read("topk_logits").astype(np.float32)
    orders = []
    for epoch in ("0", "1"):
        per_rank = [[index for index, _ in rank["served"][epoch]] for rank in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == (num_samples + 1) // 2  # equal shares
        everything = per_rank[0] + per_rank[1]
        counts = np.bincount(everything, minlength=num_samples)
        assert counts.min() == 1, f"epoch {epoch}: samples never served: {np.flatnonzero(counts == 0)[:10]}"
        assert counts.sum() - num_samples == len(everything) - num_samples == num_samples % 2  # only the padding repeats
        assert counts.max() == 1 + num_samples % 2
        for rank in ranks:
            for index, row in rank["served"][epoch]:
                assert np.array_equal(np.asarray(row, dtype=np.float32), rows[index]), f"sample {index} came with another row"
        orders.append(everything)
    assert orders[0] != orders[1], "set_epoch did not change the order"
