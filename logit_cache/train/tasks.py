"""What differs between training a classifier and a language model; the loop (:mod:`.loop`) is shared.

A :class:`Task` says how a collated batch becomes the student's outputs, the labels and the teacher's
targets that the loss compares, which losses those are, and how the student is evaluated:

* :class:`Classification`: one distribution per sample. Student logits (B, C); the ground truth is
  the cross-entropy against the labels, the KD loss :class:`~logit_cache.losses.KLDivergence`
  (full or top-k targets, one or several caches); evaluation is accuracy and the KL at T=1.
* :class:`LanguageModel`: one distribution per token. A batch is right-padded sequences
  (``tokens.collate_tokens``), student logits (B, T, V); position ``t`` predicts token ``t + 1``, so
  only the positions of :func:`~logit_cache.data.tokens.next_token_mask` count (the last token of a
  sequence and tokens before an ignored label, -100, count for neither loss), flattened to (N, V)
  rows that pair with the teacher's rows at the same positions (the teacher saw the same prefix).
  The KD loss is :class:`~logit_cache.losses.TokenKLDivergence` (full, top-k or sampled targets,
  in chunks of tokens: sparse targets never need a dense (tokens, V) float32 teacher distribution);
  evaluation is perplexity and the token KD loss at T=1.

Both mix their losses through :class:`~logit_cache.losses.DistillationLoss` (its KD and ground-truth
weights, and its KD window).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.datasets import ResolvedDataset, split_batch
from ..data.distributed import Dist
from ..data.loader import CachedDataset
from ..data.replay import preserved_rng
from ..data.tokens import collate_tokens, next_token_mask
from ..errors import TargetMismatchError, UsageError
from ..io.rows import TargetReader
from ..losses.sample import DEFAULT_TEMPERATURE, DistillationLoss, KLDivergence
from ..losses.token import TokenCrossEntropy, TokenKLDivergence, trained_positions
from ..teachers.runtime import run_model, to_device
from .config import TrainConfig
from .evaluation import cached_parts, evaluate, evaluate_tokens, plain_token_batch, token_parts


@dataclass
class Batch:
    """One training batch on the device: the student's inputs, the labels, the sequence lengths (token
    data) and the teacher's target (a cache's Targets, or the online teacher's; None without KD)."""

    inputs: Any
    labels: torch.Tensor | None
    lengths: torch.Tensor | None = None
    target: Any = None


class Task:
    """The task-specific parts of training (see the module docstring); subclasses fill them in."""

    #: The temperature without ``--temperature`` or a cache's recorded one.
    default_temperature: float = DEFAULT_TEMPERATURE
    #: What one item of the data set is, for messages.
    unit: str = "samples"
    #: ``collate_fn`` of the plain data (no cache); None: torch's default.
    plain_collate: Callable[[list[Any]], Any] | None = None
    #: Whether batches of one size can hold different numbers of loss rows (tokens): then, under DDP, each
    #: rank's mean loss is weighted by its share of the step's rows (see :mod:`.ddp`).
    rows_vary: bool = False

    def check(self, config: TrainConfig, data: ResolvedDataset, caches: list[TargetReader]) -> None:
        """Refuse options or caches this task cannot train with, before any work."""

    def check_eval(self, config: TrainConfig, eval_data: ResolvedDataset | None) -> None:
        """Refuse an evaluation data set this task cannot evaluate on."""

    def check_width(self, student: nn.Module, caches: list[TargetReader], data: ResolvedDataset, device: torch.device) -> None:
        """Fail before training if the student's output width is not the caches' class count."""
        first = self.first_inputs(data, caches)
        if first is None:
            return
        with torch.no_grad():
            width = run_model(student, to_device(first, device)).shape[-1]
        for cache in caches:
            if width != cache.num_classes:
                holds = self.classes.format(cache.num_classes)
                raise TargetMismatchError(f"the student has {width} outputs but {cache.path} holds {holds}")

    #: What a cache's class count is, for :meth:`check_width`'s message.
    classes: str = "targets over {} classes"

    def first_inputs(self, data: ResolvedDataset, caches: list[TargetReader]) -> Any:
        """The student's inputs for the first item, to read its output width (None: no check)."""
        raise NotImplementedError

    def batch(self, batch: Any, data: ResolvedDataset, cached: bool, device: torch.device) -> Batch:
        """A collated batch (from a cache's wrapper when ``cached``), moved to ``device``."""
        raise NotImplementedError

    def teacher_logits(self, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        """The online teacher's logits for ``batch``, one row per row the KD loss compares (float32)."""
        return run_model(teacher, batch.inputs).float()

    def outputs(self, logits: torch.Tensor, batch: Batch, kd: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any, int]:
        """The student's rows the losses compare, their labels, the teacher's rows (when ``kd``), and how many rows."""
        return logits, batch.labels, batch.target, len(logits)

    def ground_truth_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def kd_loss(self, config: TrainConfig, temperature: float) -> nn.Module:
        raise NotImplementedError

    def criterion(self, config: TrainConfig, temperature: float | None) -> nn.Module:
        """The ground-truth loss alone (labels only: ``temperature`` None), else the KD mix of ``config``'s weights."""
        if temperature is None:
            return self.ground_truth_loss()
        return DistillationLoss(self.kd_loss(config, temperature), config.kd_loss_weight, config.org_loss_weight,
                                config.kd_start, config.kd_end, ce_loss=self.ground_truth_loss())

    def evaluate(self, student: nn.Module, data: ResolvedDataset, device: torch.device,
                 cache: CachedDataset | None, ranks: Dist | None = None) -> dict[str, float]:
        raise NotImplementedError

    def record(self, seen: int) -> dict[str, Any]:
        """Fields of an epoch's record beyond the loss and the times (``seen``: rows the loss averaged)."""
        return {}

    def describe(self, record: dict[str, Any]) -> str:
        """The evaluation metrics of an epoch's record, for its log line."""
        return ""


class Classification(Task):
    """One teacher distribution per sample (module docstring)."""

    def check(self, config: TrainConfig, data: ResolvedDataset, caches: list[TargetReader]) -> None:
        if config.org_loss_weight and config.source != "labels" and not data.has_labels:
            raise UsageError(f"--dataset {config.dataset!r} has no labels: set --org-loss-weight 0 to train on the teacher alone")
        if config.labels_only and not data.has_labels:
            raise UsageError(f"--labels-only needs labels, but --dataset {config.dataset!r} has none")

    def first_inputs(self, data: ResolvedDataset, caches: list[TargetReader]) -> Any:
        if not caches:
            return None
        with preserved_rng():  # reading item 0 must not shift the augmentation's random draws
            return split_batch(torch.utils.data.default_collate([data.dataset[0]]), data.has_labels)[0]

    def batch(self, batch: Any, data: ResolvedDataset, cached: bool, device: torch.device) -> Batch:
        inputs, labels, target = cached_parts(batch) if cached else (*split_batch(batch, data.has_labels), None)
        labels = labels.to(device, non_blocking=True) if labels is not None else None
        return Batch(to_device(inputs, device), labels, None, target)

    def kd_loss(self, config: TrainConfig, temperature: float) -> nn.Module:
        return KLDivergence(temperature, tail=config.tail, teachers_per_step=config.teachers_per_step, seed=config.seed)

    def evaluate(self, student: nn.Module, data: ResolvedDataset, device: torch.device,
                 cache: CachedDataset | None, ranks: Dist | None = None) -> dict[str, float]:
        return evaluate(student, data, device, cache, ranks=ranks)

    def describe(self, record: dict[str, Any]) -> str:
        accuracy = f", eval accuracy {record['eval_accuracy']:.4f}" if "eval_accuracy" in record else ""
        return accuracy + (f", eval KL {record['eval_kl']:.4f}" if "eval_kl" in record else "")


class LanguageModel(Task):
    """One teacher distribution per token (module docstring)."""

    #: Language models distil at T=1 unless told otherwise (the cache's recorded temperature wins).
    default_temperature = 1.0
    unit = "sequences"
    plain_collate = staticmethod(plain_token_batch)
    rows_vary = True

    def check(self, config: TrainConfig, data: ResolvedDataset, caches: list[TargetReader]) -> None:
        for cache in caches:
            if not cache.per_token:
                raise TargetMismatchError(f"{cache.path} holds one distribution per sample, but --dataset {config.dataset!r} "
                                          f"holds token sequences: use a cache dumped from this token data")
        if config.teachers_per_step is not None or len(caches) > 1:
            raise UsageError("several teachers (caches) per token are not supported yet: pass one --cache")

    def check_eval(self, config: TrainConfig, eval_data: ResolvedDataset | None) -> None:
        if eval_data is not None and not eval_data.per_token:
            raise UsageError(f"--eval-dataset {config.eval_dataset!r} does not hold token sequences, unlike --dataset {config.dataset!r}")

    classes = "targets over a vocabulary of {}"

    def first_inputs(self, data: ResolvedDataset, caches: list[TargetReader]) -> Any:
        return collate_tokens([data.dataset[0]]).inputs  # read without caches too, as before: the student's RNG use is unchanged

    def batch(self, batch: Any, data: ResolvedDataset, cached: bool, device: torch.device) -> Batch:
        inputs, labels, third = batch
        lengths, target = token_parts(third, device)
        return Batch(to_device(inputs, device), labels.to(device, non_blocking=True), lengths, target)

    def teacher_logits(self, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        return run_model(teacher, batch.inputs)[next_token_mask(batch.labels, batch.lengths)].float()  # (N, V)

    def outputs(self, logits: torch.Tensor, batch: Batch, kd: bool) -> tuple[torch.Tensor, torch.Tensor | None, Any, int]:
        student, labels, target = trained_positions(logits, batch.labels, batch.lengths, batch.target if kd else None)
        return student, labels, target, len(student)

    def ground_truth_loss(self) -> nn.Module:
        return TokenCrossEntropy()

    def kd_loss(self, config: TrainConfig, temperature: float) -> nn.Module:
        return TokenKLDivergence(temperature, tail=config.tail)

    def evaluate(self, student: nn.Module, data: ResolvedDataset, device: torch.device,
                 cache: CachedDataset | None, ranks: Dist | None = None) -> dict[str, float]:
        return evaluate_tokens(student, data, device, cache, ranks=ranks)

    def record(self, seen: int) -> dict[str, Any]:
        return {"tokens": seen}

    def describe(self, record: dict[str, Any]) -> str:
        return f", eval perplexity {record['eval_perplexity']:.3f}" if "eval_perplexity" in record else ""


def task_for(data: ResolvedDataset) -> Task:
    """The task that trains on ``data``: a language model for token sequences, else a classifier."""
    return LanguageModel() if data.per_token else Classification()
