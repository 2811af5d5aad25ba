"""Every bad input gives a one-line error that names the problem, a non-zero exit, and no cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import spec


def base(ckpt: Path | str, out: Path, *extra: str, dataset: str | None = None) -> list[str]:
    return ["dump", "--teacher", ckpt, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset",
            dataset or spec("random_images"), "--dataset-kwargs", '{"n": 40}', "--out", out, "--quiet", *extra]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_checkpoint(cli, tmp_path):
    result = cli(*base(tmp_path / "nope.pt", tmp_path / "out", "--topk", "3"))
    assert_one_line_error(result, "nope.pt", "no such file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_wrong_arch_lists_the_mismatch(cli, teacher_ckpt, tmp_path):
    args = base(teacher_ckpt, tmp_path / "out", "--topk", "3")
    args[args.index(ARCH_KWARGS)] = '{"hidden": 48}'
    assert_one_line_error(cli(*args), "shape", "--arch")
    assert not (tmp_path / "out.partial").exists()


def test_key_mismatch_names_keys(cli, tmp_path):
    state = make_teacher().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["1.bias"]
    ckpt = tmp_path / "bad.pt"
    torch.save(state, ckpt)
    assert_one_line_error(cli(*base(ckpt, tmp_path / "out", "--topk", "3")), "1.bias", "extra.weight")


def test_untrusted_pickle(cli, tmp_path):
    ckpt = tmp_path / "whole.pt"
    torch.save(make_teacher(), ckpt)
    args = ["dump", "--teacher", ckpt, "--dataset", spec("random_images"), "--out", tmp_path / "o", "--topk", "2", "-q"]
    assert_one_line_error(cli(*args), "--trust-checkpoint", "arbitrary code")
    assert cli(*args, "--trust-checkpoint").exit_code == 0


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--topk", "3", "--full"], ["--topk", "--full", "exclusive"]),
        ([], ["--topk K", "--full"]),
        (["--topk", "0"], ["--topk", ">= 1"]),
        (["--topk", "11"], ["--topk 11", "10 classes"]),
        (["--topk", "3", "--resume", "--overwrite"], ["--resume", "--overwrite"]),
        (["--topk", "3", "--batch-size", "0"], ["--batch-size"]),
        (["--topk", "3", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--topk", "3", "--device", "tpu"],
         ["--device"]),
    ],
)
def test_incompatible_or_bad_options(cli, teacher_ckpt, tmp_path, extra, fragments):
    assert_one_line_error(cli(*base(teacher_ckpt, tmp_path / "out", *extra)), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_json_kwargs(cli, teacher_ckpt, tmp_path):
    args = base(teacher_ckpt, tmp_path / "out", "--topk", "3")
    args[args.index(ARCH_KWARGS)] = "{hidden: 32}"
    assert_one_line_error(cli(*args), "--arch-kwargs", "JSON")


def test_existing_output_is_refused(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    assert cli(*base(teacher_ckpt, out, "--topk", "3")).exit_code == 0
    before = (out / "manifest.json").read_text()
    assert_one_line_error(cli(*base(teacher_ckpt, out, "--topk", "3")), str(out), "--overwrite")
    assert (out / "manifest.json").read_text() == before
    result = cli(*base(teacher_ckpt, out, "--topk", "4", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["k"] == 4
    assert not any(p.name.startswith("out.") for p in tmp_path.iterdir())


def test_overwrite_refuses_a_directory_that_is_not_a_cache(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert_one_line_error(cli(*base(teacher_ckpt, out, "--topk", "3", "--overwrite")), "not a logit-cache cache")
    assert (out / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize(
    ("dataset", "fragments"),
    [
        ("no_such_module_xyz:make", ["no_such_module_xyz", "cannot import"]),
        (spec("does_not_exist"), ["does_not_exist"]),
        (spec("broken_dataset"), ["the data files are missing"]),
        ("imagenet", ["built-in", "MODULE:CALLABLE"]),
    ],
)
def test_dataset_that_fails(cli, teacher_ckpt, tmp_path, dataset, fragments):
    assert_one_line_error(cli(*base(teacher_ckpt, tmp_path / "out", "--topk", "3", dataset=dataset)), *fragments)


def test_nan_logits_name_the_indices(cli, tmp_path):
    from data_factories import NaNAt, RandomImages

    torch.manual_seed(0)
    ckpt = tmp_path / "nan.pt"
    torch.save(NaNAt().state_dict(), ckpt)
    data = RandomImages(40)
    bad = [i for i in range(40) if data.images[i].flatten()[0] > 0.98]
    assert bad, "the fixture needs at least one NaN row"
    out = tmp_path / "out"
    result = cli("dump", "--teacher", ckpt, "--arch", spec("NaNAt"), "--dataset", spec("random_images"),
                 "--dataset-kwargs", '{"n": 40}', "--out", out, "--topk", "3", "-q")
    assert_one_line_error(result, "NaN", ", ".join(map(str, bad)))
    assert not out.exists()  # never taken for a complete cache


def test_float16_overflow_is_reported(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    args = base(teacher_ckpt, out, "--full", "--dtype", "float16")
    args[args.index('{"n": 40}')] = '{"n": 40, "scale": 1e6}'
    assert_one_line_error(cli(*args), "float16", "--dtype float32")
    assert (tmp_path / "out.partial").exists() and not out.exists()
    args[args.index("float16")] = "float32"
    assert_one_line_error(cli(*args), "out.partial", "--resume", "--overwrite")  # the failed dump is not forgotten
    assert cli(*args, "--overwrite").exit_code == 0


def test_info_on_missing_and_incomplete(cli, tmp_path):
    assert_one_line_error(cli("info", tmp_path / "nothing"), "no such cache")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_dataset_failing_midway_names_the_batch(cli, teacher_ckpt, tmp_path, workers):
    out = tmp_path / "out"
    args = base(teacher_ckpt, out, "--topk", "3", "--batch-size", "16", "--num-workers", workers, dataset=spec("FailingItem"))
    args[args.index('{"n": 40}')] = '{"n": 100, "fail_at": 70}'
    result = cli(*args)
    assert_one_line_error(result, "64..79", "cannot decode image 70")
    assert not out.exists()


def test_info_shows_an_unfinished_dump_as_incomplete(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    args = base(teacher_ckpt, out, "--full", "--dtype", "float16")
    args[args.index('{"n": 40}')] = '{"n": 40, "scale": 1e6}'  # fails on fp16 overflow, leaving out.partial
    assert cli(*args).exit_code == 1
    text = cli("info", out)
    assert text.exit_code == 0 and "INCOMPLETE" in text.output and "out.partial" in text.output
    assert json.loads(cli("info", out, "--json").output)["complete"] is False


def test_choices_come_from_the_registries():
    """--format and --dtype offer what logit_cache.store and logit_cache.targets hold; the teacher options are one set."""
    from logit_cache.cli import main
    from logit_cache.store import BACKENDS
    from logit_cache.targets import VALUE_DTYPES

    for name in ("dump", "convert"):
        params = {param.name: param for param in main.commands[name].params}
        assert list(params["backend"].type.choices) == list(BACKENDS)
        assert list(params["dtype"].type.choices) == list(VALUE_DTYPES)
    teacher = [[p.opts for p in main.commands[name].params if p.name in ("teacher", "arch", "arch_kwargs", "trust_checkpoint")]
               for name in ("dump", "train", "verify")]
    assert teacher[0] == teacher[1] == teacher[2] == [["--teacher"], ["--arch"], ["--arch-kwargs"], ["--trust-checkpoint"]]


@pytest.mark.parametrize("extra", [["--sample", "5", "--full"], ["--topk", "3", "--sample", "5"]])
def test_exclusive_kind_flags_are_refused_once(cli, teacher_ckpt, tmp_path, extra):
    """The dump's own validation refuses two kinds (the CLI passes the flags on as given)."""
    flags = [arg for arg in extra if arg.startswith("--")]
    assert_one_line_error(cli(*base(teacher_ckpt, tmp_path / "out", *extra)), *flags, "exclusive")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
