"""Rotary position embedding for MLA's decoupled key/query (V2 §2.1.3), with YaRN as DeepSeek defines it.

Layout: the checkpoints store the rotary channels as *interleaved pairs* (x0, x1), (x2, x3), ... each rotated by one
frequency (the official `apply_rotary_emb` views them as complex numbers). We rotate the pairs in place, so no
weight permutation is ever needed. (transformers' `rope_interleave` path de-interleaves at run time instead; q.k is
identical because q and k are permuted alike.) A transformers config with `rope_interleave: false` means weights
laid out as half-split pairs (x_i, x_i+d/2) (transformers' rotate_half); `ModelConfig.rope_interleave = False`
rotates those pairs instead.

YaRN (Peng et al. 2023; V3 report §4.3): with s = factor, original context L, base b, rotary dim d,
    corr_dim(r) = d * ln(L / (2*pi*r)) / (2 ln b),   low = floor(corr_dim(beta_fast)), high = ceil(corr_dim(beta_slow))
    ramp_i = clamp((i - low) / (high - low), 0, 1)
    inv_freq_i = inv_freq_i / s * ramp_i + inv_freq_i * (1 - ramp_i)
The attention temperature is folded into the softmax scale (see ModelConfig.softmax_scale), and the rotation's amplitude
is mscale(s, mscale) / mscale(s, mscale_all_dim), 1.0 for every DeepSeek config (transformers' attention_factor).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> torch.Tensor:
    """Per-pair inverse frequencies [dim/2] with the YaRN ramp between extrapolation and interpolation."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    def corr_dim(rotations: float) -> float:
        return dim * math.log(original_max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp=0 keeps the original frequency (high-frequency dims), ramp=1 divides by the factor.
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """Produces the rotation freqs_cis [B, T, d/2] (complex64) for integer positions [B, T]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the fp32 frequencies, e.g. after building the model on the meta device."""
        config = self.config
        dim, base, rs = config.qk_rope_head_dim, config.rope_theta, config.rope_scaling
        if rs is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        else:
            factor = config.yarn_factor
            inv_freq = yarn_inv_freq(dim, base, factor, rs["original_max_position_embeddings"],
                                     rs.get("beta_fast") or 32.0, rs.get("beta_slow") or 1.0)
            mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
            if rs.get("attention_factor") is not None:
                self.attention_factor = float(rs["attention_factor"])
            elif mscale and mscale_all_dim:
                self.attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(factor)
        if self.inv_freq.is_meta:
            self.inv_freq = inv_freq.to("meta")
        else:
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # Keep inv_freq in fp32 when the model is cast to bf16: positions up to 160K need it.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Integer positions [B, T] -> freqs_cis [B, T, d/2] complex64: attention_factor * exp(i * pos * inv_freq)."""
        angles = position_ids.float()[..., None] * self.inv_freq  # [B, T, d/2]
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of x [B, T, H, d] (or [B, T, d]) by freqs_cis [B, T, d/2]; fp32 math.

    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin): the pair read as the complex number
    x_2i + i x_2i+1 times exp(i theta), as the official code does it (one fused complex multiply).
    interleaved=False rotates the half-split pairs (x_i, x_i+d/2) the same way.
    """
    if x.dim() == 4:
        freqs_cis = freqs_cis.unsqueeze(2)
    if interleaved:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (2, -1)).transpose(-1, -2).contiguous())
    return torch.view_as_real(pairs * freqs_cis).transpose(-1, -2).flatten(-2).to(x.dtype)
