"""Collectives used by the parallel runtime, each a no-op when torch.distributed is not initialised (or the group
has one rank), plus a byte counter for communication accounting.

Autograd-aware ops for tensor parallelism (Megatron's f and g), for a region whose input and output are
replicated over the TP group and whose downstream loss is computed identically on every TP rank:

    copy_to_tp(x)      forward identity,         backward SUM all-reduce   (enter a region: partial input grads)
    reduce_from_tp(x)  forward SUM all-reduce,   backward identity         (leave a region: partial outputs)
    gather_last_dim(x) forward all-gather,       backward own slice        (vocab shards -> full logits)

Expert parallelism uses `all_to_all(x, out_splits, in_splits, group)`: torch's functional-collective
`all_to_all_single_autograd` (uneven splits, forward and backward checked on gloo with torch 2.13). Only
`all_to_all_single` is used, never the list form, and never ReduceOp.AVG (SUM, then divide).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """Ranks in `group` (None: the default group); 1 without torch.distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


class CommStats:
    """Bytes handed to each kind of collective by this rank (the payload, not the wire traffic of the algorithm:
    a ring all-reduce of n bytes moves about 2n(p-1)/p per rank). `reset()` at a step start, `snapshot()` after."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, tensor_or_bytes) -> None:
        n = tensor_or_bytes if isinstance(tensor_or_bytes, int) else \
            tensor_or_bytes.numel() * tensor_or_bytes.element_size()
        self.bytes[kind] += n
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in sorted(self.bytes)}


comm_stats = CommStats()


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce (gloo has no reliable AVG: callers divide themselves)."""
    if is_distributed() and group_size(group) > 1:
        comm_stats.add("all_reduce", tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if is_distributed() and group_size(group) > 1:
        comm_stats.add("all_reduce", tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        x = x.contiguous()
        comm_stats.add("all_gather", x)
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        r = dist.get_rank(ctx.group)
        return grad[..., r * ctx.width:(r + 1) * ctx.width], None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if group_size(group) > 1 else x


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherLastDim.apply(x, group) if group_size(group) > 1 else x


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all_to_all_single along dim 0 with uneven splits (rows in_splits[j] go to rank j)."""
    import torch.distributed._functional_collectives as funcol

    # NOTE: the backward is the same exchange reversed; count it here so one forward+backward is accounted.
    comm_stats.add("all_to_all", x.numel() * x.element_size() * (2 if x.requires_grad else 1))
    return funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Even-split exchange of a count vector (no grad): rank j receives chunk j of every rank's `counts`."""
    out = torch.empty_like(counts)
    comm_stats.add("all_to_all", counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
