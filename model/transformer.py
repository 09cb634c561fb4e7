"""The DeepSeek-V3/V2 decoder: embedding -> blocks (dense first, then MoE) -> norm -> head, plus MTP modules.

`model(input_ids)` returns a `ModelOutput` whose `.logits` are the main-head logits [B, T, vocab]. With `labels`
(same layout as input_ids, shifted inside, -100 ignored) it also returns the training objective (V3 §2.2, §2.1.2):
    loss = CE_main + (lambda / D) * sum_k CE_MTP^k + sum_layers alpha * L_Bal
With an `attention_mask`, padding positions are never scored as predictors and are left out of the expert loads and
the balance loss. With a `LatentCache` it runs prefill / decode against the compressed cache (see model/generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .cache import LatentCache
from .config import ModelConfig
from .experts import GroupedExperts
from .moe import MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .router import Router


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # [n_moe_layers, E] tokens per expert in this forward (main layers)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    hidden_states: torch.Tensor | None = None  # final normed hidden state [B, T, D]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Swappable by tensor parallelism (model/parallel/tensor_parallel.py), which shards the head by vocabulary:
        # the loss then becomes a vocab-parallel CE, and logits returned without a loss are gathered to full vocab.
        self.cross_entropy = shifted_cross_entropy
        self.gather_logits = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for every matrix (0.006 in the V3 report), ones for norms, zero biases."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()
                m.tokens_per_expert.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: LatentCache | None = None, logits_to_keep: int = 0,
                return_mtp_logits: bool = False) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = left padding); position_ids [B, T].

        logits_to_keep: 0 returns logits for every position, n > 0 only for the last n (decoding).
        """
        B, T = input_ids.shape
        start, mask = 0, None
        if cache is not None:
            start, cache_positions = cache.reserve(attention_mask, T)
            position_ids = cache_positions if position_ids is None else position_ids
            if start > 0 or attention_mask is not None:
                mask = cache.attention_mask(start, start + T)
        elif attention_mask is not None:
            mask = padded_causal_mask(attention_mask)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)

        freqs_cis = self.rotary(position_ids)
        token_mask = attention_mask.bool() if attention_mask is not None else None  # padding: no load, no loss
        balance_alpha = self.config.aux_loss_alpha if labels is not None else 0.0
        h = self.embed_tokens(input_ids)
        loads, balance = [], []
        for layer in self.layers:
            h, stats = layer(h, freqs_cis, mask, cache, start, balance_alpha, token_mask)
            if stats is not None:
                loads.append(stats.load)
                if stats.balance_loss is not None:
                    balance.append(stats.balance_loss)
        h = self.norm(h)
        h_out = h[:, -logits_to_keep:] if logits_to_keep else h
        out = ModelOutput(logits=self.lm_head(h_out), hidden_states=h,
                          expert_load=torch.stack(loads) if loads else None)

        if (labels is not None or return_mtp_logits) and len(self.mtp) > 0 and cache is None:
            self._forward_mtp(out, input_ids, labels, freqs_cis, mask, balance_alpha, balance, return_mtp_logits,
                              token_mask)
        if labels is None and self.gather_logits is not None:
            out.logits = self.gather_logits(out.logits)
            out.mtp_logits = [self.gather_logits(logits) for logits in out.mtp_logits]
        if labels is not None:
            out.ce_loss = self.cross_entropy(out.logits, ignore_padded_sources(labels, token_mask, 1), shift=1)
            loss = out.ce_loss
            if out.mtp_losses:
                loss = loss + self.config.mtp_loss_lambda / len(out.mtp_losses) * torch.stack(out.mtp_losses).sum()
            if balance:
                out.balance_loss = torch.stack(balance).sum()
                loss = loss + out.balance_loss
            out.loss = loss
        return out

    def _forward_mtp(self, out: ModelOutput, input_ids, labels, freqs_cis, mask, balance_alpha, balance,
                     return_logits: bool, token_mask: torch.Tensor | None = None) -> None:
        h = out.hidden_states
        for k, module in enumerate(self.mtp, start=1):
            # Emb(t_{i+k}) at position i; the last k positions have no such token (filled with id 0, never scored,
            # and causal attention keeps them from influencing earlier positions).
            next_ids = F.pad(input_ids[:, k:], (0, k), value=0)
            h, stats = module(h, self.embed_tokens(next_ids), freqs_cis, mask, balance_alpha, token_mask)
            if stats is not None and stats.balance_loss is not None:
                balance.append(stats.balance_loss)
            logits = self.lm_head(module.norm(h))
            if return_logits:
                out.mtp_logits.append(logits)
            if labels is not None:
                out.mtp_losses.append(self.cross_entropy(logits, ignore_padded_sources(labels, token_mask, k + 1),
                                                         shift=k + 1))


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean CE of logits at position i against labels at i + shift (ignore_index -100), in fp32."""
    logits = logits[:, : logits.shape[1] - shift]
    targets = labels[:, shift:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def ignore_padded_sources(labels: torch.Tensor, token_mask: torch.Tensor | None, shift: int) -> torch.Tensor:
    """labels with -100 wherever the position that predicts them (shift places earlier) is padding: a pad token
    sees only itself, so what it predicts (e.g. a left-padded row's first real token) is never scored."""
    if token_mask is None:
        return labels
    pad_source = F.pad(~token_mask[:, : labels.shape[1] - shift], (shift, 0), value=False)
    return labels.masked_fill(pad_source, -100)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: causal, keys restricted to real tokens; every row sees itself so none is empty."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)[None]).unsqueeze(1)
