"""The entropy encoding's Zarr codecs (store/entropy_codec.py): lossless round trips of ids and counts on
random and adversarial chunks, the value quantizer's bounds, zarr arrays written and read through the
codecs, a plain zarr read in a fresh interpreter (entry points only), a clear error where the codec is
unknown or a chunk has another layout version, and damaged chunks caught by their checksum."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import UnknownCodecError

from logit_cache.errors import CorruptShardError, UsageError
from logit_cache.store import ArraySpec, get_backend
from logit_cache.store import entropy_chunks as chunks
from logit_cache.store import entropy_codec as ec


def _sorted_rows(rng: np.random.Generator, rows: int, width: int, vocab: int) -> np.ndarray:
    return np.sort(np.stack([rng.choice(vocab, width, replace=False) for _ in range(rows)]), axis=1)


def _entropy_bound_bytes(vocab: int, width: int) -> float:
    from math import lgamma, log

    return (lgamma(vocab + 1) - lgamma(width + 1) - lgamma(vocab - width + 1)) / log(2) / 8


# -- ids ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "width", "dtype"), [(131072, 50, np.int32), (70000, 16, np.int32), (1000, 10, np.uint16),
                                                       (2, 2, np.uint16), (2, 1, np.uint16), (65536, 3, np.uint16)])
def test_sorted_ids_round_trip_random(vocab: int, width: int, dtype: type) -> None:
    rng = np.random.default_rng(vocab + width)
    ids = _sorted_rows(rng, 300, width, vocab).astype(dtype)
    data = ec.encode_sorted_ids(ids)
    np.testing.assert_array_equal(ec.decode_sorted_ids(data), ids)
    if vocab > 1000:  # near the information bound of a random subset (header and ANS overhead on top)
        assert len(data) / 300 < 1.08 * _entropy_bound_bytes(vocab, width) + 3


def test_sorted_ids_adversarial_rows() -> None:
    vocab = 70000
    equal_gaps = np.arange(0, 64 * 1000, 1000)[None].repeat(5, 0)  # every gap the same
    dense = np.arange(64)[None].repeat(5, 0)  # all gaps 0 (k == C for a 64-class model)
    extreme = np.zeros((5, 64), np.int64)
    extreme[:, 0], extreme[:, 1] = 0, vocab - 1  # the maximum gap, then zero padding
    extreme[:, 1:] = 0
    extreme[:, 1] = vocab - 1
    top = np.arange(vocab - 64, vocab)[None].repeat(5, 0)  # the largest ids, first gap near V
    ragged = _sorted_rows(np.random.default_rng(1), 5, 64, vocab)
    ragged[0, 1:] = 0  # one id
    ragged[1, 40:] = 0
    ragged[2] = 0  # a fill-value row (zarr pads an edge chunk with it): id 0, then padding
    ids = np.concatenate([equal_gaps, dense, extreme, top, ragged]).astype(np.int32)
    np.testing.assert_array_equal(ec.decode_sorted_ids(ec.encode_sorted_ids(ids)), ids)
    big = np.array([[0, 2**31 - 2]], np.int64)  # raw bits beyond one uniform symbol (split in 16-bit parts)
    np.testing.assert_array_equal(ec.decode_sorted_ids(ec.encode_sorted_ids(big)), big)


def test_sorted_ids_refuse_rows_that_are_not_ascending() -> None:
    with pytest.raises(ValueError, match="strictly ascending ids followed by zero padding"):
        ec.encode_sorted_ids(np.array([[3, 2, 5]]))
    with pytest.raises(ValueError, match="must be >= 0"):
        ec.encode_sorted_ids(np.array([[-1, 2, 5]]))


# -- counts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 50, 300])
def test_counts_round_trip(width: int) -> None:
    rng = np.random.default_rng(width)
    rows = []
    for _ in range(200):
        distinct = int(rng.integers(1, width + 1))
        draws = np.bincount(rng.integers(0, distinct, width), minlength=distinct)
        draws = draws[draws > 0]
        rows.append(np.concatenate([draws, np.zeros(width - len(draws), np.int64)]))  # sums to width: last count implied
    counts = np.stack(rows)
    counts[0] = 0  # a fill-value row
    if width > 1:
        counts[1, 0], counts[1, 1:] = 1, 0  # does not sum to width: coded whole
    dtype = np.uint8 if width <= 255 else np.uint16
    counts = counts.astype(dtype)
    np.testing.assert_array_equal(ec.decode_counts(ec.encode_counts(counts)), counts)
    with pytest.raises(ValueError, match="positive counts followed by zeros"):
        ec.encode_counts(np.array([[0, 3]]))


# -- values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [31, 255, 1023])
def test_quantized_logits_bounds(levels: int) -> None:
    """Every decoded value against the layout recomputed here: the maximum as float16 (where it was), the
    others sqrt(p / p_max) rounded to 1/L_r (below half a level: 0.25/L_r; L_r = L 2^(-g/8) for the row's
    g = floor(4 log2(1 + S))), times one factor per row, the other entries' mass S over the codes' own,
    rounded to 2^-8 in log, never above the maximum."""
    rng = np.random.default_rng(levels)
    values = (rng.standard_exponential((400, 40)) * rng.uniform(0.3, 4, (400, 1))).astype(np.float32)
    values[:, 5] = values[:, 3]  # a tie with another entry
    values[0] = 7.0  # all equal
    values[1, :] = -1e3
    values[1, 7] = 20.0  # one entry holds all the mass (S = 0)
    values[2, :3] = 0.1  # ties with the maximum
    decoded = ec.decode_quantized_logits(ec.encode_quantized_logits(values, levels))
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    v = values.astype(np.float64)
    rows, first = np.arange(len(v)), np.argmax(values, axis=1)
    top = v.max(axis=1, keepdims=True)
    top16 = top.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(decoded[rows, first], top16[:, 0])  # float16, where it was
    w = np.exp(v - top)
    w[rows, first] = 0.0
    mass = w.sum(axis=1)
    row_levels = levels * 2.0 ** (-np.minimum(np.floor(4 * np.log2(1 + mass)), 31) / 8)[:, None]  # rows of >= 24 values
    assert row_levels.min() < 0.5 * levels and row_levels.max() == levels  # flat rows get fewer levels
    q = np.maximum(np.rint(np.sqrt(w) * row_levels), 0.25) / row_levels
    q[rows, first] = 0.0
    with np.errstate(divide="ignore"):
        step = np.rint((np.log(mass) - np.log(np.square(q).sum(axis=1))) * 256)
        log_scale = np.where(mass > 0, step / 256, -700.0)
        expected = top16 + np.minimum(np.log(np.square(q)) + log_scale[:, None], 0.0)
    expected[rows, first] = top16[:, 0]
    np.testing.assert_allclose(decoded, expected.astype(np.float32), rtol=0, atol=2e-5 * np.abs(top16).max())
    # so the others' mass is S to 2^-9 (0.2%) where no entry was held at the maximum, and their sqrt(p / p_max)
    # within half a level before the factor
    with np.errstate(divide="ignore"):
        held = ((np.log(np.square(q)) + log_scale[:, None]) >= 0).any(axis=1)
    mass_decoded = np.exp(decoded.astype(np.float64) - top16).sum(axis=1) - 1
    kept = ~held & (mass > 0)
    assert kept.sum() > 350
    np.testing.assert_allclose(mass_decoded[kept], mass[kept], rtol=2.5e-3)
    big = np.broadcast_to(q > 0.3 / row_levels, q.shape)
    assert (np.abs(q - np.sqrt(w)) * row_levels)[big].max() <= 0.5 + 1e-9
    assert np.all(decoded[1, 8:] < -600) and np.all(decoded <= decoded[rows, first][:, None])
    with pytest.raises(ValueError, match="must be finite"):
        ec.encode_quantized_logits(np.array([[1.0, np.nan]], np.float32), 255)


def test_quantized_logits_narrow_rows_use_the_same_levels_everywhere() -> None:
    """Rows of fewer than 24 values: L levels in every row (no per-row level symbol)."""
    rng = np.random.default_rng(4)
    values = (rng.standard_exponential((200, 10)) * rng.uniform(0.3, 4, (200, 1))).astype(np.float16).astype(np.float32)
    decoded = ec.decode_quantized_logits(ec.encode_quantized_logits(values, 100)).astype(np.float64)
    v = values.astype(np.float64)
    top = v.max(axis=1, keepdims=True)
    q = np.maximum(np.rint(np.exp((v - top) / 2) * 100), 0.25)
    # one factor per row (the S correction) times the codes' squares on the one grid of 100 levels
    others = decoded < top
    ratio = np.where(others, np.exp(decoded - top) / np.square(q / 100), np.nan)
    spread = np.nanmax(ratio, axis=1) / np.nanmin(ratio, axis=1)
    np.testing.assert_allclose(spread[np.isfinite(spread)], 1.0, rtol=1e-5)


def test_quantized_logits_keep_float16_maxima_exact_and_float32_beyond() -> None:
    """float16 values: the maximum exact; maxima beyond float16's range: stored float32, exact."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=(64, 9)).astype(np.float16).astype(np.float32)
    decoded = ec.decode_quantized_logits(ec.encode_quantized_logits(values, 127))
    np.testing.assert_array_equal(decoded.max(axis=1), values.max(axis=1))
    big = values + np.float32(1e5)
    big[3, 2] = 1e5 + 70000.5  # a float32 maximum float16 cannot hold
    decoded = ec.decode_quantized_logits(ec.encode_quantized_logits(big, 127))
    np.testing.assert_array_equal(decoded.max(axis=1), big.max(axis=1))


def test_quantized_rows_decode_alike_in_any_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of many classes (flat and peaked) share a chunk's class streams: each decodes to what it
    decodes to alone, and the classes' streams make the chunk smaller than one stream would."""
    rng = np.random.default_rng(11)
    sharp = np.exp(rng.normal(0.5, 0.8, (1500, 1)))
    values = (rng.standard_exponential((1500, 30)) * sharp).astype(np.float32)
    whole = ec.decode_quantized_logits(data := ec.encode_quantized_logits(values, 200))
    for row in (0, 17, 150, 1499):
        np.testing.assert_array_equal(ec.decode_quantized_logits(ec.encode_quantized_logits(values[row:row + 1], 200))[0], whole[row])
    picked = rng.permutation(1500)[:40]
    np.testing.assert_array_equal(ec.decode_quantized_logits(ec.encode_quantized_logits(values[picked], 200)), whole[picked])
    classes = chunks._row_classes(np.rint(np.exp((values - values.max(1, keepdims=True)) / 2) * 200).astype(np.int64) + 1)
    assert len(np.unique(classes)) >= 5
    monkeypatch.setattr(chunks, "_CLASS_STEPS", 0)  # every row in class 0: one stream
    single = ec.encode_quantized_logits(values, 200)
    np.testing.assert_array_equal(ec.decode_quantized_logits(single), whole)
    assert len(data) < 0.95 * len(single)


def test_quantized_logits_single_column_and_empty() -> None:
    values = np.array([[1.5], [-3.25]], np.float32)
    np.testing.assert_array_equal(ec.decode_quantized_logits(ec.encode_quantized_logits(values, 255)), values)
    assert ec.decode_quantized_logits(ec.encode_quantized_logits(np.zeros((0, 4), np.float32), 255)).shape == (0, 4)


# -- zarr -------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, rows: int = 700) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    ids = _sorted_rows(rng, rows, 12, 70000).astype(np.int32)
    values = rng.normal(size=(rows, 12)).astype(np.float32)
    counts = np.zeros((rows, 12), np.uint8)
    counts[:, 0], counts[:, 1] = 7, 5
    specs = [ArraySpec("ids", "int32", (12,), codec="logit_cache.sorted_ids"),
             ArraySpec("values", "float32", (12,), codec="logit_cache.quantized_logits", codec_config=(("levels", 511),)),
             ArraySpec("counts", "uint8", (12,), codec="logit_cache.counts"),
             ArraySpec("plain", "float32", (), compress=True)]
    path = tmp_path / "shard.zarr"
    writer = get_backend("zarr").create(path, specs, 256, {"note": "test"}, {"ids": rows})
    arrays = {"ids": ids, "values": values, "counts": counts, "plain": values[:, 0].copy()}
    writer.append(arrays)
    writer.close()
    return path, arrays


def test_zarr_arrays_decode_through_the_codecs(tmp_path: Path) -> None:
    path, arrays = _write(tmp_path)
    meta = json.loads((path / "ids" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["logit_cache.sorted_ids", "crc32c"]
    assert json.loads((path / "values" / "zarr.json").read_text())["codecs"][0] == {
        "name": "logit_cache.quantized_logits", "configuration": {"levels": 511}}
    with get_backend("zarr").open(path) as reader:
        assert reader.checksummed("ids") and reader.checksummed("values")
        np.testing.assert_array_equal(reader.read("ids"), arrays["ids"])
        np.testing.assert_array_equal(reader.read("counts"), arrays["counts"])
        np.testing.assert_array_equal(reader.read("ids", 300, 310), arrays["ids"][300:310])  # inside a chunk, at the edge one
        values = reader.read("values")
    assert np.abs(values - arrays["values"]).max() < 1.0  # quantized, but the same entries (bounds: test above)
    group = zarr.open_group(str(path), mode="r")
    assert all(isinstance(c, Crc32cCodec) for c in group["ids"].metadata.codecs[1:])
    np.testing.assert_array_equal(group["ids"][650:700], arrays["ids"][650:700])


def test_hdf5_refuses_entropy_arrays(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="the entropy encoding is Zarr only"):
        get_backend("hdf5").create(tmp_path / "s.h5", [ArraySpec("ids", "int32", (4,), codec="logit_cache.sorted_ids")], 256, {})


def test_a_fresh_interpreter_reads_through_the_entry_points(tmp_path: Path) -> None:
    """Only zarr imported by the reading code: zarr loads the codec classes from the zarr.codecs entry points."""
    path, arrays = _write(tmp_path)
    script = textwrap.dedent(f"""
        import sys, numpy as np, zarr
        group = zarr.open_group({str(path)!r}, mode="r")
        np.save(sys.argv[1], group["ids"][:])
        print(group["counts"][:2].tolist())
        print("torch imported:", "torch" in sys.modules)  # the codecs need numpy and zarr only
    """)
    out = tmp_path / "ids.npy"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(out), arrays["ids"])
    assert done.stdout.splitlines() == [str(arrays["counts"][:2].tolist()), "torch imported: False"]


def test_unknown_codec_names_the_package(tmp_path: Path) -> None:
    """What a zarr user without logit-cache sees: the codec's name, which says what to install."""
    path, _ = _write(tmp_path)
    meta = json.loads((path / "ids" / "zarr.json").read_text())
    meta["codecs"][0]["name"] = "logit_cache.not_installed"
    (path / "ids" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(UnknownCodecError, match=r"Unknown codec: 'logit_cache\.not_installed'"):
        zarr.open_group(str(path), mode="r")["ids"]


def test_damaged_chunks_fail_their_checksum(tmp_path: Path) -> None:
    path, _ = _write(tmp_path)
    chunk = path / "values" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit in the coded sections
    chunk.write_bytes(bytes(data))
    with get_backend("zarr").open(path) as reader:
        np.testing.assert_array_equal(reader.read("values", 0, 256), reader.read("values", 0, 256))  # chunk 0 intact
        with pytest.raises(CorruptShardError, match=r"array 'values' chunk 1 \(rows 256:512\) cannot be read: it fails its checksum"):
            reader.read("values")
    with pytest.raises(Exception, match=r"(?i)checksum|crc"):
        zarr.open_group(str(path), mode="r")["values"][:]


def test_other_layout_versions_are_refused_by_name() -> None:
    """The earlier layouts (b"LCE1": ANS streams; b"LCE2": values with their own tail sum, never released)
    and foreign bytes: a clear error, never a decode."""
    data = ec.encode_sorted_ids(np.array([[1, 5, 9]]))
    assert data[:4] == b"LCE3"
    for old in (b"LCE1", b"LCE2"):
        with pytest.raises(ValueError, match=rf"layout version {old!r}; this logit-cache reads b'LCE3' only \(rewrite the cache"):
            ec.decode_sorted_ids(old + data[4:])
        with pytest.raises(ValueError, match=rf"layout version {old!r}"):
            ec.decode_quantized_logits(old + ec.encode_quantized_logits(np.ones((2, 3), np.float32), 63)[4:])
    with pytest.raises(ValueError, match=r"not an entropy-coded logit-cache chunk \(it starts b'\\x00\\x01"):
        ec.decode_quantized_logits(bytes([0, 1, 2, 3]) + data[4:])
    with pytest.raises(ValueError, match="ends before its sections do"):
        ec.decode_sorted_ids(ec.encode_sorted_ids(_sorted_rows(np.random.default_rng(0), 50, 8, 70000))[:-2])


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_raw_bits_round_trip(seed: int) -> None:
    """Fields of 0..56 bits at every bit offset, against a bit-by-bit packing done here."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 57, 3000)
    bits[:20] = 0
    bits[-5:] = 56
    values = np.array([int(rng.integers(0, 1 << int(b))) if b else 0 for b in bits], np.int64)
    stream = "".join(format(int(v), f"0{int(b)}b")[::-1] for v, b in zip(values, bits, strict=True) if b)  # LSB first
    stream += "0" * (-len(stream) % 8)
    expected = bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))
    packed = ec.pack_bits(values, bits)
    assert packed == expected
    np.testing.assert_array_equal(ec.unpack_bits(packed, bits), values)
    with pytest.raises(ValueError, match="raw bits do not match"):
        ec.unpack_bits(packed + b"\0", bits)
