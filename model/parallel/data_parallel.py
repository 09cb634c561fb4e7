"""Data-parallel gradient reduction, global gradient norm, and gathering full tensors from shards.

A trainer calls, per optimizer step:
    loss.backward()                       (once per micro-batch; gradients accumulate locally)
    sync_gradients(model, layout)         SUM over each parameter's replica ranks, / dp (plan.py's rules)
    clip_grad_norm_(model, layout, 1.0)   optional: the norm of the full (unsharded) gradient
    optimizer.step()
    update_expert_bias(model, gamma, reduce_fn=layout.reduce_expert_load)

Gradients are flattened into one buffer per reduction rule (one all-reduce per rule and group, whatever the
parameter count). Parameters without a gradient reduce zeros, so every rank issues the same collectives.
FSDP-sharded parameters (fsdp.py) arrive averaged over DP by FSDP's reduce-scatter; only their TP sum is left.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .collectives import all_reduce_sum_
from .fsdp import is_sharded, local, unshard
from .layout import Layout
from .plan import GRAD_RULES, plan_of


def _groups_for(rule: str, layout: Layout) -> list:
    return {"dp": [layout.dp_group], "dp+tp": [layout.dp_group, layout.tp_group], "edp": [layout.edp_group]}[rule]


def _reduce_grads(params: list[nn.Parameter], groups: list, divisor: int) -> None:
    """SUM the gradients of `params` over each group in one flat buffer, then divide; a missing gradient reduces
    zeros (every rank issues the same collectives) and is filled in, except on FSDP parameters (this rank's chunk)."""
    grads = [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    for group in groups:
        all_reduce_sum_(flat, group)
    if divisor != 1:
        flat /= divisor
    offset = 0
    for p, g in zip(params, grads):
        piece = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
        if p.grad is not None:
            g.copy_(piece)
        elif not is_sharded(p):
            p.grad = piece.clone()


@torch.no_grad()
def sync_gradients(model: nn.Module, layout: Layout) -> None:
    """Make every gradient equal the single-process gradient of the global batch (mean over DP replicas)."""
    if layout.world_size == 1:
        return
    plan = plan_of(model)
    buckets: dict[str, list[nn.Parameter]] = {rule: [] for rule in GRAD_RULES}
    fsdp_partial_over_tp: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_sharded(p):  # FSDP already averaged it over DP
            if plan.spec(name).grad == "dp+tp":
                fsdp_partial_over_tp.append(p)
            continue
        buckets[plan.spec(name).grad].append(p)
    if fsdp_partial_over_tp and layout.tp > 1:
        _reduce_grads(fsdp_partial_over_tp, [layout.tp_group], 1)
    for rule, params in buckets.items():
        if params:
            _reduce_grads(params, _groups_for(rule, layout), layout.dp)


@torch.no_grad()
def grad_norm(model: nn.Module, layout: Layout) -> torch.Tensor:
    """L2 norm of the full gradient, counting each distinct shard once (call after sync_gradients)."""
    plan = plan_of(model)
    sq = {None: 0.0, "tp": 0.0, "ep": 0.0}
    fsdp_sq = {None: 0.0, "tp": 0.0, "ep": 0.0}  # FSDP chunks: distinct over DP as well
    has_fsdp = False
    for name, p in model.named_parameters():
        has_fsdp = has_fsdp or is_sharded(p)
        if p.grad is not None:
            target = fsdp_sq if is_sharded(p.grad) else sq
            axis = plan.spec(name).axis
            target[axis] = target[axis] + local(p.grad).detach().float().pow(2).sum()
    sq = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in sq.items()}
    if has_fsdp:
        fsdp_sum = torch.stack([torch.as_tensor(fsdp_sq[k], dtype=torch.float32) for k in (None, "tp", "ep")])
        all_reduce_sum_(fsdp_sum, layout.dp_group)
        sq = {k: sq[k] + fsdp_sum[i] for i, k in enumerate((None, "tp", "ep"))}
    if layout.world_size > 1:
        all_reduce_sum_(sq["tp"], layout.tp_group)
        all_reduce_sum_(sq["ep"], layout.ep_group)
    return (sq[None] + sq["tp"] + sq["ep"]).sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, layout: Layout, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the full model; returns the norm before clipping."""
    norm = grad_norm(model, layout)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            local(p.grad).mul_(scale.to(p.grad.dtype))
    return norm


@torch.no_grad()
def gather_full(model: nn.Module, layout: Layout, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of every parameter (or its gradient) and persistent buffer, on every rank."""
    plan = plan_of(model)
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        if grads:
            if name not in params or params[name].grad is None:
                continue
            t = params[name].grad
        t = unshard(t)
        spec = plan.spec(name)
        size = plan.axis_size(spec.axis)
        if size > 1:
            group = layout.tp_group if spec.axis == "tp" else layout.ep_group
            parts = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=spec.dim)
        out[name] = t.detach().clone()
    return out
