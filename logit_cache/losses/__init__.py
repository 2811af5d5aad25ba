"""KD losses: per-sample (:mod:`.sample`, one distribution per row) and per-token (:mod:`.token`,
chunked over tokens for large vocabularies). Both read :class:`~logit_cache.targets.Targets`."""

from __future__ import annotations

from .sample import DEFAULT_TEMPERATURE, TAILS, DistillationLoss, KLDivergence, kd_loss, logits_targets
from .token import (
    TokenCrossEntropy,
    TokenKLDivergence,
    masked_token_logits,
    sampled_weights,
    token_kd_loss,
    token_loss_terms,
    trained_positions,
)

__all__ = [
    "DEFAULT_TEMPERATURE",
    "TAILS",
    "DistillationLoss",
    "KLDivergence",
    "TokenCrossEntropy",
    "TokenKLDivergence",
    "kd_loss",
    "logits_targets",
    "masked_token_logits",
    "sampled_weights",
    "token_kd_loss",
    "token_loss_terms",
    "trained_positions",
]
