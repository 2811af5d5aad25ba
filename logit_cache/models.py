"""Small built-in architectures for the digits demo, the tests and the benchmarks.

They are ordinary ``nn.Module`` factories, usable as ``--arch logit_cache.models:digits_mlp``.
Inputs are images ``(B, 1, 8, 8)`` (or anything that flattens to ``in_features``).
"""

from __future__ import annotations

from torch import nn


def digits_mlp(in_features: int = 64, hidden: int = 256, num_classes: int = 10, depth: int = 2) -> nn.Module:
    """An MLP classifier: Flatten, ``depth`` hidden layers of width ``hidden`` with ReLU, a linear head.

    The defaults make a teacher that reaches about 97% test accuracy on digits in a few seconds;
    ``hidden=32, depth=1`` makes a student about 20x smaller.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
