"""Runs under ``torchrun``: which rank this is, joining the process group, and collectives that end a phase.

Shared by the dump (``pipeline/``) and the trainer (``train/``), so it lives below both, next to the
sampler that splits an epoch by rank. Under ``WORLD_SIZE > 1`` the process group is started here (gloo
on CPU; NCCL for CUDA tensors with gloo beside it for CPU ones) unless the caller already started one,
which is then used and left alone. Every phase that can fail on one rank ends in :func:`sync`, so an
error on one rank stops all of them, each with a message (the failing one with its own error), instead
of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LogitCacheError, UsageError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: this process started the process group (and destroys it at the end)
    owns_group: bool = False
    #: where tensors for collectives live: the CPU unless the group has no CPU backend (a caller's NCCL-only group)
    collective_device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def sampler_ranks(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """A sampler's ``(num_replicas, rank)``: as given, else the process group's (1 and 0 without one); checked."""
    if num_replicas is None or rank is None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if ready else 1)
        rank = rank if rank is not None else (torch.distributed.get_rank() if ready else 0)
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise UsageError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
    return num_replicas, rank


def device_kind(spec: str) -> str:
    """``cuda`` when ``--device`` (auto, cpu, cuda, cuda:N) will put the work on a GPU, else ``cpu``: picks the backend."""
    return "cuda" if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()) else "cpu"


def init_distributed(device_kind: str) -> Dist:
    """The caller's process group when one is initialised (used, never destroyed here); else, when
    ``WORLD_SIZE > 1`` (torchrun), a new one: NCCL for CUDA tensors with gloo for CPU ones, gloo alone on CPU."""
    import torch.distributed as dist

    owns = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Dist()
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() == 1:
        return Dist(owns_group=owns)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = str(dist.get_backend()).lower()
    # a caller's NCCL-only group: its tensors go to the current GPU, which is the rank's first one also when a
    # rank holds several (--devices-per-rank), not necessarily GPU LOCAL_RANK
    collective = "cpu" if owns or "gloo" in backend or "mpi" in backend else "cuda"
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns, collective)


def sync(dist_info: Dist, error: BaseException | None) -> None:
    """End a phase: if any rank failed, every rank raises (the failing one its own error)."""
    if dist_info.world_size > 1:
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=dist_info.collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if error is None and flag.item() > 0:
            raise LogitCacheError(f"rank {dist_info.rank}: stopping because another rank failed (see its message)")
    if error is not None:
        raise error


def phase(dist_info: Dist, fn: Any, *args: Any) -> Any:
    """Run ``fn`` on this rank, then :func:`sync` so errors reach every rank."""
    try:
        result = fn(*args)
    except BaseException as exc:
        sync(dist_info, exc)
        raise
    sync(dist_info, None)
    return result


def sum_across(dist_info: Dist, values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over the ranks (float64; as given on one process)."""
    if dist_info.world_size == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    totals = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dist_info.collective_device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


def shard_bounds(length: int, dist_info: Dist) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``length`` items, without padding (shares differ by
    at most one): for work that is summed across ranks, where a repeated item would count twice."""
    per, extra = divmod(length, dist_info.world_size)
    start = dist_info.rank * per + min(dist_info.rank, extra)
    return start, start + per + (1 if dist_info.rank < extra else 0)


def destroy(dist_info: Dist) -> None:
    """Leave the process group if this process started it."""
    if dist_info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
