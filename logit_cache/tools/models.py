"""Small built-in architectures for the digits demo, the tests and the benchmarks.

They are ordinary ``nn.Module`` factories, usable as ``--arch logit_cache.models:digits_mlp``.
Inputs are images ``(B, 1, 8, 8)`` (or anything that flattens to ``in_features``).
"""

from __future__ import annotations

from typing import Any

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


class TinyCausalLM(nn.Module):
    """A small GPT-style causal transformer over token ids: (B, T) ids -> (B, T, vocab) logits.

    Learned positions, pre-norm blocks of ``torch.nn.TransformerEncoderLayer`` with a causal mask,
    a tied-free linear head. Small enough to train on the CPU in a minute for the byte-level demo.
    """

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, max_len: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        import torch

        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: Any, attention_mask: Any = None) -> Any:
        import torch

        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_len={self.max_len}")
        hidden = self.embed(input_ids) + self.position[:length]  # (B, T, d)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device, dtype=hidden.dtype)
        hidden = self.blocks(hidden, mask=causal, is_causal=True)  # right padding needs no mask: causal attention never sees it
        return self.head(self.norm(hidden))  # (B, T, V)


def tiny_lm(vocab_size: int = 256, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, max_len: int = 256) -> nn.Module:
    """:class:`TinyCausalLM`, as an ``--arch``/``--student`` factory (``logit_cache.models:tiny_lm``)."""
    return TinyCausalLM(vocab_size, d_model, n_layers, n_heads, max_len)
