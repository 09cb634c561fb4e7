"""Random-weight transformers DeepSeek models written to temp dirs, and a loader into seekstack (test-only)."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file

from model import ModelConfig, Transformer
from model.hf_mapping import hf_state_dict_to_seekstack

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, max_position_embeddings=512, initializer_range=0.08, num_mtp_layers=0)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def make_hf_model(seed: int = 0, **overrides):
    """A random DeepseekV3ForCausalLM in eval mode, with a random router bias so routing is non-trivial."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return hf


def load_hf_dir(path: str) -> Transformer:
    """Read an HF checkpoint directory (config.json + *.safetensors) into a seekstack Transformer."""
    state = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(file))
    config = ModelConfig.from_json(os.path.join(path, "config.json"))
    if not any(f"layers.{config.num_hidden_layers}." in k for k in state):
        config.num_nextn_predict_layers = 0  # transformers writes num_nextn_predict_layers but no MTP weights
    model = Transformer(config)
    model.load_state_dict(hf_state_dict_to_seekstack(state, config), strict=True)
    return model.eval()
