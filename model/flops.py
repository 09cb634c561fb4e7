"""Model FLOPs per token, for model FLOP utilisation (MFU) in logs and benchmarks.

Counts multiply-adds as 2 FLOPs. Per token, forward: 2 * (active matmul parameters) + attention scores and values
2 * H * S_ctx * (qk_head_dim + v_head_dim) per layer with S_ctx = T/2 for causal training sequences of length T.
Training (forward + backward) is 3x the forward. Active parameters: every projection a token passes through —
MLA, the dense MLP or (router + top-k routed experts + shared experts), the output head, and the MTP modules when
they run; the embedding lookup is free.
"""

from __future__ import annotations

from .config import ModelConfig


def _attention_params(c: ModelConfig) -> int:
    H = c.num_attention_heads
    q = c.hidden_size * H * c.qk_head_dim if c.q_lora_rank is None else (
        c.hidden_size * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim)
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + H * c.v_head_dim * c.hidden_size


def _ffn_params(c: ModelConfig, layer_idx: int) -> int:
    if not c.is_moe_layer(layer_idx):
        return 3 * c.hidden_size * c.intermediate_size
    experts = (c.num_experts_per_tok + (c.n_shared_experts or 0)) * 3 * c.hidden_size * c.moe_intermediate_size
    return experts + c.hidden_size * c.n_routed_experts


def active_params_per_token(c: ModelConfig, with_mtp: bool = True) -> int:
    layers = list(range(c.num_hidden_layers))
    if with_mtp:
        layers += [c.num_hidden_layers + k for k in range(c.num_nextn_predict_layers)]
    total = sum(_attention_params(c) + _ffn_params(c, i) for i in layers)
    heads = 1 + (c.num_nextn_predict_layers if with_mtp else 0)
    mtp_proj = (2 * c.hidden_size * c.hidden_size * c.num_nextn_predict_layers) if with_mtp else 0
    return total + heads * c.hidden_size * c.vocab_size + mtp_proj


def training_flops_per_token(c: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    n_layers = c.num_hidden_layers + (c.num_nextn_predict_layers if with_mtp else 0)
    attention = 2 * c.num_attention_heads * (seq_len / 2) * (c.qk_head_dim + c.v_head_dim) * n_layers
    return 3 * (2 * active_params_per_token(c, with_mtp) + attention)


def measure_matmul_peak(threads: int | None = None, size: int = 1024, repeats: int = 7) -> float:
    """Best-of-`repeats` fp32 square-matmul FLOP/s on this machine: the MFU denominator (the best run, so a
    momentarily busy machine does not inflate MFU)."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / min(times)
