"""Training a student: from a cache, from an online teacher, or from labels alone.

:mod:`.loop` is the one training loop; :mod:`.tasks` what differs between a classifier and a
language model; :mod:`.config` the options and the result; :mod:`.evaluation` the held-out metrics.
``logit_cache.train`` is also callable as the function it used to be (``train(config)`` is
:func:`train_student`).
"""

from __future__ import annotations

from .._legacy import callable_module
from .config import OPTIMIZERS, TrainConfig, TrainResult
from .evaluation import evaluate, evaluate_tokens
from .loop import train_student
from .tasks import Classification, LanguageModel, Task

#: The function's name before the package moved to subpackages.
train = train_student

__all__ = ["OPTIMIZERS", "Classification", "LanguageModel", "Task", "TrainConfig", "TrainResult", "evaluate", "evaluate_tokens", "train",
           "train_student"]

callable_module(__name__, train_student)
