"""``logit-cache train`` under ``torchrun``: data-parallel training with DistributedDataParallel.

What changes with ``WORLD_SIZE > 1`` (one process per rank, all running :func:`~.loop.train_student`):

* **Data**: each rank reads its contiguous share of every epoch's order from the cache's sampler
  (:class:`~logit_cache.data.loader.ChunkShuffleSampler`): all samples once per epoch across ranks,
  the order padded by repeating its start to a multiple of the world size. ``--batch-size`` is per
  rank; a step consumes ``batch_size * world_size`` samples.
* **Model**: every rank builds the student from the same seed, then DDP broadcasts rank 0's weights
  (so they are equal even for a factory that ignores the seed) and averages the gradients, so the
  weights stay equal on every rank. After that each rank reseeds its generators from
  ``(seed, rank)``, so augmentation and dropout draw differently on each rank.
* **Loss**: DDP averages the ranks' gradients, each of its own mean loss. For a classifier every rank
  has the same number of rows per step, so that is the mean over the global batch. For a language
  model the ranks' batches hold different numbers of tokens: each rank's loss is weighted by
  ``rows * world_size / rows of the step across ranks`` (one scalar all-reduce per step), so a step is
  the mean over every token of the global batch, as one process with the whole batch takes it.
* **Reports**: the epoch loss is ``sum(loss * rows) / sum(rows)`` across ranks; evaluation is sharded
  and reduced (:mod:`.evaluation`); only rank 0 shows progress and writes files.
* **Errors**: setup and saving end in a collective check (:func:`~logit_cache.data.distributed.phase`).
  Inside an epoch a failing rank raises at once; the others, waiting in DDP's gradient all-reduce, see
  the group break (or are stopped by torchrun) and raise :class:`PeerFailedError` naming the cause.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from ..data.distributed import Dist
from ..errors import LogitCacheError


class PeerFailedError(LogitCacheError, RuntimeError):
    """This rank stopped because another rank failed or left mid-epoch (its own message says why)."""


def wrap(student: nn.Module, ranks: Dist, device: torch.device) -> nn.Module:
    """The student in DistributedDataParallel under torchrun (rank 0's weights broadcast), else as it is."""
    if ranks.world_size == 1:
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(student: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper: what is evaluated and saved (its state_dict keys have no ``module.``)."""
    from torch.nn.parallel import DistributedDataParallel

    return student.module if isinstance(student, DistributedDataParallel) else student


def reseed_rank(seed: int, ranks: Dist) -> None:
    """Each rank's own draws from here on (augmentation, dropout, worker seeds), derived from ``(seed, rank)``."""
    if ranks.world_size == 1:
        return
    state = np.random.SeedSequence([seed, ranks.rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[0]) ^ int(state[1]))


def row_weight(rows: int, ranks: Dist, device: torch.device) -> torch.Tensor | None:
    """``rows * world_size / rows of this step on all ranks``, on ``device`` (no host sync): the factor that makes
    DDP's average of per-rank means the mean over every row of the step. None on one process."""
    if ranks.world_size == 1:
        return None
    import torch.distributed as dist

    total = torch.tensor([float(rows)], dtype=torch.float32, device=ranks.collective_device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (rows * ranks.world_size / total.to(device).clamp(min=1.0)).squeeze(0)


def peer_failure(exc: BaseException, ranks: Dist) -> BaseException:
    """The error to raise for ``exc`` caught mid-epoch: a collective that broke because another rank
    failed becomes a :class:`PeerFailedError` saying so; anything else (this rank's own failure) as it is."""
    if ranks.world_size == 1 or isinstance(exc, LogitCacheError):
        return exc
    import torch.distributed as dist

    broken = isinstance(exc, dist.DistError) or any(
        text in str(exc) for text in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL"))
    if not broken:
        return exc
    return PeerFailedError(f"rank {ranks.rank}: the training stopped because another rank failed or left "
                           f"(see that rank's message above); torch says: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
