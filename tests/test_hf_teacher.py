"""Tests for ``hf:DIR`` teachers: a local Hugging Face causal LM directory, loaded offline, hashed whole.

The models are tiny randomly initialised GPT-2s built here and written with ``save_pretrained``; every
comparison is against the same directory loaded independently with transformers.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import transformers

from logit_cache.dump import run_teacher
from logit_cache.errors import CheckpointError, CheckpointNotFoundError, MissingPackageError, UsageError
from logit_cache.teacher import hf_dir, is_hf_spec, load_teacher, teacher_sha256

VOCAB = 300


def tiny_config() -> transformers.GPT2Config:
    # bos/eos inside the tiny vocabulary, or transformers warns about the GPT-2 defaults (50256).
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 causal LM, saved once for the module."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    transformers.GPT2LMHeadModel(tiny_config()).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the hub's offline switch, and any socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def reference(directory: Path, **kwargs: object) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(directory, local_files_only=True, **kwargs).eval()


def documented_sha256(directory: Path) -> str:
    """``teacher_sha256``'s definition for hf:DIR, written out independently."""
    digest = hashlib.sha256()
    entries = []
    for file in directory.rglob("*"):
        relative = file.relative_to(directory)
        if file.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            entries.append((relative.as_posix(), file.read_bytes()))
    for relative, data in sorted(entries):
        digest.update(relative.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


# --- loading ------------------------------------------------------------------------------------------


def test_loads_the_same_model_in_eval_mode_and_frozen(tiny):
    spec = "hf:" + str(tiny)
    teacher = load_teacher(spec)
    assert (teacher.format, teacher.layout, teacher.path, teacher.arch, teacher.arch_kwargs) == ("hf", "hf", spec, None, {})
    assert teacher.sha256 == teacher_sha256(spec)
    assert teacher.manifest_entry()["format"] == "hf"
    module = teacher.module
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())
    ids = torch.tensor([[2, 7]])
    output = module(ids)
    assert output.logits.shape == (1, 2, VOCAB)
    assert getattr(output, "past_key_values", None) is None  # a teacher never generates: no KV cache returned
    with torch.no_grad():
        expected = reference(tiny)(ids).logits
    torch.testing.assert_close(output.logits, expected)
    torch.testing.assert_close(run_teacher(module, ids), expected)  # the dump's own call unwraps .logits


def test_keyword_call_with_right_padding_matches_at_real_positions(tiny):
    module = load_teacher("hf:" + str(tiny)).module
    ids = torch.tensor([[2, 7, 11, 5], [3, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    padded = module(input_ids=ids, attention_mask=mask).logits  # (2, 4, V)
    assert padded.shape == (2, 4, VOCAB)
    torch.testing.assert_close(padded[0], module(ids[:1]).logits[0])
    torch.testing.assert_close(padded[1, :2], module(ids[1:, :2]).logits[0])
    # dict inputs, as a token data set yields them, become keyword arguments in the dump
    torch.testing.assert_close(run_teacher(module, {"input_ids": ids, "attention_mask": mask}), padded)


def test_a_bf16_directory_loads_in_float32(tiny, tmp_path):
    directory = tmp_path / "bf16"
    reference(tiny).to(torch.bfloat16).save_pretrained(directory)
    module = load_teacher(f"hf:{directory}").module
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    ids = torch.tensor([[4, 8, 15]])
    with torch.no_grad():
        expected = reference(directory, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(module(ids).logits, expected)


# --- the directory digest --------------------------------------------------------------------------


def test_directory_digest_is_stable_and_follows_the_definition(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    spec = f"hf:{copy}"
    first = teacher_sha256(spec)
    assert first == teacher_sha256(spec) == teacher_sha256(f"hf:{tiny}")
    assert first == documented_sha256(copy)
    assert len(first) == 64 and first == first.lower()

    # hidden entries and __pycache__ are not part of the model
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "model.safetensors.lock").write_text("lock")
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs")
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert teacher_sha256(spec) == first

    # a file in a subdirectory is
    (copy / "extra").mkdir()
    (copy / "extra" / "notes.txt").write_text("n")
    with_extra = teacher_sha256(spec)
    assert with_extra != first and with_extra == documented_sha256(copy)
    (copy / "extra" / "notes.txt").unlink()
    (copy / "extra").rmdir()

    # one byte of config.json changes the teacher
    config = copy / "config.json"
    data = bytearray(config.read_bytes())
    position = data.index(b'"n_positions": 64') + len(b'"n_positions": 6')
    data[position : position + 1] = b"5"
    config.write_bytes(bytes(data))
    changed = teacher_sha256(spec)
    assert changed != first and changed == documented_sha256(copy)


def test_digest_of_a_checkpoint_file_is_its_sha256(tmp_path):
    file = tmp_path / "teacher.pt"
    file.write_bytes(b"weights")
    assert teacher_sha256(file) == teacher_sha256(str(file)) == hashlib.sha256(b"weights").hexdigest()


def test_digest_of_missing_paths(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        teacher_sha256(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        teacher_sha256(tmp_path / "nope.pt")


def test_spec_helpers(tmp_path):
    assert is_hf_spec("hf:/models/x") and not is_hf_spec("/models/x") and not is_hf_spec(Path("hf:x"))
    assert hf_dir(f"hf:{tmp_path}") == tmp_path
    with pytest.raises(UsageError, match="names no directory"):
        hf_dir("hf:")
    with pytest.raises(UsageError, match="expected hf:DIR"):
        hf_dir("teacher.pt")


# --- errors --------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"directory .*nope.* does not exist"):
        load_teacher(f"hf:{tmp_path / 'nope'}")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"has no config\.json.*holds config\.json and the weights"):
        load_teacher(f"hf:{tmp_path}")


def test_hf_prefix_on_a_file(tmp_path):
    file = tmp_path / "teacher.pt"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is a file, not a directory.*drop the hf: prefix"):
        load_teacher(f"hf:{file}")


def test_config_without_weights(tiny, tmp_path):
    shutil.copy(tiny / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"cannot load teacher .*model_type 'gpt2'.*model\.safetensors"):
        load_teacher(f"hf:{tmp_path}")


def test_arch_refused(tiny):
    with pytest.raises(UsageError, match=r"Hugging Face model directory .*carries its own architecture; drop --arch"):
        load_teacher(f"hf:{tiny}", arch="logit_cache.models:digits_mlp")
    with pytest.raises(UsageError, match="drop --arch-kwargs"):
        load_teacher(f"hf:{tiny}", arch_kwargs={"hidden": 16})


def test_non_causal_config_refused(tmp_path):
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a causal language model \(model_type 'vit'.*only causal LMs"):
        load_teacher(f"hf:{tmp_path}")


def test_weights_without_the_lm_head_refused(tmp_path):
    """A base BertModel loads as BertLMHeadModel with a random LM head; that must not become a teacher."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path)
    expected = r"\['BertModel'\].*does not hold every weight of BertLMHeadModel: missing .*cls\.predictions"
    with pytest.raises(CheckpointError, match=expected):
        load_teacher(f"hf:{tmp_path}")


def test_missing_transformers(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(MissingPackageError, match=r"needs the transformers package.*pip install 'logit-cache\[hf\]'"):
        load_teacher(f"hf:{tiny}")


def test_dump_an_hf_teacher_over_token_windows_from_the_cli(tiny: Path, tmp_path: Path, cli) -> None:
    """`logit-cache dump --teacher hf:DIR --dataset tokens:PATH.npy --topk K`: rows equal the model's own
    top-k on each window, run alone; the key names the directory's digest."""
    import json

    import numpy as np

    from logit_cache.teacher import teacher_sha256

    flat = np.random.default_rng(0).integers(0, 300, size=150).astype(np.int32)
    np.save(tmp_path / "ids.npy", flat)
    out = tmp_path / "cache"
    result = cli("dump", "--teacher", f"hf:{tiny}", "--dataset", f"tokens:{tmp_path / 'ids.npy'}", "--dataset-kwargs",
                 '{"seq_len": 32, "stride": 24}', "--topk", "5", "--dtype", "float32", "--out", out, "--batch-size", "4", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["format"] == "hf" and manifest["teacher"]["sha256"] == teacher_sha256(f"hf:{tiny}")
    model = reference(tiny)
    starts = range(0, len(flat) - 1, 24)
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(flat[s : s + 32].astype(np.int64))[None]).logits[0] for s in starts])
    assert manifest["num_rows"] == len(expected)
    from logit_cache import open_reader

    cache = open_reader(out)
    top = torch.topk(expected, 5, dim=-1)
    np.testing.assert_allclose(cache.read("topk_logits"), top.values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cache.read("topk_indices"), top.indices.numpy())
