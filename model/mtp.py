"""Multi-Token Prediction module (V3 §2.2 eqs. 21-25).

Depth k combines the previous depth's representation of token i with the embedding of token i+k and predicts
token i+k+1:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]      (checkpoint order: embedding first, as vLLM)
    h^k  = TRM_k(h')                                           (one full decoder block, MoE when the layer index is)
    P^k  = OutHead(RMSNorm_k(h^k))                              (embedding and output head shared with the model)
h^0 is the main model's final (normed) hidden state, as vLLM and SGLang feed it. The checkpoint stores these
modules as `model.layers.{num_hidden_layers + k - 1}` with `enorm`, `hnorm`, `eh_proj`, the block and
`shared_head.norm` (mapped to `norm` here).
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .moe import MoEStats
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, next_embeds: torch.Tensor, freqs_cis, mask,
                balance_alpha: float = 0.0, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEStats | None]:
        """h_prev [B, T, D] (h^{k-1}), next_embeds [B, T, D] (Emb(t_{i+k})) -> (h^k [B, T, D], MoE stats)."""
        h = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h_prev)), dim=-1))
        return self.block(h, freqs_cis, mask, balance_alpha=balance_alpha, token_mask=token_mask)
