"""The target-kind registry: every mode-specific decision asks a kind, so a new kind is one object.

A toy kind registered here ("argmax": only each row's top-1 class id) is dumped by the real pipeline
through ``DumpConfig(mode="argmax")`` and read back with ``open_cache``, with no other file changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import RandomImages, spec

import logit_cache.targets as targets
from logit_cache import DumpConfig, dump_cache, open_cache
from logit_cache.errors import CacheFormatError, UsageError
from logit_cache.format.manifest import read_manifest
from logit_cache.store import ArraySpec
from logit_cache.targets import KINDS, TargetKind, Targets, get_kind, kind_names, register, unregister
from logit_cache.targets.dtypes import index_dtype
from logit_cache.targets.encoded import EncodedBatch, inspect_logits

N = 120


class ArgMax(TargetKind):
    """Each row's most likely class, nothing else (no loss reads it)."""

    name = "argmax"
    target_arrays = ("argmax_indices",)
    losses = frozenset()
    option = "--argmax"
    rows_field = "indices"

    def describe(self, width: int | None) -> str:
        return "top-1 ids"

    def encode(self, raw: torch.Tensor, width: int | None, dtype: str, *, sample_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> EncodedBatch:
        seen = inspect_logits(raw, dtype)
        arrays = {"argmax_indices": seen.raw.argmax(dim=1).to(torch.int32)}
        return EncodedBatch(arrays, seen.nonfinite, torch.zeros_like(seen.nonfinite), seen.raw.new_full((), float(len(raw))))

    def array_specs(self, width: int | None, num_classes: int, dtype: str, *, sampled_logits: bool = False) -> list[ArraySpec]:
        return [ArraySpec("argmax_indices", index_dtype(num_classes).name, (), compress=True)]

    def batch(self, num_classes: int, arrays: Mapping[str, np.ndarray], *, sample_temperature: float = 1.0,
              lengths: np.ndarray | None = None) -> Any:
        return Targets(self.name, num_classes, indices=torch.from_numpy(arrays["argmax_indices"]))


@pytest.fixture
def argmax() -> Iterator[TargetKind]:
    kind = register(ArgMax())
    try:
        yield kind
    finally:
        unregister(kind.name)


def test_the_built_in_kinds_are_registered_in_order():
    assert kind_names() == ("full", "topk", "sampled")
    assert kind_names() == targets.MODES
    assert targets.TARGET_ARRAYS["topk"] == ("topk_logits", "topk_indices", "logsumexp")
    assert targets.OPTIONAL_TARGET_ARRAYS == {"topk": ("topk_log_tail",), "sampled": ("sampled_logits",)}
    assert [get_kind(name).width_field for name in kind_names()] == [None, "k", "m"]
    assert get_kind("topk").label(5) == "top5" and get_kind("sampled").label(50) == "sample50" and get_kind("full").label(None) == "full"
    assert get_kind("topk").describe(5) == "top-5" and get_kind("full").describe(None) == "full logits"
    assert {name for name in kind_names() if get_kind(name).compact} == {"topk", "sampled"}


def test_an_unknown_kind_is_a_usage_error_naming_the_known_ones():
    with pytest.raises(UsageError, match="unknown mode 'nope'; expected one of full, topk, sampled"):
        get_kind("nope")


def test_a_kind_reads_its_width_and_its_key_fields_from_a_record():
    config = DumpConfig(teacher="t", dataset="d", out="o", mode="sampled", m=7, sample_temperature=2.0)
    assert get_kind("sampled").width(config) == 7
    assert get_kind("sampled").key_fields(config) == {"m": 7, "sample_temperature": 2.0}
    assert get_kind("topk").key_fields(config) == {} and get_kind("full").width(config) is None


def test_targets_know_their_kind():
    batch = Targets.from_arrays("topk", 10, {"topk_logits": np.zeros((2, 3), np.float16),
                                              "topk_indices": np.zeros((2, 3), np.uint16), "logsumexp": np.zeros(2, np.float32)})
    assert batch.kind is get_kind("topk") and batch.k == 3 and len(batch) == 2


def _dump(tmp_path, teacher_ckpt, **options: Any):
    return dump_cache(DumpConfig(teacher=str(teacher_ckpt), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS),
                                 dataset=spec("random_images"), dataset_kwargs={"n": N}, out=str(tmp_path / "cache"),
                                 batch_size=32, shard_rows=64, quiet=True, **options))


def test_a_registered_kind_is_dumped_and_read_back(argmax, teacher_ckpt, tmp_path):
    result = _dump(tmp_path, teacher_ckpt, mode="argmax")
    assert not result.reused and result.rows_computed == N and result.mean_topk_mass is None
    manifest = read_manifest(result.out)
    assert manifest.mode == "argmax" and manifest.complete and set(manifest.arrays) == {"argmax_indices", "labels"}
    with torch.no_grad():
        want = make_teacher()(RandomImages(N).images).argmax(dim=1).numpy()
    cache = open_cache(result.out)
    batch = cache.targets(np.arange(N))
    assert batch.kind is argmax and batch.mode == "argmax" and len(batch) == N
    np.testing.assert_array_equal(batch.indices.numpy(), want)
    # the same dump again is the same content: reused by key
    again = _dump(tmp_path, teacher_ckpt, mode="argmax", resume=True)
    assert again.reused and again.manifest.key == manifest.key


def test_an_unregistered_kind_is_refused_by_the_dump_and_the_manifest(argmax, teacher_ckpt, tmp_path):
    out = _dump(tmp_path, teacher_ckpt, mode="argmax").out
    unregister(argmax.name)
    with pytest.raises(UsageError, match="unknown mode 'argmax'"):
        DumpConfig(teacher="t", dataset="d", out="o", mode="argmax").validate()
    with pytest.raises(CacheFormatError, match="field 'mode' is 'argmax', expected one of full, topk, sampled"):
        read_manifest(out)
    assert "argmax" not in KINDS


def test_the_dump_asks_the_kinds_for_its_option_checks():
    checks: list[tuple[dict[str, Any], str]] = [
        ({"mode": "topk"}, "choose what to store: --topk K"),
        ({"mode": "topk", "k": 0}, "--topk must be >= 1"),
        ({"mode": "sampled", "m": 0}, r"M must be in \[1, 65535\]"),
        ({"mode": "topk", "k": 3, "m": 5}, "--topk and --sample are exclusive: pass one of --topk K, --sample M, --full"),
        ({"mode": "full", "k": 3}, "--topk and --full are exclusive"),
        ({"mode": "full", "encoding": "compact"}, "--encoding compact applies to --topk and --sample caches"),
        ({"mode": "topk", "k": 3, "sample_temperature": 2.0}, "--sample-temperature applies to --sample M"),
        ({"mode": "what"}, "unknown mode 'what'; use --topk K, --sample M or --full"),
    ]
    for options, message in checks:
        with pytest.raises(UsageError, match=message):
            DumpConfig(teacher="t", dataset="d", out="o", **options).validate()
    resolved: Callable[..., DumpConfig] = lambda **kw: DumpConfig(teacher="t", dataset="d", out="o", **kw).resolved()  # noqa: E731
    assert resolved(mode="sampled", m=4).seed == 0 and resolved(mode="topk", k=4).seed is None
