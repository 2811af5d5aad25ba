"""Per-token encoding: a right-padded batch of sequences' logits (B, T, V) to one encoded row per
real token, a bounded chunk of tokens at a time (float32 work stays bounded for any T and V)."""

from __future__ import annotations

import torch

from .encoded import EncodedBatch, concat_encoded
from .registry import get_kind

#: Per-token dumps encode at most this many tokens' logits at a time on the device: with a vocabulary
#: of 250k, a float32 [1024, V] is 1 GB; the teacher's own [B, T, V] output is the only larger tensor.
TOKEN_CHUNK = 1024


def sample_seed(seed: int | None, index: int) -> int:
    """The generator seed of a drawing kind (sampled) for dataset item ``index``: draws depend on the
    item, not on the batch it falls in, so resumed, multi-rank and differently batched dumps draw the same ids.

    32 bits: torch's CPU generator keeps only the low 32 bits of a seed. Items get distinct seeds
    (up to 2^32 of them); the dump's seed shifts them all by a large odd multiple."""
    return (index + (seed or 0) * 0x9E3779B1) & 0xFFFFFFFF


def encode_tokens(logits: torch.Tensor, lengths: list[int], indices: list[int], mode: str, width: int | None, dtype: str, *,
                  seed: int | None = None, sample_temperature: float = 1.0) -> EncodedBatch:
    """Encode the real tokens of a right-padded batch, (B, T, V) -> rows (sum(lengths), ...), a
    chunk of at most TOKEN_CHUNK tokens at a time; ``indices`` are the sequences' dataset indices.

    Kinds that draw (sampled) go sequence by sequence, each with its own generator seeded by
    :func:`sample_seed` (draws independent of the batching). Others encode the padded (B * T, V) view
    in chunks (a few large operations instead of a few per sequence), then keep the real tokens' rows.
    ``dtype`` is the dtype values leave the device in (``kind.device_value_dtype``).
    """
    kind = get_kind(mode)
    if kind.draws:
        parts = []
        for row, (length, index) in enumerate(zip(lengths, indices, strict=True)):
            tokens = logits[row, :length]  # (L, V), a view
            generator = torch.Generator(device=logits.device).manual_seed(sample_seed(seed, index))
            for start in range(0, length, TOKEN_CHUNK):
                parts.append(kind.encode(tokens[start : start + TOKEN_CHUNK], width, dtype,
                                         sample_temperature=sample_temperature, generator=generator))
        return concat_encoded(parts)
    batch, steps, vocab = logits.shape
    flat = logits.reshape(batch * steps, vocab)  # a view: no copy
    encoded = concat_encoded([kind.encode(flat[start : start + TOKEN_CHUNK], width, dtype)
                              for start in range(0, len(flat), TOKEN_CHUNK)])
    if sum(lengths) == batch * steps:  # no padding
        return encoded
    real = torch.arange(steps, device=logits.device)[None, :] < torch.tensor(lengths, device=logits.device)[:, None]
    keep = real.reshape(-1).nonzero().squeeze(1)  # (N,) rows of the real tokens, b-major
    arrays = {name: tensor.index_select(0, keep) for name, tensor in encoded.arrays.items()}
    mass = kind.row_mass(arrays, len(keep), logits)
    return type(encoded)(arrays, encoded.nonfinite.index_select(0, keep), encoded.overflow.index_select(0, keep), mass)
