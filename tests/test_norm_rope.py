"""RMSNorm closed form; YaRN inverse frequencies (closed form and transformers); interleaved RoPE == complex product.

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_norm_rope.py
"""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig, preset
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, apply_rotary, yarn_inv_freq

V3_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
               mscale_all_dim=1.0)


# --------------------------------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_closed_form():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 3.0
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)


def test_rmsnorm_hand_values():
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 4.0, 0.0, 0.0]])
    # rms = 1 and sqrt(25/4) = 2.5
    expected = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.2, 1.6, 0.0, 0.0]])
    torch.testing.assert_close(norm(x), expected)
    # scale invariance
    torch.testing.assert_close(norm(7.0 * x), expected)


# --------------------------------------------------------------------------------------------------- YaRN
def _closed_form_v3_inv_freq() -> torch.Tensor:
    dim, base, factor = 64, 10000.0, 40.0
    base_freq = torch.tensor([1.0 / base ** (2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    low, high = 10, 23
    ramp = torch.tensor([min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)],
                        dtype=torch.float64)
    return base_freq * (1 - ramp) + base_freq / factor * ramp, base_freq


def test_yarn_correction_range_v3():
    def corr_dim(r):
        return 64 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(10000))

    assert math.floor(corr_dim(32)) == 10 and corr_dim(32) == pytest.approx(10.47, abs=0.01)
    assert math.ceil(corr_dim(1)) == 23 and corr_dim(1) == pytest.approx(22.51, abs=0.01)


def test_yarn_inv_freq_closed_form_v3():
    got = yarn_inv_freq(64, 10000.0, 40.0, 4096, 32.0, 1.0).double()
    expected, base_freq = _closed_form_v3_inv_freq()
    assert got.shape == (32,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # i <= 10 keeps the base (high) frequency, i >= 23 is divided by 40, strictly in between for 10 < i < 23.
    torch.testing.assert_close(got[:11], base_freq[:11], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[23:], base_freq[23:] / 40, rtol=1e-6, atol=0)
    mid = slice(11, 23)
    assert torch.all(got[mid] < base_freq[mid]) and torch.all(got[mid] > base_freq[mid] / 40)
    # Linear blend: ramp_i = (i - 10) / 13 exactly.
    ramp = (base_freq - got) / (base_freq - base_freq / 40)
    torch.testing.assert_close(ramp[mid], (torch.arange(11, 23, dtype=torch.float64) - 10) / 13,
                               rtol=1e-5, atol=1e-5)


def test_yarn_inv_freq_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, qk_rope_head_dim=64,
                          n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                          max_position_embeddings=163840,
                          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, **V3_YARN))
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")

    ours = yarn_inv_freq(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=1e-6, atol=0)

    # And through the model's RotaryEmbedding built from the very same transformers config.
    cfg = ModelConfig.from_dict(hf.to_dict())
    rotary = RotaryEmbedding(cfg)
    torch.testing.assert_close(rotary.inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=0)
    assert rotary.attention_factor == pytest.approx(hf_attention_factor) == pytest.approx(1.0)


def test_rotary_embedding_freqs_cis():
    cfg = preset("tiny", rope_theta=500.0)
    rotary = RotaryEmbedding(cfg)
    d = cfg.qk_rope_head_dim
    inv = 1.0 / 500.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(rotary.inv_freq.double(), inv, rtol=1e-6, atol=0)
    pos = torch.tensor([[0, 1, 5, 17]])
    freqs_cis = rotary(pos)
    assert freqs_cis.shape == (1, 4, d // 2) and freqs_cis.dtype == torch.complex64
    cos, sin = freqs_cis.real, freqs_cis.imag
    angles = pos.double()[..., None] * inv
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-6)


def test_rotary_attention_factor_mscale_ratio():
    rs = dict(type="yarn", factor=40.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=1.0)
    rotary = RotaryEmbedding(preset("tiny", rope_scaling=rs))
    expected = (0.1 * 0.707 * math.log(40) + 1) / (0.1 * math.log(40) + 1)
    assert rotary.attention_factor == pytest.approx(expected)
    freqs_cis = rotary(torch.arange(6)[None])
    torch.testing.assert_close(freqs_cis.abs(), torch.full(freqs_cis.shape, expected), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------- apply_rotary
def _complex_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Official DeepSeek apply_rotary_emb: consecutive pairs as complex numbers times exp(i * pos * freq)."""
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # [B, T, H, d/2]
    angles = pos.double()[..., None] * inv_freq.double()  # [B, T, d/2]
    rot = torch.polar(torch.ones_like(angles), angles)
    if x.dim() == 4:
        rot = rot.unsqueeze(2)
    return torch.view_as_real(xc * rot).flatten(-2)


@pytest.mark.parametrize("yarn", [False, True])
def test_apply_rotary_equals_complex_form(yarn):
    rs = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
              mscale=1.0, mscale_all_dim=1.0) if yarn else None
    cfg = preset("tiny", qk_rope_head_dim=16, rope_scaling=rs)
    rotary = RotaryEmbedding(cfg)
    B, T, H, d = 2, 7, 3, 16
    pos = torch.stack([torch.arange(T), torch.arange(T) + 100])
    freqs_cis = rotary(pos)
    q = torch.randn(B, T, H, d)
    k = torch.randn(B, T, d)  # MLA's single shared rope key: the 3-D layout
    torch.testing.assert_close(apply_rotary(q, freqs_cis).double(), _complex_rope(q, pos, rotary.inv_freq),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary(k, freqs_cis).double(), _complex_rope(k, pos, rotary.inv_freq),
                               rtol=1e-5, atol=1e-5)
    # and the real-arithmetic form on the interleaved pairs (transformers' rope_interleave reads them this way)
    cos, sin = freqs_cis.real.unsqueeze(2), freqs_cis.imag.unsqueeze(2)
    even, odd = q[..., 0::2], q[..., 1::2]
    real_form = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rotary(q, freqs_cis), real_form, rtol=1e-6, atol=1e-6)


def test_apply_rotary_hand_case():
    # One pair (1, 0) rotated by 90 degrees -> (0, 1); pair (0, 2) by 180 degrees -> (0, -2).
    x = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])  # [B=1, T=1, d=4]
    angles = torch.tensor([[[math.pi / 2, math.pi]]])
    out = apply_rotary(x, torch.polar(torch.ones_like(angles), angles))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0, 0.0, -2.0]]]), rtol=0, atol=1e-6)


def test_apply_rotary_preserves_norm_and_dtype():
    cfg = preset("tiny", qk_rope_head_dim=16)
    freqs_cis = RotaryEmbedding(cfg)(torch.arange(50)[None])
    x = torch.randn(1, 50, 4, 16)
    out = apply_rotary(x, freqs_cis)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # pairwise norms too (each pair is rotated on its own)
    torch.testing.assert_close(out.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1),
                               rtol=1e-5, atol=1e-5)
    assert apply_rotary(x.to(torch.bfloat16), freqs_cis).dtype == torch.bfloat16


def test_rotary_relative_position_property():
    cfg = preset("tiny", qk_rope_head_dim=16)
    rotary = RotaryEmbedding(cfg)
    q, k = torch.randn(16), torch.randn(16)

    def score(m: int, n: int) -> float:
        return float(apply_rotary(q.view(1, 1, 16), rotary(torch.tensor([[m]]))).flatten()
                     @ apply_rotary(k.view(1, 1, 16), rotary(torch.tensor([[n]]))).flatten())

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        ref = score(m, n)
        for shift in (1, 17, 40):
            assert score(m + shift, n + shift) == pytest.approx(ref, abs=1e-4), (m, n, shift)
    # ... and it really depends on the offset (not constant).
    assert abs(score(5, 2) - score(2, 5)) > 1e-3 or abs(score(5, 2) - score(9, 2)) > 1e-3
