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

import functools

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


@functools.lru_cache(maxsize=16)
def _schedule(entropy_words: int, count: int) -> tuple[np.ndarray, ...]:
    """The hash constants of the whole computation as (rows, 1) columns, for ``entropy_words`` words in and ``count`` out.

    ``hashmix`` call ``t`` xors with ``c[t]`` and multiplies by ``c[t + 1]`` (the constant advances between the
    two), and the calls come in a fixed order, so each step's constants are known before any data: returned are
    (xor, mul) for the pool's first hash, (xor, mul) for each mixing round (the round's own lane gets 0, 0: its
    result is discarded), (xor, mul) for the entropy beyond the pool, and (xor, mul) for the output words.
    """
    consts = [_INIT_A]
    for _ in range(_POOL_SIZE * _POOL_SIZE + _POOL_SIZE * max(0, entropy_words - _POOL_SIZE)):
        consts.append((consts[-1] * _MULT_A) & _MASK)
    column = lambda values: np.asarray(values, dtype=np.uint32)[:, None]  # noqa: E731
    steps = [column(consts[0:_POOL_SIZE]), column(consts[1 : _POOL_SIZE + 1])]
    call = _POOL_SIZE
    for src in range(_POOL_SIZE):  # lane dst != src takes the next constant, in lane order
        xor, mul = [0] * _POOL_SIZE, [0] * _POOL_SIZE
        for dst in range(_POOL_SIZE):
            if dst != src:
                xor[dst], mul[dst] = consts[call], consts[call + 1]
                call += 1
        steps += [column(xor), column(mul)]
    for _ in range(_POOL_SIZE, entropy_words):
        steps += [column(consts[call : call + _POOL_SIZE]), column(consts[call + 1 : call + _POOL_SIZE + 1])]
        call += _POOL_SIZE
    out = [_INIT_B]
    for _ in range(count):
        out.append((out[-1] * _MULT_B) & _MASK)
    return (*steps, column(out[:count]), column(out[1:]))


def _hashmix(values: np.ndarray, xor: np.ndarray, mul: np.ndarray) -> np.ndarray:
    out = values ^ xor  # (n,) or (rows, n) against (rows, 1): one row per hashmix call
    out *= mul
    out ^= out >> np.uint32(_XSHIFT)
    return out


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    result = np.uint32(_MIX_MULT_L) * x
    result -= np.uint32(_MIX_MULT_R) * y
    result ^= result >> np.uint32(_XSHIFT)
    return result


def batch_seed_words(seed: int, indices: np.ndarray, views: np.ndarray, count: int = 3) -> np.ndarray:
    """``SeedSequence([seed, i, v]).generate_state(count, uint32)`` for every ``(i, v)``: (n, count) uint32.

    ``indices`` and ``views`` below 2**32 (one entropy word each, as every dataset index is). The
    pool's four lanes are one (4, n) array and a mixing round hashes its lane into the three others at
    once: ~40 numpy calls a batch instead of ~150, which is what counts for a batch of 64 (~1 us an item).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    views = np.asarray(views, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() > _MASK or views.min() < 0 or views.max() > _MASK):
        raise ValueError("replay indices and views must lie in [0, 2**32)")
    n = len(indices)
    seed_words = _words(int(seed))
    entropy = np.zeros((max(len(seed_words) + 2, _POOL_SIZE), n), dtype=np.uint32)  # lanes past the entropy hash 0
    entropy[: len(seed_words)] = np.asarray(seed_words, dtype=np.uint32)[:, None]
    entropy[len(seed_words)], entropy[len(seed_words) + 1] = indices, views
    steps = _schedule(len(entropy), count)
    with np.errstate(over="ignore"):
        pool = _hashmix(entropy[:_POOL_SIZE], steps[0], steps[1])
        for src in range(_POOL_SIZE):  # numpy: for dst != src: pool[dst] = mix(pool[dst], hashmix(pool[src]))
            kept = pool[src]  # the round's own lane does not change (_mix returns a new pool: this view stays valid)
            pool = _mix(pool, _hashmix(kept, steps[2 + 2 * src], steps[3 + 2 * src]))
            pool[src] = kept
        for k, src in enumerate(range(_POOL_SIZE, len(entropy))):  # entropy past the pool: into every lane
            pool = _mix(pool, _hashmix(entropy[src], steps[10 + 2 * k], steps[11 + 2 * k]))
        out = _hashmix(pool[np.arange(count) % _POOL_SIZE], steps[-2], steps[-1])
    return np.ascontiguousarray(out.T)
