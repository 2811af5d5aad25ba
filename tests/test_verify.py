"""``logit-cache verify``: shards against the manifest, values against the teacher, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import read_plain, spec

from logit_cache import DumpConfig, dump
from logit_cache.errors import CacheNotFoundError, UsageError
from logit_cache.store import BACKENDS
from logit_cache.verify import compare_full, compare_topk, value_tolerance, verify_cache

N = 60
SHARD_ROWS = 25  # three shards: rows 0-24, 25-49, 50-59
KWARGS = json.loads(ARCH_KWARGS)
# (backend, mode, dtype): each backend and each mode once in each storage dtype (hdf5: full float32, zarr: full float16)
CACHES = [(backend, mode, dtype) for i, backend in enumerate(sorted(BACKENDS))
          for mode, dtype in zip(("full", "topk"), ("float32", "float16") if i % 2 == 0 else ("float16", "float32"), strict=True)]


def make_cache(out: Path, teacher: Path, backend: str = "zarr", mode: str = "full", dtype: str = "float32",
               dataset: str = "random_images", dataset_kwargs: dict | None = None, **extra) -> Path:
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=KWARGS, dataset=spec(dataset),
                    dataset_kwargs={"n": N} if dataset_kwargs is None else dataset_kwargs, out=str(out), mode=mode,
                    k=4 if mode == "topk" else None, dtype=dtype, backend=backend, shard_rows=SHARD_ROWS, quiet=True, **extra))
    return out


def with_teacher(teacher: Path, n: int = N, dataset: str = "random_images", **extra) -> dict:
    return {"teacher": teacher, "arch": ARCH, "arch_kwargs": KWARGS, "dataset": spec(dataset), "dataset_kwargs": {"n": n},
            "progress": False, **extra}


def teacher_args(teacher: Path, n: int = N, dataset: str = "random_images") -> list:
    return ["--teacher", teacher, "--arch", ARCH, "--arch-kwargs", ARCH_KWARGS, "--dataset", spec(dataset),
            "--dataset-kwargs", json.dumps({"n": n})]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> dict[tuple[str, str, str], Path]:
    root = tmp_path_factory.mktemp("verify")
    return {key: make_cache(root / "-".join(key), teacher, *key) for key in CACHES}


@pytest.fixture
def copy_of(caches, tmp_path):
    """A private copy of one of the module's caches, to damage."""

    def copy(key: tuple[str, str, str] = ("zarr", "full", "float16")) -> Path:
        return Path(shutil.copytree(caches[key], tmp_path / "cache"))

    return copy


def edit_manifest(cache: Path, change) -> None:
    path = cache / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def lines_of(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = lines_of(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- good caches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", CACHES, ids=["-".join(key) for key in CACHES])
def test_a_good_cache_verifies_with_and_without_the_teacher(caches, teacher, key):
    cache = caches[key]
    plain = verify_cache(cache, progress=False)
    assert plain.ok and plain.failures == [], plain.failures
    kinds = [check.kind for check in plain.checks]
    assert kinds.count("shard") == 3 and kinds.count("checksum") == 3
    assert kinds.count("arrays") == 3 * {"full": 2, "topk": 5}.get(key[1], 4)  # values (+ ids, logsumexp, tail) and labels, per shard
    assert "sample" not in kinds

    full = verify_cache(cache, **with_teacher(teacher))
    assert full.ok, full.failures
    samples = [check for check in full.checks if check.kind == "sample"]
    assert len(samples) == 32 and all(check.ok for check in samples)
    assert len({check.subject for check in samples}) == 32  # 32 distinct samples
    assert full.summary == f"ok: {cache}: 3 shard(s), {kinds.count('arrays')} array(s), 32 sample(s) against the teacher verified"
    assert full.notices == []  # same teacher file, same dataset


def test_the_cli_on_a_good_cache(cli, caches, teacher):
    cache = caches["hdf5", "topk", "float16"]
    result = cli("verify", cache)
    assert result.exit_code == 0, result.output
    assert lines_of(result) == [f"ok: {cache}: 3 shard(s), 15 array(s) verified"]
    result = cli("verify", cache, *teacher_args(teacher), "--samples", "5", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert lines_of(result) == [f"ok: {cache}: 3 shard(s), 15 array(s), 5 sample(s) against the teacher verified"]


def test_json_output(cli, caches, copy_of, teacher):
    cache = caches["zarr", "topk", "float32"]
    result = cli("verify", cache, "--json", *teacher_args(teacher), "--samples", "4")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert {"path", "ok", "checks", "failures"} <= set(record)
    assert record["path"] == str(cache) and record["ok"] is True and record["failures"] == []
    assert {check["kind"] for check in record["checks"]} >= {"manifest", "shard", "arrays", "checksum", "dataset_length", "sample",
                                                               "teacher_sha256"}
    assert all(set(check) == {"kind", "subject", "ok", "detail", "notice"} for check in record["checks"])

    damaged = copy_of()
    shutil.rmtree(damaged / "shard-00002.zarr")
    result = cli("verify", damaged, "--json")
    assert result.exit_code == 1
    record = json.loads(result.output)  # stdout holds the JSON object alone
    assert record["ok"] is False
    assert record["failures"] == [f"shard-00002.zarr: missing: listed in the manifest but {damaged / 'shard-00002.zarr'} does not exist"]


def test_the_samples_and_views_compared_are_seeded(caches, teacher):
    cache = caches["zarr", "full", "float16"]

    def subjects(seed: int) -> list[str]:
        report = verify_cache(cache, **with_teacher(teacher), samples=6, seed=seed)
        return [check.subject for check in report.checks if check.kind == "sample"]

    assert subjects(1) == subjects(1) and subjects(1) != subjects(2)
    everything = verify_cache(cache, **with_teacher(teacher), samples=1000)  # more than the cache holds: all of them
    assert sum(check.kind == "sample" for check in everything.checks) == N and everything.ok


# -- damage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_flipped_byte_is_caught_and_the_shard_named(cli, copy_of, backend):
    cache = copy_of((backend, "full", "float16" if backend == "zarr" else "float32"))
    if backend == "zarr":  # full logits are stored uncompressed: a flipped byte changes a value
        chunk = next(p for p in sorted((cache / "shard-00001.zarr" / "logits" / "c").rglob("*")) if p.is_file())
        data = bytearray(chunk.read_bytes())
        data[7] ^= 0xFF
    else:  # find the raw bytes of shard 1's logits in the file and flip one in the middle
        chunk = cache / "shard-00001.h5"
        data = bytearray(chunk.read_bytes())
        needle = read_plain(cache, "logits")[SHARD_ROWS : SHARD_ROWS + 2].tobytes()
        data[data.index(needle) + 13] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_cache(cache, progress=False)
    assert not report.ok
    shard = f"shard-00001{'.zarr' if backend == 'zarr' else '.h5'}"
    # The chunk's own checksum (crc32c / fletcher32) fails as it is read, naming the array and chunk.
    assert len(report.failures) == 1 and report.failures[0].startswith(f"{shard}: cannot be read whole:")
    assert "array 'logits' chunk 0 (rows 0:" in report.failures[0] and "it fails its checksum" in report.failures[0]
    result = cli("verify", cache)
    assert result.exit_code == 1
    lines = lines_of(result)
    assert lines[0] == f"FAIL {report.failures[0]}"
    assert lines[-1] == f"FAILED: {cache}: 1 of {len(report.checks)} checks failed (1 checksum); checked 3 shard(s), 6 array(s)"
    assert len(lines) == 2


def test_a_truncated_shard_is_caught(copy_of):
    hdf5 = copy_of(("hdf5", "topk", "float16"))
    shard = hdf5 / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:200])
    report = verify_cache(hdf5, progress=False)
    assert [failure.split(":")[0] for failure in report.failures] == ["shard-00000.h5"]
    assert "cannot be opened" in report.failures[0]


def test_a_truncated_zarr_chunk_is_caught(caches, tmp_path):
    cache = Path(shutil.copytree(caches["zarr", "topk", "float32"], tmp_path / "zarr"))
    chunk = next(p for p in sorted((cache / "shard-00002.zarr" / "topk_logits" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:10])
    report = verify_cache(cache, progress=False)
    assert len(report.failures) == 1, report.failures
    assert report.failures[0].startswith("shard-00002.zarr: cannot be read whole")
    assert "'topk_logits'" in report.failures[0]


def test_a_missing_shard_is_caught_and_its_samples_skipped(copy_of, teacher):
    cache = copy_of(("zarr", "full", "float16"))
    shutil.rmtree(cache / "shard-00000.zarr")
    report = verify_cache(cache, **with_teacher(teacher))
    assert report.failures == [f"shard-00000.zarr: missing: listed in the manifest but {cache / 'shard-00000.zarr'} does not exist"]
    compared = [check for check in report.checks if check.kind == "sample" and check.subject != "samples"]
    assert compared and all(int(check.subject.split()[1]) >= SHARD_ROWS for check in compared)  # only shards 1 and 2
    assert any("not compared" in notice for notice in report.notices)


def test_arrays_that_disagree_with_the_manifest_are_named(copy_of):
    cache = copy_of(("hdf5", "topk", "float16"))

    def change(data):
        data["arrays"]["topk_logits"]["dtype"] = "float32"  # stored: float16
        data["arrays"]["topk_indices"]["row_shape"] = [5]  # stored: 4 ids per row
        data["arrays"]["ghost"] = {"dtype": "int64", "row_shape": [], "per": "row"}
        del data["arrays"]["logsumexp"]

    edit_manifest(cache, change)
    report = verify_cache(cache, progress=False)
    assert not report.ok
    for shard, rows in [("shard-00000.h5", 25), ("shard-00001.h5", 25), ("shard-00002.h5", 10)]:
        assert f"{shard}/topk_logits: dtype float16, the manifest says float32" in report.failures
        assert f"{shard}/topk_indices: shape [{rows}, 4], the manifest says [{rows}, 5]" in report.failures
        assert f"{shard}/ghost: missing: the manifest lists this array but the shard does not hold it" in report.failures
        assert f"{shard}/logsumexp: the shard holds this array but the manifest lists no such array" in report.failures
    # and the manifest's own fields (dtype float16, k=4) no longer fit the arrays it lists
    assert report.failures[0].startswith("manifest.json: the manifest's fields (mode=topk, k=4, num_classes=10, dtype=float16")
    assert len(report.failures) == 13  # the checksums still match: the bytes are unchanged


def test_per_sample_arrays_have_a_row_per_sample(copy_of, teacher, tmp_path):
    cache = make_cache(tmp_path / "views", teacher, dataset="three_rng_images", dataset_kwargs={"n": 30}, views=2, seed=3)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [(s["row_stop"] - s["row_start"], s["sample_stop"] - s["sample_start"]) for s in manifest["shards"]] == [(24, 12)] * 2 + [
        (12, 6)]
    assert verify_cache(cache, progress=False).ok  # labels: 12 rows where logits have 24

    edit_manifest(cache, lambda data: data["arrays"]["labels"].update(per="row"))
    report = verify_cache(cache, progress=False)
    assert "shard-00000.zarr/labels: shape [12], the manifest says [24]" in report.failures


def test_an_incomplete_cache_is_a_failure_not_verified(cli, copy_of, tmp_path):
    cache = copy_of()
    edit_manifest(cache, lambda data: data.update(complete=False))
    report = verify_cache(cache, progress=False)
    assert not report.ok and len(report.checks) == 1
    assert report.failures[0].startswith("manifest.json: incomplete: complete=false")
    result = cli("verify", cache)
    assert result.exit_code == 1
    assert lines_of(result)[-1] == f"FAILED: {cache} is incomplete, not verified"

    unfinished = tmp_path / "never"
    cache.rename(tmp_path / "never.partial")
    result = cli("verify", unfinished, "--json")
    assert result.exit_code == 1
    record = json.loads(result.output)
    assert record["ok"] is False and "the dump has not finished" in record["failures"][0]


def test_a_damaged_manifest_is_a_failure(copy_of):
    cache = copy_of()
    (cache / "manifest.json").write_text("{not json")
    report = verify_cache(cache, progress=False)
    assert not report.ok and report.failures[0].startswith("manifest.json: invalid:")


# -- the teacher ----------------------------------------------------------------------------------


def test_a_teacher_changed_since_the_dump_is_caught(cli, tmp_path):
    ckpt = tmp_path / "teacher.pt"
    torch.save(make_teacher().state_dict(), ckpt)
    cache = make_cache(tmp_path / "cache", ckpt, mode="topk", dtype="float16")
    before = verify_cache(cache, **with_teacher(ckpt))
    assert before.ok, before.failures
    torch.save(make_teacher(seed=1).state_dict(), ckpt)  # same architecture, other weights, same path
    report = verify_cache(cache, **with_teacher(ckpt), samples=8)
    assert not report.ok
    samples = [f for f in report.failures if f.startswith("sample ")]
    assert len(samples) == 8
    assert all("top-4" in f or "logsumexp" in f for f in samples)
    sha = [f for f in report.failures if f.startswith("teacher:")]
    assert len(sha) == 1 and "sha256" in sha[0] and "differs from the manifest's" in sha[0]
    assert "outputs differ from the cache on 8 of 8 samples" in sha[0]

    result = cli("verify", cache, *teacher_args(ckpt), "--samples", "8")
    assert result.exit_code == 1
    lines = lines_of(result)
    assert len(lines) == 8 + 1 + 1  # a line per sample, the teacher's line, the summary
    assert all(line.startswith("FAIL ") for line in lines[:-1])
    assert lines[-1].startswith(f"FAILED: {cache}: 9 of ") and "(8 sample, 1 teacher_sha256)" in lines[-1]


def test_a_rewritten_teacher_file_with_the_same_weights_is_reported_not_failed(tmp_path, cli):
    ckpt = tmp_path / "teacher.pt"
    torch.save(make_teacher().state_dict(), ckpt)
    cache = make_cache(tmp_path / "cache", ckpt, backend="hdf5", mode="full", dtype="float16")
    torch.save({"model": make_teacher().state_dict(), "epoch": 3}, ckpt)  # other bytes, same weights
    report = verify_cache(cache, **with_teacher(ckpt))
    assert report.ok, report.failures
    assert len(report.notices) == 1
    assert "sha256" in report.notices[0] and "match the cache within tolerance, so this is not a failure" in report.notices[0]
    result = cli("verify", cache, *teacher_args(ckpt))
    assert result.exit_code == 0
    assert lines_of(result)[0].startswith("note teacher: file sha256")


def test_a_teacher_of_other_classes_or_one_that_crashes_is_a_failure(caches, tmp_path):
    from logit_cache.models import digits_mlp

    cache = caches["zarr", "topk", "float32"]
    other = tmp_path / "other.pt"
    torch.save(digits_mlp(hidden=32, num_classes=7).state_dict(), other)
    kwargs = {**with_teacher(other), "arch_kwargs": {"hidden": 32, "num_classes": 7}}
    report = verify_cache(cache, **kwargs, samples=3)
    assert report.failures[0].startswith("teacher: returned logits of shape [3, 7]") and "10 classes per row" in report.failures[0]
    assert "outputs could not be compared" in report.failures[1]
    assert report.checks[-1].kind == "teacher_sha256"

    crashing = tmp_path / "crash.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 10)).state_dict(), crashing)  # 64 pixels do not fit 3 inputs
    factory = tmp_path / "tiny.py"
    factory.write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(3, 10))\n")
    report = verify_cache(cache, **{**with_teacher(crashing), "arch": f"{factory}:make", "arch_kwargs": None}, samples=3)
    assert report.failures[0].startswith("teacher: failed on samples ") and "RuntimeError" in report.failures[0]
    assert "\n" not in report.failures[0]
    assert "teacher_arch" in [check.kind for check in report.checks]  # another --arch than the dump's: said


def test_a_views_cache_verifies_with_the_teacher(teacher, tmp_path):
    cache = make_cache(tmp_path / "views", teacher, dataset="three_rng_images", dataset_kwargs={"n": 40}, views=2, seed=3)
    report = verify_cache(cache, **with_teacher(teacher, n=40, dataset="three_rng_images"), samples=16)
    assert report.ok, report.failures
    subjects = [check.subject for check in report.checks if check.kind == "sample"]
    assert any(" view 0 " in s for s in subjects) and any(" view 1 " in s for s in subjects)
    for subject in subjects:  # "sample i view v (row r)" with r = i * 2 + v
        words = subject.replace("(", "").replace(")", "").split()
        assert int(words[5]) == int(words[1]) * 2 + int(words[3])

    # the replay seed matters: compared under another seed, the augmented inputs (and outputs) differ
    edit_manifest(cache, lambda data: data.update(seed=4))
    report = verify_cache(cache, **with_teacher(teacher, n=40, dataset="three_rng_images"), samples=16)
    assert not report.ok
    assert sum(f.startswith("sample ") for f in report.failures) == 16


def test_a_dataset_of_another_length_is_a_failure(caches, teacher):
    cache = caches["zarr", "full", "float16"]
    report = verify_cache(cache, **with_teacher(teacher, n=N + 5))
    assert not report.ok
    assert report.failures[0].startswith("dataset: ") and f"has {N + 5} items, the manifest records {N}" in report.failures[0]
    # the first N images are the same (drawn first from the same generator), the labels are not
    samples = [f for f in report.failures if f.startswith("sample ")]
    assert samples and all("label" in f and "logits" not in f for f in samples)
    assert any(f.startswith("dataset: content differs from what the cache was dumped from") for f in report.failures)


def test_other_data_of_the_same_length_fails_the_samples(caches, teacher):
    cache = caches["hdf5", "full", "float32"]
    report = verify_cache(cache, **{**with_teacher(teacher), "dataset_kwargs": {"n": N, "seed": 1}}, samples=5)
    assert not report.ok
    assert report.failures[0].startswith("dataset: content differs") and "fingerprint" in report.failures[0]
    samples = report.failures[1:]
    assert len(samples) == 5 and all(f.startswith("sample ") for f in samples)
    assert all("logits differ from the teacher's" in f for f in samples)
    assert any("is stored, the dataset says" in f for f in samples)  # labels too, where they differ by chance


def test_the_same_dataset_named_another_way_verifies(caches, teacher, monkeypatch):
    monkeypatch.chdir(Path(spec("x")).parent)
    report = verify_cache(caches["zarr", "topk", "float32"], **{**with_teacher(teacher), "dataset": "data_factories.py:random_images"})
    assert report.ok, report.failures


# -- usage errors ---------------------------------------------------------------------------------


def test_usage_errors(cli, caches, teacher, tmp_path):
    cache = caches["zarr", "full", "float16"]
    assert_one_line_error(cli("verify", tmp_path / "nope"), "nope", "no such cache directory")
    assert_one_line_error(cli("verify", cache, "--teacher", teacher), "--teacher needs --dataset")
    assert_one_line_error(cli("verify", cache, "--dataset", spec("random_images")), "--dataset needs --teacher")
    assert_one_line_error(cli("verify", cache, "--arch", ARCH), "--arch", "--teacher")
    assert_one_line_error(cli("verify", cache, *teacher_args(teacher), "--samples", "0"), "--samples must be >= 1")
    assert_one_line_error(cli("verify", cache, *teacher_args(tmp_path / "gone.pt")), "gone.pt", "does not exist")
    no_arch = ["--teacher", teacher, "--dataset", spec("random_images"), "--dataset-kwargs", '{"n": 60}']
    assert_one_line_error(cli("verify", cache, *no_arch), "--arch", f"the cache was dumped with --arch {ARCH}")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("verify", tmp_path / "empty"), "no manifest.json")
    with pytest.raises(CacheNotFoundError):
        verify_cache(tmp_path / "nope")
    with pytest.raises(UsageError, match="--teacher needs --dataset"):
        verify_cache(cache, teacher=teacher)


# -- tolerances -----------------------------------------------------------------------------------


def test_float16_tolerance_is_the_rounding_plus_a_slack():
    teacher = np.array([0.1, -3.3, 1000.7, 7.0], dtype=np.float32)
    rounded = teacher.astype(np.float16)
    assert compare_full(rounded, teacher, "float16", 1e-4) is None
    one_ulp_off = np.nextafter(rounded, np.float16(np.inf))  # the neighbour beyond the rounding
    problem = compare_full(one_ulp_off, teacher, "float16", 1e-4)
    assert problem is not None and "worst class" in problem
    tolerance = value_tolerance(teacher, "float16", 1e-4)
    assert tolerance[2] == pytest.approx(0.5 * 0.5 + 1e-4 * 1001.7)  # float16 spacing at 1000 is 0.5
    # float32 storage: 1e-4 relative plus 1e-4 absolute
    assert compare_full(teacher + np.float32(5e-5), teacher, "float32", 1e-4) is None
    assert "class 0" in compare_full(teacher + np.array([1e-3, 0, 0, 0], np.float32), teacher, "float32", 1e-4)
    assert compare_full(np.full(4, np.nan, np.float32), teacher, "float32", 1e-4) is not None


def test_topk_allows_swaps_among_ties_only():
    teacher = np.array([5.0, 1.0, 3.0, 3.0, -2.0], dtype=np.float32)  # classes 2 and 3 tie for second place
    lse = float(torch.logsumexp(torch.from_numpy(teacher), 0))
    for ids in ([0, 2], [0, 3]):
        assert compare_topk(np.array(ids), teacher[ids], lse, teacher, "float32", 1e-4) is None
    wrong = compare_topk(np.array([0, 1]), teacher[[0, 1]], lse, teacher, "float32", 1e-4)
    assert wrong is not None and "are not the teacher's" in wrong and "class 1" in wrong
    nearly = teacher.copy()
    nearly[3] = 3.0 - 1e-5  # within the noise of two runs: still a tie
    assert compare_topk(np.array([0, 3]), nearly[[0, 3]], lse, nearly, "float32", 1e-4) is None
    assert "values differ" in compare_topk(np.array([0, 2]), np.array([5.0, 2.5]), lse, teacher, "float32", 1e-4)
    assert "logsumexp" in compare_topk(np.array([0, 2]), teacher[[0, 2]], lse + 0.01, teacher, "float32", 1e-4)
    assert "descending" in compare_topk(np.array([2, 0]), teacher[[2, 0]], lse, teacher, "float32", 1e-4)
    assert "outside" in compare_topk(np.array([0, 9]), np.array([5.0, 3.0]), lse, teacher, "float32", 1e-4)
    assert "repeat" in compare_topk(np.array([0, 0]), np.array([5.0, 5.0]), lse, teacher, "float32", 1e-4)


def test_rows_are_compared_by_what_the_kind_stores() -> None:
    """Verify asks the target kind which comparison its rows get (dense logits or top-k ids), not its name."""
    from logit_cache.targets import KINDS
    from logit_cache.tools.verify_compare import comparable, compare_row

    assert comparable(KINDS["full"]) and comparable(KINDS["topk"]) and not comparable(KINDS["sampled"])
    teacher = np.array([3.0, 1.0, 2.0, 0.0], dtype=np.float32)
    dense = {"logits": teacher.copy()}
    assert compare_row(KINDS["full"], dense.__getitem__, dense.__contains__, teacher, "float32", 1e-4) is None
    dense["logits"][1] = 5.0
    assert "worst class 1" in compare_row(KINDS["full"], dense.__getitem__, dense.__contains__, teacher, "float32", 1e-4)
    top = {"topk_indices": np.array([0, 2]), "topk_logits": np.array([3.0, 2.0], dtype=np.float32)}
    assert compare_row(KINDS["topk"], top.__getitem__, top.__contains__, teacher, "float32", 1e-4) is None  # no logsumexp: not checked
    top["logsumexp"] = np.float32(9.0)
    assert "logsumexp" in compare_row(KINDS["topk"], top.__getitem__, top.__contains__, teacher, "float32", 1e-4)


def test_an_unfinished_dump_is_found_beside_its_name(tmp_path: Path) -> None:
    from logit_cache.format.completeness import shown_location, unfinished_work

    out = tmp_path / "cache"
    assert unfinished_work(out) is None and shown_location(out) == out
    (tmp_path / "cache.partial").mkdir()
    assert unfinished_work(out) == tmp_path / "cache.partial" and shown_location(out) == tmp_path / "cache.partial"
    assert unfinished_work(str(out), exists=lambda p: Path(p).exists()) == f"{out}.partial"  # the reader's form (URLs)
    out.mkdir()  # the finished cache is there: the leftover does not count
    assert unfinished_work(out) is None and shown_location(out) == out
