"""The three process-wide generators a replayed item may draw from: seed, snapshot, restore, detect a draw.

:func:`~.replay.replay_items` seeds torch's CPU generator, numpy's global ``RandomState`` and Python's
``random`` from ``(seed, index, view)`` before each item, and puts the caller's states back after the
batch. On a small augmented item (~45 us) that bookkeeping is most of the replay's cost, so each
step here takes the cheapest path that leaves the generator in the *same* state as the obvious one:

- torch: ``torch.default_generator.manual_seed`` (``torch.manual_seed`` also seeds every CUDA device,
  ~100x dearer) and the generator's own ``get_state``/``set_state``.
- numpy: ``np.random.seed`` and ``get_state``/``set_state`` (~60-90 us each, once a batch: ~2 us an
  item at batch 64; reading the bit generator's struct through ctypes would save that, at the price of
  depending on numpy's private layout).
- Python: ``random.seed``/``getstate``/``setstate`` (nothing cheaper is public).

Detecting a draw (:func:`arm`, :func:`drew`): a generator the batch does not seed is put in a fixed
state (its canary) first and compared with it after the batch; any draw advances an MT19937 (or fills
a cached normal), so an unchanged state means no item drew from it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

#: The generators, in the order of :func:`~.replay.item_seeds`' words.
NAMES = ("torch", "numpy", "random")
ALL = frozenset(range(len(NAMES)))
#: The seed a generator left unseeded is put in for the batch, to tell afterwards whether an item drew.
CANARY_SEED = 0x5EED

_TORCH = torch.default_generator


#: Per generator: seed(word), snapshot(), restore(snapshot).
SEEDERS: tuple[Callable[[int], Any], ...] = (_TORCH.manual_seed, np.random.seed, random.seed)
_SNAPSHOT = (_TORCH.get_state, np.random.get_state, random.getstate)
_RESTORE = (_TORCH.set_state, np.random.set_state, random.setstate)
_canary: dict[int, Any] = {}  # each generator's state in its canary state, computed once


def snapshot() -> list[Any]:
    """The three generators' states, to :func:`restore` after a batch."""
    return [get() for get in _SNAPSHOT]


def restore(states: list[Any]) -> None:
    """Put the three generators back to a :func:`snapshot`."""
    for put, state in zip(_RESTORE, states, strict=True):
        put(state)


def _token(k: int) -> Any:
    """Generator ``k``'s state, in the form :func:`drew` compares."""
    return _SNAPSHOT[k]()


def arm(unseeded: frozenset[int]) -> dict[int, Any]:
    """Put each generator of ``unseeded`` in its canary state, to tell afterwards whether anything drew from it
    (:func:`drew`); an item that reads one without drawing sees a fixed state, not the caller's."""
    tokens: dict[int, Any] = {}
    for k in sorted(unseeded):
        SEEDERS[k](CANARY_SEED)
        if k not in _canary:
            _canary[k] = _token(k)
        tokens[k] = _canary[k]
    return tokens


def drew(tokens: dict[int, Any]) -> frozenset[int]:
    """The generators :func:`arm` put in their canary states that have left them: something drew from them."""
    moved = []
    for k, token in tokens.items():
        now = _token(k)
        if k == 0:
            same = torch.equal(token, now)
        elif k == 1:  # ("MT19937", key, pos, has_gauss, gauss)
            same = token[0] == now[0] and token[2:] == now[2:] and np.array_equal(token[1], now[1])
        else:
            same = token == now
        if not same:
            moved.append(k)
    return frozenset(moved)
