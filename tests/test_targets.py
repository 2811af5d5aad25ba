"""Encoding against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logit_cache.targets import encode, index_dtype, topk_mass


def test_topk_encoding_matches_numpy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    enc = encode(logits, "topk", 7, "float32")
    ref = logits.double().numpy()
    order = np.argsort(-ref, axis=1)[:, :7]
    np.testing.assert_array_equal(enc.arrays["topk_indices"].numpy(), order)
    np.testing.assert_array_equal(enc.arrays["topk_logits"].numpy(), np.take_along_axis(ref, order, 1).astype(np.float32))
    lse = np.log(np.exp(ref).sum(1))
    np.testing.assert_allclose(enc.arrays["logsumexp"].numpy(), lse, rtol=1e-6)
    mass = np.exp(np.take_along_axis(ref, order, 1) - lse[:, None]).sum(1)
    np.testing.assert_allclose(enc.topk_mass.item(), mass.sum(), rtol=1e-5)
    np.testing.assert_allclose(topk_mass(enc.arrays["topk_logits"], enc.arrays["logsumexp"]).numpy(), mass, rtol=1e-5)
    assert not enc.nonfinite.any() and not enc.overflow.any()


def test_topk_with_k_equal_classes_keeps_all_mass():
    logits = torch.randn(8, 5)
    enc = encode(logits, "topk", 5, "float32")
    np.testing.assert_allclose(topk_mass(enc.arrays["topk_logits"], enc.arrays["logsumexp"]).numpy(), 1.0, rtol=1e-6)


def test_full_encoding_and_bad_rows():
    logits = torch.randn(6, 4)
    logits[2, 1] = float("nan")
    logits[4, 0] = float("inf")
    logits[5, 3] = 70000.0  # finite, but beyond float16
    enc = encode(logits, "full", None, "float16")
    assert enc.arrays["logits"].dtype == torch.float16
    assert enc.nonfinite.tolist() == [False, False, True, False, True, False]
    assert enc.overflow.tolist() == [False, False, False, False, False, True]
    enc32 = encode(logits, "full", None, "float32")
    assert not enc32.overflow.any()


def test_index_dtype_never_wraps():
    assert index_dtype(10) == np.uint16 and index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.int32
    ids = np.array([65535, 40000], dtype=index_dtype(65536))
    assert ids.tolist() == [65535, 40000]


def test_large_vocab_ids_survive():
    logits = torch.full((2, 70000), -5.0)
    logits[0, 69999] = 10.0
    logits[1, 40000] = 10.0
    enc = encode(logits, "topk", 1, "float16")
    ids = enc.arrays["topk_indices"].numpy().astype(index_dtype(70000))
    assert ids[:, 0].tolist() == [69999, 40000]


@pytest.mark.parametrize("k", [0, 6])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        encode(torch.randn(2, 5), "topk", k, "float16")


def test_topk_overflow_looks_only_at_stored_values():
    logits = torch.zeros(3, 6)
    logits[0, 5] = -70000.0  # beyond float16, but not among the top-2: nothing stored overflows
    logits[1, 2] = 70000.0  # stored, and beyond float16
    logits[2, 4] = float("-inf")  # not finite, wherever it is
    enc = encode(logits, "topk", 2, "float16")
    assert enc.overflow.tolist() == [False, True, False]
    assert enc.nonfinite.tolist() == [False, False, True]
