"""The ``entropy`` encoding through targets.encode_arrays/decode_arrays and whole dumps: logical rows back
(top-k re-sorted descending, ids exactly the same sets, values within the quantizer's fidelity; sampled
rows lossless), any gathered subset of rows decodes alike, and dumps per token and per sample read
back through logit-cache's reader equal to the plain cache's decode within the bound."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from data_factories import causal_bag, dump_digits, spec

from logit_cache import DumpConfig, dump, open_cache, verify_cache
from logit_cache.errors import UsageError
from logit_cache.store import get_backend
from logit_cache.targets import decode_arrays, encode_arrays, stored_specs
from logit_cache.targets.entropy import levels


def _logits(rows: int, vocab: int, seed: int = 0, zipf: bool = True) -> np.ndarray:
    """LM-like rows (scripts/bench_lm_storage.py's model): Exp(1) noise on a Zipf id prior, per-row sharpness."""
    rng = np.random.default_rng(seed)
    prior = -np.log1p(np.arange(vocab)) if zipf else np.zeros(vocab)
    prior = prior - np.log(np.exp(prior).sum()) + math.log(vocab)
    sharp = np.exp(0.55 + 0.35 * rng.standard_normal((rows, 1)))
    return ((rng.standard_exponential((rows, vocab)) + prior) * sharp).astype(np.float32)


def _topk(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    wide = logits.astype(np.float64)
    lse = wide.max(1) + np.log(np.exp(wide - wide.max(1, keepdims=True)).sum(1))
    values = np.take_along_axis(logits, ids, 1)
    mass = np.exp(values.astype(np.float64) - lse[:, None]).sum(1)
    log_tail = np.log(np.maximum(1 - mass, 1e-300))
    dtype = np.uint16 if logits.shape[1] <= 65536 else np.int32
    return {"topk_logits": values, "topk_indices": ids.astype(dtype), "logsumexp": lse.astype(np.float32),
            "topk_log_tail": log_tail.astype(np.float32)}


def _kl(a: dict[str, np.ndarray], b: dict[str, np.ndarray], vocab: int, temperature: float) -> np.ndarray:
    """KL(p^_a || p^_b) at T over all V ids, as the loss reads a cache (targets.topk_log_probs with the
    stored tail), computed here in float64: the top-k at T, the tail log-mass ``topk_log_tail`` spread
    evenly over the other V - k ids, the row total log sum exp(v) - log(1 - tail)."""
    out = []
    for arrays in (a, b):
        order = np.argsort(arrays["topk_indices"], axis=1)
        v = np.take_along_axis(arrays["topk_logits"].astype(np.float64), order, 1)
        k = v.shape[1]
        log_tail = np.clip(arrays["topk_log_tail"].astype(np.float64), -80.0, 0.0)
        lse = (np.log(np.exp(v - v.max(1, keepdims=True)).sum(1)) + v.max(1) - np.log(-np.expm1(log_tail)))[:, None]
        log_tail_t = math.log(vocab - k) + (log_tail - math.log(vocab - k)) / temperature
        scaled = (v - lse) / temperature
        z = np.logaddexp(np.log(np.exp(scaled).sum(1)), log_tail_t)
        out.append((scaled - z[:, None], log_tail_t - z))
    (la, ta), (lb, tb) = out
    return (np.exp(la) * (la - lb)).sum(1) + np.exp(ta) * (ta - tb)


def _check_logsumexp(decoded: dict[str, np.ndarray], logical: dict[str, np.ndarray]) -> None:
    """The derived logsumexp: the decoded top-k plus the exact tail sum to 1, and it is the dumped one up
    to the values' rounding."""
    v, lse = decoded["topk_logits"].astype(np.float64), decoded["logsumexp"].astype(np.float64)
    total = np.exp(v - lse[:, None]).sum(1) + np.exp(decoded["topk_log_tail"].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, rtol=2e-5)
    np.testing.assert_allclose(decoded["logsumexp"], logical["logsumexp"], rtol=0, atol=0.05)
    assert decoded["logsumexp"].dtype == np.float32


@pytest.mark.parametrize(("vocab", "k"), [(131072, 50), (32768, 128), (1000, 10)])
def test_topk_fidelity_within_the_goals(vocab: int, k: int) -> None:
    """Decoded against float32 plain: KL <= 1e-4 nats/token at T=1 and <= 1e-2 at T=2; ids the same sets."""
    logical = _topk(_logits(600, vocab, seed=k), k)
    stored = encode_arrays("topk", logical, "entropy", vocab)
    assert np.all(np.diff(stored["topk_indices"].astype(np.int64), axis=1) > 0)  # stored ascending
    np.testing.assert_array_equal(stored["topk_log_tail"], logical["topk_log_tail"])  # carried as it is
    from logit_cache.store.entropy_codec import decode_quantized_logits, encode_quantized_logits

    stored["topk_logits"] = decode_quantized_logits(encode_quantized_logits(stored["topk_logits"], levels(k)))
    decoded = decode_arrays("topk", stored, "entropy", vocab, "float32")
    np.testing.assert_array_equal(np.sort(decoded["topk_indices"], 1), np.sort(logical["topk_indices"], 1))
    assert np.all(np.diff(decoded["topk_logits"], axis=1) <= 0)  # descending again
    assert decoded["topk_indices"].dtype == logical["topk_indices"].dtype
    # the maximum as float16 (the row shifted alike: no probability changes), the tail exact
    np.testing.assert_array_equal(decoded["topk_logits"][:, 0], logical["topk_logits"][:, 0].astype(np.float16))
    np.testing.assert_array_equal(decoded["topk_log_tail"], logical["topk_log_tail"])
    assert "logsumexp" not in stored
    _check_logsumexp(decoded, logical)
    kl1, kl2 = _kl(logical, decoded, vocab, 1.0).mean(), _kl(logical, decoded, vocab, 2.0).mean()
    assert 0 <= kl1 <= 1e-4 and 0 <= kl2 <= 1e-2, (kl1, kl2)


def test_tail_derived_where_none_is_given_and_logsumexp_never_stored(tmp_path: Path) -> None:
    """A caller without topk_log_tail: the tail the loss would derive (from logsumexp), stored exact; a
    plain zarr read of the shard finds the coded arrays and the tail, and no logsumexp."""
    vocab, k = 5000, 12
    logical = _topk(_logits(300, vocab, seed=9), k)
    given = {name: a for name, a in logical.items() if name != "topk_log_tail"}
    stored = encode_arrays("topk", given, "entropy", vocab)
    wide = logical["topk_logits"].astype(np.float64) - logical["logsumexp"].astype(np.float64)[:, None]
    with np.errstate(divide="ignore"):  # the top-k mass as the loss derives it: at most 1, the tail floored at -80
        expected = np.maximum(np.log(-np.expm1(np.minimum(np.log(np.exp(wide).sum(1)), 0.0))), -80.0)
    np.testing.assert_allclose(stored["topk_log_tail"], expected, rtol=1e-6)
    assert stored["topk_log_tail"].dtype == np.float32 and "logsumexp" not in stored
    with pytest.raises(UsageError, match="needs topk_log_tail, or logsumexp to derive it from"):
        encode_arrays("topk", {n: logical[n] for n in ("topk_logits", "topk_indices")}, "entropy", vocab)
    specs = stored_specs("topk", k, vocab, "float32", "entropy")
    assert [spec.name for spec in specs] == ["topk_logits", "topk_indices", "topk_log_tail"]
    writer = get_backend("zarr").create(tmp_path / "s.zarr", specs, 128, {}, {s.name: 300 for s in specs})
    writer.append(stored)
    writer.close()
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["topk_indices", "topk_log_tail", "topk_logits"]
    np.testing.assert_array_equal(group["topk_indices"][:], stored["topk_indices"])
    np.testing.assert_array_equal(group["topk_log_tail"][:], stored["topk_log_tail"])
    decoded = decode_arrays("topk", {name: group[name][:] for name in group.array_keys()}, "entropy", vocab, "float32")
    _check_logsumexp(decoded, logical)
    assert _kl(logical, decoded, vocab, 1.0).mean() <= 1e-4
    # the sampled kind keeps its logsumexp (lossless rows: nothing to derive it from)
    assert "logsumexp" in [spec.name for spec in stored_specs("sampled", 8, vocab, "float32", "entropy")]


def test_empty_tail_and_v2() -> None:
    """k == C (an empty tail) and the smallest vocabulary."""
    for vocab, k in ((2, 2), (2, 1), (7, 7)):
        logical = _topk(_logits(50, vocab, seed=vocab + k), k)
        stored = encode_arrays("topk", logical, "entropy", vocab)
        decoded = decode_arrays("topk", stored, "entropy", vocab, "float16")
        np.testing.assert_array_equal(np.sort(decoded["topk_indices"], 1), np.sort(logical["topk_indices"], 1))
        assert decoded["topk_logits"].dtype == np.float16


def test_sampled_rows_pass_unchanged_and_bad_rows_are_refused() -> None:
    ids = np.array([[3, 9, 0, 0], [0, 1, 2, 3], [5, 0, 0, 0]], np.uint16)
    counts = np.array([[3, 1, 0, 0], [1, 1, 1, 1], [4, 0, 0, 0]], np.uint8)
    logical = {"sampled_indices": ids, "sampled_counts": counts, "logsumexp": np.zeros(3, np.float32)}
    decoded = decode_arrays("sampled", encode_arrays("sampled", logical, "entropy", 10), "entropy", 10, "float32")
    for name, array in logical.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype
    with pytest.raises(UsageError, match="ascending distinct ids"):
        encode_arrays("sampled", {**logical, "sampled_indices": ids[:, ::-1].copy()}, "entropy", 10)
    with pytest.raises(UsageError, match=r"ids must lie in \[0, 5\)"):
        encode_arrays("sampled", logical, "entropy", 5)
    with pytest.raises(UsageError, match="must be distinct"):
        encode_arrays("topk", {"topk_logits": np.zeros((1, 2), np.float32), "topk_indices": np.array([[1, 1]]),
                               "logsumexp": np.zeros(1, np.float32)}, "entropy", 10)


def test_gathered_rows_decode_alike(tmp_path: Path) -> None:
    """A shard written through the codecs: any subset of rows, in any order, decodes to the same rows."""
    vocab, k = 70000, 16
    logical = _topk(_logits(900, vocab, seed=3, zipf=False), k)
    specs = stored_specs("topk", k, vocab, "float32", "entropy")
    writer = get_backend("zarr").create(tmp_path / "s.zarr", specs, 256, {}, {s.name: 900 for s in specs})
    writer.append(encode_arrays("topk", logical, "entropy", vocab))
    writer.close()
    with get_backend("zarr").open(tmp_path / "s.zarr") as reader:
        whole = decode_arrays("topk", {n: reader.read(n) for n in reader.names()}, "entropy", vocab, "float32")
        picked = np.random.default_rng(0).permutation(900)[:97]
        part = decode_arrays("topk", {n: reader.read(n)[picked] for n in reader.names()}, "entropy", vocab, "float32")
        one = decode_arrays("topk", {n: reader.read(n, 517, 518) for n in reader.names()}, "entropy", vocab, "float32")
    for name in whole:
        np.testing.assert_array_equal(part[name], whole[name][picked])
        np.testing.assert_array_equal(one[name], whole[name][517:518])
    assert whole["topk_indices"].dtype == np.int32
    np.testing.assert_array_equal(np.sort(whole["topk_indices"], 1), np.sort(logical["topk_indices"], 1))


# -- dumps ------------------------------------------------------------------------------------------------


def _token_dump(tmp_path: Path, teacher: Path, name: str, **kw) -> Path:
    config = DumpConfig(teacher=str(teacher), arch=spec("causal_bag"), arch_kwargs={"vocab": 50}, dataset=spec("ragged_tokens"),
                        dataset_kwargs={"vocab": 50}, out=str(tmp_path / name), quiet=True, **kw)
    return dump(config).out


def _compare_topk(plain: dict[str, np.ndarray], coded: dict[str, np.ndarray], vocab: int) -> None:
    np.testing.assert_array_equal(coded["topk_log_tail"], plain["topk_log_tail"])
    _check_logsumexp(coded, plain)
    np.testing.assert_array_equal(np.sort(coded["topk_indices"], 1), np.sort(plain["topk_indices"], 1))
    assert coded["topk_indices"].dtype == plain["topk_indices"].dtype
    assert _kl(plain, coded, vocab, 1.0).mean() <= 1e-4 and _kl(plain, coded, vocab, 2.0).mean() <= 1e-2


@pytest.mark.slow
def test_per_token_dumps_read_back_like_plain(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = causal_bag(vocab=50).eval()
    teacher = tmp_path / "bag.pt"
    torch.save(model.state_dict(), teacher)
    plain = open_cache(_token_dump(tmp_path, teacher, "p", mode="topk", k=8, dtype="float32"))
    coded = open_cache(_token_dump(tmp_path, teacher, "e", mode="topk", k=8, dtype="float32", encoding="entropy"))
    assert coded.manifest.encoding == "entropy" and coded.manifest.key != plain.manifest.key
    # the shard checksums are over what reads back (the values are quantized): verify passes, and a
    # checksum over the values the writer was given would not match them
    report = verify_cache(coded.path, progress=False)
    assert report.ok, report.failures
    rows = np.arange(plain.num_rows)
    _compare_topk(plain.rows(rows), coded.rows(rows), 50)
    picked = rows[::-7]
    for name, array in coded.rows(picked).items():
        np.testing.assert_array_equal(array, coded.rows(rows)[name][picked])
    sampled = open_cache(_token_dump(tmp_path, teacher, "sp", mode="sampled", m=20))
    sampled_coded = open_cache(_token_dump(tmp_path, teacher, "se", mode="sampled", m=20, encoding="entropy"))
    a, b = sampled.rows(rows), sampled_coded.rows(rows)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name])
        assert b[name].dtype == a[name].dtype
    assert verify_cache(sampled_coded.path, progress=False).ok


@pytest.mark.slow
def test_per_sample_dump_reads_back_like_plain(tmp_path: Path, teacher: Path) -> None:
    plain = open_cache(dump_digits(tmp_path, teacher, "p", mode="topk", k=4, dtype="float32"))
    coded = open_cache(dump_digits(tmp_path, teacher, "e", mode="topk", k=4, dtype="float32", encoding="entropy"))
    rows = np.arange(plain.num_rows)
    _compare_topk(plain.rows(rows), coded.rows(rows), 10)
    assert verify_cache(coded.path, progress=False).ok
    with pytest.raises(UsageError, match=r"codecs that only zarr can register .*use --format zarr, or --encoding compact"):
        dump_digits(tmp_path, teacher, "h", mode="topk", k=4, encoding="entropy", backend="hdf5")
