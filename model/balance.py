"""Auxiliary-loss-free load balancing (V3 §2.1.2): after each optimizer step, per MoE layer,

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

with load_i the tokens routed to expert i over the whole step (every micro-batch, and every rank when
torch.distributed is initialised). Overloaded experts get a lower bias, underloaded ones a higher one; the bias only
affects which experts are selected, never the gating weights. gamma = 0 disables the update (V3 uses 0.001 for most
of pre-training, then 0). This is DeepSeek's uncentred rule (as Megatron); the bias is not re-centred.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .parallel.collectives import all_reduce_sum_
from .router import Router


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float,
                       reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = all_reduce_sum_) -> torch.Tensor | None:
    """Apply the bias update to every router in `model` and reset the load counters.

    Returns the step's loads [n_routers, E] (after the reduction), or None for a dense model.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        return None
    loads = torch.stack([r.tokens_per_expert for r in routers])
    if reduce_fn is not None:
        loads = reduce_fn(loads)
    for router, load in zip(routers, loads):
        if gamma > 0 and load.sum() > 0:
            router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        router.tokens_per_expert.zero_()
    return loads
