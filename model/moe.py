"""DeepSeekMoE layer (V3 §2.1.2 eq. 12): h' = u + sum_i FFN^s_i(u) + sum_i g_{i,t} FFN^r_i(u).

Fine-grained routed experts (stacked weights, grouped GEMM) plus always-on shared experts. The token dispatcher is
a swappable attribute (`moe.dispatcher`) so expert parallelism replaces it without touching this math.

Per forward the layer also reports the expert load (tokens routed to each expert) and, when asked, the
complementary sequence-wise balance loss (V3 eqs. 17-20):
    f_i = E / (K T) * #{t : expert i selected for token t},   P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}
    L_Bal = alpha * sum_i f_i P_i   for each sequence of length T, averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .dispatch import LocalDispatcher
from .experts import GroupedExperts
from .mlp import MLP
from .router import Router


@dataclass
class MoEStats:
    load: torch.Tensor  # [E] tokens routed to each expert in this forward (fp32, no grad)
    balance_loss: torch.Tensor | None  # scalar, already multiplied by alpha; None when not requested


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
                               if config.n_shared_experts else None)
        self.dispatcher = LocalDispatcher(config.n_routed_experts)

    def forward(self, x: torch.Tensor, balance_alpha: float = 0.0,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [B, T, D]; token_mask [B, T] bool (False = padding): padding is computed like any token but left out
        of the expert load and the balance loss."""
        B, T, D = x.shape
        x_TD = x.reshape(-1, D)
        topk_ids, topk_weights, scores = self.gate(x_TD)
        x_RD, counts_E, state = self.dispatcher.dispatch(x_TD, topk_ids)
        y_RD = self.experts(x_RD, counts_E)
        y = self.dispatcher.combine(y_RD, topk_weights, state)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)

        with torch.no_grad():
            # padding weighs 0: a weighted count needs no boolean indexing (a host sync on every decode step)
            weights = None if token_mask is None else token_mask.reshape(-1, 1).expand_as(topk_ids).flatten().float()
            load = torch.bincount(topk_ids.flatten(), weights=weights, minlength=self.num_experts).float()
            if self.training:
                self.gate.tokens_per_expert += load
        balance = None
        if balance_alpha > 0:
            balance = balance_alpha * sequence_balance_loss(scores.view(B, T, -1), topk_ids.view(B, T, -1),
                                                            token_mask)
        return y.view(B, T, D), MoEStats(load, balance)


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor,
                          token_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i f_i P_i per sequence (V3 eqs. 17-20, without alpha), averaged over sequences; T counts only the
    tokens `token_mask_BT` keeps (all of them when None)."""
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    keep = (torch.ones(B, T, dtype=scores_BTE.dtype, device=scores_BTE.device) if token_mask_BT is None
            else token_mask_BT.to(scores_BTE.dtype))
    tokens = keep.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    counts = torch.zeros(B, E, device=scores_BTE.device, dtype=scores_BTE.dtype)
    counts.scatter_add_(1, topk_ids_BTK.reshape(B, -1), keep.repeat_interleave(K, dim=1))
    f = counts * E / (K * tokens)
    p = ((scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)) * keep.unsqueeze(-1)).sum(dim=1) / tokens
    return (f * p).sum(dim=-1).mean()
