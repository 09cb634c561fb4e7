"""Collectives the single-device model code may call; each is a no-op when torch.distributed is not initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce (gloo has no reliable AVG: callers divide themselves)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
