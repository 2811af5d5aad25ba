"""Hugging Face ``Trainer`` on cached teacher targets: :class:`DistillationTrainer` and its collator.

    from logit_cache import open_cache
    from logit_cache.integrations.transformers import DistillationTrainer

    cache = open_cache("caches/gpt2-top32")
    trainer = DistillationTrainer(student, TrainingArguments("out", per_device_train_batch_size=8),
                                  train_dataset=cache.wrap(train_dataset), temperature=1.0)
    trainer.train()                          # or: torchrun --nproc_per_node=N script.py

What it changes in ``Trainer``, and why:

* **The order.** The training DataLoader draws from the cache's own sampler
  (:meth:`~logit_cache.data.cache.LogitCache.sampler`: chunk-aware, seeded by ``data_seed`` or ``seed``
  and the epoch). That sampler already gives each DDP rank its own contiguous share, so the loader is
  *not* passed through ``accelerator.prepare``, which would split every rank's share again (each rank
  would see half of it): it is built as accelerate's ``DataLoaderShard`` directly, without a shard
  wrapper. The Trainer's ``set_epoch`` calls (each epoch, and on the epoch it resumes inside) reach
  the sampler through the batch sampler, so a views cache rotates its views and a resumed run skips
  the finished batches of the very order an uninterrupted run draws. ``train_sampling_strategy`` /
  ``group_by_length`` do not apply.
* **The batches.** Items of ``cache.wrap(ds)`` are ``(input, label, target)``;
  :class:`DistillationCollator` turns a batch into the dict ``model(**batch)`` needs: the inputs
  (a dict's keys, or the model's main input name for a tensor), ``labels`` and the cached targets
  under :data:`TARGETS_KEY`. With ``remove_unused_columns`` (the default) it drops input keys the
  model's ``forward`` does not name, which the Trainer's own column removal cannot do for tuples.
* **The loss.** :class:`~logit_cache.losses.DistillationLoss` on the model's logits, never the
  model's own loss: per sample (:class:`~logit_cache.losses.KLDivergence`) for classification caches,
  per token for language-model caches, over the positions that predict a label
  (:func:`~logit_cache.losses.trained_positions`, the same rows ``logit-cache train`` uses), with
  :class:`~logit_cache.losses.TokenKLDivergence` and :class:`~logit_cache.losses.TokenCrossEntropy`.
  It is each batch's mean, so the Trainer divides it by the gradient-accumulation steps, and DDP
  averages the ranks' gradients (per token: each rank's batch weighs the same, whatever its tokens).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler

from ..data.loader import CachedDataset, ChunkShuffleSampler, collate
from ..errors import MissingPackageError, TargetMismatchError, UsageError
from ..losses.sample import DEFAULT_TEMPERATURE, DistillationLoss, KLDivergence
from ..losses.token import TokenCrossEntropy, TokenKLDivergence, trained_positions
from ..targets.batch import Targets

try:
    import transformers
    from accelerate.data_loader import DataLoaderShard
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingPackageError(
        f"logit_cache.integrations.transformers needs transformers and accelerate ({exc}): pip install 'logit-cache[hf]' accelerate"
    ) from exc

__all__ = ["LABEL_KEYS", "TARGETS_KEY", "CacheBatchSampler", "DistillationCollator", "DistillationTrainer"]

#: The batch key of the cached targets (a :class:`~logit_cache.targets.Targets`, or a list of them).
TARGETS_KEY = "teacher_targets"
#: Input keys taken as the labels (the names Hugging Face datasets and collators use), never passed to the model.
LABEL_KEYS = ("labels", "label", "label_ids")
#: The language-model default temperature (``logit-cache train`` uses the same).
TOKEN_TEMPERATURE = 1.0


class CacheBatchSampler(BatchSampler):
    """Batches of the cache's sampler, with ``set_epoch`` on the batch sampler itself.

    The Trainer and accelerate look for ``set_epoch`` on the loader's batch sampler, and, once
    ``skip_first_batches`` has wrapped it on resume, on the wrapped one; either way it lands here
    and goes on to the :class:`~logit_cache.data.loader.ChunkShuffleSampler` (and from it to the
    wrapped datasets, for views).
    """

    sampler: ChunkShuffleSampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of the model's ``forward`` (a PEFT model's base model's), ``self`` excluded."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return list(inspect.signature(base.forward).parameters.values())


def _named(parameters: Sequence[inspect.Parameter]) -> list[str]:
    return [p.name for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


class DistillationCollator:
    """``collate_fn`` for ``cache.wrap(dataset)`` under ``Trainer``: a dict for ``model(**batch)``.

    The batch is what :meth:`LogitCache.collate` gives (``(inputs, labels, Targets)``), as keyword
    arguments: a dict input keeps its keys (only those in ``columns``, when given); a tensor goes
    under ``input_names[0]``; a tuple or list of inputs under ``input_names`` in order. Labels go
    under ``labels`` (also when the input dict holds them as ``label``/``label_ids``/``labels``), the
    targets under :data:`TARGETS_KEY`. :class:`DistillationTrainer` makes one from its model.
    """

    def __init__(self, input_names: Sequence[str] = ("input_ids",), columns: Collection[str] | None = None) -> None:
        if not input_names:
            raise UsageError("DistillationCollator needs at least one input name (the model's first forward argument)")
        self.input_names = tuple(input_names)
        self.columns = None if columns is None else frozenset(columns)

    @classmethod
    def for_model(cls, model: nn.Module, remove_unused_columns: bool = True) -> DistillationCollator:
        """The collator that feeds ``model``: its main input name, and its ``forward``'s names as the columns."""
        parameters = _forward_parameters(model)
        names = _named(parameters)
        main = getattr(model, "main_input_name", None)
        order = ([main] if main else []) + [name for name in names if name != main]
        return cls(order or ["input_ids"], names if remove_unused_columns else None)

    def __call__(self, batch: Any) -> dict[str, Any]:
        *head, target = collate(batch)
        inputs, labels = head if len(head) == 2 else (head[0], None)
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
            for key in LABEL_KEYS:
                found = inputs.pop(key, None)
                labels = found if labels is None and found is not None else labels
            if self.columns is not None:
                kept = {key: value for key, value in inputs.items() if key in self.columns}
                if not kept:
                    raise UsageError(
                        f"none of the batch's inputs ({', '.join(sorted(inputs))}) is an argument of the model's forward "
                        f"({', '.join(sorted(self.columns))}): rename the dataset's keys, or set remove_unused_columns=False "
                        "in TrainingArguments to pass them all"
                    )
                inputs = kept
        elif isinstance(inputs, (tuple, list)):
            if len(inputs) > len(self.input_names):
                raise UsageError(f"items have {len(inputs)} inputs but the model's forward names only {list(self.input_names)}")
            inputs = dict(zip(self.input_names, inputs, strict=False))
        else:
            inputs = {self.input_names[0]: inputs}
        out = dict(inputs)
        if labels is not None:
            out["labels"] = labels
        out[TARGETS_KEY] = target
        return out


def _logits(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits``, ``["logits"]``, the first of a tuple, or the tensor itself."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TargetMismatchError(
            f"the model returned a {type(outputs).__name__} without logits: DistillationTrainer needs a tensor, an output "
            "with .logits, or a tuple whose first element is the logits"
        )
    return logits


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils from a cache: train on ``train_dataset=cache.wrap(ds)``.

    ``kd_loss_weight``, ``org_loss_weight``: :class:`~logit_cache.losses.DistillationLoss`'s weights
    of the KD term and of the ground truth (0.9 / 0.1; ``org_loss_weight=0`` for data without labels).
    ``temperature``: None takes the cache's recorded one, else 1 for a language-model cache and
    :data:`~logit_cache.losses.DEFAULT_TEMPERATURE` for a per-sample one (as ``logit-cache train``).
    ``tail``: the top-k tail model (``rest``, ``renormalize``, ``ignore``). ``shuffle``: False serves
    the samples in index order (each rank its contiguous share). Every other argument is ``Trainer``'s;
    without a ``data_collator``, a :class:`DistillationCollator` for the model is used.
    ``per_device_train_batch_size`` is per rank; the module docstring says what else differs.
    """

    #: compute_loss returns each batch's mean: the Trainer divides it by the accumulation steps (transformers >= 5).
    loss_is_scaled_for_ga = False

    def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, *trainer_args: Any,
                 kd_loss_weight: float = 0.9, org_loss_weight: float = 0.1, temperature: float | None = None,
                 tail: str | None = None, shuffle: bool = True, **trainer_kwargs: Any) -> None:
        own_collator = data_collator is None
        super().__init__(model, args, data_collator if data_collator is not None else DistillationCollator(), *trainer_args,
                         **trainer_kwargs)
        if own_collator:
            self.data_collator = DistillationCollator.for_model(self.model, self.args.remove_unused_columns)
        # our loss is not the model's: no num_items_in_batch, and the mean is divided by the accumulation steps
        self.model_accepts_loss_kwargs = False
        if temperature is not None and not temperature > 0:
            raise UsageError(f"temperature must be > 0, got {temperature}")
        self.kd_loss_weight, self.org_loss_weight = float(kd_loss_weight), float(org_loss_weight)
        self.temperature, self.tail, self.shuffle = temperature, tail, bool(shuffle)
        self._losses: dict[bool, DistillationLoss] = {}
        if self.train_dataset is not None:
            self._cached(self.train_dataset)
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if getattr(self.args, "group_by_length", False) or strategy not in ("random", None):
            warnings.warn(f"DistillationTrainer draws batches from the cache's sampler: train_sampling_strategy={strategy!r} "
                          "(or group_by_length) does not apply", stacklevel=2)

    # -- data ------------------------------------------------------------------------------------------

    @staticmethod
    def _cached(dataset: Any) -> CachedDataset:
        if not isinstance(dataset, CachedDataset):
            raise UsageError(
                f"DistillationTrainer trains on cached targets, but train_dataset is a {type(dataset).__name__}: pass "
                "train_dataset=cache.wrap(dataset), with cache = logit_cache.open_cache(DIR) dumped from that dataset"
            )
        return dataset

    def train_sampler(self) -> ChunkShuffleSampler:
        """This rank's sampler over the train dataset's caches (seeded by ``data_seed``, else ``seed``)."""
        dataset = self._cached(self.train_dataset)
        seed = self.args.data_seed if getattr(self.args, "data_seed", None) is not None else self.args.seed
        return ChunkShuffleSampler.for_caches(dataset.caches, shuffle=self.shuffle, seed=seed,
                                              num_replicas=max(1, self.args.world_size), rank=self.args.process_index,
                                              drop_last=self.args.dataloader_drop_last)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The training loader over the cache's sampler, this rank's share only (module docstring)."""
        if self.train_dataset is None:
            raise UsageError("DistillationTrainer: training needs train_dataset=cache.wrap(dataset)")
        dataset = self._cached(self.train_dataset)
        args = self.args
        workers = args.dataloader_num_workers
        params: dict[str, Any] = {"num_workers": workers, "collate_fn": self.data_collator,
                                  "pin_memory": bool(args.dataloader_pin_memory) and args.device.type == "cuda"}
        if workers > 0:
            params["persistent_workers"] = bool(args.dataloader_persistent_workers)
            if getattr(args, "dataloader_prefetch_factor", None) is not None:
                params["prefetch_factor"] = args.dataloader_prefetch_factor
            if getattr(args, "dataloader_multiprocessing_context", None) is not None:
                params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        batches = CacheBatchSampler(self.train_sampler(), self._train_batch_size, args.dataloader_drop_last)
        # no accelerator.prepare: it would wrap the batch sampler in a BatchSamplerShard and split the share again
        return DataLoaderShard(dataset, batch_sampler=batches, **params)

    # -- loss ------------------------------------------------------------------------------------------

    def distillation_loss(self, per_token: bool) -> DistillationLoss:
        """The loss of per-token or per-sample targets (made once, from the constructor's settings)."""
        if per_token not in self._losses:
            temperature = self.temperature or self._recorded_temperature() or (TOKEN_TEMPERATURE if per_token else DEFAULT_TEMPERATURE)
            if per_token:
                loss = DistillationLoss(TokenKLDivergence(temperature, tail=self.tail), self.kd_loss_weight, self.org_loss_weight,
                                        ce_loss=TokenCrossEntropy())
            else:
                loss = DistillationLoss(KLDivergence(temperature, tail=self.tail), self.kd_loss_weight, self.org_loss_weight)
            self._losses[per_token] = loss
        return self._losses[per_token]

    def _recorded_temperature(self) -> float | None:
        if isinstance(self.train_dataset, CachedDataset):
            return self.train_dataset.caches[0].manifest.temperature
        return None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """:class:`DistillationLoss` on ``model(**inputs)``'s logits and the batch's cached targets."""
        inputs = dict(inputs)
        if TARGETS_KEY not in inputs:
            raise UsageError(
                f"the batch has no {TARGETS_KEY!r}: DistillationTrainer needs batches of cache.wrap(dataset) collated by "
                f"DistillationCollator (got keys {', '.join(sorted(inputs))})"
            )
        target = inputs.pop(TARGETS_KEY)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = _logits(outputs)
        first = target[0] if isinstance(target, (list, tuple)) and target else target
        if isinstance(first, Targets) and first.lengths is not None:
            if isinstance(target, (list, tuple)):
                if len(target) > 1:
                    raise UsageError("several caches (teachers) per token are not supported: wrap the dataset with one cache")
                target = first
            if labels is None:
                raise UsageError("a per-token batch has no labels: collate it with DistillationCollator")
            student, shifted, rows = trained_positions(logits, labels.to(logits.device), target.lengths.to(logits.device), target)
            loss = self.distillation_loss(True)(student, shifted, rows)
        else:
            loss = self.distillation_loss(False)(logits, labels, target)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation on a cache-wrapped dataset: the distillation loss, the logits and the labels."""
        if TARGETS_KEY not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        labels = inputs.get("labels")
        return loss, _logits(outputs).detach(), labels.detach() if isinstance(labels, torch.Tensor) else None
