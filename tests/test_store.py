"""One suite every storage backend must pass, plus the arrays' names, dtypes and bytes."""

from __future__ import annotations

import hashlib
import itertools

import h5py
import numpy as np
import pytest
import zarr

from logit_cache.errors import CacheFormatError, CorruptShardError
from logit_cache.store import BACKENDS, ArraySpec, get_backend
from logit_cache.store.base import combine_checksum

SPECS = [
    ArraySpec("topk_logits", "float16", (4,), compress=True),
    ArraySpec("topk_indices", "uint16", (4,), compress=True),
    ArraySpec("logsumexp", "float32", ()),
    ArraySpec("labels", "int64", (), per="sample"),
]


def sample_arrays(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "topk_logits": rng.standard_normal((rows, 4)).astype(np.float16),
        "topk_indices": rng.integers(0, 65536, (rows, 4)).astype(np.uint16),
        "logsumexp": rng.standard_normal(rows).astype(np.float32),
        "labels": rng.integers(0, 1000, rows).astype(np.int64),
    }


def write_in_pieces(backend_name, path, arrays, pieces, chunk_rows=8):
    backend = get_backend(backend_name)
    writer = backend.create(path, SPECS, chunk_rows, {"note": "test"})
    rows = len(arrays["labels"])
    bounds = np.linspace(0, rows, pieces + 1).astype(int)
    for start, stop in itertools.pairwise(bounds):
        writer.append({name: value[start:stop] for name, value in arrays.items()})
    return writer.close()


def independent_checksum(arrays: dict[str, np.ndarray]) -> str:
    parts = {name: (a.dtype.name, a.shape, hashlib.sha256(a.tobytes()).hexdigest()) for name, a in arrays.items()}
    return combine_checksum(parts)


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
@pytest.mark.parametrize("pieces", [1, 7])
def test_round_trip_through_our_reader(tmp_path, backend_name, pieces):
    arrays = sample_arrays(53)
    path = tmp_path / get_backend(backend_name).shard_name(0)
    checksum = write_in_pieces(backend_name, path, arrays, pieces)
    assert checksum == independent_checksum(arrays)
    with get_backend(backend_name).open(path) as reader:
        assert reader.names() == sorted(arrays)
        for name, want in arrays.items():
            got = reader.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(reader.read(name, 10, 20), want[10:20])
        assert reader.checksum() == checksum


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_plain_library_reads_the_shard(tmp_path, backend_name):
    arrays = sample_arrays(30)
    path = tmp_path / get_backend(backend_name).shard_name(3)
    write_in_pieces(backend_name, path, arrays, 3)
    if backend_name == "zarr":
        group = zarr.open_group(str(path), mode="r")
        got = {name: group[name][:] for name in arrays}
        assert group["topk_logits"].chunks == (8, 4)
        assert group.attrs["note"] == "test"
    else:
        with h5py.File(path, "r") as handle:
            got = {name: handle[name][:] for name in arrays}
            assert handle["topk_logits"].chunks == (8, 4)
            assert handle.attrs["note"] == "test"
    for name, want in arrays.items():
        np.testing.assert_array_equal(got[name], want)
        assert got[name].dtype == want.dtype


def test_checksum_does_not_depend_on_backend_or_chunking(tmp_path):
    arrays = sample_arrays(40, seed=3)
    sums = {
        write_in_pieces(name, tmp_path / f"{name}-{chunk}{get_backend(name).suffix}", arrays, 4, chunk_rows=chunk)
        for name in BACKENDS for chunk in (4, 16)
    }
    assert len(sums) == 1


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_wrong_dtype_or_shape_is_refused(tmp_path, backend_name):
    writer = get_backend(backend_name).create(tmp_path / f"s{get_backend(backend_name).suffix}", SPECS, 8, {})
    with pytest.raises(CacheFormatError, match="topk_indices"):
        writer.append({"topk_indices": np.zeros((2, 4), dtype=np.int32)})
    with pytest.raises(CacheFormatError, match="topk_logits"):
        writer.append({"topk_logits": np.zeros((2, 5), dtype=np.float16)})
    with pytest.raises(CacheFormatError, match="no array 'nope'"):
        writer.append({"nope": np.zeros(2)})


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
def test_damage_is_detected(tmp_path, backend_name):
    backend = get_backend(backend_name)
    arrays = sample_arrays(64)
    path = tmp_path / backend.shard_name(0)
    checksum = write_in_pieces(backend_name, path, arrays, 2)
    if backend_name == "zarr":
        chunk = sorted(p for p in (path / "logsumexp" / "c").rglob("*") if p.is_file())[0]  # uncompressed: a flipped byte changes a value
    else:
        chunk = path
    data = bytearray(chunk.read_bytes())
    if backend_name == "zarr":
        data[5] ^= 0xFF
    else:  # flip a byte inside the logsumexp data: find its raw bytes in the file
        needle = arrays["logsumexp"][:8].tobytes()
        data[data.index(needle) + 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # Every chunk carries a checksum (crc32c, fletcher32): the flip is caught as the chunk is decoded.
    with pytest.raises(CorruptShardError, match="'logsumexp' chunk 0 "), backend.open(path) as reader:
        assert reader.checksum() != checksum
    # A truncated shard cannot be decoded, and the error names it.
    if backend_name == "hdf5":
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(CorruptShardError, match=path.name):
            backend.open(path)
    else:
        compressed = sorted(p for p in (path / "topk_logits" / "c").rglob("*") if p.is_file())[0]
        compressed.write_bytes(compressed.read_bytes()[:10])
        with pytest.raises(CorruptShardError, match="topk_logits"), backend.open(path) as reader:
            reader.read("topk_logits")


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
@pytest.mark.parametrize("planned", [20, 53, 80])
def test_planned_rows_fewer_or_more_than_written(tmp_path, backend_name, planned):
    """Arrays are created at the planned size; the final shape is what was written, either way."""
    backend = get_backend(backend_name)
    arrays = sample_arrays(53)
    path = tmp_path / backend.shard_name(0)
    writer = backend.create(path, SPECS, 8, {}, rows=dict.fromkeys(arrays, planned))
    for start in range(0, 53, 10):
        writer.append({name: value[start : start + 10] for name, value in arrays.items()})
    assert writer.close() == independent_checksum(arrays)
    with backend.open(path) as reader:
        for name, want in arrays.items():
            np.testing.assert_array_equal(reader.read(name), want)


def test_per_array_chunk_rows(tmp_path):
    specs = [ArraySpec("values", "float16", (3,)), ArraySpec("labels", "int64", (), per="sample", chunk_rows=32)]
    writer = get_backend("zarr").create(tmp_path / "s.zarr", specs, 8, {})
    writer.append({"values": np.ones((40, 3), np.float16), "labels": np.arange(40)})
    writer.close()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["values"].chunks == (8, 3) and group["labels"].chunks == (32,)
