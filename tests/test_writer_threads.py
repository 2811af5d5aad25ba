"""Several writer threads (``DumpConfig.writer_threads``, io/writer.py): batches are turned into host
arrays in a thread pool, out of order, and written in order by one thread, so a cache is the same bytes
with 1 or 4 threads, and a failure in any batch's conversion stops the dump as it did with one thread:
its message, and the shards finished before it kept for --resume.

Per-token dumps of a tiny causal LM (data_factories.causal_bag) over ragged token sequences, in many
shards of a few batches each; each cache's shards are re-read with zarr / h5py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import h5py
import pytest
import torch
import zarr
from data_factories import CausalBag, RaggedTokens, spec

from logit_cache import DumpConfig, dump
from logit_cache.errors import NonFiniteLogitsError, UsageError
from logit_cache.io.writer import ShardedWriter, default_writer_threads
from logit_cache.pipeline import batches
from logit_cache.store import BACKENDS

VOCAB = 200
DATA = {"n": 48, "vocab": VOCAB, "max_len": 12, "seed": 1}


def teacher(tmp_path: Path, poison: int | None = None) -> Path:
    """A CausalBag state dict; with ``poison``, that id's embedding is NaN, so every token from its first
    occurrence in a sequence on has NaN logits (a running mean)."""
    torch.manual_seed(0)
    model = CausalBag(VOCAB, 8)
    if poison is not None:
        with torch.no_grad():
            model.embed.weight[poison] = float("nan")
    path = tmp_path / f"bag-{poison}.pt"
    torch.save(model.state_dict(), path)
    return path


def run_dump(tmp_path: Path, checkpoint: Path, name: str, threads: int, **options: object) -> Path:
    config = DumpConfig(teacher=str(checkpoint), arch=spec("causal_bag"), arch_kwargs={"vocab": VOCAB}, dataset=spec("ragged_tokens"),
                        dataset_kwargs=dict(DATA), out=str(tmp_path / name), mode="topk", k=8, shard_rows=40, batch_size=4,
                        quiet=True, device="cpu", writer_threads=threads, **options)
    return Path(dump(config).out)


def shard_arrays(path: Path) -> dict[str, bytes]:
    """One shard's arrays (zarr group or HDF5 file), each as dtype, shape and bytes."""
    if path.suffix == ".zarr" or path.name.endswith(".zarr.partial"):
        group = zarr.open_group(str(path), mode="r")
        arrays = {name: group[name][:] for name in group.array_keys()}
    else:
        with h5py.File(path, "r") as handle:
            arrays = {name: handle[name][:] for name in handle}
    return {name: f"{a.dtype}{a.shape}".encode() + a.tobytes() for name, a in arrays.items()}


def cache_arrays(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {shard["path"]: shard_arrays(out / shard["path"]) for shard in manifest["shards"]}


@pytest.fixture
def scrambled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Producers that finish out of order (every third batch sleeps 30 ms, the others none), recording
    the threads they ran on."""
    threads: list[str] = []
    original = batches.host_producer
    made = [0]

    def host_producer(*args: object, **kwargs: object) -> object:
        produce = original(*args, **kwargs)
        delay = 0.03 if made[0] % 3 == 0 else 0.0
        made[0] += 1

        def slow() -> object:
            threads.append(threading.current_thread().name)
            time.sleep(delay)
            return produce()

        return slow

    monkeypatch.setattr(batches, "host_producer", host_producer)
    return threads


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_one_and_four_writer_threads_write_the_same_bytes(tmp_path: Path, scrambled: list[str], backend: str, encoding: str) -> None:
    checkpoint = teacher(tmp_path)
    one = run_dump(tmp_path, checkpoint, "one", 1, backend=backend, encoding=encoding)
    assert set(scrambled) and len(set(scrambled)) == 1
    scrambled.clear()
    four = run_dump(tmp_path, checkpoint, "four", 4, backend=backend, encoding=encoding)
    assert len(set(scrambled)) > 1  # the batches were converted on several threads, some overtaking others
    a, b = cache_arrays(one), cache_arrays(four)
    assert len(a) >= 5 and list(a) == list(b)
    for shard in a:
        assert a[shard] == b[shard], shard
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (one, four)]
    assert manifests[0]["shards"] == manifests[1]["shards"]  # ranges and checksums
    assert manifests[0]["key"] == manifests[1]["key"]  # the thread count is not part of the cache's identity


def first_seen_in_the_middle() -> tuple[int, int]:
    """(id, sequence): an id whose first occurrence is in a sequence near the middle of DATA."""
    data = RaggedTokens(**DATA)
    first: dict[int, int] = {}
    for index in range(len(data)):
        for token in data[index].tolist():
            first.setdefault(token, index)
    middle = len(data) // 2
    token = min(first, key=lambda t: (abs(first[t] - middle), t))
    return token, first[token]


def test_a_failing_batch_surfaces_its_message_and_keeps_the_shards_before_it(tmp_path: Path, scrambled: list[str]) -> None:
    poison, sequence = first_seen_in_the_middle()
    checkpoint = teacher(tmp_path, poison)
    lengths = RaggedTokens(**DATA).lengths
    kept: dict[int, list[str]] = {}
    for threads in (1, 4):
        with pytest.raises(NonFiniteLogitsError, match=rf"NaN or infinite logits for dataset indices {sequence}\b") as caught:
            run_dump(tmp_path, checkpoint, f"bad-{threads}", threads)
        assert "kept for --resume" in str(caught.value)
        work = tmp_path / f"bad-{threads}.partial"
        kept[threads] = sorted(p.name for p in (work / "progress").iterdir() if not p.name.startswith("."))
    # exactly the shards before the failing sequence's shard were finished and recorded (shards hold whole
    # sequences of about shard_rows rows: the next one, not recorded, is the one holding the sequence)
    assert kept[1] == kept[4] and kept[1]
    first_row = int(lengths[:sequence].sum())
    stops = [json.loads((tmp_path / "bad-4.partial" / "progress" / record).read_text())["row_stop"] for record in kept[4]]
    assert max(stops) <= first_row < max(stops) + 40 + DATA["max_len"]
    clean = run_dump(tmp_path, teacher(tmp_path), "clean", 4)
    for record in kept[4]:
        name = record.removesuffix(".json")
        # a poisoned id never seen before its first sequence: the kept shards equal the clean teacher's
        assert shard_arrays(tmp_path / "bad-4.partial" / name) == shard_arrays(clean / name)
        assert shard_arrays(tmp_path / "bad-1.partial" / name) == shard_arrays(clean / name)


def test_writer_thread_count_default_and_bounds(tmp_path: Path) -> None:
    assert 1 <= default_writer_threads() <= 4
    with pytest.raises(UsageError, match="writer threads must be >= 1, got 0"):
        ShardedWriter(tmp_path, None, [], 1, {}, producers=0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--writer-threads must be >= 1"):
        DumpConfig(teacher="t.pt", dataset="d", out=str(tmp_path / "o"), k=3, writer_threads=0).validate()
