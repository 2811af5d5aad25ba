"""Manifest validation on read, atomic write, and the fingerprint rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logit_cache.errors import CacheFormatError, CacheNotFoundError, DatasetError
from logit_cache.fingerprint import content_key, dataset_fingerprint, file_sha256, sample_indices
from logit_cache.manifest import Manifest, ShardEntry, read_manifest, write_manifest


def make_manifest(**changes) -> Manifest:
    fields = dict(
        backend="zarr", mode="topk", k=3, num_classes=10, dtype="float16", temperature=1.0, num_samples=5,
        num_rows=5, views=1, seed=None, per_token=False, teacher={"sha256": "x"}, dataset={"fingerprint": "y"},
        key="abc", shards=[ShardEntry("shard-00000.zarr", 0, 5, 0, 5, "sha256:0")], complete=True,
    )
    fields.update(changes)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    write_manifest(tmp_path, make_manifest())
    assert read_manifest(tmp_path) == make_manifest()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "newer logit-cache"),
        (lambda d: d.pop("key"), "missing field"),
        (lambda d: d.update(mode="soft"), "'mode'"),
        (lambda d: d.update(k=11), "'k'"),
        (lambda d: d.update(num_rows=6), "'shards'"),
        (lambda d: d["shards"][0].update(row_start=1), "does not start"),
    ],
)
def test_validation_names_the_field(tmp_path, edit, message):
    data = make_manifest().to_dict()
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheFormatError, match=message):
        read_manifest(tmp_path)


def test_missing_and_garbage(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no such cache"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(CacheNotFoundError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheFormatError, match="cannot be read as JSON"):
        read_manifest(tmp_path)


def test_file_sha256(tmp_path):
    import hashlib

    (tmp_path / "a.bin").write_bytes(b"x" * 3_000_000)
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_dataset_fingerprint_sees_content_length_kwargs_and_types():
    data = [(torch.arange(4, dtype=torch.float32) + i, i % 3) for i in range(100)]
    base = dataset_fingerprint(data, "s", {})
    assert base == dataset_fingerprint(list(data), "s", {})
    changed = list(data)
    changed[99] = (changed[99][0] + 1, changed[99][1])  # index 99 is always sampled (the last)
    assert dataset_fingerprint(changed, "s", {}) != base
    assert dataset_fingerprint(data[:99], "s", {}) != base
    assert dataset_fingerprint(data, "s", {"split": "test"}) != base
    as_double = [(x.double(), y) for x, y in data]
    assert dataset_fingerprint(as_double, "s", {}) != base
    assert sample_indices(100)[0] == 0 and sample_indices(100)[-1] == 99 and len(sample_indices(100)) == 16
    with pytest.raises(DatasetError, match="cannot fingerprint"):
        dataset_fingerprint([object()], "s", {})
    with pytest.raises(DatasetError, match="objects"):
        dataset_fingerprint([np.array([object()])], "s", {})


def test_key_covers_content_fields_only():
    base = dict(teacher_sha256="t", dataset_fingerprint="d", mode="topk", k=5, views=1, seed=None, dtype="float16",
                format_version=1)
    key = content_key(**base)
    assert len(key) == 16 and key == content_key(**base)
    for name, value in [("teacher_sha256", "u"), ("dataset_fingerprint", "e"), ("k", 6), ("dtype", "float32"),
                        ("views", 2), ("seed", 0), ("mode", "full")]:
        assert content_key(**{**base, name: value}) != key, name
    # the teacher's precision: bf16/fp16 logits differ from fp32 ones; fp32 keeps the key it always had
    assert content_key(**base, precision="fp32") == key
    assert len({key, content_key(**base, precision="bf16"), content_key(**base, precision="fp16")}) == 3
