"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

    c^Q = W^DQ h,  [q^C; q^R] = W^UQ c^Q,  q^R <- RoPE(q^R)                 (q_a_proj, q_a_layernorm, q_b_proj)
    c^KV = W^DKV h,  k^R = RoPE(W^KR h)  (one rope key shared by all heads)   (kv_a_proj_with_mqa, kv_a_layernorm)
    [k^C; v^C] = W^UKV c^KV                                                  (kv_b_proj)
    o_i = softmax(q_i . k_i * scale) v^C_i,   u = W^O [o_1; ...; o_H]         (o_proj)

Only `kv_a_layernorm(c^KV)` (kv_lora_rank values) and the roped `k^R` (qk_rope_head_dim values) are cached per
token per layer. Two mathematically equal ways to attend over them:

* expanded (training, prefill): up-project the latent to per-head k^C, v^C and run SDPA;
* absorbed (decode): fold W^UK into the query and W^UV into the output, so attention runs directly on the latent:
      score_ts = (q^C_t W^UK_h) . c^KV_s + q^R_t . k^R_s,    o_t = (sum_s p_ts c^KV_s) W^UV_h^T
  which reads (kv_lora_rank + qk_rope_head_dim) numbers per cached token instead of H*(qk_head_dim + v_head_dim).

The head count is always inferred from the weights (`view(..., -1, head_dim)`), so tensor-parallel head shards run
this code unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.rope_interleave = c.rope_interleave
        self.softmax_scale = c.softmax_scale
        H = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D].

        mask: bool [B, 1, T, S] (True = may attend) or None for plain causal attention with S == T.
        cache: this layer's latent cache [B, S_max, kv_lora_rank + qk_rope_head_dim]; the new tokens are written at
        slots [start, start + T) and attention runs over slots [0, start + T). Decoding (start > 0) uses the
        absorbed path.
        """
        q_nope, q_pe = self.query(x, freqs_cis)
        c_kv, k_pe = self.latent(x, freqs_cis)
        if cache is not None:
            end = start + x.shape[1]
            cache[:, start:end, : self.kv_lora_rank] = c_kv
            cache[:, start:end, self.kv_lora_rank:] = k_pe
            if start > 0:
                return self.o_proj(self.attend_absorbed(q_nope, q_pe, cache[:, :end], mask))
            c_kv, k_pe = cache[:, :end, : self.kv_lora_rank], cache[:, :end, self.kv_lora_rank:]
        return self.o_proj(self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask))

    def query(self, x, freqs_cis) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns q^C [B, T, H, nope] and roped q^R [B, T, H, rope]."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (-1, self.nope_dim + self.rope_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, freqs_cis, self.rope_interleave)

    def latent(self, x, freqs_cis) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the cached quantities: normalised c^KV [B, T, kv_lora_rank] and roped k^R [B, T, rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rotary(k_pe, freqs_cis, self.rope_interleave)

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Up-project the latent to per-head keys/values and run SDPA. Returns [B, T, H * v_head_dim]."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).unflatten(-1, (-1, self.nope_dim + self.v_dim))  # [B, S, H, nope + v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        S = k_nope.shape[1]
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope_dim)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:  # SDPA's fused (flash) kernels want equal q/k and v head dims; zero columns add nothing
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return o[..., : self.v_dim].transpose(1, 2).flatten(2)

    def attend_absorbed(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """Attention directly over the latent cache (W^UK absorbed into q, W^UV applied after). [B, T, H * v].

        latent [B, S, kv_lora_rank + rope]: the cache rows [c^KV; k^R], so one matmul scores both terms.
        """
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # [H, nope, c], [H, v, c]
        # per-head q^C W^UK as one batched matmul over heads ([H, B*T, nope] x [H, nope, c]); cheaper than einsum
        q_lat = torch.bmm(q_nope.flatten(0, 1).transpose(0, 1), w_uk).transpose(0, 1).unflatten(0, (B, T))
        # Heads fold into the query axis: one [T*H, c + rope] x [c + rope, S] matmul per sequence.
        q = torch.cat((q_lat, q_pe), dim=-1).flatten(1, 2)
        if mask is None:
            scores = torch.bmm(q, latent.transpose(1, 2)).float() * self.softmax_scale
        else:  # additive -inf bias for masked slots, broadcast over heads: [B, T, 1, S] -> rows (t, h)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            bias = bias.transpose(1, 2).expand(B, T, H, -1).flatten(1, 2)
            scores = torch.baddbmm(bias, q, latent.transpose(1, 2), alpha=self.softmax_scale).float()
        probs = scores.softmax(dim=-1).to(latent.dtype)  # [B, T*H, S]
        o_lat = torch.bmm(probs, latent[..., : self.kv_lora_rank]).view(B * T, H, -1)  # rows (b, t), then heads
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, v]: o_h W^UV_h^T
        return o.transpose(0, 1).reshape(B, T, -1)
