"""Lightning students and the DDP script body for tests/test_integration_lightning.py.

A module of its own (not the test file) so the script Lightning relaunches per rank imports the
same classes: ``python script.py CACHE OUT`` calls :func:`ddp_main`, which writes what
each rank served to ``OUT/served-rank{R}.json`` and the error a plain ``cache.sampler()`` raised to
``OUT/error-rank{R}.txt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from data_factories import CausalBag, read_plain, three_rng_images
from torch import nn
from torch.utils.data import DataLoader

from logit_cache import open_cache
from logit_cache.data.loader import collate
from logit_cache.integrations.lightning import CacheDataModule, DistillationMixin


class Student(DistillationMixin, pl.LightningModule):
    """A linear classifier over (1, 8, 8) images; remembers each step's batch, logits (before the step) and loss."""

    def __init__(self, seed: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.lr = lr
        self.steps: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            logits = self(batch[0]).clone()
        loss = super().training_step(batch, batch_idx)
        self.steps.append({"epoch": self.current_epoch, "batch": batch, "logits": logits, "loss": loss.detach().clone()})
        return loss


class TokenStudent(Student):
    """A :class:`~data_factories.CausalBag` language model (B, T, V) logits."""

    def __init__(self, vocab: int = 50, seed: int = 1, lr: float = 0.1) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(seed)
        self.net = CausalBag(vocab)
        self.lr = lr
        self.steps = []


class PlainSamplerData(pl.LightningDataModule):
    """What a user writes without the integration: ``cache.sampler()`` in a plain DataLoader."""

    def __init__(self, cache_path: str, dataset, batch_size: int) -> None:
        super().__init__()
        self.cache_path, self.dataset, self.batch_size = cache_path, dataset, batch_size

    def train_dataloader(self) -> DataLoader:
        cache = open_cache(self.cache_path)
        self.wrapped = cache.wrap(self.dataset)
        return DataLoader(self.wrapped, batch_size=self.batch_size, sampler=cache.sampler(seed=0), collate_fn=collate)


def _fit(data: pl.LightningDataModule) -> tuple[pl.Trainer, Student]:
    student = Student()
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(student, datamodule=data)
    return trainer, student


def ddp_main(argv: list[str]) -> None:
    """Two DDP fits on 2 CPU ranks (gloo) in one launch (ranks start slowly): ``CACHE OUT``.

    First what a user writes without the integration (a plain ``cache.sampler()``), whose refusal
    each rank records; then :class:`CacheDataModule`, whose served rows each rank records. The
    second fit reuses the ranks and process group the first one started (LOCAL_RANK is set by then).
    """
    cache_path, out = argv[0], Path(argv[1])
    dataset = three_rng_images(n=120)
    try:
        _fit(PlainSamplerData(cache_path, dataset, batch_size=8))
    except Exception as exc:  # the refusal under test
        rank = os.environ.get("LOCAL_RANK", "?")
        (out / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
    trainer, student = _fit(CacheDataModule(cache_path, dataset, batch_size=8, seed=0))
    rows = {row.tobytes(): r for r, row in enumerate(read_plain(Path(cache_path), "logits"))}  # logits row -> cache row
    served: dict[int, list[int]] = {}
    for step in student.steps:
        served.setdefault(step["epoch"], []).extend(rows[row.tobytes()] for row in step["batch"][-1].logits.numpy())
    (out / f"served-rank{trainer.global_rank}.json").write_text(json.dumps(served))
    weights = np.concatenate([p.detach().numpy().ravel() for p in student.parameters()])
    np.save(out / f"weights-rank{trainer.global_rank}.npy", weights)


if __name__ == "__main__":
    ddp_main(sys.argv[1:])
