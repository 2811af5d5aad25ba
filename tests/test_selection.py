"""Block-maxima top-k selection (targets/selection.py) against torch.topk, and the top-k encoding through it."""

from __future__ import annotations

import pytest
import torch

from logit_cache.targets.selection import BLOCK, block_topk, blocked
from logit_cache.targets.topk import KIND


def _check_topk(logits: torch.Tensor, k: int) -> None:
    values, ids = block_topk(logits, k)
    expected, _ = torch.topk(logits, k, dim=1)
    assert torch.equal(values, expected)  # the same values, descending
    assert torch.equal(logits.gather(1, ids), values)  # ids point at them
    assert all(len(set(row.tolist())) == k for row in ids)  # k distinct columns
    assert int(ids.min()) >= 0 and int(ids.max()) < logits.shape[1]


@pytest.mark.parametrize("columns", [BLOCK * 64, BLOCK * 64 + 1, BLOCK * 64 + BLOCK - 1, 50_257])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_values_equal_torch_topk(columns: int, k: int) -> None:
    generator = torch.Generator().manual_seed(columns * 31 + k)
    logits = torch.randn(9, columns, generator=generator) * 4
    _check_topk(logits, k)
    _check_topk(logits.double(), k)


def test_top_values_in_one_block_and_in_the_short_last_block() -> None:
    columns = BLOCK * 40 + 5
    logits = torch.randn(3, columns, generator=torch.Generator().manual_seed(1))
    logits[0, 64:80] += 50  # the whole top k in one block
    logits[1, -5:] += 50  # the short last block holds the top 5
    logits[2, ::BLOCK] += 50  # one top value in every block
    _check_topk(logits, 16)
    _, ids = block_topk(logits, 5)
    assert sorted(ids[1].tolist()) == list(range(columns - 5, columns))


def test_ties_keep_the_values_and_distinct_ids() -> None:
    logits = torch.randint(-3, 4, (6, BLOCK * 32), generator=torch.Generator().manual_seed(2)).float()
    _check_topk(logits, 20)  # hundreds of columns tie at the k-th value
    constant = torch.zeros(2, BLOCK * 16)
    _check_topk(constant, 8)


def test_nan_comes_first_as_in_torch_topk() -> None:
    logits = torch.randn(2, BLOCK * 16)
    logits[0, 300] = float("nan")
    values, ids = block_topk(logits, 4)
    assert torch.isnan(values[0, 0]) and int(ids[0, 0]) == 300
    assert torch.equal(values[1], torch.topk(logits[1:], 4, dim=1).values[0])


def test_taken_only_where_measured_faster() -> None:
    wide = torch.zeros(1, 131_072)
    assert blocked(wide, 64) and blocked(wide.double(), 64)
    assert not blocked(wide.bfloat16(), 64)  # bfloat16 reductions on a CPU: slower
    assert not blocked(torch.zeros(1, 1000), 10)  # narrow rows: torch.topk is faster
    assert not blocked(torch.zeros(1, 32_768), 64) and blocked(torch.zeros(1, 32_768), 32)


@pytest.mark.parametrize("k", [8, 64])
def test_topk_encoding_matches_a_float64_reference(k: int) -> None:
    columns = 70_001  # wide enough for the blocked path at both k, with a short last block
    logits = torch.randn(5, columns, generator=torch.Generator().manual_seed(k)) * 3
    logits[0, :k] += 40  # a confident row: the tail is ~1e-13 of the mass
    logits[3, 17] = float("-inf")
    assert blocked(logits, k)
    encoded = KIND.encode(logits, k, "float32")
    wide = logits.double()
    top, ids = torch.topk(wide, k, dim=1)
    assert torch.equal(encoded.arrays["topk_logits"].double(), top)
    mask = torch.ones_like(wide, dtype=torch.bool).scatter_(1, ids, False)
    lse = torch.logsumexp(wide, dim=1)
    tail = torch.logsumexp(wide.masked_fill(~mask, float("-inf")), dim=1) - lse
    finite = torch.tensor([True, True, True, False, True])
    assert torch.equal(encoded.nonfinite, ~finite)
    torch.testing.assert_close(encoded.arrays["logsumexp"].double()[finite], lse[finite], rtol=0, atol=1e-5)
    torch.testing.assert_close(encoded.arrays["topk_log_tail"].double()[finite], tail[finite], rtol=0, atol=1e-4)
