"""``hf:`` teachers split over devices (``--device-map``, ``--max-memory``, ``--devices-per-rank``): a map
that puts part of a tiny model on the CPU and part on disk gives the rows of the unsplit model, through the
CLI and the Python API; the options' errors name the flag; the GPU arithmetic per rank as pure functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from data_factories import read_plain
from hf_factories import tiny_llama

from logit_cache import DumpConfig, dump
from logit_cache.errors import MissingPackageError, UsageError
from logit_cache.teachers import load_teacher
from logit_cache.teachers.placement import Placement, for_gpus, parse_device_map, parse_max_memory, rank_gpus, resolve_placement

VOCAB = 96
#: the tiny model holds ~150 KB of float32 weights per layer: 200 KB of CPU leaves most of it to disk
SPLIT = '{"cpu": "200KB", "disk": "1GB"}'


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama") / "tiny"
    tiny_llama(VOCAB, hidden=64, layers=4).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "ids.npy"
    np.save(path, np.random.default_rng(1).integers(2, VOCAB, size=80).astype(np.int64))
    return path


def _args(llama_dir: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    return ["dump", "--teacher", f"hf:{llama_dir}", "--dataset", f"tokens:{tokens}", "--dataset-kwargs", '{"seq_len": 8, "stride": 8}',
            "--out", str(out), "--topk", "6", "--dtype", "float32", "--batch-size", "4", "--device", "cpu", "--quiet", *extra]


def _rows(out: Path) -> dict[str, np.ndarray]:
    return {name: read_plain(out, name) for name in ("topk_indices", "topk_logits", "logsumexp")}


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_a_map_over_cpu_and_disk_gives_the_rows_of_the_unsplit_model(llama_dir: Path, tokens: Path, tmp_path: Path, cli,
                                                                      precision: str, tolerance: float) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli(*_args(llama_dir, tokens, whole, "--precision", precision)).exit_code == 0
    result = cli(*_args(llama_dir, tokens, split, "--precision", precision, "--device-map", "auto", "--max-memory", SPLIT))
    assert result.exit_code == 0, result.output
    manifest, reference = json.loads((split / "manifest.json").read_text()), json.loads((whole / "manifest.json").read_text())
    placed = manifest["dump"]["placement"]["placed"]
    assert {"cpu", "disk"} <= set(placed.values()), placed  # really split, and recorded
    assert manifest["dump"]["placement"]["max_memory"] == json.loads(SPLIT)
    assert manifest["key"] == reference["key"]  # the same logits: the map is not part of the key
    got, want = _rows(split), _rows(whole)
    agree = (got["topk_indices"] == want["topk_indices"]).mean()
    assert agree == 1.0 if precision == "fp32" else agree > 0.95
    np.testing.assert_allclose(got["logsumexp"], want["logsumexp"], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(np.sort(got["topk_logits"], -1), np.sort(want["topk_logits"], -1), rtol=tolerance, atol=tolerance)


def test_the_python_api_takes_a_json_map_and_the_teacher_runs_split(llama_dir: Path, tokens: Path, tmp_path: Path) -> None:
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                  "model.layers.3": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}
    teacher = load_teacher(f"hf:{llama_dir}", device_map=device_map)
    assert teacher.device_map == device_map and teacher.input_device == torch.device("cpu")
    ids = torch.from_numpy(np.load(tokens)).reshape(10, 8)
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(teacher.module(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    config = dict(teacher=f"hf:{llama_dir}", dataset=f"tokens:{tokens}", dataset_kwargs={"seq_len": 8, "stride": 8}, mode="topk", k=6,
                  dtype="float32", batch_size=4, device="cpu", quiet=True)
    split = dump(DumpConfig(**config, out=str(tmp_path / "split"), device_map=json.dumps(device_map))).out
    whole = dump(DumpConfig(**config, out=str(tmp_path / "whole"))).out
    for name, values in _rows(whole).items():
        np.testing.assert_allclose(_rows(split)[name], values, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("extra, message", [
    (["--device-map", "everywhere"], "--device-map 'everywhere' is not one of auto, balanced, balanced_low_0, sequential or a JSON object"),
    (["--device-map", '{"lm_head": 0'], "--device-map '{\"lm_head\": 0' is not valid JSON"),
    (["--device-map", '{"lm_head": "tpu"}'], "--device-map: the device of 'lm_head', 'tpu' is not a device"),
    (["--device-map", "auto", "--max-memory", "{cpu: 1GB}"], "--max-memory '{cpu: 1GB}' is not valid JSON"),
    (["--device-map", "auto", "--max-memory", '{"cpu": "lots"}'], "--max-memory: the budget of 'cpu' is 'lots'"),
    (["--max-memory", SPLIT], "--max-memory apply to a teacher split by --device-map; add --device-map auto"),
    (["--device-map", "auto", "--devices-per-rank", "2"], "--devices-per-rank 2 gives each rank GPUs; --device cpu uses none"),
    (["--writer-threads", "0"], "--writer-threads must be >= 1, got 0"),
])
def test_bad_options_fail_in_one_line_naming_the_flag(llama_dir: Path, tokens: Path, tmp_path: Path, cli, extra: list[str],
                                                      message: str) -> None:
    result = cli(*_args(llama_dir, tokens, tmp_path / "never", *extra))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_a_device_map_for_a_checkpoint_file_is_refused(teacher_ckpt: Path, tmp_path: Path, cli) -> None:
    result = cli("dump", "--teacher", teacher_ckpt, "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs", '{"hidden": 32}',
                 "--dataset", "digits", "--out", tmp_path / "never", "--topk", "3", "--device-map", "auto")
    assert result.exit_code == 1 and "--device-map places hf:DIR teachers" in result.output
    with pytest.raises(UsageError, match="--device-map places hf:DIR teachers"):
        load_teacher(teacher_ckpt, arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32}, device_map="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")
def test_devices_per_rank_without_gpus_says_so(llama_dir: Path, tokens: Path, tmp_path: Path, cli) -> None:
    args = _args(llama_dir, tokens, tmp_path / "never", "--device-map", "auto", "--devices-per-rank", "2")
    result = cli(*[arg if arg != "cpu" else "auto" for arg in args])
    assert result.exit_code == 1
    assert "--devices-per-rank 2 gives each rank GPUs, but torch sees no GPU on this machine" in result.output


def test_without_accelerate_the_error_names_the_extra(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(MissingPackageError, match=r"pip install 'logit-cache\[hf\]'"):
        load_teacher(f"hf:{llama_dir}", device_map="auto", max_memory=SPLIT)


# -- pure functions: parsing and each rank's GPUs -------------------------------------------------------


def test_each_rank_gets_its_own_run_of_gpus() -> None:
    assert [rank_gpus(rank, 4, 2, 8) for rank in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [rank_gpus(rank, 3, 2, 8) for rank in range(2)] == [[0, 1, 2], [3, 4, 5]]  # 2 GPUs left idle
    with pytest.raises(UsageError, match="--devices-per-rank 4 with 3 rank\\(s\\) on this node needs 12 GPUs, but torch sees 8"):
        rank_gpus(0, 4, 3, 8)
    with pytest.raises(UsageError, match="torch sees no GPU on this machine"):
        rank_gpus(0, 1, 1, 0)
    with pytest.raises(UsageError, match="--devices-per-rank must be >= 1, got 0"):
        rank_gpus(0, 0, 1, 8)


def test_gpu_indices_count_from_the_ranks_first_gpu() -> None:
    placement = for_gpus({"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}, {0: "10GiB", 1: "20GiB", "cpu": "1GB"}, [4, 5])
    assert placement.device_map == {"model.embed_tokens": 4, "model.layers": 5, "lm_head": "cpu"}
    assert placement.max_memory == {4: "10GiB", 5: "20GiB", "cpu": "1GB"}
    assert placement.first_device == torch.device("cuda", 4)
    with pytest.raises(UsageError, match=r"--max-memory names GPU 2, but this rank has GPUs 4\.\.5"):
        for_gpus("auto", {2: "1GB"}, [4, 5])
    assert for_gpus("auto", {"cpu": 10}, []).first_device == torch.device("cpu")
    two_ranks = [resolve_placement("auto", None, 2, "cuda", rank, 2, 2, visible=4) for rank in range(2)]
    assert [p.gpus for p in two_ranks] == [(0, 1), (2, 3)]
    assert resolve_placement("sequential", None, None, "auto", 1, 2, 2, visible=2).gpus == (1,)  # one GPU per rank by default
    assert resolve_placement("auto", None, None, "auto", visible=0).gpus == ()
    with pytest.raises(UsageError, match="--device cuda:1 with --device-map: the map chooses the GPUs"):
        resolve_placement("auto", None, None, "cuda:1", visible=2)


def test_parsing_keeps_what_transformers_takes() -> None:
    assert parse_device_map(" balanced ") == "balanced"
    assert parse_device_map('{"a": "cuda:1", "b": "CPU", "c": "disk", "d": 2}') == {"a": 1, "b": "cpu", "c": "disk", "d": 2}
    assert parse_max_memory('{"0": "20GiB", "cuda:1": 1000, "cpu": "60 GB"}') == {0: "20GiB", 1: 1000, "cpu": "60GB"}
    assert parse_device_map(None) is None and parse_max_memory(None) is None
    with pytest.raises(UsageError, match="--max-memory must be a non-empty JSON object"):
        parse_max_memory("[1, 2]")
    assert Placement("auto", {0: "1GB"}, (2,)).describe() == {"device_map": "auto", "max_memory": {"0": "1GB"}, "gpus": [2]}
