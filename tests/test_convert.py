"""``logit-cache convert``: the same arrays in the other backend or value dtype, as a new cache.

Source caches are dumped once per module from the seeded teacher over the built-in digits train
split (1437 items) with 500-row shards (three shards); arrays are compared with plain zarr / h5py.
Sources are never modified: tests that damage one work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import make_teacher
from data_factories import dump_digits, read_plain, spec

from logit_cache.convert import convert
from logit_cache.errors import CorruptShardError, IncompleteCacheError, NonFiniteLogitsError, OutputExistsError, UsageError
from logit_cache.fingerprint import content_key
from logit_cache.manifest import FORMAT_VERSION
from logit_cache.reader import open_cache

N = 1437


def dump(root: Path, teacher: Path, name: str, **options) -> Path:
    return dump_digits(root, teacher, name, shard_rows=500, **options)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    teacher = root / "teacher.pt"
    torch.save(make_teacher().state_dict(), teacher)
    return {
        "topk16": dump(root, teacher, "topk16", mode="topk", k=4, dtype="float16"),
        "full32": dump(root, teacher, "full32", mode="full", dtype="float32"),
        "full16": dump(root, teacher, "full16", mode="full", dtype="float16"),
        # logits up to ~9e4: some rows do not fit float16
        "huge": dump(root, teacher, "huge", dataset=spec("random_images"), dataset_kwargs={"n": 60, "scale": 5e5},
                     mode="full", dtype="float32"),
    }


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def names_of(path: Path) -> list[str]:
    return list(manifest_of(path)["arrays"])


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def chunks_of(path: Path) -> list[dict[str, tuple]]:
    """Each shard's chunk shape per array, read with plain zarr / h5py."""
    manifest = manifest_of(path)
    out = []
    for shard in manifest["shards"]:
        where = path / shard["path"]
        if manifest["backend"] == "zarr":
            group = zarr.open_group(str(where), mode="r")
            out.append({name: tuple(group[name].chunks) for name in manifest["arrays"]})
        else:
            with h5py.File(where, "r") as handle:
                out.append({name: tuple(handle[name].chunks) for name in manifest["arrays"]})
    return out


def ranges(manifest: dict) -> list[tuple[int, int, int, int]]:
    return [(s["row_start"], s["row_stop"], s["sample_start"], s["sample_stop"]) for s in manifest["shards"]]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("source", ["topk16", "full32"])
def test_round_trip_zarr_hdf5_zarr_is_identical(cli, caches, tmp_path, source):
    src = caches[source]
    before = tree_digest(src)
    h5, back = tmp_path / "h5", tmp_path / "back"
    result = cli("convert", src, h5, "--format", "hdf5", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"converted {src} -> {h5}" in result.output and "zarr" in result.output and "hdf5" in result.output
    assert f"{manifest_of(src)['key']} (unchanged)" in result.output
    assert cli("convert", h5, back, "--format", "zarr", "-q").exit_code == 0

    want = manifest_of(src)
    for out, backend in ((h5, "hdf5"), (back, "zarr")):
        got = manifest_of(out)
        assert got["complete"] is True and got["backend"] == backend and got["dtype"] == want["dtype"]
        assert got["key"] == want["key"]
        assert [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in want["shards"]]
        assert ranges(got) == ranges(want) and len(got["shards"]) == 3
        assert got["arrays"] == want["arrays"] and got["chunk_rows"] == want["chunk_rows"]
        for field in ("teacher", "dataset", "mode", "k", "views", "seed", "num_rows", "num_samples", "temperature"):
            assert got[field] == want[field], field
        for name in names_of(src):
            stored, original = read_plain(out, name), read_plain(src, name)
            assert stored.dtype == original.dtype
            np.testing.assert_array_equal(stored, original)
        assert chunks_of(out) == chunks_of(src)
        assert not Path(f"{out}.partial").exists()
    assert manifest_of(h5)["dump"]["converted_from"] == {
        **manifest_of(h5)["dump"]["converted_from"], "path": str(src.resolve()), "key": want["key"], "backend": "zarr",
        "dtype": want["dtype"],
    }
    assert manifest_of(back)["dump"]["converted_from"]["backend"] == "hdf5"
    # compressed exactly as the source: top-k arrays and labels with Blosc-zstd, full logits not at all
    for name in names_of(src):
        original = zarr.open_group(str(src / "shard-00000.zarr"), mode="r")[name]
        again = zarr.open_group(str(back / "shard-00000.zarr"), mode="r")[name]
        assert again.compressors == original.compressors, name
    assert tree_digest(src) == before  # a complete cache is never modified

    # training reads the same rows, in any order, from the converted caches
    rows = np.random.default_rng(0).permutation(N)[:300]
    with open_cache(src) as a, open_cache(h5, in_memory=False, chunk_cache_bytes=1 << 14) as b:
        for name, values in a.rows(rows).items():
            np.testing.assert_array_equal(b.rows(rows)[name], values)


def test_narrowing_equals_numpy_rounding_and_a_float16_dump(caches, tmp_path):
    out = tmp_path / "fp16"
    result = convert(caches["full32"], out, dtype="float16", quiet=True)
    source = read_plain(caches["full32"], "logits")
    stored = read_plain(out, "logits")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, source.astype(np.float16))
    np.testing.assert_array_equal(read_plain(out, "labels"), read_plain(caches["full32"], "labels"))
    got, direct = manifest_of(out), manifest_of(caches["full16"])
    assert got["dtype"] == "float16" and got["arrays"]["logits"]["dtype"] == "float16" and got["backend"] == "zarr"
    assert got["key"] != manifest_of(caches["full32"])["key"]
    # the same values a float16 dump stores: the same content, so the same key and checksums
    assert got["key"] == direct["key"] == result.manifest.key
    assert [s["checksum"] for s in got["shards"]] == [s["checksum"] for s in direct["shards"]]
    np.testing.assert_array_equal(stored, read_plain(caches["full16"], "logits"))
    assert "value_precision" not in got["dump"]
    with open_cache(out) as cache:
        np.testing.assert_array_equal(cache.rows(np.arange(N))["logits"], source.astype(np.float16))


def test_widening_is_exact_and_keyed_apart_from_a_float32_dump(caches, tmp_path):
    src = caches["topk16"]
    wide, narrow = tmp_path / "fp32", tmp_path / "fp16-again"
    convert(src, wide, backend="hdf5", dtype="float32", quiet=True)
    values = read_plain(wide, "topk_logits")
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, read_plain(src, "topk_logits").astype(np.float32))
    for name in ("topk_indices", "logsumexp", "labels"):
        np.testing.assert_array_equal(read_plain(wide, name), read_plain(src, name))
        assert read_plain(wide, name).dtype == read_plain(src, name).dtype
    m, original = manifest_of(wide), manifest_of(src)
    float32_dump_key = content_key(teacher_sha256=m["teacher"]["sha256"], dataset_fingerprint=m["dataset"]["fingerprint"],
                                   mode="topk", k=4, views=1, seed=None, dtype="float32", format_version=FORMAT_VERSION)
    assert m["key"] not in (original["key"], float32_dump_key)  # float16-rounded values are not a float32 dump's
    assert m["dump"]["value_precision"] == "float16" and m["dtype"] == "float32"
    # back to float16 (and zarr): exactly the original content, key and checksums
    convert(wide, narrow, backend="zarr", dtype="float16", quiet=True)
    back = manifest_of(narrow)
    assert back["key"] == original["key"]
    assert [s["checksum"] for s in back["shards"]] == [s["checksum"] for s in original["shards"]]
    assert "value_precision" not in back["dump"]


def test_overflow_is_refused_naming_the_rows(cli, caches, tmp_path):
    src, out = caches["huge"], tmp_path / "fp16"
    logits = read_plain(src, "logits")
    with np.errstate(over="ignore"):
        bad = np.flatnonzero(np.isinf(logits.astype(np.float16)).any(axis=1))
    assert 0 < len(bad) < len(logits)  # the fixture has rows on both sides of float16's range
    result = cli("convert", src, out, "--dtype", "float16")
    rows = ", ".join(map(str, bad.tolist()))
    assert_one_line_error(result, f"rows {rows} hold logits beyond float16's range", "65504", "without --dtype float16")
    assert not out.exists() and not Path(f"{out}.partial").exists()
    with pytest.raises(NonFiniteLogitsError):
        convert(src, out, dtype="float16", quiet=True)
    assert cli("convert", src, out, "--format", "hdf5", "-q").exit_code == 0  # float32 is fine


def test_incomplete_source_is_refused(cli, caches, tmp_path):
    src = tmp_path / "unfinished"
    shutil.copytree(caches["topk16"], src)
    manifest = manifest_of(src)
    manifest["complete"] = False
    (src / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli("convert", src, tmp_path / "out", "--format", "hdf5"), "complete=false", "only a complete cache")
    src.rename(tmp_path / "other.partial")
    assert_one_line_error(cli("convert", tmp_path / "other", tmp_path / "out", "--format", "hdf5"), "has not finished")
    with pytest.raises(IncompleteCacheError):
        convert(tmp_path / "other", tmp_path / "out", backend="hdf5")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_usage_errors(cli, caches, tmp_path):
    src = caches["topk16"]
    assert_one_line_error(cli("convert", src, tmp_path / "o", "--format", "zarr"), "nothing to convert", "--format hdf5")
    assert_one_line_error(cli("convert", src, tmp_path / "o"), "nothing to convert")
    assert_one_line_error(cli("convert", src, src, "--format", "hdf5"), "never modified")
    assert_one_line_error(cli("convert", src, src / "inside", "--format", "hdf5"), "never modified")
    assert_one_line_error(cli("convert", tmp_path / "missing", tmp_path / "o", "--format", "hdf5"), "missing", "no such cache")
    assert cli("convert", src, tmp_path / "o", "--format", "xml").exit_code == 2  # click's own choice check
    with pytest.raises(UsageError, match="nothing to convert"):
        convert(src, tmp_path / "o", backend="zarr", dtype="float16")
    assert not (tmp_path / "o").exists() and not (src / "inside").exists()


def test_existing_destination(cli, caches, tmp_path):
    src, out = caches["topk16"], tmp_path / "out"
    assert cli("convert", src, out, "--format", "hdf5", "-q").exit_code == 0
    first = manifest_of(out)
    assert_one_line_error(cli("convert", src, out, "--format", "hdf5"), "already exists", "already holds this content", "--overwrite")
    assert_one_line_error(cli("convert", src, out, "--dtype", "float32"), "already exists", "--overwrite")
    assert manifest_of(out) == first
    assert cli("convert", src, out, "--dtype", "float32", "--overwrite", "-q").exit_code == 0
    assert manifest_of(out)["dtype"] == "float32" and manifest_of(out)["backend"] == "zarr"
    assert not list(tmp_path.glob("out.*"))  # no .partial, no .replaced-* left over

    # --overwrite never deletes what is not a cache
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert_one_line_error(cli("convert", src, stranger, "--format", "hdf5", "--overwrite"), "not a logit-cache cache")
    assert (stranger / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError):
        convert(src, out, backend="hdf5")


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_damaged_source_fails_midway_and_leaves_no_destination(cli, caches, tmp_path, dtype):
    """Shard 0 converts, shard 1 cannot be read: no DST, and the unfinished DST.partial is removed."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(caches["full32"], src)
    chunk = src / "shard-00001.zarr" / "logits" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: does not decode
    extra = ["--dtype", dtype] if dtype else []
    assert_one_line_error(cli("convert", src, out, "--format", "hdf5", *extra), "shard-00001.zarr", "cannot be read")
    assert not out.exists() and not Path(f"{out}.partial").exists()

    # a flipped byte fails its chunk's crc32c as it is read (before chunk checksums: it decoded, and the
    # shard no longer matched the manifest's checksum): refused, not copied
    shutil.rmtree(src)
    shutil.copytree(caches["full32"], src)
    chunk = src / "shard-00002.zarr" / "logits" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-00002\.zarr.*(does not match the manifest|fails its checksum)"):
        convert(src, out, backend="hdf5", dtype=dtype, quiet=True)
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.slow
def test_killed_conversion_leaves_only_the_partial(cli, caches, tmp_path):
    """SIGKILL at the worst moment (every shard and the manifest written, before the rename)."""
    src, out = caches["topk16"], tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import logit_cache.convert as convert
        convert.move_into_place = lambda work, dst: os.kill(os.getpid(), signal.SIGKILL)
        convert.convert({str(src)!r}, {str(out)!r}, backend="hdf5", quiet=True)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert process.returncode == -9, process.stderr.decode()
    assert not out.exists() and Path(f"{out}.partial", "manifest.json").is_file()
    with pytest.raises(IncompleteCacheError):
        open_cache(out)
    assert_one_line_error(cli("convert", src, out, "--format", "hdf5"), "out.partial", "--overwrite")
    assert cli("convert", src, out, "--format", "hdf5", "--overwrite", "-q").exit_code == 0
    assert not Path(f"{out}.partial").exists()
    np.testing.assert_array_equal(read_plain(out, "topk_logits"), read_plain(src, "topk_logits"))


def test_any_registered_backend_is_a_target(caches, tmp_path, monkeypatch):
    """Convert knows no backend by name: a third registered backend is offered and written like the others."""
    from logit_cache import store
    from logit_cache.store.zarr_store import ZarrBackend

    monkeypatch.setitem(store.BACKENDS, "zarr-copy", ZarrBackend())
    src = caches["topk16"]
    with pytest.raises(UsageError, match="nothing to convert; pass --format hdf5 or zarr-copy and/or --dtype float32"):
        convert(src, tmp_path / "o", backend="zarr")
    result = convert(src, tmp_path / "copy", backend="zarr-copy", quiet=True)
    assert result.manifest.backend == "zarr-copy" and result.manifest.key == result.source.key
    with open_cache(tmp_path / "copy") as copy, open_cache(src) as source:
        assert copy.manifest.arrays == source.manifest.arrays
        for position, entry in enumerate(source.manifest.shards):
            rows = entry.row_stop - entry.row_start
            for name in ("topk_indices", "topk_logits"):
                np.testing.assert_array_equal(copy.shard(position).read(name, 0, rows), source.shard(position).read(name, 0, rows))


def test_value_arrays_come_from_the_target_kinds():
    from logit_cache.targets import KINDS
    from logit_cache.tools.convert import VALUE_ARRAYS

    assert set(VALUE_ARRAYS) == {name for kind in KINDS.values() for name in kind.value_arrays}
    assert {"logits", "topk_logits", "sampled_logits"} <= set(VALUE_ARRAYS)
