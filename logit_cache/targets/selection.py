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

#: Columns per block. 64 measured best at C = 32k and 131k, k = 64 (32 and 128 within noise or slower).
BLOCK = 64
#: The blocked path is taken when the chosen blocks are at most this fraction of the row: below it,
#: one ``torch.topk`` is as fast or faster (measured at C = 1,000, k = 10: blocked 2x slower).
MAX_CANDIDATE_FRACTION = 0.25


def blocked(logits: torch.Tensor, k: int) -> bool:
    """Whether :func:`block_topk` is the faster selection of k from ``logits`` [B, C]: measured on CPUs for
    float32/float64 rows (bfloat16 reductions there cost ~3x float32's, and on accelerators ``torch.topk``
    is a radix select whose cost has not been measured against this)."""
    wide_enough = k * BLOCK <= MAX_CANDIDATE_FRACTION * logits.shape[1]
    return wide_enough and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)


def _block_maxima(logits: torch.Tensor, full: int) -> torch.Tensor:
    """Each block's max [B, ceil(C / BLOCK)] in the logits' dtype (exact); the last block may be short."""
    columns = logits.shape[1]
    head = logits[:, :full].unflatten(1, (full // BLOCK, BLOCK)).amax(dim=2)
    if full == columns:
        return head
    return torch.cat([head, logits[:, full:].amax(dim=1, keepdim=True)], dim=1)


def block_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row of ``logits`` [B, C], descending (``values`` [B, k] in the logits'
    dtype, ``ids`` [B, k] int64): ``torch.topk(logits, k, dim=1)``'s values, from one ``amax`` pass
    and two small ``torch.topk`` calls. A row holding NaN has it first (``amax`` propagates NaN, and
    ``torch.topk`` puts NaN first), as ``torch.topk`` does.
    """
    columns = logits.shape[1]
    block_max = _block_maxima(logits, columns - columns % BLOCK)
    _, chosen = torch.topk(block_max, min(k, block_max.shape[1]), dim=1, sorted=False)  # (B, k) block ids
    columns_of = (chosen[:, :, None] * BLOCK + torch.arange(BLOCK, device=logits.device)).flatten(1)  # (B, k * BLOCK)
    candidates = torch.gather(logits, 1, columns_of.clamp(max=columns - 1))
    candidates.masked_fill_(columns_of >= columns, float("-inf"))  # the short last block's missing columns
    values, where = torch.topk(candidates, k, dim=1, largest=True, sorted=True)
    return values, torch.gather(columns_of, 1, where)
