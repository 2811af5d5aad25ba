"""End-to-end dumps through the CLI, compared with the teacher run directly in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import RandomImages, read_plain, spec

from logit_cache.datasets import DigitsDataset
from logit_cache.reader import open_reader
from logit_cache.store import BACKENDS

N = 300


def expected_logits(n: int = N, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """The teacher's float32 logits for every item, computed independently of the library."""
    data = RandomImages(n, seed, scale=scale)
    with torch.no_grad():
        return make_teacher()(data.images)  # (N, 10)


def dump_args(ckpt: Path, out: Path, *extra: str, n: int = N) -> list[str]:
    return ["dump", "--teacher", ckpt, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS,
            "--dataset", spec("random_images"), "--dataset-kwargs", json.dumps({"n": n}),
            "--out", out, "--quiet", *extra]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_full_logits_match_the_teacher(cli, teacher_ckpt, tmp_path, backend, dtype):
    out = tmp_path / "cache"
    result = cli(*dump_args(teacher_ckpt, out, "--full", "--format", backend, "--dtype", dtype,
                            "--batch-size", "64", "--shard-rows", "128"))
    assert result.exit_code == 0, result.output
    stored = read_plain(out, "logits")
    want = expected_logits()
    assert stored.dtype == np.dtype(dtype) and stored.shape == (N, 10)
    if dtype == "float32":
        np.testing.assert_array_equal(stored, want.numpy())
    else:  # fp16 storage: exactly the teacher's value rounded to nearest fp16
        np.testing.assert_array_equal(stored, want.numpy().astype(np.float16))
    labels = read_plain(out, "labels")
    np.testing.assert_array_equal(labels, RandomImages(N).labels.numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_rows"] == N and len(manifest["shards"]) == 3
    assert [s["row_start"] for s in manifest["shards"]] == [0, 128, 256]
    assert not (tmp_path / "cache.partial").exists()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_topk_matches_the_teacher(cli, teacher_ckpt, tmp_path, backend):
    out = tmp_path / "cache"
    result = cli(*dump_args(teacher_ckpt, out, "--topk", "4", "--format", backend, "--dtype", "float32",
                            "--batch-size", "50"))
    assert result.exit_code == 0, result.output
    want = expected_logits().numpy()
    order = np.argsort(-want, axis=1, kind="stable")[:, :4]
    ids = read_plain(out, "topk_indices")
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(read_plain(out, "topk_logits"), np.take_along_axis(want, order, axis=1))
    lse = np.log(np.exp(want.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(read_plain(out, "logsumexp"), lse, rtol=1e-6)
    assert "top-4 mass" in result.output  # --quiet hides progress and logs, not the summary
    mass = np.exp(np.take_along_axis(want, order, axis=1) - lse[:, None]).sum(1).mean()
    assert f"{mass:.4f}" in result.output


def test_digits_builtin_and_reader(cli, tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    ckpt = tmp_path / "linear.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "digits"
    factory = tmp_path / "linear_arch.py"
    factory.write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    result = cli("dump", "--teacher", ckpt, "--arch", f"{factory}:make", "--dataset", "digits",
                 "--dataset-kwargs", '{"split": "test"}', "--out", out, "--topk", "3", "--quiet")
    assert result.exit_code == 0, result.output
    test = DigitsDataset("test")
    assert len(test) == 360 and len(DigitsDataset("train")) == 1437
    with torch.no_grad():
        want = model(test.images)
    with open_reader(out) as reader:
        assert reader.manifest.dataset["spec"] == "digits"
        assert reader.manifest.dataset["kwargs"] == {"split": "test"}
        assert reader.manifest.dataset["length"] == 360
        np.testing.assert_array_equal(reader.read("topk_indices"), want.topk(3).indices.numpy())
        np.testing.assert_array_equal(reader.read("labels"), test.labels.numpy())
        assert reader.verify_checksums() == []


def test_manifest_contract(cli, teacher_ckpt, tmp_path):
    import hashlib

    out = tmp_path / "cache"
    assert cli(*dump_args(teacher_ckpt, out, "--topk", "5", "--temperature", "3.5")).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ["format_version", "complete", "created_at", "tool_version", "torch_version", "backend", "mode", "k",
                 "num_classes", "dtype", "temperature", "num_samples", "num_rows", "views", "seed", "per_token",
                 "teacher", "dataset", "shards", "key"]:
        assert name in manifest, name
    assert manifest["format_version"] == 1 and manifest["mode"] == "topk" and manifest["k"] == 5
    assert manifest["temperature"] == 3.5 and manifest["num_classes"] == 10 and manifest["per_token"] is False
    assert manifest["teacher"]["sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()
    assert manifest["teacher"]["format"] == "state_dict" and manifest["teacher"]["arch"] == ARCH
    assert manifest["teacher"]["arch_kwargs"] == {"hidden": 32}
    assert manifest["dataset"]["length"] == N and len(manifest["dataset"]["fingerprint"]) == 64
    assert set(manifest["shards"][0]) == {"path", "row_start", "row_stop", "sample_start", "sample_stop", "checksum"}
    assert manifest["arrays"]["topk_indices"] == {"dtype": "uint16", "row_shape": [5], "per": "row"}


def test_same_inputs_same_arrays_and_key(cli, teacher_ckpt, tmp_path):
    a, b, d = tmp_path / "a", tmp_path / "b", tmp_path / "d"
    assert cli(*dump_args(teacher_ckpt, a, "--topk", "3")).exit_code == 0
    assert cli(*dump_args(teacher_ckpt, b, "--topk", "3", "--format", "hdf5")).exit_code == 0
    assert cli(*dump_args(teacher_ckpt, d, "--topk", "3", "--batch-size", "7")).exit_code == 0
    ma, mb, md = (json.loads((p / "manifest.json").read_text()) for p in (a, b, d))
    assert ma["key"] == mb["key"] == md["key"]  # the backend and batch size are not content
    assert ma["shards"][0]["checksum"] == mb["shards"][0]["checksum"]  # same bytes in either backend
    # Another batch size changes the matmul's blocking on some CPUs (AVX2 here: ~1e-7 apart), so the
    # values agree to rounding, not bit for bit; the ids of the top 3 are the same.
    np.testing.assert_allclose(read_plain(d, "topk_logits").astype(np.float32),
                               read_plain(a, "topk_logits").astype(np.float32), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(read_plain(d, "topk_indices"), read_plain(a, "topk_indices"))
    c = tmp_path / "c"
    assert cli(*dump_args(teacher_ckpt, c, "--topk", "3", "--dataset-kwargs", '{"n": 300, "seed": 1}')).exit_code == 0
    assert json.loads((c / "manifest.json").read_text())["key"] != ma["key"]


def test_dict_inputs_and_unlabeled_items(cli, tmp_path):
    from data_factories import DictImages, KeywordNet

    torch.manual_seed(0)
    net = KeywordNet().eval()
    ckpt = tmp_path / "kw.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "kw"
    result = cli("dump", "--teacher", ckpt, "--arch", spec("KeywordNet"), "--dataset", spec("dict_images"),
                 "--out", out, "--full", "--dtype", "float32", "--quiet")
    assert result.exit_code == 0, result.output
    data = DictImages()
    pixels = torch.stack([data[i][0]["pixels"] for i in range(len(data))])
    bias = torch.stack([data[i][0]["bias"] for i in range(len(data))])
    with torch.no_grad():
        np.testing.assert_array_equal(read_plain(out, "logits"), net(pixels, bias).numpy())

    out2 = tmp_path / "unlabeled"
    ckpt2 = tmp_path / "t.pt"
    torch.save(make_teacher().state_dict(), ckpt2)
    result = cli("dump", "--teacher", ckpt2, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset",
                 spec("unlabeled_images"), "--out", out2, "--topk", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "labels" not in zarr.open_group(str(out2 / "shard-00000.zarr"), mode="r")


def test_info_text_and_json(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "cache"
    assert cli(*dump_args(teacher_ckpt, out, "--topk", "5")).exit_code == 0
    text = cli("info", out)
    assert text.exit_code == 0 and "top-5 of 10 classes" in text.output and "300 samples" in text.output
    record = json.loads(cli("info", out, "--json").output)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert record["bytes_on_disk"] == size and record["bytes_per_sample"] == pytest.approx(size / N)
    assert record["manifest"]["k"] == 5 and record["complete"] is True


def test_precision_bf16_on_cpu_is_close(cli, teacher_ckpt, tmp_path):
    out = tmp_path / "bf16"
    result = cli(*dump_args(teacher_ckpt, out, "--full", "--dtype", "float32", "--precision", "bf16"))
    assert result.exit_code == 0, result.output
    stored = read_plain(out, "logits")
    want = expected_logits().numpy()
    assert not np.array_equal(stored, want)  # autocast really ran in bf16
    np.testing.assert_allclose(stored, want, atol=0.05, rtol=0.02)
    assert json.loads((out / "manifest.json").read_text())["dump"]["precision"] == "bf16"


def test_every_checkpoint_layout_gives_the_same_arrays(cli, tmp_path):
    """State-dict layouts: byte-identical arrays. TorchScript and torch.export: equal up to float rounding."""
    import warnings

    model = make_teacher()
    state = model.state_dict()
    saved = {
        "plain": (state, True),
        "model": ({"model": state}, True),
        "lightning": ({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, True),
        "composer": ({"state": {"model": {f"module.{k}": v for k, v in state.items()}}}, True),
        "compiled": ({f"_orig_mod.{k}": v for k, v in state.items()}, True),
    }
    arrays = {}
    for name, (payload, needs_arch) in saved.items():
        ckpt = tmp_path / f"{name}.pt"
        torch.save(payload, ckpt)
        out = tmp_path / f"cache-{name}"
        arch = ["--arch", ARCH, "--arch-kwargs", ARCH_KWARGS] if needs_arch else []
        result = cli("dump", "--teacher", ckpt, *arch, "--dataset", spec("random_images"), "--out", out,
                     "--topk", "4", "--quiet")
        assert result.exit_code == 0, (name, result.output)
        arrays[name] = {a: read_plain(out, a) for a in ("topk_logits", "topk_indices", "logsumexp")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), tmp_path / "t.ts")
    exported = torch.export.export(model, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, tmp_path / "t.pt2")
    for name in ("t.ts", "t.pt2"):
        out = tmp_path / f"cache-{name}"
        result = cli("dump", "--teacher", tmp_path / name, "--dataset", spec("random_images"), "--out", out,
                     "--topk", "4", "--quiet")
        assert result.exit_code == 0, (name, result.output)
        arrays[name] = {a: read_plain(out, a) for a in ("topk_logits", "topk_indices", "logsumexp")}
    reference = arrays["plain"]
    for name, got in arrays.items():
        for array, value in got.items():
            if name.endswith((".ts", ".pt2")):
                np.testing.assert_allclose(value.astype(np.float32), reference[array].astype(np.float32), rtol=1e-3, atol=1e-3)
            else:
                assert value.tobytes() == reference[array].tobytes(), (name, array)


@pytest.mark.parametrize("teacher", ["NaNAt", "RaiseAt"])
def test_failure_keeps_finished_shards_for_resume(cli, tmp_path, teacher):
    """A bad row in a later shard stops the dump (in the writer thread for NaN, in the main thread for an
    exception); the shards before it were handed to the writer and are kept for --resume."""
    import data_factories

    data = data_factories.RandomImages(400, seed=2)
    threshold = 0.998  # with seed 2, rows 121, 130 and 181 are above it: shards 0 to 2 are clean
    first_bad = next(i for i in range(400) if data.images[i].flatten()[0] > threshold)
    assert first_bad == 121
    torch.manual_seed(0)
    ckpt = tmp_path / "bad.pt"
    torch.save(getattr(data_factories, teacher)().state_dict(), ckpt)
    out = tmp_path / "out"
    result = cli("dump", "--teacher", ckpt, "--arch", spec(teacher), "--arch-kwargs", json.dumps({"threshold": threshold}),
                 "--dataset", spec("random_images"), "--dataset-kwargs", '{"n": 400, "seed": 2}', "--out", out,
                 "--topk", "3", "--shard-rows", "32", "--batch-size", "8", "-q")
    assert result.exit_code == 1
    assert (str(first_bad) if teacher == "NaNAt" else "teacher crashed") in result.output
    progress = sorted(p.name for p in (tmp_path / "out.partial" / "progress").iterdir())
    assert progress == [f"shard-{i:05d}.zarr.json" for i in range(first_bad // 32)]


def test_resume_of_a_dump_started_by_an_older_version_is_refused_by_name(cli, teacher_ckpt, tmp_path):
    """An unfinished dump of a version that wrote fewer arrays (before topk_log_tail) cannot be mixed with new shards."""
    out = tmp_path / "cache"
    assert cli(*dump_args(teacher_ckpt, out, "--topk", "3", "--shard-rows", "100")).exit_code == 0
    work = tmp_path / "cache.partial"
    out.rename(work)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest.update(complete=False, tool_version="0.1.0")
    del manifest["arrays"]["topk_log_tail"]
    (work / "manifest.json").write_text(json.dumps(manifest))
    result = cli(*dump_args(teacher_ckpt, out, "--topk", "3", "--shard-rows", "100", "--resume"))
    assert result.exit_code != 0
    assert "started by logit-cache 0.1.0" in result.output and "topk_log_tail" in result.output
    assert "--overwrite" in result.output and not out.exists()


def test_resume_after_a_kill_inside_finalize(cli, teacher_ckpt, tmp_path):
    """A complete manifest left in OUT.partial (killed between finalize's steps) is finished, not recomputed."""
    out = tmp_path / "cache"
    assert cli(*dump_args(teacher_ckpt, out, "--topk", "3", "--shard-rows", "100")).exit_code == 0
    before = read_plain(out, "topk_logits")
    out.rename(tmp_path / "cache.partial")
    result = cli(*dump_args(teacher_ckpt, out, "--topk", "3", "--shard-rows", "100", "--resume"))
    assert result.exit_code == 0, result.output
    assert "3 kept from the unfinished dump" in result.output
    np.testing.assert_array_equal(read_plain(out, "topk_logits"), before)
