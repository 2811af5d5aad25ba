"""Training a student: from a cache, from an online teacher, or from labels alone.

``logit_cache.train`` is also callable as the function it used to be (``train(config)`` is
:func:`train_student`).
"""

from __future__ import annotations

from .._legacy import callable_module
from .loop import OPTIMIZERS, TrainConfig, TrainResult, evaluate, train_student

#: The function's name before the package moved to subpackages.
train = train_student

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "evaluate", "train", "train_student"]

callable_module(__name__, train_student)
