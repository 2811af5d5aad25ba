"""Per-token encoding: a right-padded batch of sequences to one encoded row per real token, a bounded
chunk of tokens at a time (float32 work stays bounded for any T and V).

Two inputs give the same rows: the teacher's logits (B, T, V), or its last hidden states (B, T, H) with
the output head applied here per chunk of real tokens (``head``), so that no (B, T, V) tensor exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .encoded import EncodedBatch, concat_encoded
from .registry import get_kind

#: Per-token dumps encode at most this many tokens' logits at a time on the device: with a vocabulary
#: of 250k, a float32 [1024, V] is 1 GB. With a chunked head this bounds the logits held at any moment;
#: without one the teacher's own [B, T, V] output is the only larger tensor.
TOKEN_CHUNK = 1024


def sample_seed(seed: int | None, index: int) -> int:
    """The generator seed of a drawing kind (sampled) for dataset item ``index``: draws depend on the
    item, not on the batch it falls in, so resumed, multi-rank and differently batched dumps draw the same ids.

    32 bits: torch's CPU generator keeps only the low 32 bits of a seed. Items get distinct seeds
    (up to 2^32 of them); the dump's seed shifts them all by a large odd multiple."""
    return (index + (seed or 0) * 0x9E3779B1) & 0xFFFFFFFF


def encode_tokens(logits: torch.Tensor, lengths: list[int], indices: list[int], mode: str, width: int | None, dtype: str, *,
                  seed: int | None = None, sample_temperature: float = 1.0,
                  head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EncodedBatch:
    """Encode the real tokens of a right-padded batch, (B, T, V) -> rows (sum(lengths), ...), a
    chunk of at most TOKEN_CHUNK tokens at a time; ``indices`` are the sequences' dataset indices.

    With ``head`` (hidden rows (n, H) -> logits (n, V)), ``logits`` are the last hidden states (B, T, H)
    and the head runs per chunk of real tokens, each chunk encoded before the next is computed.

    Kinds that draw (sampled) go sequence by sequence, each with its own generator seeded by
    :func:`sample_seed` (draws independent of the batching); the draws of a sequence's chunk do not
    depend on how its logits were computed, so both inputs draw the same ids. Others encode the padded
    (B * T, V) view in chunks (a few large operations instead of a few per sequence), then keep the real
    tokens' rows. ``dtype`` is the dtype values leave the device in (``kind.device_value_dtype``).
    """
    if head is not None:
        return _encode_hidden(logits, head, lengths, indices, mode, width, dtype, seed, sample_temperature)
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
    keep = _real_rows(lengths, steps, logits.device)
    arrays = {name: tensor.index_select(0, keep) for name, tensor in encoded.arrays.items()}
    mass = kind.row_mass(arrays, len(keep), logits)
    return type(encoded)(arrays, encoded.nonfinite.index_select(0, keep), encoded.overflow.index_select(0, keep), mass)


def _real_rows(lengths: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """(N,) positions of the real tokens in the padded (B * T) rows, b-major."""
    real = torch.arange(steps, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return real.reshape(-1).nonzero().squeeze(1)


def _encode_hidden(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], lengths: list[int], indices: list[int],
                   mode: str, width: int | None, dtype: str, seed: int | None, sample_temperature: float) -> EncodedBatch:
    """:func:`encode_tokens` from hidden states: the real tokens' rows (N, H), then per block of at most
    TOKEN_CHUNK rows the head's logits, encoded piece by piece (the pieces :func:`encode_tokens` encodes
    from logits: per sequence chunks for drawing kinds, chunks of the real rows otherwise)."""
    kind = get_kind(mode)
    batch, steps, size = hidden.shape
    rows = hidden.reshape(batch * steps, size)
    if sum(lengths) != batch * steps:
        rows = rows.index_select(0, _real_rows(lengths, steps, hidden.device))  # (N, H): hidden size, not vocabulary
    parts: list[EncodedBatch] = []
    drawing: tuple[int, torch.Generator] | None = None  # the sequence being drawn for, and its generator
    for block_start, block_stop, pieces in _blocks(lengths, kind.draws):
        logits = head(rows[block_start:block_stop])  # (n <= TOKEN_CHUNK, V): the only logits alive
        for start, stop, sequence in pieces:
            chunk = logits[start - block_start : stop - block_start]
            if sequence is None:
                parts.append(kind.encode(chunk, width, dtype))
                continue
            if drawing is None or drawing[0] != sequence:  # on the logits' device: the head's, which may differ from the body's
                drawing = sequence, torch.Generator(device=chunk.device).manual_seed(sample_seed(seed, indices[sequence]))
            parts.append(kind.encode(chunk, width, dtype, sample_temperature=sample_temperature, generator=drawing[1]))
        chunk = logits = None  # a view keeps the block alive too: free it before the next block's product
    return concat_encoded(parts)


Piece = tuple[int, int, int | None]  # rows start, stop of the real rows; the sequence (drawing kinds)


def _blocks(lengths: list[int], per_sequence: bool) -> Iterator[tuple[int, int, list[Piece]]]:
    """Blocks of consecutive real rows ``(start, stop, pieces)``, each at most TOKEN_CHUNK rows, made of
    whole pieces ``(start, stop, sequence)``: chunks of TOKEN_CHUNK of each sequence when ``per_sequence``
    (sequence None otherwise: chunks of all real rows). Short sequences share a block, so the head runs
    a few large products instead of one per sequence."""
    if per_sequence:
        pieces: list[Piece] = []
        first = 0
        for sequence, length in enumerate(lengths):
            pieces += [(first + start, first + min(start + TOKEN_CHUNK, length), sequence) for start in range(0, length, TOKEN_CHUNK)]
            first += length
    else:
        total = sum(lengths)
        pieces = [(start, min(start + TOKEN_CHUNK, total), None) for start in range(0, total, TOKEN_CHUNK)]
    block: list[Piece] = []
    for piece in pieces:
        if block and piece[1] - block[0][0] > TOKEN_CHUNK:
            yield block[0][0], block[-1][1], block
            block = []
        block.append(piece)
    if block:
        yield block[0][0], block[-1][1], block
