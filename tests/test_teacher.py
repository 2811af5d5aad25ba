"""Tests for logit_cache.teacher: every checkpoint kind loads to the same teacher, and every mistake is named.

Equality is exact for state dicts (the same weights in the same module give the same bits); TorchScript and
torch.export run other kernels' code paths, so their outputs are compared with ``assert_close``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from logit_cache.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    SpecError,
    StateDictMismatchError,
    UntrustedCheckpointError,
    UsageError,
)
from logit_cache.models import digits_mlp
from logit_cache.teacher import Teacher, detect_format, load_teacher

ARCH = "logit_cache.models:digits_mlp"
KWARGS = {"hidden": 16}
# The file form of a spec works whatever pytest's import mode; it names the factory below.
DROPOUT_ARCH = f"{Path(__file__).resolve()}:dropout_mlp"

# TorchScript is deprecated in this torch, yet users still hold such teachers: loading them is the point here.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def dropout_mlp() -> nn.Module:
    """A digits-shaped teacher with dropout: its outputs are deterministic only in eval mode."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10))


@pytest.fixture
def original() -> nn.Module:
    torch.manual_seed(0)
    return digits_mlp(**KWARGS).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, 1, 8, 8)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


def assert_same_teacher(teacher: Teacher, original: nn.Module, images: torch.Tensor) -> None:
    """Every parameter equal, outputs bit-identical, eval mode, frozen."""
    loaded = dict(teacher.module.named_parameters())
    expected = dict(original.named_parameters())
    assert loaded.keys() == expected.keys()
    for name, parameter in expected.items():
        assert torch.equal(loaded[name], parameter), name
    assert torch.equal(teacher.module(images), original(images))
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())


# --- state-dict layouts -------------------------------------------------------------------------------

LAYOUTS = {
    # name: (how the checkpoint wraps the state dict, expected layout, expected stripped prefix in the log)
    "plain": (lambda sd: sd, "plain", None),
    "model": (lambda sd: {"model": sd, "epoch": 3}, "model", None),
    "model_state_dict": (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}}, "model_state_dict", None),
    "lightning": (
        lambda sd: {
            "epoch": 7,
            "global_step": 1400,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": prefixed(sd, "model."),
            "optimizer_states": [],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1},
        },
        "state_dict",
        "'model.'",
    ),
    "composer": (
        lambda sd: {
            "state": {"model": prefixed(sd, "module."), "optimizers": {}, "timestamp": {"epoch": 2}},
            "rng": [],
        },
        "composer",
        "'module.'",
    ),
    "compiled": (lambda sd: prefixed(sd, "_orig_mod."), "plain", "'_orig_mod.'"),
    "ddp_compiled": (lambda sd: prefixed(sd, "module._orig_mod."), "plain", "'module._orig_mod.'"),
    "compiled_submodule": (
        lambda sd: {key.replace("1.", "1._orig_mod.", 1) if key.startswith("1.") else key: v for key, v in sd.items()},
        "plain",
        "inner '_orig_mod.'",
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_dict_layouts_load_exactly(name, original, images, tmp_path, caplog):
    wrap, layout, stripped = LAYOUTS[name]
    path = tmp_path / f"{name}.pt"
    torch.save(wrap(original.state_dict()), path)
    with caplog.at_level(logging.INFO, logger="logit_cache.teachers"):
        teacher = load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)
    assert_same_teacher(teacher, original, images)
    assert (teacher.format, teacher.layout) == ("state_dict", layout)
    assert teacher.sha256 == sha256_of(path)
    assert (teacher.path, teacher.arch, teacher.arch_kwargs) == (str(path), ARCH, KWARGS)
    assert f"layout={layout}" in caplog.text
    assert (f"stripped {stripped}" in caplog.text) if stripped else ("keys used as saved" in caplog.text)


def test_prefix_kept_when_the_model_itself_has_it(images, tmp_path):
    """A model whose own keys start with 'model.' loads as saved: stripping is never forced."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = digits_mlp(**KWARGS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    torch.manual_seed(0)
    wrapper = Wrapper().eval()
    path = tmp_path / "wrapped.pt"
    torch.save(wrapper.state_dict(), path)
    spec_file = tmp_path / "wrapper_arch.py"
    spec_file.write_text(
        "from torch import nn\nfrom logit_cache.models import digits_mlp\n"
        "class Wrapper(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.model = digits_mlp(hidden=16)\n"
        "    def forward(self, x):\n        return self.model(x)\n"
    )
    teacher = load_teacher(path, arch=f"{spec_file}:Wrapper")
    assert_same_teacher(teacher, wrapper, images)


def test_lightning_extra_modules_are_left_out(original, images, tmp_path, caplog):
    """A LightningModule's other weights (a loss's class weights) do not stop the model's from loading."""
    state_dict = prefixed(original.state_dict(), "model.") | {"criterion.weight": torch.ones(10)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state_dict}, path)
    with caplog.at_level(logging.WARNING, logger="logit_cache.teachers"):
        teacher = load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)
    assert_same_teacher(teacher, original, images)
    assert "1 keys without prefix 'model.'" in caplog.text


def test_dropout_teacher_is_in_eval_mode(tmp_path, images):
    """With dropout, equal repeated outputs prove eval mode (train mode would drop half the units)."""
    torch.manual_seed(0)
    model = dropout_mlp().eval()
    path = tmp_path / "dropout.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, arch=DROPOUT_ARCH)
    assert_same_teacher(teacher, model, images)
    assert torch.equal(teacher.module(images), teacher.module(images))


def test_manifest_entry_is_json(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    entry = load_teacher(path, arch=ARCH, arch_kwargs=KWARGS).manifest_entry()
    assert json.loads(json.dumps(entry)) == {
        "path": str(path),
        "sha256": sha256_of(path),
        "format": "state_dict",
        "layout": "plain",
        "arch": ARCH,
        "arch_kwargs": KWARGS,
    }


def test_arch_kwargs_must_be_json(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(UsageError, match="cannot be recorded as JSON"):
        load_teacher(path, arch=ARCH, arch_kwargs={"hidden": object()})


# --- self-contained formats ---------------------------------------------------------------------------


def test_torchscript(original, images, tmp_path):
    path = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.script(original), path)
    assert detect_format(path) == "torchscript"
    teacher = load_teacher(path)
    assert (teacher.format, teacher.layout, teacher.arch) == ("torchscript", "torchscript", None)
    assert teacher.arch_kwargs == {}
    assert teacher.sha256 == sha256_of(path)
    torch.testing.assert_close(teacher.module(images), original(images))
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_torchscript_saved_in_train_mode_is_switched_to_eval(tmp_path, images):
    torch.manual_seed(0)
    model = dropout_mlp().train()
    path = tmp_path / "dropout.ts"
    torch.jit.save(torch.jit.script(model), path)
    teacher = load_teacher(path)
    torch.testing.assert_close(teacher.module(images), model.eval()(images))


def export(model: nn.Module, path: Path) -> None:
    example = (torch.randn(4, 1, 8, 8),)
    program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


def test_export(original, images, tmp_path):
    path = tmp_path / "teacher.pt2"
    export(original, path)
    assert detect_format(path) == "export"
    teacher = load_teacher(path, device=torch.device("cpu"))
    assert (teacher.format, teacher.layout, teacher.arch) == ("export", "export", None)
    assert teacher.sha256 == sha256_of(path)
    torch.testing.assert_close(teacher.module(images), original(images))  # batch 5, exported with 4: dynamic
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_export_in_train_mode_warns(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "train_mode.pt2"
    export(dropout_mlp().train(), path)
    with caplog.at_level(logging.WARNING, logger="logit_cache.teachers"):
        load_teacher(path)
    assert "exported in training mode" in caplog.text and "dropout" in caplog.text


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_arch_refused_for_self_contained_formats(kind, original, tmp_path):
    path = tmp_path / "teacher.bin"
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(original), path)
    else:
        export(original, path)
    with pytest.raises(UsageError, match="carries its own architecture; drop --arch"):
        load_teacher(path, arch=ARCH)
    with pytest.raises(UsageError, match="drop --arch-kwargs"):
        load_teacher(path, arch_kwargs=KWARGS)


# --- pickled modules ----------------------------------------------------------------------------------


def test_pickled_module_needs_trust(original, images, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    assert detect_format(path) == "torch"
    with pytest.raises(UntrustedCheckpointError) as caught:
        load_teacher(path)
    message = str(caught.value)
    assert "--trust-checkpoint" in message and "arbitrary code" in message and "pickled Python object" in message
    assert "torch.nn.modules.container.Sequential" in message
    assert isinstance(caught.value, CheckpointError)

    teacher = load_teacher(path, trust_checkpoint=True)
    assert (teacher.format, teacher.layout, teacher.arch) == ("pickle", "pickle", None)
    assert teacher.sha256 == sha256_of(path)
    assert_same_teacher(teacher, original, images)


def test_pickled_module_refuses_arch(original, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    with pytest.raises(UsageError, match=re.escape("pickled nn.Module, which carries its own architecture")):
        load_teacher(path, arch=ARCH, trust_checkpoint=True)


def test_trusted_pickle_that_is_not_a_module(tmp_path):
    path = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(lr=0.1), path)
    with pytest.raises(UntrustedCheckpointError, match=re.escape("(argparse.Namespace)")):
        load_teacher(path)
    expected = "holds an object of type argparse.Namespace, expected a torch.nn.Module"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_teacher(path, trust_checkpoint=True)


def test_trusted_checkpoint_with_pickled_hyperparameters_loads_its_state_dict(original, images, tmp_path):
    """Lightning often pickles an argparse.Namespace in hyper_parameters; the weights are still a state dict."""
    path = tmp_path / "lightning.ckpt"
    checkpoint = {"state_dict": prefixed(original.state_dict(), "model."), "hyper_parameters": argparse.Namespace()}
    torch.save(checkpoint, path)
    with pytest.raises(UntrustedCheckpointError):
        load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)
    teacher = load_teacher(path, arch=ARCH, arch_kwargs=KWARGS, trust_checkpoint=True)
    assert (teacher.format, teacher.layout) == ("state_dict", "state_dict")
    assert_same_teacher(teacher, original, images)


# --- errors -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(path))):
        load_teacher(path, arch=ARCH)
    with pytest.raises(FileNotFoundError):  # the builtin a Python caller would catch
        load_teacher(path, arch=ARCH)


def test_state_dict_without_arch(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    expected = r"holds weights .* but no architecture; pass --arch MODULE:CALLABLE"
    with pytest.raises(CheckpointError, match=expected) as err:
        load_teacher(path)
    assert "--arch-kwargs" in str(err.value)


def test_wrong_arch_lists_shape_mismatches(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(StateDictMismatchError) as caught:
        load_teacher(path, arch=ARCH, arch_kwargs={"hidden": 32})
    message = str(caught.value)
    assert "shape mismatch" in message
    assert "1.weight checkpoint [16, 64] vs model [32, 64]" in message
    assert str(path) in message and ARCH in message and '{"hidden": 32}' in message
    assert "Check that --arch and --arch-kwargs" in message
    assert "\n" not in message  # the CLI prints it as one line


def test_key_mismatch_names_missing_and_unexpected(original, tmp_path):
    state_dict = original.state_dict()
    state_dict["head.weight"] = state_dict.pop("5.weight")
    path = tmp_path / "renamed.pt"
    torch.save(state_dict, path)
    with pytest.raises(StateDictMismatchError) as caught:
        load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)
    message = str(caught.value)
    assert "missing from the checkpoint (1): 5.weight" in message
    assert "unexpected in the checkpoint (1): head.weight" in message


def test_long_key_lists_are_truncated(original, tmp_path):
    state_dict = original.state_dict() | {f"extra.{i}": torch.zeros(1) for i in range(20)}
    path = tmp_path / "extra.pt"
    torch.save(state_dict, path)
    with pytest.raises(StateDictMismatchError, match=r"unexpected in the checkpoint \(20\): extra\.0, .*and 12 more"):
        load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)


def test_closest_candidate_is_reported(original, tmp_path):
    """No reading fits; the error describes the one with the most loadable weights (the stripped one)."""
    path = tmp_path / "composer.pt"
    torch.save({"state": {"model": prefixed(original.state_dict(), "module.")}}, path)
    with pytest.raises(StateDictMismatchError, match=r"layout composer, stripped 'module\.'.*shape mismatch"):
        load_teacher(path, arch=ARCH, arch_kwargs={"hidden": 8})


def test_bad_arch_spec_propagates_spec_error(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(SpecError, match="no_such_module_for_logit_cache"):
        load_teacher(path, arch="no_such_module_for_logit_cache:make")


def test_arch_that_fails_to_build(original, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(SpecError, match=r"--arch 'logit_cache.models:digits_mlp' with --arch-kwargs \{\"bogus\": 1\}"):
        load_teacher(path, arch=ARCH, arch_kwargs={"bogus": 1})


@pytest.mark.parametrize(
    "content",
    [b"hello, I am a text file\n", b'{"json": true}', bytes(range(256)) * 4, b""],
    ids=["text", "json", "binary", "empty"],
)
def test_garbage_file(content, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as caught:
        load_teacher(path, arch=ARCH, trust_checkpoint=True)
    assert not isinstance(caught.value, UntrustedCheckpointError)
    assert caught.value.__cause__ is not None  # the original error is chained


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data/readme.txt", "hello")
    with pytest.raises(CheckpointError, match="zip archive but not a PyTorch checkpoint"):
        detect_format(path)


def test_detect_legacy_torch_save(original, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(original.state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "torch"
    teacher = load_teacher(path, arch=ARCH, arch_kwargs=KWARGS)
    assert teacher.layout == "plain"


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_teacher(tmp_path, arch=ARCH)


# --- building on the meta device (no random init) must never change what is loaded ---------------------


def test_meta_build_keeps_non_persistent_buffers(tmp_path: Path) -> None:
    from data_factories import WithTable, spec

    torch.manual_seed(0)
    reference = WithTable().eval()
    ckpt = tmp_path / "table.pt"
    torch.save(reference.state_dict(), ckpt)
    teacher = load_teacher(ckpt, arch=spec("WithTable"))
    x = torch.rand(5, 1, 8, 8)
    assert not any(t.is_meta for t in (*teacher.module.parameters(), *teacher.module.buffers()))
    assert torch.equal(teacher.module(x), reference(x))


def test_meta_build_casts_to_the_model_dtype_like_a_normal_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = digits_mlp(hidden=16).eval()
    ckpt = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in reference.state_dict().items()}, ckpt)
    teacher = load_teacher(ckpt, arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 16})
    normal = digits_mlp(hidden=16)
    normal.load_state_dict(torch.load(ckpt, weights_only=True))
    for (name, got), (_, want) in zip(teacher.module.state_dict().items(), normal.state_dict().items(), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_factory_that_cannot_build_on_meta(tmp_path: Path) -> None:
    from data_factories import needs_real_tensors, spec

    torch.manual_seed(0)
    reference = needs_real_tensors().eval()
    ckpt = tmp_path / "real.pt"
    torch.save(reference.state_dict(), ckpt)
    teacher = load_teacher(ckpt, arch=spec("needs_real_tensors"))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(teacher.module(x), reference(x))
