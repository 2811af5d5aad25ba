"""The dump under ``torchrun``: which rank this is, and phases that end in a collective check.

Under ``WORLD_SIZE > 1`` each rank takes a contiguous run of shards; rank 0 prepares the directory
before and writes the manifest after every rank finished. Every phase ends in :func:`sync`, so an
error on one rank stops all of them, each with a message (the failing one with its own error).

Joining the process group and the phases are shared with the trainer, so they live one layer down
(:mod:`logit_cache.data.distributed`); what is the dump's alone (its totals over ranks) stays here.
"""

from __future__ import annotations

from ..data.distributed import Dist, destroy, device_kind, init_distributed, phase, sum_across, sync

__all__ = ["Dist", "destroy", "device_kind", "init_distributed", "phase", "reduce_stats", "sync"]


def reduce_stats(dist_info: Dist, rows: int, mass: float, kept: int, compute_seconds: float) -> tuple[int, float, int, float]:
    """Totals over ranks: rows computed, top-k mass, shards kept from before; the slowest rank's time."""
    if dist_info.world_size == 1:
        return rows, mass, kept, compute_seconds
    import torch
    import torch.distributed as dist

    total_rows, total_mass, total_kept = sum_across(dist_info, [float(rows), mass, float(kept)])
    slowest = torch.tensor([compute_seconds], dtype=torch.float64, device=dist_info.collective_device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return int(total_rows), float(total_mass), int(total_kept), float(slowest.item())
