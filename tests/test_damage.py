"""Damaged caches are caught as they are read (issue 16, items 6 and 7), for every registered backend.

Readers: a flipped byte fails its chunk's checksum, a deleted chunk is an error (not zeros), swapped
shards are named, NaNs rewritten through zarr/h5py (which recompute the chunk checksums) stop the
trainer. ``verify``: edits of the manifest's ``dtype``, ``k``, ``num_classes`` or ``key`` fail, and shard
paths outside the cache directory are refused without being opened.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import ARCH, ARCH_KWARGS
from data_factories import causal_bag, spec

from logit_cache import DumpConfig, dump
from logit_cache.errors import CacheFormatError, CorruptShardError
from logit_cache.reader import open_cache
from logit_cache.store import BACKENDS, ArraySpec, get_backend
from logit_cache.verify import verify_cache

N = 600
SHARD_ROWS = 256  # three shards of 256, 256 and 88 rows; one chunk per array and shard
BACKEND_NAMES = sorted(BACKENDS)


def make_cache(out: Path, teacher: Path, backend: str, mode: str = "topk") -> Path:
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec("random_images"),
                    dataset_kwargs={"n": N}, out=str(out), mode=mode, k=4 if mode == "topk" else None, dtype="float16",
                    backend=backend, shard_rows=SHARD_ROWS, quiet=True))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("damage")
    return {(backend, mode): make_cache(root / f"{backend}-{mode}", teacher, backend, mode)
            for backend in BACKEND_NAMES for mode in ("topk", "full")}


@pytest.fixture
def copy_of(caches, tmp_path):
    def copy(backend: str, mode: str = "topk") -> Path:
        return Path(shutil.copytree(caches[backend, mode], tmp_path / "cache"))

    return copy


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def edit_manifest(cache: Path, change) -> None:
    data = manifest_of(cache)
    change(data)
    (cache / "manifest.json").write_text(json.dumps(data))


def read_everything(cache: Path) -> dict[str, np.ndarray]:
    """Every target row through the chunk reader (not in memory), as training reads them."""
    opened = open_cache(cache, in_memory=False)
    return opened.rows(np.arange(opened.num_rows))


def train_args(cache: Path, out: Path, *extra: str) -> list:
    return ["train", "--student", "logit_cache.models:digits_mlp", "--student-kwargs", '{"hidden": 8, "depth": 1}',
            "--dataset", spec("random_images"), "--dataset-kwargs", json.dumps({"n": N}), "--cache", cache,
            "--epochs", "1", "--device", "cpu", "--quiet", "--out", out, *extra]


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- where each backend keeps a chunk's bytes (the one place that knows the backends' layouts) ----------


def _zarr_chunks(shard: Path, name: str) -> list[tuple[Path, int, int]]:
    return [(path, 0, path.stat().st_size) for path in sorted((shard / name / "c").rglob("*")) if path.is_file()]


def _hdf5_chunks(shard: Path, name: str) -> list[tuple[Path, int, int]]:
    with h5py.File(shard, "r") as handle:
        dsid = handle[name].id
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    return [(shard, int(info.byte_offset), int(info.size)) for info in infos]


#: backend -> (shard, array name) -> [(file, first byte, byte count)] of each stored chunk
CHUNK_BYTES = {"zarr": _zarr_chunks, "hdf5": _hdf5_chunks}


def test_every_backend_has_a_chunk_locator():
    assert set(BACKENDS) <= set(CHUNK_BYTES), "add the new backend's chunk layout to CHUNK_BYTES"


def rewrite(shard: Path, name: str, row: int, value: float) -> None:
    """Write one value through the storage library, as a user of zarr/h5py would (checksums recomputed)."""
    if shard.is_dir():
        array = zarr.open_group(str(shard), mode="r+")[name]
        array[row, 0] = value
    else:
        with h5py.File(shard, "r+") as handle:
            handle[name][row, 0] = value


# -- item 6: readers detect damage as they read ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_fresh_shards_carry_chunk_checksums_and_every_chunk(caches, backend):
    cache = caches[backend, "topk"]
    opened = open_cache(cache, in_memory=False)
    for position, entry in enumerate(opened.manifest.shards):
        shard = opened.shard(position)
        for name in shard.names():
            assert shard.checksummed(name), (entry.path, name)
            rows, chunk = shard.shape(name)[0], shard.chunk_rows(name)
            assert shard._stored_chunks(name) == set(range(-(-rows // chunk))), (entry.path, name)
        assert {key: shard.attrs()[key] for key in ("key", "shard_index", "row_start", "sample_start")} == {
            "key": opened.manifest.key, "shard_index": position, "row_start": entry.row_start, "sample_start": entry.sample_start}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_chunk_of_zeros_is_stored_and_reads_back(tmp_path, backend):
    """Every chunk is written, even one equal to the fill value, so an absent chunk can only be damage."""
    store = get_backend(backend)
    path = tmp_path / store.shard_name(0)
    writer = store.create(path, [ArraySpec("values", "float32", (3,))], 4, {})
    data = np.zeros((12, 3), dtype=np.float32)
    data[4:8] = 1.0  # chunks 0 and 2 hold only zeros
    writer.append({"values": data})
    writer.close()
    with store.open(path) as reader:
        assert reader._stored_chunks("values") == {0, 1, 2}
        np.testing.assert_array_equal(reader.read("values"), data)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_byte_flips_in_chunks_are_all_caught_on_read(copy_of, backend):
    """A seeded set of single-byte flips over every chunk the trainer reads: each one fails on read.

    Chunk checksums cover every stored byte of a chunk (the checksum's own bytes too), so every
    flip is caught, not only those that change the decoded values; before them, 9 of 13 flips that
    changed data were read silently.
    """
    cache = copy_of(backend)
    names = open_cache(cache).names
    chunks = [piece for entry in manifest_of(cache)["shards"] for name in names
              for piece in CHUNK_BYTES[backend](cache / entry["path"], name)]
    assert len(chunks) == 3 * len(names)
    rng = np.random.default_rng(16)
    flips = 24
    caught = []
    for _ in range(flips):
        path, first, size = chunks[int(rng.integers(len(chunks)))]
        at = first + int(rng.integers(size))
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        try:
            read_everything(cache)
        except CorruptShardError as exc:
            caught.append(str(exc))
        finally:
            path.write_bytes(original)
    assert len(caught) == flips
    assert all("shard-0000" in message and "logit-cache verify" in message and "checksum" in message for message in caught)
    read_everything(cache)  # restored: reads again


def test_a_deleted_chunk_is_an_error_not_zeros(copy_of, cli, tmp_path):
    for backend in BACKEND_NAMES:
        cache = copy_of(backend)
        shard = cache / manifest_of(cache)["shards"][1]["path"]
        if not shard.is_dir():  # an HDF5 shard is one file: its chunks cannot be deleted one by one
            shutil.rmtree(cache)
            continue
        chunk_file = CHUNK_BYTES[backend](shard, "topk_logits")[0][0]
        chunk_file.unlink()
        with pytest.raises(CorruptShardError) as caught:
            read_everything(cache)
        message = str(caught.value)
        assert f"{shard}: array 'topk_logits' chunk 0 (rows 0:256) is missing from storage" in message
        assert f"logit-cache verify {cache}" in message
        # rows of the other shards still read
        assert open_cache(cache, in_memory=False).rows([0, 599])["topk_indices"].shape == (2, 4)
        assert_one_line_error(cli(*train_args(cache, tmp_path / "student.pt")), "is missing from storage", "topk_logits")
        report = verify_cache(cache, progress=False)
        assert not report.ok and any("is missing from storage" in failure for failure in report.failures)
        shutil.rmtree(cache)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_swapped_shards_are_named(copy_of, cli, tmp_path, backend):
    cache = copy_of(backend)
    first, second = (cache / entry["path"] for entry in manifest_of(cache)["shards"][:2])
    first.rename(tmp_path / "aside")
    second.rename(first)
    (tmp_path / "aside").rename(second)
    with pytest.raises(CorruptShardError) as caught:
        read_everything(cache)
    message = str(caught.value)
    assert f"shard {first.name} (entry 0 of the manifest) is not the shard the manifest lists there" in message
    assert "its shard_index is 1, the manifest's entry says 0" in message and "its row_start is 256" in message
    assert f"logit-cache verify {cache}" in message
    assert_one_line_error(cli(*train_args(cache, tmp_path / "student.pt")), first.name, "swapped")
    assert not (tmp_path / "student.pt").exists()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_shard_of_another_cache_is_named(caches, copy_of, backend):
    """Same index and ranges, another cache (its key): refused too."""
    cache = copy_of(backend, "topk")
    other = caches[backend, "full"]
    entry = manifest_of(cache)["shards"][2]
    path = cache / entry["path"]
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    (shutil.copytree if (other / entry["path"]).is_dir() else shutil.copy)(other / entry["path"], path)
    with pytest.raises(CorruptShardError, match=f"shard {entry['path']} .* its key is '{manifest_of(other)['key']}'"):
        read_everything(cache)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_nan_rewritten_through_the_library_stops_training(copy_of, cli, tmp_path, backend):
    """zarr/h5py recompute the chunk checksum of a value written through them: the non-finite check catches it."""
    cache = copy_of(backend)
    entry = manifest_of(cache)["shards"][1]
    rewrite(cache / entry["path"], "topk_logits", 7, float("nan"))
    rewrite(cache / entry["path"], "topk_logits", 9, float("inf"))
    for in_memory in (False, True):
        opened = open_cache(cache, in_memory=in_memory)
        with pytest.raises(CorruptShardError) as caught:
            opened.rows(np.arange(N))
        message = str(caught.value)
        assert f"{cache}: shard {entry['path']}, array 'topk_logits'" in message
        assert "NaN or infinite values at cache rows 263, 265" in message
        assert f"logit-cache verify {cache}" in message and "--allow-nonfinite-targets" in message
        if not in_memory:
            opened.rows(np.arange(256))  # shard 0 is fine
    allowed = open_cache(cache, in_memory=False, allow_nonfinite=True).rows([263, 265])["topk_logits"][:, 0]
    assert np.isnan(allowed[0]) and np.isinf(allowed[1])

    student = tmp_path / "student.pt"
    assert_one_line_error(cli(*train_args(cache, student)), entry["path"], "263, 265", "--allow-nonfinite-targets")
    assert not student.exists()
    result = cli(*train_args(cache, student, "--allow-nonfinite-targets"))
    assert result.exit_code == 0, result.output
    assert student.exists()


def strip_checksums(cache: Path) -> None:
    """Rewrite every shard's arrays without chunk checksums: a cache as logit-cache wrote them before."""
    for entry in manifest_of(cache)["shards"]:
        shard = cache / entry["path"]
        if shard.is_dir():
            group = zarr.open_group(str(shard), mode="r+")
            for name in list(group.array_keys()):
                old = group[name]
                data, chunks, compressors = old[:], old.chunks, [c for c in old.compressors if type(c).__name__ != "Crc32cCodec"]
                del group[name]
                group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=compressors or None,
                                   fill_value=0)[:] = data
        else:
            with h5py.File(shard, "r+") as handle:
                for name in list(handle):
                    data, chunks = handle[name][:], handle[name].chunks
                    del handle[name]
                    handle.create_dataset(name, data=data, chunks=chunks, maxshape=(None, *data.shape[1:]))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_caches_without_chunk_checksums_still_read(caches, copy_of, caplog, backend):
    cache = copy_of(backend)
    strip_checksums(cache)
    with caplog.at_level(logging.DEBUG, logger="logit_cache.io"):
        got = read_everything(cache)
    want = read_everything(caches[backend, "topk"])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert "without chunk checksums" in caplog.text
    assert verify_cache(cache, progress=False).ok  # the shard checksums are over the values: unchanged


# -- item 7: verify checks the manifest's fields and its shard paths -----------------------------------------


@pytest.mark.parametrize(("mode", "field", "value", "expected"), [
    ("topk", "dtype", "float32", "they call for 'topk_logits' as float32 [4], the manifest's arrays list float16 [4]"),
    ("topk", "k", 3, "they call for 'topk_logits' as float16 [3], the manifest's arrays list float16 [4]"),
    ("topk", "num_classes", 6, "outside [0, num_classes=6)"),
    ("full", "num_classes", 12, "they call for 'logits' as float16 [12], the manifest's arrays list float16 [10]"),
    ("topk", "key", "0123456789abcdef", "key 0123456789abcdef is not the key of the manifest's content fields"),
])
def test_verify_catches_edits_of_the_manifest_fields(copy_of, cli, mode, field, value, expected):
    cache = copy_of("zarr", mode)
    assert verify_cache(cache, progress=False).ok
    edit_manifest(cache, lambda data: data.update({field: value}))
    report = verify_cache(cache, progress=False)
    assert not report.ok
    assert any(expected in failure for failure in report.failures), report.failures
    if field in ("dtype", "k"):  # content fields: the key no longer fits either
        assert any("is not the key of the manifest's content fields" in failure for failure in report.failures)
    result = cli("verify", cache)
    assert result.exit_code == 1 and expected in result.output


@pytest.mark.parametrize("bad_path", ["../../other/shard-00000.zarr", "/etc/passwd", "shards/../../x.zarr"])
def test_shard_paths_outside_the_cache_are_refused_unopened(copy_of, cli, monkeypatch, tmp_path, bad_path):
    cache = copy_of("zarr")
    outside = (cache / bad_path) if not bad_path.startswith("/") else Path(bad_path)
    if not bad_path.startswith("/"):  # a real shard there, which would pass if it were opened
        outside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cache / "shard-00000.zarr", outside)
    edit_manifest(cache, lambda data: data["shards"][0].update({"path": bad_path}))
    opened = []
    for backend in BACKENDS.values():
        monkeypatch.setattr(type(backend), "open", lambda self, path, *a, **k: opened.append(path))
    report = verify_cache(cache, progress=False)
    assert not report.ok and len(report.failures) == 1
    assert f"field 'shards' entry 0 has path {bad_path!r}" in report.failures[0]
    assert ("is absolute" if bad_path.startswith("/") else "leaves the cache directory") in report.failures[0]
    result = cli("verify", cache)
    assert result.exit_code == 1 and repr(bad_path) in result.output
    with pytest.raises(CacheFormatError, match=r"leaves the cache directory|is absolute"):
        open_cache(cache)
    assert_one_line_error(cli(*train_args(cache, tmp_path / "student.pt")), repr(bad_path))
    assert opened == []


def test_a_shard_symlinked_outside_the_cache_is_refused(copy_of, cli, tmp_path):
    cache = copy_of("zarr")
    elsewhere = tmp_path / "elsewhere.zarr"
    (cache / "shard-00000.zarr").rename(elsewhere)
    (cache / "shard-00000.zarr").symlink_to(elsewhere)
    with pytest.raises(CorruptShardError, match="outside the cache directory"):
        read_everything(cache)
    report = verify_cache(cache, progress=False)
    assert not report.ok and any("outside the cache directory" in failure for failure in report.failures)
    # a symlink inside the cache directory is fine
    (cache / "shard-00000.zarr").unlink()
    elsewhere.rename(cache / "moved.zarr")
    (cache / "shard-00000.zarr").symlink_to(cache / "moved.zarr")
    read_everything(cache)
    assert verify_cache(cache, progress=False).ok


@pytest.mark.parametrize(("mode", "encoding", "sample_temperature"), [
    ("topk", "plain", 1.0), ("topk", "compact", 1.0), ("sampled", "plain", 1.0), ("sampled", "compact", 2.0), ("full", "plain", 1.0),
])
def test_verify_passes_fresh_token_caches_and_catches_a_smaller_num_classes(tmp_path, mode, encoding, sample_temperature):
    """Per-token caches of every layout: the field checks hold on a fresh cache (ids decoded from compact
    gaps, sampled pads skipped, offsets), and a num_classes below the largest stored id fails."""
    torch.manual_seed(0)
    teacher = tmp_path / "bag.pt"
    torch.save(causal_bag(vocab=50).eval().state_dict(), teacher)
    width = {"topk": {"k": 20}, "sampled": {"m": 24, "sample_temperature": sample_temperature}, "full": {}}[mode]
    out = tmp_path / "cache"
    dump(DumpConfig(teacher=str(teacher), arch=spec("causal_bag"), arch_kwargs={"vocab": 50}, dataset=spec("ragged_tokens"),
                    dataset_kwargs={"vocab": 50}, out=str(out), mode=mode, encoding=encoding, shard_rows=300, quiet=True,
                    dtype="float32", **width))
    report = verify_cache(out, progress=False)
    assert report.ok, report.failures
    assert any(check.kind == "ranges" and "offsets run from 0" in check.detail for check in report.checks)
    stored = open_cache(out, in_memory=True)
    ids = stored.rows(np.arange(stored.num_rows)).get("topk_indices" if mode == "topk" else "sampled_indices")
    if ids is None:  # full logits: the width is the check
        edit_manifest(out, lambda data: data.update({"num_classes": 49}))
        assert any("'logits' as float32 [49]" in failure for failure in verify_cache(out, progress=False).failures)
        return
    largest = int(ids.max())
    edit_manifest(out, lambda data: data.update({"num_classes": largest}))
    report = verify_cache(out, progress=False)
    assert any(f"to {largest}, outside [0, num_classes={largest})" in failure for failure in report.failures), report.failures
