"""Pre-norm decoder block: x += MLA(norm(x)); x += FFN(norm(x)), FFN dense for the first layers, MoE after."""

from __future__ import annotations

import torch
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .mla import MLA
from .mlp import MLP
from .moe import MoE, MoEStats
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LatentCache | None = None, start: int = 0, balance_alpha: float = 0.0,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        # The cache object, not this layer's tensor, is the argument: wrappers that hook a module's tensor inputs
        # (FSDP2) would otherwise hand MLA a view it may not write into.
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, mask, layer_cache, start)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(h, balance_alpha, token_mask)
            return x + y, stats
        return x + self.mlp(h), None
