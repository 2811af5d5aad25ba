"""The dump under ``torchrun``: which rank this is, and phases that end in a collective check.

Under ``WORLD_SIZE > 1`` each rank takes a contiguous run of shards; rank 0 prepares the directory
before and writes the manifest after every rank finished. Every phase ends in :func:`sync`, so an
error on one rank stops all of them, each with a message (the failing one with its own error).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LogitCacheError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: this process started the process group (and destroys it at the end)
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join (or start) the process group when ``WORLD_SIZE > 1``; NCCL for CUDA, gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def sync(dist_info: Dist, error: BaseException | None) -> None:
    """End a phase: if any rank failed, every rank raises (the failing one its own error)."""
    if dist_info.world_size > 1:
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
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


def reduce_stats(dist_info: Dist, rows: int, mass: float, kept: int, compute_seconds: float) -> tuple[int, float, int, float]:
    """Totals over ranks: rows computed, top-k mass, shards kept from before; the slowest rank's time."""
    if dist_info.world_size == 1:
        return rows, mass, kept, compute_seconds
    import torch.distributed as dist

    totals = torch.tensor([float(rows), mass, float(kept)], dtype=torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    slowest = torch.tensor([compute_seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return int(totals[0].item()), float(totals[1].item()), int(totals[2].item()), float(slowest.item())


def destroy(dist_info: Dist) -> None:
    """Leave the process group if this process started it."""
    if dist_info.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
