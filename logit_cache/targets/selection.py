"""Top-k selection over wide rows (vocabularies of 10^4 to 10^5) at a fraction of ``torch.topk``'s cost.

Why: a top-k encoding reads the logits twice, once to select and once for the exp-sums that give the
logsumexp and the tail (``encoded.exp_sums``); with ``torch.topk`` as the selection it cost ~2x one
``torch.topk`` on a CPU (issue 13 asks for <= 1.5x). The k largest logits of a row lie in the k
blocks of ``BLOCK`` columns with the largest maxima: if t is the row's k-th largest value, every block
holding one of the top k has max >= t, and if more than k blocks have max >= t, any k of them still
hold k values >= t and every value > t. So one ``amax`` pass (block maxima, exact in any dtype), a
``torch.topk`` over the [B, C / BLOCK] maxima and one over the k·BLOCK logits of the chosen blocks
give the same values as ``torch.topk`` over [B, C].

Ties: where logits tie at the k-th value, which of the tied ids is kept may differ from
``torch.topk``'s choice (itself unspecified, and different between devices); either is a top k.
"""

from __future__ import annotations

import torch

#: Columns per block: 64 and 32 measured alike at C = 131k, k = 64; 16 and 128 slower.
BLOCK = 64
#: The blocked path is taken when the chosen blocks are at most this fraction of the row. Measured on 2
#: cores, encoding [1024, C] at k = 64 against one torch.topk: C = 131,072 1.9x -> 1.45x, 65,536 1.8x -> 1.5x,
#: 32,768 and 50,257 within noise of the plain path (1.6-2.0x both), C = 1,000 at k = 10 2x slower.
MAX_CANDIDATE_FRACTION = 1 / 16


def blocked(logits: torch.Tensor, k: int) -> bool:
    """Whether :func:`block_topk` is the faster selection of k from ``logits`` [B, C]: measured on CPUs for
    float32/float64 rows (bfloat16 reductions there cost ~3x float32's, and on accelerators ``torch.topk``
    is a radix select whose cost has not been measured against this)."""
    wide_enough = k * BLOCK <= MAX_CANDIDATE_FRACTION * logits.shape[1]
    return wide_enough and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)


def block_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row of ``logits`` [B, C], descending (``values`` [B, k] in the logits'
    dtype, ``ids`` [B, k] int64): ``torch.topk(logits, k, dim=1)``'s values, from one ``amax`` pass
    and two small ``torch.topk`` calls. A row holding NaN has it first (``amax`` propagates NaN, and
    ``torch.topk`` puts NaN first), as ``torch.topk`` does.

    Only whole blocks compete; the last ``C % BLOCK`` columns join every row's candidates as they are
    (the argument above holds for the top k among the whole blocks' columns, a superset of what the
    row's top k takes from them).
    """
    columns = logits.shape[1]
    full = columns - columns % BLOCK
    if full == 0:
        return torch.topk(logits, k, dim=1, largest=True, sorted=True)
    blocks = logits[:, :full].unflatten(1, (full // BLOCK, BLOCK))  # a view
    picked = min(k, full // BLOCK)
    _, chosen = torch.topk(blocks.amax(dim=2), picked, dim=1, sorted=False)  # (B, picked) block ids
    candidates = torch.gather(blocks, 1, chosen[:, :, None].expand(-1, -1, BLOCK)).flatten(1)  # (B, picked * BLOCK)
    if full < columns:
        candidates = torch.cat([candidates, logits[:, full:]], dim=1)
    values, where = torch.topk(candidates, k, dim=1, largest=True, sorted=True)
    in_blocks = where < picked * BLOCK
    block_ids = torch.gather(chosen, 1, (where // BLOCK).clamp(max=picked - 1)) * BLOCK + where % BLOCK
    return values, torch.where(in_blocks, block_ids, where - picked * BLOCK + full)
