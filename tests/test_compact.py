"""The stored layouts of target arrays (compact.py): plain is the identity, compact decodes back to
the logical arrays (ids, counts and logsumexp exactly, top-k values within the documented bound),
row by row, and goes through a real Zarr shard unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from logit_cache.compact import (
    CODE_LEVELS,
    ENCODINGS,
    SAMPLED_HEAD,
    decode_arrays,
    encode_arrays,
    stored_specs,
)
from logit_cache.errors import CacheFormatError, UsageError
from logit_cache.store import get_backend
from logit_cache.targets import LOG_MASS_FLOOR, count_dtype, encode, index_dtype

BIG_V = (1 << 17) + 64  # ids need int32; the test puts the top ids around 2^17


def peaked_logits(rows: int, num_classes: int, seed: int = 0, hot: np.ndarray | None = None) -> torch.Tensor:
    """LM-like rows: a heavy upper tail (scaled Gumbel noise, power-law probabilities by rank) with a
    per-row sharpness, so some rows are confident and some flat; ``hot`` ids get a boost."""
    generator = torch.Generator().manual_seed(seed)
    sharpness = torch.exp(0.5 + 0.4 * torch.randn(rows, 1, generator=generator))
    gumbel = -torch.log(torch.empty(rows, num_classes).exponential_(generator=generator))
    logits = sharpness * gumbel
    if hot is not None:
        logits[:, torch.as_tensor(hot)] += 8.0
    return logits


def topk_arrays(logits: torch.Tensor, k: int, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The logical top-k arrays in their storage dtypes, as the dump hands them to the writer."""
    arrays = {name: tensor.numpy() for name, tensor in encode(logits, "topk", k, dtype).arrays.items()}
    arrays["topk_indices"] = arrays["topk_indices"].astype(index_dtype(logits.shape[1]))
    return arrays


def sampled_arrays(logits: torch.Tensor, m: int, temperature: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    encoded = encode(logits, "sampled", None, "float16", m=m, sample_temperature=temperature,
                     generator=torch.Generator().manual_seed(seed))
    arrays = {name: tensor.numpy() for name, tensor in encoded.arrays.items()}
    arrays["sampled_indices"] = arrays["sampled_indices"].astype(index_dtype(logits.shape[1]))
    arrays["sampled_counts"] = arrays["sampled_counts"].astype(count_dtype(m))
    return arrays


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert actual[name].shape == expected[name].shape, name
        assert np.array_equal(actual[name], expected[name]), name


def by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by id, values permuted alike: compares (id, value) pairs whatever the order."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)


def assert_within_bound(original: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> None:
    """The documented bound, checked from its definition: decoded sqrt-probabilities are g * q with
    |q - sqrt(p)| <= 1/510 and one factor g per row, and the row's decoded mass is 1 - the stored
    tail mass (log r rounded to float16)."""
    ids, values = by_id(original["topk_indices"], original["topk_logits"])
    decoded_ids, decoded_values = by_id(decoded["topk_indices"], decoded["topk_logits"])
    assert np.array_equal(ids, decoded_ids)
    lse = original["logsumexp"].astype(np.float64)[:, None]
    true_roots = np.sqrt(np.minimum(np.exp(values.astype(np.float64) - lse), 1.0))
    roots = np.sqrt(np.exp(decoded_values.astype(np.float64) - lse))
    half_step = 0.5 / CODE_LEVELS
    rtol = 1e-5  # float32 rounding of the decoded logits
    low = roots / (true_roots + half_step) * (1 - rtol)
    high = np.where(true_roots > half_step, roots / np.maximum(true_roots - half_step, 1e-300), np.inf) * (1 + rtol)
    assert np.all(low.max(axis=1) <= high.min(axis=1)), "no per-row factor fits every entry within the bound"
    # mass: sum of decoded probabilities = 1 - r, r known up to the float16 rounding of log r
    true_mass = np.exp(values.astype(np.float64) - lse).sum(axis=1)
    tail = np.clip(1.0 - true_mass, 0.0, None)
    log_tail = np.log(np.maximum(tail, np.exp(LOG_MASS_FLOOR)))
    tail_slack = tail * np.expm1(np.abs(log_tail) * 2.0**-11) + 1e-5
    assert np.all(np.abs(np.square(roots).sum(axis=1) - (1.0 - tail)) <= tail_slack)


# -- plain ---------------------------------------------------------------------------------------------


def test_plain_is_the_identity() -> None:
    logits = peaked_logits(8, 500)
    for mode, arrays in (("topk", topk_arrays(logits, 5)), ("sampled", sampled_arrays(logits, 20, temperature=2.0))):
        stored = encode_arrays(mode, arrays, "plain", 500)
        assert all(stored[name] is arrays[name] for name in arrays) and sorted(stored) == sorted(arrays)
        decoded = decode_arrays(mode, stored, "plain", 500, "float16")
        assert all(decoded[name] is arrays[name] for name in arrays)


def test_plain_specs_are_the_logical_arrays() -> None:
    specs = {s.name: s for s in stored_specs("topk", 7, 70_000, "float16", "plain")}
    assert [(n, s.dtype, s.row_shape) for n, s in specs.items()] == [
        ("topk_logits", "float16", (7,)), ("topk_indices", "int32", (7,)), ("logsumexp", "float32", ()),
        ("topk_log_tail", "float32", ())]
    assert all(s.compress and s.per == "row" for s in specs.values())
    specs = {s.name: s for s in stored_specs("sampled", 300, 1000, "float32", "plain", sampled_logits=True)}
    assert [(n, s.dtype, s.row_shape) for n, s in specs.items()] == [
        ("sampled_indices", "uint16", (300,)), ("sampled_counts", "uint16", (300,)), ("logsumexp", "float32", ()),
        ("sampled_logits", "float32", (300,))]


# -- compact top-k ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "k", "dtype"), [(1000, 16, "float32"), (1000, 1, "float32"), (BIG_V, 50, "float32"),
                                                         (1000, 16, "float16"), (BIG_V, 50, "float16")])
def test_compact_topk_round_trip(num_classes: int, k: int, dtype: str) -> None:
    hot = np.arange((1 << 17) - 40, (1 << 17) + 40) if num_classes == BIG_V else None
    arrays = topk_arrays(peaked_logits(32, num_classes, seed=k, hot=hot), k, dtype)
    if hot is not None:
        assert arrays["topk_indices"].dtype == np.int32 and arrays["topk_indices"].max() >= 1 << 17
    stored = encode_arrays("topk", arrays, "compact", num_classes)
    decoded = decode_arrays("topk", stored, "compact", num_classes, dtype)

    assert {n: (a.dtype, a.shape) for n, a in decoded.items()} == {n: (a.dtype, a.shape) for n, a in arrays.items()}
    assert np.array_equal(decoded["logsumexp"], arrays["logsumexp"])
    # the same id set per row, values descending, and pairs kept: an id's value moves with it
    assert np.array_equal(np.sort(decoded["topk_indices"], axis=1), np.sort(arrays["topk_indices"], axis=1))
    assert np.all(np.diff(decoded["topk_logits"].astype(np.float64), axis=1) <= 0)
    lse = arrays["logsumexp"].astype(np.float64)[:, None]
    _, values = by_id(arrays["topk_indices"], arrays["topk_logits"].astype(np.float64))
    _, got = by_id(decoded["topk_indices"], decoded["topk_logits"].astype(np.float64))
    assert np.abs(np.sqrt(np.exp(got - lse)) - np.sqrt(np.minimum(np.exp(values - lse), 1))).max() < 2 / CODE_LEVELS
    if dtype == "float32":
        assert_within_bound(arrays, decoded)
    else:  # the float16 result is the float32 decode, rounded (ids and order alike)
        wide = decode_arrays("topk", stored, "compact", num_classes, "float32")
        assert np.array_equal(wide["topk_indices"], decoded["topk_indices"])
        assert np.allclose(wide["topk_logits"], decoded["topk_logits"], rtol=2.0**-10, atol=0)


def test_compact_topk_ties_and_k_equal_to_v() -> None:
    logits = torch.zeros(6, 12)
    logits[:, [2, 5, 7]] = 4.0  # three tied leaders, then nine tied others
    logits[3] = torch.arange(12, dtype=torch.float32)  # one row without ties
    arrays = topk_arrays(logits, 12, "float32")
    stored = encode_arrays("topk", arrays, "compact", 12)
    assert np.all(stored["topk_id_gaps"] == 0)  # K = V: ids 0..11, every gap 0
    assert np.all(stored["topk_log_tail"] == np.float16(LOG_MASS_FLOOR))  # no tail
    decoded = decode_arrays("topk", stored, "compact", 12, "float32")
    assert np.all(np.diff(decoded["topk_logits"], axis=1) <= 0)
    lse = decoded["logsumexp"][:, None].astype(np.float64)
    assert np.allclose(np.exp(decoded["topk_logits"] - lse).sum(axis=1), 1.0, atol=1e-6)
    for row in (0, 1, 2, 4, 5):  # ties stay ties, in ascending id order
        assert decoded["topk_indices"][row].tolist() == [2, 5, 7, 0, 1, 3, 4, 6, 8, 9, 10, 11]
        assert len(set(decoded["topk_logits"][row, :3].tolist())) == 1 and len(set(decoded["topk_logits"][row, 3:].tolist())) == 1
    assert decoded["topk_indices"][3, :8].tolist() == list(range(11, 3, -1))  # ids 0 and 1 (p < 1e-5) may share a code
    assert_within_bound(arrays, decoded)


def test_compact_topk_keeps_the_tail_mass_of_a_confident_row() -> None:
    """A tail of 1e-4 beside a top-1 of 0.9999: 8-bit codes alone could not tell it from 0."""
    logits = torch.full((1, 5000), -30.0)
    logits[0, 17] = 0.0
    logits[0, 100:110] = -11.5  # ten entries of ~1e-5 each
    arrays = topk_arrays(logits, 4, "float32")
    decoded = decode_arrays("topk", encode_arrays("topk", arrays, "compact", 5000), "compact", 5000, "float32")
    lse = arrays["logsumexp"][:, None].astype(np.float64)
    tail = 1 - np.exp(arrays["topk_logits"] - lse).sum()
    decoded_tail = 1 - np.exp(decoded["topk_logits"] - lse).sum()
    assert tail > 5e-5 and abs(decoded_tail - tail) < 1e-3 * tail


def test_decoding_gathered_rows_equals_gathering_decoded_rows() -> None:
    rng = np.random.default_rng(0)
    logits = peaked_logits(200, 3000, seed=3)
    rows = rng.integers(0, 200, 150)  # any order, repeats allowed: what a shuffled reader gathers
    for mode, arrays in (("topk", topk_arrays(logits, 32)), ("sampled", sampled_arrays(logits, 50, temperature=1.5))):
        stored = encode_arrays(mode, arrays, "compact", 3000)
        whole = decode_arrays(mode, stored, "compact", 3000, "float16")
        gathered = decode_arrays(mode, {name: a[rows] for name, a in stored.items()}, "compact", 3000, "float16")
        assert_same(gathered, {name: a[rows] for name, a in whole.items()})


# -- compact sampled --------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "m", "temperature"), [(1000, 50, 1.0), (1000, 8, 1.0), (BIG_V, 50, 2.0), (300, 300, 1.0)])
def test_compact_sampled_round_trip_is_exact(num_classes: int, m: int, temperature: float) -> None:
    hot = np.arange((1 << 17) - 40, (1 << 17) + 40) if num_classes == BIG_V else None
    logits = peaked_logits(24, num_classes, seed=m, hot=hot)
    logits[0] = -50.0
    logits[0, 0] = 50.0  # every draw is id 0: one id (the pad id) with count M
    logits[1] = -50.0
    logits[1, num_classes - 1] = 50.0  # every draw is the last id
    arrays = sampled_arrays(logits, m, temperature)
    assert arrays["sampled_indices"][0, 0] == 0 and arrays["sampled_counts"][0, 0] == m
    assert arrays["sampled_indices"][1, 0] == num_classes - 1 and arrays["sampled_counts"][1, 0] == m
    stored = encode_arrays("sampled", arrays, "compact", num_classes)
    assert ("sampled_id_gaps_rest" in stored) == (m > SAMPLED_HEAD)
    assert ("sampled_logits" in stored) == (temperature != 1.0)
    assert_same(decode_arrays("sampled", stored, "compact", num_classes, "float16"), arrays)


def test_compact_sampled_refuses_rows_that_are_not_left_aligned() -> None:
    arrays = sampled_arrays(peaked_logits(4, 100), 10)
    arrays["sampled_counts"][0, 0] = 0  # a pad before the row's ids
    with pytest.raises(UsageError, match="left-aligned"):
        encode_arrays("sampled", arrays, "compact", 100)


# -- specs, shards, errors ----------------------------------------------------------------------------


CASES = [("topk", 16, 1000, "float16", False), ("topk", 50, BIG_V, "float32", False), ("sampled", 50, 1000, "float16", False),
         ("sampled", 12, BIG_V, "float16", True), ("sampled", 300, 2000, "float32", True)]


def make_arrays(mode: str, width: int, num_classes: int, dtype: str, with_logits: bool, rows: int = 24) -> dict[str, np.ndarray]:
    logits = peaked_logits(rows, num_classes, seed=width)
    if mode == "topk":
        return topk_arrays(logits, width, dtype)
    arrays = sampled_arrays(logits, width, temperature=1.7 if with_logits else 1.0)
    if with_logits:
        arrays["sampled_logits"] = arrays["sampled_logits"].astype(dtype)
    return arrays


@pytest.mark.parametrize(("encoding", "case"), list(itertools.product(ENCODINGS, CASES)))
def test_specs_match_what_encode_returns(encoding: str, case: tuple) -> None:
    mode, width, num_classes, dtype, with_logits = case
    specs = stored_specs(mode, width, num_classes, dtype, encoding, sampled_logits=with_logits)
    stored = encode_arrays(mode, make_arrays(*case), encoding, num_classes)
    assert [s.name for s in specs] == list(stored)
    for spec in specs:
        assert (stored[spec.name].dtype, stored[spec.name].shape[1:]) == (np.dtype(spec.dtype), spec.row_shape), spec.name
        assert spec.per == "row" and spec.compress


@pytest.mark.parametrize(("encoding", "case"), [("plain", CASES[1]), ("compact", CASES[1]), ("compact", CASES[3])])
def test_zarr_shard_round_trip(tmp_path, encoding: str, case: tuple) -> None:
    mode, width, num_classes, dtype, with_logits = case
    arrays = make_arrays(*case, rows=48)
    specs = stored_specs(mode, width, num_classes, dtype, encoding, sampled_logits=with_logits)
    backend = get_backend("zarr")
    writer = backend.create(tmp_path / "shard.zarr", specs, 16, {"encoding": encoding}, {s.name: 48 for s in specs})
    for start in range(0, 48, 20):  # batches that do not line up with the 16-row chunks
        writer.append(encode_arrays(mode, {n: a[start:start + 20] for n, a in arrays.items()}, encoding, num_classes))
    writer.close()
    with backend.open(tmp_path / "shard.zarr") as reader:
        assert sorted(reader.names()) == sorted(s.name for s in specs)
        read = {name: reader.read(name) for name in reader.names()}
    direct = decode_arrays(mode, encode_arrays(mode, arrays, encoding, num_classes), encoding, num_classes, dtype)
    assert_same(decode_arrays(mode, read, encoding, num_classes, dtype), direct)
    if encoding == "plain":
        assert_same(read, arrays)


def test_errors_name_the_value_and_the_choices() -> None:
    arrays = topk_arrays(peaked_logits(2, 50), 3)
    with pytest.raises(UsageError, match=r"'tight'.*plain, compact"):
        encode_arrays("topk", arrays, "tight", 50)
    with pytest.raises(UsageError, match=r"'tight'.*plain, compact"):
        stored_specs("topk", 3, 50, "float16", "tight")
    with pytest.raises(UsageError, match=r"'dense'.*full, topk, sampled"):
        stored_specs("dense", 3, 50, "float16", "plain")
    with pytest.raises(UsageError, match="full logits are stored plain"):
        stored_specs("full", 50, 50, "float16", "compact")
    with pytest.raises(CacheFormatError, match=r"'tight'.*plain, compact"):
        decode_arrays("topk", arrays, "tight", 50, "float16")
    stored = encode_arrays("topk", arrays, "compact", 50)
    with pytest.raises(CacheFormatError, match="missing topk_codes"):
        decode_arrays("topk", {n: a for n, a in stored.items() if n != "topk_codes"}, "compact", 50, "float16")
    arrays["topk_indices"][0, 1] = arrays["topk_indices"][0, 0]  # a repeated id cannot be delta-coded
    with pytest.raises(CacheFormatError, match="distinct"):
        encode_arrays("topk", arrays, "compact", 50)
