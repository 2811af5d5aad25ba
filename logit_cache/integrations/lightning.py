"""Lightning with a logit cache: a DataModule, a sampler Lightning leaves alone, and the loss as a mixin.

    import lightning.pytorch as pl
    from logit_cache.integrations.lightning import CacheDataModule, DistillationMixin

    class Student(DistillationMixin, pl.LightningModule):    # training_step: DistillationLoss on (inputs, labels, target)
        def __init__(self):
            super().__init__()
            self.net = make_student()
        def forward(self, x): return self.net(x)
        def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)

    data = CacheDataModule("caches/digits-top10", train_dataset, batch_size=64, num_workers=4, seed=0)
    pl.Trainer(strategy="ddp", devices=2, max_epochs=3).fit(Student(), datamodule=data)

Why this module exists: under DDP, Lightning replaces a DataLoader's sampler with its own
``DistributedSampler`` unless the sampler already *is* one (``_requires_distributed_sampler`` in
lightning.pytorch's data connector; Fabric's ``setup_dataloaders`` does the same). The cache's
:class:`~logit_cache.data.loader.ChunkShuffleSampler` already gives each rank its share, so the
wrapper split that share again and each rank trained on half of it, silently. :class:`CacheSampler`
is the same sampler declared a ``DistributedSampler``, so Lightning keeps it whatever
``use_distributed_sampler`` says, and its rank and world size come from the trainer, not from
whatever process group existed when it was built. Lightning calls ``set_epoch`` on the loader's
sampler before every epoch, which reorders the samples and, for caches with views, rotates the
views (the sampler forwards the epoch to the wrapped dataset and passes it with each index).

A loader the user builds with ``cache.sampler()`` is checked when training starts
(:func:`check_train_samplers`, run by :class:`DistillationMixin` and by :class:`CacheSamplerCheck`):
split twice, or split for another world size, is refused with the fix in the message.

lightning is an optional extra (``pip install 'logit-cache[lightning]'``): imported here only;
``lightning.pytorch`` is preferred, ``pytorch_lightning`` is used when only it is installed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data.cache import LogitCache, open_cache
from ..data.loader import CachedDataset, ChunkShuffleSampler, collate
from ..errors import TargetMismatchError, UsageError
from ..losses.sample import DistillationLoss
from ..losses.token import TokenCrossEntropy, TokenKLDivergence, trained_positions
from ..targets.batch import Targets

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - only the older package name installed
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "logit_cache.integrations.lightning needs Lightning: pip install 'logit-cache[lightning]' (or pip install lightning)"
        ) from exc

__all__ = ["CacheDataModule", "CacheSampler", "CacheSamplerCheck", "DistillationMixin", "cache_sampler", "check_train_samplers"]

#: Language models distil at T=1 (as ``logit-cache train`` does for token data).
TOKEN_TEMPERATURE = 1.0


class CacheSampler(ChunkShuffleSampler, DistributedSampler):
    """:class:`~logit_cache.data.loader.ChunkShuffleSampler`, seen by Lightning (and Fabric) as a
    ``DistributedSampler``, so it is not wrapped and split a second time.

    Only the isinstance check is borrowed: ``DistributedSampler.__init__`` never runs, and every
    method (order, share per rank, ``set_epoch``, ``len``) is ChunkShuffleSampler's. Its
    ``num_samples`` is the whole cache's, not one rank's as in torch's class.
    """


def _world(trainer: Any | None) -> dict[str, int]:
    """``num_replicas`` and ``rank`` as the trainer's strategy splits data (data-parallel ranks only)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if kwargs:
        return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}
    return {"num_replicas": 1, "rank": 0} if trainer is not None else {}


def cache_sampler(caches: LogitCache | Sequence[LogitCache], trainer: Any | None = None, shuffle: bool = True, seed: int = 0,
                  **kwargs: Any) -> CacheSampler:
    """The cache's sampler for a ``train_dataloader`` written by hand, split as ``trainer`` splits data.

    Call it inside ``train_dataloader`` (``cache_sampler(cache, self.trainer, seed=0)``): by then the
    trainer knows its ranks. Without a trainer the process group is read, as ``cache.sampler()`` does.
    """
    many = list(caches) if isinstance(caches, (list, tuple)) else [caches]
    return CacheSampler.for_caches(many, shuffle=shuffle, seed=seed, **{**_world(trainer), **kwargs})


class CacheDataModule(pl.LightningDataModule):
    """The training data of a cache: ``dataset`` wrapped with the cache(s), the cache's sampler, its collate.

    ``cache_or_path``: an open :class:`~logit_cache.data.cache.LogitCache`, a path, or a list of
    either (several teachers, as ``cache.wrap`` takes one). Paths are opened in each process when
    the loader is first built, so the module pickles cheaply (``ddp_spawn``). ``batch_size`` is per
    rank, as everywhere in Lightning: the global batch is ``batch_size * world size``.
    ``sampler_kwargs`` go to :class:`CacheSampler` (``window``, ``block_size``, ``drop_last``),
    ``loader_kwargs`` to the DataLoader (``pin_memory``, ``persistent_workers``, ``drop_last``, ...).
    ``verify``: ``"fingerprint"`` (default) or ``"length"``, as for ``cache.wrap``.

    For validation or test data, subclass and add ``val_dataloader``; the cache serves training.
    """

    def __init__(self, cache_or_path: LogitCache | str | Path | Sequence[LogitCache | str | Path], dataset: Any, batch_size: int,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, verify: str = "fingerprint",
                 sampler_kwargs: Mapping[str, Any] | None = None, **loader_kwargs: Any) -> None:
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"CacheDataModule: batch_size must be at least 1, got {batch_size}")
        for taken in ("sampler", "shuffle", "collate_fn", "batch_sampler"):
            if taken in loader_kwargs:
                raise UsageError(f"CacheDataModule: {taken}= is set by the module (the cache's sampler and collate); "
                                 f"pass shuffle= to the module, sampler options as sampler_kwargs=")
        self.sources = list(cache_or_path) if isinstance(cache_or_path, (list, tuple)) else [cache_or_path]
        if not self.sources:
            raise UsageError("CacheDataModule needs at least one cache")
        self.dataset, self.batch_size, self.num_workers = dataset, int(batch_size), int(num_workers)
        self.seed, self.shuffle, self.verify = int(seed), bool(shuffle), verify
        self.sampler_kwargs, self.loader_kwargs = dict(sampler_kwargs or {}), loader_kwargs
        self._caches: list[LogitCache] | None = None
        self._wrapped: CachedDataset | None = None

    @property
    def caches(self) -> list[LogitCache]:
        """The caches, opened on first use in this process."""
        if self._caches is None:
            self._caches = [s if isinstance(s, LogitCache) else open_cache(s) for s in self.sources]
        return self._caches

    @property
    def train_dataset(self) -> CachedDataset:
        """``dataset`` with the caches' targets (checked against the dump once per process)."""
        if self._wrapped is None:
            self._wrapped = CachedDataset(self.dataset, self.caches, verify=self.verify)
        return self._wrapped

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not all(isinstance(s, LogitCache) for s in self.sources):  # reopened from paths in the new process
            state["_caches"] = None
        state["_wrapped"] = None
        return state

    def train_dataloader(self) -> DataLoader:
        wrapped = self.train_dataset  # first: the sampler forwards set_epoch to the wrappers alive when it is built
        sampler = cache_sampler(self.caches, getattr(self, "trainer", None), shuffle=self.shuffle, seed=self.seed,
                                **self.sampler_kwargs)
        return DataLoader(wrapped, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          **self.loader_kwargs)


# -- the checks --------------------------------------------------------------------------------------


def _loaders(obj: Any) -> list[DataLoader]:
    if isinstance(obj, DataLoader):
        return [obj]
    if isinstance(obj, Mapping):
        return [dl for value in obj.values() for dl in _loaders(value)]
    if isinstance(obj, (list, tuple)):
        return [dl for value in obj for dl in _loaders(value)]
    return []


def _samplers(loader: DataLoader) -> list[Any]:
    found = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return [s for j, s in enumerate(found) if s is not None and all(s is not t for t in found[:j])]


def check_train_samplers(trainer: Any) -> None:
    """Refuse training loaders whose cache sampler does not give each rank its share of every epoch.

    * A cache sampler wrapped by Lightning's ``DistributedSamplerWrapper`` after it split the data
      itself: each rank would see ``1 / world`` of its share (the bug this module exists for).
    * A cache sampler, not wrapped, split for another world size or rank than the trainer's (built
      before the trainer started its processes): ranks would repeat each other's samples.

    A cache sampler split for one process and then wrapped is correct but loses the chunk-aware
    order across ranks: a warning.
    """
    world = _world(trainer) or {"num_replicas": 1, "rank": 0}
    fix = ("build the loader with CacheDataModule, or with sampler=cache_sampler(cache, self.trainer) inside train_dataloader "
           "(logit_cache.integrations.lightning); a plain cache.sampler() also works with Trainer(use_distributed_sampler=False)")
    for loader in _loaders(getattr(trainer, "train_dataloader", None)):
        for sampler in _samplers(loader):
            inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's DistributedSamplerWrapper
            if isinstance(sampler, DistributedSampler) and isinstance(inner, ChunkShuffleSampler):
                if inner.num_replicas > 1:
                    raise UsageError(
                        f"the training loader's cache sampler already splits the data over {inner.num_replicas} ranks, and Lightning "
                        f"wrapped it in a DistributedSampler that splits each share again: every rank would train on "
                        f"1/{sampler.num_replicas} of its share. Fix: {fix}"
                    )
                warnings.warn("Lightning wrapped the cache sampler in a DistributedSampler: every sample is served, but each "
                              f"rank reads from every chunk (the chunk-aware order is lost). Fix: {fix}", stacklevel=2)
            elif isinstance(sampler, ChunkShuffleSampler) and (sampler.num_replicas, sampler.rank) != (world["num_replicas"],
                                                                                                     world["rank"]):
                raise UsageError(
                    f"the training loader's cache sampler was split for rank {sampler.rank} of {sampler.num_replicas}, but this "
                    f"process is rank {world['rank']} of {world['num_replicas']} (the sampler was built before the trainer started "
                    f"its processes): ranks would repeat each other's samples. Fix: {fix}"
                )


class CacheSamplerCheck(pl.Callback):
    """:func:`check_train_samplers` when training starts, for LightningModules without :class:`DistillationMixin`."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        check_train_samplers(trainer)


# -- the loss ----------------------------------------------------------------------------------------


def _logits(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor):
        raise TargetMismatchError(f"the model returned a {type(output).__name__}; expected a tensor of logits (or an object "
                                  f"with a .logits tensor)")
    return output


def _unpack(batch: Any) -> tuple[Any, torch.Tensor | None, Any]:
    """``(inputs, labels, target)`` or ``(inputs, target)`` from :func:`~logit_cache.data.loader.collate`."""
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise UsageError(f"expected a batch (inputs, labels, target) or (inputs, target) from the cache's collate, got "
                         f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (list, tuple)) else ''}")
    target = batch[-1]
    first = target[0] if isinstance(target, (list, tuple)) and target else target
    if not isinstance(first, Targets):
        raise UsageError(f"the batch's last element is a {type(first).__name__}, not the cache's Targets: build the loader "
                         f"with cache.wrap(...) and collate_fn=cache.collate (CacheDataModule does)")
    return batch[0], (batch[1] if len(batch) == 3 else None), target


def default_loss(per_token: bool) -> DistillationLoss:
    """``DistillationLoss`` with Composer's weights; per token: the chunked token KD at T=1 and the token CE."""
    if per_token:
        return DistillationLoss(kd=TokenKLDivergence(TOKEN_TEMPERATURE), ce_loss=TokenCrossEntropy())
    return DistillationLoss()


class DistillationMixin:
    """``training_step`` for a LightningModule trained on a cache: :class:`~logit_cache.losses.DistillationLoss`.

    Put it before ``LightningModule`` (``class Student(DistillationMixin, pl.LightningModule)``)
    and write ``forward`` and ``configure_optimizers``. The loss is ``self.distillation`` when set
    (a ``DistillationLoss``; its KD window ``start``/``end`` follows the trainer's progress),
    else :func:`default_loss`. Per-sample batches: ``forward(inputs)`` gives (B, C) logits. Per-token
    batches (a cache of token sequences): ``forward(inputs)`` gives (B, T, V), and the loss is taken
    at the positions that predict a label (:func:`~logit_cache.losses.trained_positions`). Logs
    ``train_loss``. Also checks, when training starts, that the loader's cache sampler is split once.
    """

    def distillation_loss(self, batch: Any) -> torch.Tensor:
        """The loss of one batch from the cache's collate (what ``training_step`` returns)."""
        inputs, labels, target = _unpack(batch)
        logits = _logits(self(**inputs) if isinstance(inputs, Mapping) else self(inputs))
        first = target[0] if isinstance(target, (list, tuple)) else target
        per_token = first.lengths is not None
        # no class attribute: it would hide the submodule nn.Module keeps in _modules
        loss = getattr(self, "distillation", None)
        loss = default_loss(per_token) if loss is None else loss
        progress = self._kd_progress(loss)
        if not per_token:
            return loss(logits, labels, target, progress=progress)
        if first is not target:
            raise UsageError("several caches per token are not supported: pass one cache of token sequences")
        student, shifted, rows = trained_positions(logits, labels, target.lengths.to(labels.device), target)
        return loss(student, shifted, rows, progress=progress)

    def _kd_progress(self, loss: DistillationLoss) -> float | None:
        """The fraction of training done, only when the loss has a KD window (it costs a look at the trainer)."""
        if getattr(loss, "start", 0.0) <= 0.0 and getattr(loss, "end", 1.0) >= 1.0:
            return None
        total = self.trainer.estimated_stepping_batches
        return None if not math.isfinite(total) or total <= 0 else self.trainer.global_step / total

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.distillation_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch[1]))
        return loss

    def on_train_start(self) -> None:
        check_train_samplers(self.trainer)
        super().on_train_start()
