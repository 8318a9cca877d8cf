"""Collectives shared by the model layers (MoE load counts) and the trainer (losses, error flags).

One owner, so a module that needs a sum over ranks does not grow its own copy."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over the default process group; a no-op on one process or without
    torch.distributed. Returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
