"""Cache identity: one list of key fields (``manifest_key``), keys that name content rather than spelling,
and one rule for hashing directories."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ARCH, ARCH_KWARGS

from logit_cache import DumpConfig, dump_cache
from logit_cache.data.datasets import fingerprint_as_dumped, recorded_fingerprint, resolve_dataset
from logit_cache.format.identity import content_key, directory_sha256, file_sha256, manifest_key, record_key
from logit_cache.format.manifest import read_manifest
from logit_cache.specs import bound_kwargs, callable_identity, resolve_callable
from logit_cache.teachers.sources import teacher_sha256

# --- one list of key fields -------------------------------------------------------------------------

#: Keys the pre-registry content_key gave (logit-cache at bffa368) for these fields: they must not change.
OLD_KEYS = [
    (dict(mode="topk", k=5, dtype="float16"), "a1949714f425230c"),
    (dict(mode="full", k=None, dtype="float32", precision="bf16"), "a6c14104b09075bb"),
    (dict(mode="sampled", k=None, m=50, sample_temperature=2.0, dtype="float16", encoding="compact"), "e4568fc7cb69e69e"),
    (dict(mode="topk", k=8, dtype="float16", encoding="compact", seed=3, views=2), "33fb0a8760dac4d6"),
]


def _manifest(fields: dict) -> SimpleNamespace:
    fields = {"views": 1, "seed": None, "m": None, "sample_temperature": 1.0, "encoding": "plain", **fields}
    precision = fields.pop("precision", "fp32")
    return SimpleNamespace(teacher={"sha256": "ab" * 32}, dataset={"fingerprint": "cd" * 32}, format_version=1,
                           dump={"precision": precision}, **fields)


@pytest.mark.parametrize(("fields", "old"), OLD_KEYS)
def test_manifest_key_keeps_the_keys_of_existing_caches(fields: dict, old: str) -> None:
    manifest = _manifest(fields)
    spelled = {"views": 1, "seed": None, **fields}
    assert content_key(teacher_sha256="ab" * 32, dataset_fingerprint="cd" * 32, format_version=1, **spelled) == old
    assert manifest_key(manifest) == old
    assert record_key(manifest, teacher_sha256="ab" * 32, dataset_fingerprint="cd" * 32, format_version=1,
                      precision=manifest.dump["precision"]) == old


def test_the_kind_adds_its_own_key_fields() -> None:
    sampled = _manifest(dict(mode="sampled", k=None, m=50, dtype="float16"))
    assert manifest_key(sampled) != manifest_key(_manifest(dict(mode="sampled", k=None, m=51, dtype="float16")))
    # the width of another kind's field does not enter a top-k key
    topk = _manifest(dict(mode="topk", k=5, dtype="float16"))
    assert manifest_key(topk) == manifest_key(_manifest(dict(mode="topk", k=5, dtype="float16", m=7)))
    assert manifest_key(topk, dtype="float32") != manifest_key(topk)


# --- keys name content, not spelling ----------------------------------------------------------------

FACTORY = '''
import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, n, seed):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 8, 8, generator=generator)
        self.labels = torch.randint(0, 10, (n,), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def images(n=48, seed=0, note=None):
    return Images(n, seed)
'''


@pytest.fixture
def factory_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``<name>/mod.py`` in the working directory (importable from it); returns its name."""
    name = f"idpkg_{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "mod.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # restores sys.path (resolve_callable appends the cwd)
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def test_three_spellings_give_one_cache(tmp_path: Path, teacher: Path, factory_package: str) -> None:
    root = tmp_path / "root"
    spellings = [
        (f"{factory_package}.mod:images", {}),
        (f"{factory_package}/mod.py:images", {}),
        (f"{factory_package}.mod:images", {"n": 48, "seed": 0, "note": None}),
    ]
    results = [
        dump_cache(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec,
                              dataset_kwargs=kwargs, k=3, cache_root=str(root)))
        for spec, kwargs in spellings
    ]
    assert [result.reused for result in results] == [False, True, True]
    assert len({result.out for result in results}) == 1
    assert [p.name for p in root.iterdir() if p.is_dir()] == [results[0].out.name]
    manifest = read_manifest(results[0].out)
    assert manifest.dataset["spec"] == spellings[0][0] and manifest.dataset["kwargs"] == {}  # as typed
    assert manifest.dataset["identity"] == {"spec": f"{factory_package}.mod:images", "kwargs": {"n": 48, "seed": 0, "note": None}}
    assert manifest_key(manifest) == manifest.key
    # training and verify recompute the fingerprint from what the manifest records
    assert recorded_fingerprint(resolve_dataset(spellings[1][0]).dataset, manifest) == manifest.dataset["fingerprint"]
    # another value is other content
    other = dump_cache(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS),
                                  dataset=spellings[0][0], dataset_kwargs={"seed": 1}, k=3, cache_root=str(root)))
    assert not other.reused and other.out != results[0].out


def test_different_kwargs_values_give_different_fingerprints(factory_package: str) -> None:
    spec = f"{factory_package}.mod:images"
    base = resolve_dataset(spec).fingerprint()
    assert resolve_dataset(spec, {"n": 48}).fingerprint() == base
    assert resolve_dataset(f"{factory_package}/mod.py:images", {"seed": 0}).fingerprint() == base
    assert resolve_dataset(spec, {"seed": 1}).fingerprint() != base
    assert resolve_dataset(spec, {"note": "x"}).fingerprint() != base  # not used by the data, but another call


def test_old_alias_paths_and_builtins_are_one_identity() -> None:
    old, new = (resolve_callable(spec, "--arch") for spec in ("logit_cache.models:digits_mlp", "logit_cache.tools.models:digits_mlp"))
    assert callable_identity(old, "a") == callable_identity(new, "b") == "logit_cache.tools.models:digits_mlp"
    file = str(Path(new.__code__.co_filename))
    assert callable_identity(resolve_callable(f"{file}:digits_mlp", "--arch"), "c") == "logit_cache.tools.models:digits_mlp"
    assert resolve_dataset("digits").identity == resolve_dataset("digits", {"split": "train", "augment": False}).identity
    assert resolve_dataset("digits").identity["spec"] == "digits"
    assert resolve_dataset("digits", {"split": "test"}).fingerprint() != resolve_dataset("digits").fingerprint()


TRANSFORM = object()


def test_bound_kwargs_fills_only_what_json_can_spell() -> None:
    def factory(a, b=2, *rest, transform=TRANSFORM, path=None, **extra):
        return None

    assert bound_kwargs(factory, {"a": 1}) == {"a": 1, "b": 2, "path": None}
    assert bound_kwargs(factory, {"a": 1, "z": 3}) == {"a": 1, "b": 2, "path": None, "z": 3}
    assert bound_kwargs(factory, {"nope": 1}) == {"nope": 1}  # does not bind: as given (the call reports it)


def test_a_manifest_without_identity_is_fingerprinted_as_spelled() -> None:
    resolved = resolve_dataset("digits", {"split": "test"})
    entry = resolved.manifest_entry("f")
    assert "identity" in entry  # defaults filled: differs from what was typed
    old_style = SimpleNamespace(dataset={"spec": "digits", "kwargs": {"split": "test"}}, per_token=False, seed=None)
    assert recorded_fingerprint(resolved.dataset, old_style) == fingerprint_as_dumped(resolved.dataset, "digits", {"split": "test"}, None)


# --- directories ------------------------------------------------------------------------------------


def test_one_directory_rule(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"weights")
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("ignored")
    expected = hashlib.sha256()
    for relative, data in (("config.json", b"{}"), ("sub/w.bin", b"weights")):
        expected.update(f"{relative}\0{len(data)}\0".encode() + data)
    assert directory_sha256(model) == file_sha256(model) == teacher_sha256(f"hf:{model}") == expected.hexdigest()
    assert directory_sha256(model, skip=None) != expected.hexdigest()
