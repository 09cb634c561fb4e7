"""DeepSeekMoE router (V3 §2.1.2 eqs. 13-16; V2 §2.2).

    s_{i,t} = sigmoid(u_t . e_i)             (V3)   or  softmax_i(u_t . e_i)   (V2)
    selection: TopK over s_{i,t} + b_i, restricted to the `topk_group` best of `n_group` expert groups
               (group score: sum of the two best biased scores per group for V3 `noaux_tc`; the max for V2
               `group_limited_greedy`; no group limit for `greedy`)
    g_{i,t} = s_{i,t} for the selected experts (the bias b only chooses, it never weights),
              normalised over the selected ones when norm_topk_prob, times routed_scaling_factor.

Logits, scores and the bias are fp32 whatever the model dtype (a bf16 bias collapses distinct values and changes
routing). Masked groups get -inf, so a negative bias can never let a masked expert win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (the whole optimizer step), training only.
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # Casting the model (e.g. to bf16) must not round the routing bias or the load counts: keep them fp32.
        old = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, new in self._buffers.items():
            if new is not None and new.dtype != torch.float32:
                src = new if old[name].is_meta else old[name]
                self._buffers[name] = src.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (topk_ids [T, K] int64, topk_weights [T, K] fp32, scores [T, E] fp32)."""
        logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = self._limit_groups(choice)
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor, scores

    def _limit_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        grouped = choice_TE.unflatten(-1, (self.n_group, -1))  # [T, G, E/G]
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~keep_mask.unsqueeze(-1), float("-inf")).flatten(1)
