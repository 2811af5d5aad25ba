"""The old token-level trainer's module (``logit_cache.train_lm``). Its loop is now the one loop of
:mod:`.loop`, with the language-model task of :mod:`.tasks`; its names stay importable from here."""

from __future__ import annotations

from .evaluation import evaluate_tokens  # moved to train/evaluation.py
from .tasks import LanguageModel

#: Language models distil at T=1 unless told otherwise (moved to ``tasks.LanguageModel.default_temperature``).
LM_TEMPERATURE = LanguageModel.default_temperature

__all__ = ["LM_TEMPERATURE", "evaluate_tokens"]
