"""Parity with transformers' DeepseekV3ForCausalLM: same weights (written to disk in the HF layout and loaded back),
same logits within 1e-4, same 32 greedy tokens, with and without q_lora_rank, several group settings, YaRN on.

Run: python -m pytest -q tests/test_hf_parity.py
"""

import pytest
import torch

from model.generate import generate
from tests.hf_helpers import BASE, YARN, load_hf_dir, make_hf_model

CASES = {
    "v3-groups-yarn": dict(rope_parameters=YARN),
    "no-q-lora": dict(q_lora_rank=None, n_group=1, topk_group=1),
    "groups-2-of-4-top3": dict(num_experts_per_tok=3, n_group=4, topk_group=2, rope_parameters=YARN,
                               first_k_dense_replace=0),
    "one-group-of-two": dict(n_group=2, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0,
                             n_shared_experts=2),
    # weights in the half-split rotary layout (transformers' rotate_half), not DeepSeek's interleaved pairs
    "rope-not-interleaved": dict(rope_interleave=False, rope_parameters=YARN),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf = make_hf_model(seed=len(request.param), **CASES[request.param])
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    return hf, load_hf_dir(path)


def test_logits_match(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, 70))  # longer than YaRN's original 64 positions
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4


def test_left_padded_batch_matches(pair):
    hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(2, hf.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        out = ours(ids, attention_mask=mask).logits  # position ids derived from the mask
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() < 1e-4


def test_32_greedy_tokens_identical(pair):
    hf, ours = pair
    prompt = [5, 17, 3, 42, 8, 11]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    ours_tokens = generate(ours, [prompt], 32, greedy=True, eos_token_id=[]).completions()[0]
    assert ours_tokens == ref


V2_CASES = {
    "v2-lite-greedy": dict(topk_method="greedy", q_lora_rank=None),
    "v2-group-limited-yarn": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=32,
                                  rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_deepseek_v2_logits_match(case, tmp_path):
    """DeepSeek-V2/V2-Lite: softmax routing, no renormalisation, greedy or group-limited (max) selection."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(3)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "max_position_embeddings",
            "initializer_range")
    hc = DeepseekV2Config(**{k: BASE[k] for k in keys}, n_shared_experts=2, routed_scaling_factor=1.0,
                          **V2_CASES[case])
    hf = DeepseekV2ForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path)
    ours = load_hf_dir(str(tmp_path))
    assert ours.config.scoring_func == "softmax" and not ours.config.norm_topk_prob
    ids = torch.randint(0, hc.vocab_size, (2, 70))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_tied_embeddings_load_strictly_and_match(tmp_path):
    """tie_word_embeddings: the converted state dict holds the one tensor under both names, so a strict load works."""
    hf = make_hf_model(seed=7, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))
    ours = load_hf_dir(str(tmp_path))
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4
