"""Encoding in the logits' own dtype, a chunk of rows at a time (targets/encoded.py): the same arrays as
encoding float32 copies of the same values (and as the float32 encoder before it, kept here as the
reference), bad rows still flagged, the overflow check kept, and no float32 copy of the whole block."""

from __future__ import annotations

import pytest
import torch
from data_factories import LargestFloat32

from logit_cache.targets import encoded as encoded_module
from logit_cache.targets import get_kind
from logit_cache.targets.batch import encode

K, M = 7, 20


def logits(rows: int = 24, classes: int = 500, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * scale


def reference_topk(raw: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The float32 encoder before this one: topk and logsumexp of a float32 copy."""
    wide = raw.float()
    values, ids = torch.topk(wide, k, dim=1)
    return {"topk_logits": values, "topk_indices": ids.to(torch.int32), "logsumexp": torch.logsumexp(wide, 1)}


def reference_sampled(raw: torch.Tensor, m: int, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws as the encoder made them before (softmax of a float32 copy, bad rows zeroed first), uniqued."""
    wide = raw.float()
    finite = torch.isfinite(wide).all(dim=1)
    scaled = torch.where(finite[:, None], wide / temperature, torch.zeros_like(wide))
    draws = torch.multinomial(torch.softmax(scaled, 1), m, replacement=True, generator=torch.Generator().manual_seed(seed))
    return draws.sort(dim=1).values, finite


def test_float32_topk_equals_the_float32_reference() -> None:
    raw = logits()
    got = get_kind("topk").encode(raw, K, "float32").arrays
    want = reference_topk(raw, K)
    assert torch.equal(got["topk_logits"], want["topk_logits"]) and torch.equal(got["topk_indices"], want["topk_indices"])
    assert torch.allclose(got["logsumexp"], want["logsumexp"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("store", ["float16", "float32"])
def test_narrow_logits_encode_as_their_float32_values(dtype: torch.dtype, store: str) -> None:
    narrow = logits().to(dtype)
    wide = narrow.float()  # the same values, exactly
    for mode, width in (("topk", K), ("full", None), ("sampled", M)):
        a = encode(narrow, mode, width, store, m=width, generator=torch.Generator().manual_seed(1))
        b = encode(wide, mode, width, store, m=width, generator=torch.Generator().manual_seed(1))
        assert set(a.arrays) == set(b.arrays)
        for name in a.arrays:
            if name in ("logsumexp", "topk_log_tail"):  # summed over other chunkings of the same values: float32 rounding
                assert torch.allclose(a.arrays[name], b.arrays[name], rtol=1e-6, atol=1e-6), (mode, name)
            else:  # ids, counts and values exactly, draws included
                assert torch.equal(a.arrays[name], b.arrays[name]), (mode, name)
        assert torch.equal(a.nonfinite, b.nonfinite) and torch.equal(a.overflow, b.overflow)


def test_sampled_draws_are_unchanged() -> None:
    raw = logits(seed=2)
    raw[3, 7] = float("nan")
    for temperature in (1.0, 2.0):
        got = get_kind("sampled").encode(raw, M, "float32", sample_temperature=temperature, generator=torch.Generator().manual_seed(9))
        ordered, finite = reference_sampled(raw, M, temperature, 9)
        assert torch.equal(got.nonfinite, ~finite)
        counts = got.arrays["sampled_counts"].long()
        ids = got.arrays["sampled_indices"].long()
        for row in torch.nonzero(finite).squeeze(1).tolist():  # the unique ids with their counts are the sorted draws
            expanded = torch.repeat_interleave(ids[row], counts[row])
            assert torch.equal(expanded, ordered[row]), row
        assert torch.allclose(got.arrays["logsumexp"][finite], torch.logsumexp(raw[finite], 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["topk", "full", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bad_rows_are_flagged(mode: str, dtype: torch.dtype) -> None:
    raw = logits(rows=8, classes=60)
    raw[1, 4] = float("nan")
    raw[3, 10] = float("inf")
    raw[5, 20] = float("-inf")  # outside any top-k: only the row's min shows it
    raw[6] = float("-inf")
    raw = raw.to(dtype)
    width = {"topk": 3, "full": None, "sampled": 5}[mode]
    got = encode(raw, mode, width, "float32", m=width, generator=torch.Generator().manual_seed(0))
    assert got.nonfinite.tolist() == [False, True, False, True, False, True, True, False]
    assert not got.overflow.any()
    finite = ~got.nonfinite
    if mode != "full":
        assert torch.isfinite(got.arrays["logsumexp"][finite]).all()


def test_the_overflow_check_looks_at_stored_values() -> None:
    raw = logits(rows=4, classes=40)
    raw[0, 3] = 70000.0  # the top value does not fit float16
    raw[1, 5] = -70000.0  # outside the top-k: not stored by top-k, stored by full
    raw[2, 6] = 60000.0  # fits
    topk = get_kind("topk").encode(raw, 3, "float16")
    assert topk.overflow.tolist() == [True, False, False, False] and not topk.nonfinite.any()
    full = get_kind("full").encode(raw, None, "float16")
    assert full.overflow.tolist() == [True, True, False, False]
    assert not get_kind("topk").encode(raw, 3, "float32").overflow.any()
    for dtype in (torch.bfloat16, torch.float32):  # bfloat16 reaches 3e38: the same check
        assert get_kind("topk").encode(raw.to(dtype), 3, "float16").overflow.tolist() == [True, False, False, False]


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_chunking_does_not_change_a_row(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    raw = logits(rows=23, classes=300)
    width = K if mode == "topk" else M
    whole = encode(raw, mode, width, "float32", m=width, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(encoded_module, "CPU_CHUNK_ELEMENTS", 300 * 4)  # 4 rows a chunk, the last one 3
    assert encoded_module.chunk_rows(raw) == 4
    parts = encode(raw, mode, width, "float32", m=width, generator=torch.Generator().manual_seed(0))
    for name in whole.arrays:
        assert torch.equal(whole.arrays[name], parts.arrays[name]), name


def test_topk_makes_no_float32_copy_of_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = logits(rows=64, classes=1000).to(torch.bfloat16)
    monkeypatch.setattr(encoded_module, "CPU_CHUNK_ELEMENTS", 8 * 1000)
    with LargestFloat32() as tracker:
        get_kind("topk").encode(raw, K, "float16")
    assert 0 < tracker.largest <= 8 * 1000  # one chunk of 8 rows, not 64
    with LargestFloat32() as tracker:
        get_kind("full").encode(raw, None, "float32")
    assert tracker.largest == 64 * 1000  # the stored block itself, and nothing else as large before it
