"""Loading a file the user did not mark as trusted runs none of its code.

* ``.pt2`` archives: every way torch 2.13's ``torch.export.load`` (and ``.module()``) runs code from an archive
  gets a hostile archive here, built from a clean one by rewriting one member. Each must be refused by
  ``logit-cache dump`` without ``--trust-checkpoint`` with a message naming the file and the member, and its
  code must not run (the payload makes a marker directory). With ``--trust-checkpoint`` torch loads it as
  before, which also proves that the payload would have run.
* ``MODULE:CALLABLE`` specs: a module in the working directory must not shadow an installed package.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_teacher
from data_factories import spec

from logit_cache.errors import UntrustedCheckpointError
from logit_cache.export_archive import unsafe_parts
from logit_cache.teacher import load_teacher

Members = dict[str, bytes]  # archive member name (below the root folder) -> bytes


class Hostile:
    """Unpickling it makes the directory ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Hostile(marker), buffer)
    return buffer.getvalue()


def python(marker: Path) -> str:
    """A Python expression that makes ``marker`` and is None."""
    return f"__import__('os').mkdir({str(marker)!r})"


def export_teacher(path: Path, model: torch.nn.Module | None = None, batch: object = None) -> Path:
    """The conftest teacher (or ``model``) exported with a dynamic batch and saved by ``torch.export.save``."""
    model = make_teacher() if model is None else model
    batch = torch.export.Dim("batch") if batch is None else batch
    program = torch.export.export(model, (torch.randn(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def rewrite(clean: Path, hostile: Path, edit: Callable[[Members], None]) -> Path:
    """Copy ``clean`` to ``hostile`` with its members changed by ``edit`` (names relative to the root folder)."""
    with zipfile.ZipFile(clean) as archive:
        root = archive.namelist()[0].split("/")[0]
        members = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(hostile, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    return hostile


def edit_program(members: Members, change: Callable[[dict], None]) -> None:
    program = json.loads(members["models/model.json"])
    change(program)
    members["models/model.json"] = json.dumps(program).encode()


def edit_config(members: Members, kind: str, change: Callable[[dict], None]) -> None:
    name = f"data/{kind}/model_{kind}_config.json"
    config = json.loads(members[name])
    change(config["config"])
    members[name] = json.dumps(config).encode()


def first(tree, key: str) -> dict:
    """The first dict in a JSON tree that holds ``key``."""
    stack = [tree]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise KeyError(key)


# --- the hostile edits: (member the message must name, edit) ---------------------------------------------


def pickled_weight(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        def change(config: dict) -> None:
            config["0.weight" if "0.weight" in config else next(iter(config))]["use_pickle"] = True

        edit_config(members, "weights", change)
        path = next(entry for entry in json.loads(members["data/weights/model_weights_config.json"])["config"].values()
                    if entry["use_pickle"])["path_name"]
        members[f"data/weights/{path}"] = pickled(m)
    return edit


def sample_inputs(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        members["data/sample_inputs/model.pt"] = pickled(m)
    return edit


def opaque_constant(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        edit_config(members, "constants", lambda config: config.update(
            evil={"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}))
        members["data/constants/opaque_obj_0"] = pickle.dumps(Hostile(m))
    return edit


def legacy_weights(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        members["data/weights/model.pt"] = pickled(m)  # read instead of the config, through a full-unpickle fallback
    return edit


def guards_code(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        edit_program(members, lambda program: program.update(guards_code=[f"{python(m)} is None"]))
    return edit


def expr_str(m: Path) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        edit_program(members, lambda program: first(program, "expr_str").update(expr_str=f'Max(1, "{python(m)} or 4")'))
    return edit


def input_name(m: Path) -> Callable[[Members], None]:
    """The graph's input renamed to ``input=<code>``: torch pastes it into ``def forward(self, ...)``."""
    bad = f"input={python(m)}"

    def edit(members: Members) -> None:
        def change(program: dict) -> None:
            values = program["graph_module"]["graph"]["tensor_values"]
            values[bad] = values.pop("input")

        edit_program(members, change)
        text = members["models/model.json"].decode().replace('{"name": "input"}', json.dumps({"name": bad}))
        members["models/model.json"] = text.encode()
    return edit


def enum_in_spec(m: Path) -> Callable[[Members], None]:
    """An ``__enum__`` in the input spec: torch imports the module it names (here ``hostile_enum_module``)."""

    def edit(members: Members) -> None:
        def change(program: dict) -> None:
            signature = program["graph_module"]["module_call_graph"][0]["signature"]
            in_spec = json.loads(signature["in_spec"])
            in_spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": "hostile_enum_module:E", "name": "A"}])
            signature["in_spec"] = json.dumps(in_spec)

        edit_program(members, change)
    return edit


HOSTILE = {  # name: (edit, member named in the refusal)
    "pickled_weight": (pickled_weight, "data/weights/weight_0"),
    "sample_inputs": (sample_inputs, "data/sample_inputs/model.pt"),
    "opaque_constant": (opaque_constant, "data/constants/opaque_obj_0"),
    "legacy_weights": (legacy_weights, "data/weights/model.pt"),
    "guards_code": (guards_code, "guards_code"),
    "expr_str": (expr_str, "expr_str"),
    "input_name": (input_name, "would be pasted into generated Python source"),
    "enum_in_spec": (enum_in_spec, "in_spec holds an enum"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_teacher(tmp_path_factory.mktemp("clean") / "teacher.pt2")


def dump_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["dump", "--teacher", teacher, "--dataset", spec("random_images"), "--dataset-kwargs", '{"n": 8}',
            "--out", out, "--topk", "2", "--quiet", *extra]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_export_archive_is_refused_and_runs_nothing(name, clean, cli, tmp_path, monkeypatch):
    make_edit, member = HOSTILE[name]
    marker = tmp_path / "code-ran"
    # The module an __enum__ names: importing it is running its code.
    (tmp_path / "hostile_enum_module.py").write_text(f"import os\nos.mkdir({str(marker)!r})\nimport enum\nE = enum.Enum('E', 'A')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = rewrite(clean, tmp_path / "evil.pt2", make_edit(marker))

    result = cli(*dump_args(evil, tmp_path / "out"))
    assert not marker.exists(), f"the archive's code ran without --trust-checkpoint: {result.output}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "evil.pt2" in lines[0] and member in lines[0] and "--trust-checkpoint" in lines[0], lines[0]
    assert "runs code" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()

    # Trusted, torch loads it as it always did: the payload runs, which shows the archive really was hostile.
    cli(*dump_args(evil, tmp_path / "out", "--trust-checkpoint"))
    assert marker.exists()
    sys.modules.pop("hostile_enum_module", None)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda ms: ms.update({"data/aotinductor/model/model.so": b"\x7fELF"}), "data/aotinductor/: AOTInductor code"),
        (lambda ms: edit_config(ms, "constants", lambda c: c.update(
            obj={"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None})),
         "data/constants/custom_obj_0: constant 'obj' is a pickled Python object"),
        (lambda ms: edit_config(ms, "constants", lambda c: c.update(
            t={"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None})),
         "data/constants/tensor_0: constant 't' is pickled"),
        (lambda ms: edit_program(ms, lambda p: first(p, "forward_arg_names").update(forward_arg_names=["x=print()"])),
         "forward_arg_names 'x=print()'"),
        (lambda ms: edit_program(ms, lambda p: first(p, "parameter_name").update(parameter_name='a") or print() or ("')),
         "parameter_name"),
        (lambda ms: edit_program(ms, lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system")),
         "node target 'torch.os.system' is not a torch operator"),
        (lambda ms: edit_program(ms, lambda p: first(p, "in_spec").update(in_spec=json.dumps(
            [1, {"type": "collections.defaultdict", "context": json.dumps(
                {"default_factory_module": "os", "default_factory_name": "system", "dict_context": []}),
                 "children_spec": []}]))),
         "in_spec holds a defaultdict"),
    ],
    ids=["aoti", "custom_obj", "pickled_tensor_constant", "forward_arg_names", "parameter_name", "node_target", "defaultdict"],
)
def test_other_code_paths_are_named(edit, fragment, clean, tmp_path):
    """Parts that run code in ways a marker cannot show cheaply (native code, TorchScript's unpickler, code torch
    generates later) are refused all the same, each by name."""
    evil = rewrite(clean, tmp_path / "evil.pt2", edit)
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as caught:
        load_teacher(evil)
    assert fragment in str(caught.value) and "evil.pt2" in str(caught.value)


def test_legacy_layout_fallback_is_refused(clean, cli, tmp_path):
    """An archive torch cannot read as pt2 makes it fall back to the pre-2.8 layout, which it unpickles."""
    from torch._export.serde.schema import SCHEMA_VERSION

    marker = tmp_path / "code-ran"
    with zipfile.ZipFile(clean) as archive:
        program = archive.read(f"{archive.namelist()[0].split('/')[0]}/models/model.json")
    evil = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("version", f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}")
        archive.writestr("serialized_exported_program.json", program)
        archive.writestr("serialized_state_dict.pt", b"")
        archive.writestr("serialized_constants.pt", pickled(marker))
        archive.writestr("serialized_example_inputs.pt", b"")
        archive.writestr("root/archive_format", "pt2")  # what makes it look like a torch.export archive
    result = cli(*dump_args(evil, tmp_path / "out"))
    assert not marker.exists(), f"the archive's code ran without --trust-checkpoint: {result.output}"
    assert result.exit_code != 0 and "legacy.pt2" in result.output and "version: the pre-2.8" in result.output
    assert "--trust-checkpoint" in result.output
    cli(*dump_args(evil, tmp_path / "out", "--trust-checkpoint"))
    assert marker.exists()


def test_clean_export_needs_no_trust(clean, cli, tmp_path):
    """What torch.export.save writes for a plain module holds no pickle and no code: it loads without the flag,
    to the same outputs as a trusted load, and dumps."""
    with zipfile.ZipFile(clean) as archive:
        root = archive.namelist()[0].split("/")[0]
        weights = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))["config"]
        sample = archive.read(f"{root}/data/sample_inputs/model.pt")
    assert weights and not any(entry["use_pickle"] for entry in weights.values())
    torch.load(io.BytesIO(sample), weights_only=True)  # torch always writes sample inputs; they are plain tensors
    with open(clean, "rb") as handle:
        assert unsafe_parts(handle) == []

    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # batch 5: exported with 4
    untrusted, trusted = load_teacher(clean), load_teacher(clean, trust_checkpoint=True)
    expected = make_teacher()(images)
    torch.testing.assert_close(untrusted.module(images), expected)
    torch.testing.assert_close(trusted.module(images), expected)
    assert cli(*dump_args(clean, tmp_path / "out")).exit_code == 0


def test_buffers_and_constants_need_no_trust(tmp_path):
    """Batch-norm buffers and a tensor constant are saved as raw bytes too."""

    class WithConstant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.BatchNorm1d(10))
            self.offset = torch.arange(10.0)  # not a buffer: export keeps it as a tensor constant

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) + self.offset

    torch.manual_seed(0)
    model = WithConstant().eval()
    path = export_teacher(tmp_path / "bn.pt2", model)
    images = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(load_teacher(path).module(images), model(images))


def test_guards_code_needs_trust(tmp_path):
    """A program whose export recorded shape guards carries them as Python source that torch runs: legitimate,
    and still code from the file, so it needs the flag (and then loads as before)."""

    class EvenBatch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(1)
            return flat.view(flat.shape[0] // 2, -1)[:, :10] if flat.shape[0] % 2 == 0 else flat[:, :10]

    path = export_teacher(tmp_path / "guards.pt2", EvenBatch(), batch=torch.export.Dim.AUTO)
    with pytest.raises(UntrustedCheckpointError, match="guards_code holds Python source"):
        load_teacher(path)
    images = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(load_teacher(path, trust_checkpoint=True).module(images), EvenBatch()(images))


# --- MODULE:CALLABLE specs: the working directory comes after installed packages ---------------------


SHADOW = "import sys; sys.stderr.write('SHADOWED\\n'); raise SystemExit('the working directory shadowed an installed package')\n"


@pytest.mark.slow
def test_working_directory_does_not_shadow_installed_packages(tmp_path):
    """A ``click.py`` (or any installed package's name) beside the user must not replace the package when a spec
    is resolved; a module that only exists in the working directory still resolves."""
    (tmp_path / "click.py").write_text(SHADOW)
    (tmp_path / "json.py").write_text(SHADOW)
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import click, json
        def make():
            return (click.__file__, json.__file__)
    """))
    code = textwrap.dedent("""
        import sys
        sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # as the console script starts: no cwd entry
        from logit_cache.spec import resolve_callable
        import json
        for name in ("click", "json"):  # evict any copy imported before, so the import below looks again
            sys.modules.pop(name, None)
        print(json.dumps(resolve_callable("mymodels:make", "--arch")()))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SHADOWED" not in result.stderr
    click_file, json_file = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(click_file).parent != tmp_path and Path(json_file).parent != tmp_path


def test_shadowed_name_error_points_to_the_file_form(tmp_path, monkeypatch):
    """A local file named like an installed module is not imported; the error says how to use it."""
    from logit_cache.errors import SpecError
    from logit_cache.spec import resolve_callable

    (tmp_path / "json.py").write_text("def make():\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"searched after installed packages; to use .*json\.py, pass its path"):
        resolve_callable("json:make", "--dataset")
    assert resolve_callable(f"{tmp_path / 'json.py'}:make", "--dataset")() == 1


def test_help_says_what_runs_code(cli):
    def unwrapped(command: str) -> str:  # click wraps at any width, breaking words at hyphens: compare without spaces
        return "".join(cli(command, "--help").output.split())

    spec_options = {"dump": ("--arch", "--dataset"), "train": ("--student", "--dataset", "--arch", "--eval-dataset"),
                    "verify": ("--arch", "--dataset")}
    for command, options in spec_options.items():
        text = unwrapped(command)
        assert text.count("runsitscode") >= len(options) and "Onlyforfilesyoutrust" in text, (command, text)
    assert ".pt2archive(oneholdingpickles,compiledcodeorPythonsourceneeds--trust-checkpoint)" in unwrapped("dump")


def test_damaged_archive_is_an_error_not_a_trust_question(clean, cli, tmp_path):
    """A member that cannot be parsed is reported as damage; it is never handed to torch."""
    evil = rewrite(clean, tmp_path / "damaged.pt2", lambda members: members.update({"models/model.json": b"{not json"}))
    result = cli(*dump_args(evil, tmp_path / "out"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "damaged.pt2" in result.output and "models/model.json cannot be read" in result.output
    assert "--trust-checkpoint" not in result.output
