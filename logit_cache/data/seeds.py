"""The replay seeds of a whole batch at once: numpy's ``SeedSequence`` hash, vectorised, bit for bit.

Replaying a view seeds the torch, numpy and Python generators from
``SeedSequence([seed, index, view]).generate_state(3)`` before each item (:mod:`.replay`). Built one
``SeedSequence`` at a time that hash costs ~20 us an item, a third of a small augmented item's own
cost. The hash mixes each item's words with constants that do not depend on the data, so one pass of
numpy uint32 arithmetic over the batch gives every item's words. It must stay bit-identical to
numpy's (caches dumped with views replay through it): ``tests/test_replay.py`` compares the two.

The algorithm is Melissa O'Neill's ``seed_seq`` hash as numpy's ``SeedSequence`` implements it:
entropy words mixed into a pool of 4, the pool hashed out into the requested words.
"""

from __future__ import annotations

import numpy as np

_MASK = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_POOL_SIZE = 4


def _words(value: int) -> list[int]:
    """An int as numpy coerces it to entropy: its 32-bit words, least significant first (0 is one word)."""
    if value < 0:
        raise ValueError(f"seeds are non-negative, got {value}")
    words = [value & _MASK]
    value >>= 32
    while value:
        words.append(value & _MASK)
        value >>= 32
    return words


class _Hash:
    """``hashmix`` with its running constant: the constant's sequence is the same for every item."""

    def __init__(self, init: int, mult: int) -> None:
        self.const, self.mult = init, mult

    def __call__(self, value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(self.const)
        self.const = (self.const * self.mult) & _MASK
        value = value * np.uint32(self.const)
        return value ^ (value >> np.uint32(_XSHIFT))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return result ^ (result >> np.uint32(_XSHIFT))


def batch_seed_words(seed: int, indices: np.ndarray, views: np.ndarray, count: int = 3) -> np.ndarray:
    """``SeedSequence([seed, i, v]).generate_state(count, uint32)`` for every ``(i, v)``: (n, count) uint32.

    ``indices`` and ``views`` below 2**32 (one entropy word each, as every dataset index is).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() > _MASK or views.min() < 0 or views.max() > _MASK):
        raise ValueError("replay indices and views must lie in [0, 2**32)")
    n = len(indices)
    entropy = [np.full(n, word, dtype=np.uint32) for word in _words(int(seed))]
    entropy += [indices.astype(np.uint32), views.astype(np.uint32)]
    with np.errstate(over="ignore"):
        hashmix = _Hash(_INIT_A, _MULT_A)
        zero = np.zeros(n, dtype=np.uint32)
        pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
        for src in range(_POOL_SIZE):
            for dst in range(_POOL_SIZE):
                if src != dst:
                    pool[dst] = _mix(pool[dst], hashmix(pool[src]))
        for src in range(_POOL_SIZE, len(entropy)):
            for dst in range(_POOL_SIZE):
                pool[dst] = _mix(pool[dst], hashmix(entropy[src]))
        out = _Hash(_INIT_B, _MULT_B)
        return np.stack([out(pool[i % _POOL_SIZE]) for i in range(count)], axis=1)
