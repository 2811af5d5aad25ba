"""scripts/bench_lm_dump.py: a --quick run's JSON holds every configuration with consistent, positive numbers,
checked against the caches it kept (rows, bytes on disk, top-k mass recomputed from the stored arrays)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logit_cache import open_reader

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_lm_dump.py"
VOCABS = (1024, 4096)
TOKENS, SEQ_LEN, BATCH, ENCODE_BATCHES = 1024, 64, 4, 2


def load_script():
    """The script as a module (its argument parsing is tested without running it)."""
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_lm_dump", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(folder, name)).st_size for folder, _, names in os.walk(path) for name in names)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One --quick run on the CPU with a kept workdir, shared by the tests that read what it left."""
    root = tmp_path_factory.mktemp("bench-lm-dump")
    out = root / "report.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out), "--workdir", str(root / "work"), "--keep"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(out.read_text()), completed.stdout, root / "work"


@pytest.mark.slow
def test_quick_report_has_every_configuration_with_consistent_numbers(quick: tuple[dict, str, Path]) -> None:
    report, stdout, _ = quick
    rows = report["summary"]
    assert [(row["vocab"], row["what"]) for row in rows] == [(v, w) for v in VOCABS for w in ("top-64", "sampled-50", "top-64 compact")]
    assert report["config"]["quick"] is True and report["config"]["vocabs"] == list(VOCABS)
    machine = report["machine"]
    assert machine["torch_version"] and machine["torch_threads"] >= 1 and machine["device"] == "cpu"
    assert machine["cpu_model"] is None or isinstance(machine["cpu_model"], str)
    for row in rows:
        assert row["tokens"] == TOKENS  # 16 full windows of 64 tokens, one row per token
        assert row["encode_tokens"] == ENCODE_BATCHES * BATCH * SEQ_LEN
        for name in ("bare_s", "loop_s", "dump_wall_s", "encode_s", "topk_s", "bytes_per_token"):
            assert row[name] > 0, (row["what"], name)
        assert row["dump_wall_s"] >= row["loop_s"]  # the wall time holds the loop and the set-up around it
        # one repeat: the medians are the single measurement, the ratios its quotients
        assert row["dump_over_bare"] == pytest.approx(row["loop_s"] / row["bare_s"])
        assert row["wall_over_bare"] == pytest.approx(row["dump_wall_s"] / row["bare_s"])
        assert row["encode_over_topk"] == pytest.approx(row["encode_s"] / row["topk_s"])
        assert row["encode_tokens_per_s"] == pytest.approx(row["encode_tokens"] / row["encode_s"])
        assert set(row["host_rows_per_s"]) == {"1", "2", "4"} and all(v > 0 for v in row["host_rows_per_s"].values())
        by_threads = row["dump_tokens_per_s_by_writer_threads"]
        assert by_threads["1"] is None or by_threads["1"] > 0
        if not report["config"]["writer_threads_field"]:  # one thread: the main dump's own speed; the others n/a
            assert by_threads["1"] == pytest.approx(row["tokens"] / row["loop_s"]) and by_threads["2"] is None is by_threads["4"]
        assert row["dump_host_peak_mb"] >= 0 and row["bare_host_peak_mb"] >= 0
        assert row["what"] in stdout and f"{row['vocab']:,}" in stdout
    if report["config"]["writer_threads_field"]:  # --thread-dumps one: the compact dump at the smallest vocabulary, at 1, 2 and 4
        measured = [(r["vocab"], r["what"]) for r in rows if None not in r["dump_tokens_per_s_by_writer_threads"].values()]
        assert measured == [(VOCABS[0], "top-64 compact")]
        assert all(v > 0 for v in rows[2]["dump_tokens_per_s_by_writer_threads"].values())
    plain, sampled, compact = (next(r for r in rows if r["vocab"] == VOCABS[-1] and r["what"] == w)
                               for w in ("top-64", "sampled-50", "top-64 compact"))
    assert compact["bytes_per_token"] < plain["bytes_per_token"]  # what the compact encoding is for
    assert sampled["mean_topk_mass"] is None or 0 < sampled["mean_topk_mass"] <= 1
    assert 0 < plain["mean_topk_mass"] <= 1


@pytest.mark.slow
def test_kept_caches_match_the_report(quick: tuple[dict, str, Path]) -> None:
    """Rows, bytes per token and the top-k mass, recomputed from the caches the run left."""
    report, _, work = quick
    for row in report["summary"]:
        index = ("top-64", "sampled-50", "top-64 compact").index(row["what"])
        cache = work / f"v{row['vocab']}" / f"cache-{index}"
        reader = open_reader(cache)
        assert reader.manifest.num_rows == row["tokens"] and reader.manifest.num_classes == row["vocab"]
        assert row["bytes_per_token"] == pytest.approx(tree_bytes(cache) / row["tokens"], rel=0.05)
        if row["what"] == "top-64":
            values = reader.read("topk_logits").astype(np.float64)
            lse = reader.read("logsumexp").astype(np.float64)
            mass = np.exp(values - lse[:, None]).sum(axis=1).mean()
            assert row["mean_topk_mass"] == pytest.approx(mass, rel=1e-3)


def test_arguments_fill_cpu_and_quick_defaults_and_reject_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    args = script.parse_args(["--device", "cpu"])
    assert (args.vocabs, args.hidden, args.layers, args.seq_len, args.batch, args.tokens) == ([32768, 131072], 64, 2, 256, 4, 4096)
    args = script.parse_args(["--device", "cpu", "--quick"])
    assert (args.vocabs, args.tokens, args.seq_len, args.encode_batches) == (list(VOCABS), TOKENS, SEQ_LEN, ENCODE_BATCHES)
    for bad, message in ((["--k", "2000"], "must not exceed the smallest vocabulary 1024"),
                         (["--tokens", "10"], "less than one window"),
                         (["--batch", "0"], "must be positive")):
        with pytest.raises(SystemExit):
            script.parse_args(["--device", "cpu", "--quick", *bad])
        assert message in capsys.readouterr().err
    # kind names come from the registry: the widths choose them
    names = [config["fields"]["mode"] for config in script.configurations(64, 50)]
    from logit_cache.targets import get_kind

    assert [get_kind(name).width_field for name in names] == ["k", "m", "k"]
