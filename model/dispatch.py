"""Token dispatch for DeepSeekMoE: route (token, expert) pairs to the experts that hold them and back.

A dispatcher is a small swappable object with two calls:
    dispatch(x_TD, topk_ids_TK) -> (x_RD, counts_E, state)   rows sorted by local expert, counts per local expert
    combine(y_RD, topk_weights_TK, state) -> y_TD            weighted sum over each token's top-k expert outputs
`LocalDispatcher` (single process, all experts local) is the default; expert parallelism swaps in an all-to-all
dispatcher from model/parallel without touching the MoE math.

Shape suffixes: T tokens, D model dim, K top-k, R = T*K routed rows, E experts.
"""

from __future__ import annotations

import torch


class LocalDispatcher:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        K = topk_ids_TK.shape[1]
        flat_ids = topk_ids_TK.flatten()
        order_R = flat_ids.argsort(stable=True)  # rows grouped by expert, token order kept within an expert
        counts_E = torch.bincount(flat_ids, minlength=self.num_experts)
        x_RD = x_TD.index_select(0, order_R // K)
        return x_RD, counts_E, order_R

    def combine(self, y_RD: torch.Tensor, topk_weights_TK: torch.Tensor, order_R: torch.Tensor) -> torch.Tensor:
        T, K = topk_weights_TK.shape
        y_unsorted = torch.empty_like(y_RD).index_copy(0, order_R, y_RD)  # back to (token, k) order
        y_TKD = y_unsorted.view(T, K, -1)
        return torch.bmm(topk_weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
