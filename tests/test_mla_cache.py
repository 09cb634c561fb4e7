"""MLA: absorbed decode == expanded attention; cached decoding == full forward at every position; the cache holds
only (kv_lora_rank + qk_rope_head_dim) values per token per layer.

Run: python -m pytest -q tests/test_mla_cache.py
"""

import torch

from model import LatentCache, Transformer, preset
from model.mla import MLA
from model.transformer import padded_causal_mask


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = preset("tiny", **kw)
    return Transformer(cfg).eval()


def test_absorbed_equals_expanded_attention():
    torch.manual_seed(0)
    cfg = preset("tiny", rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32,
                                           mscale=1.0, mscale_all_dim=1.0))
    model = Transformer(cfg)
    mla: MLA = model.layers[0].self_attn
    x = torch.randn(2, 12, cfg.hidden_size)
    pos = torch.arange(12).expand(2, 12)
    freqs_cis = model.rotary(pos)
    q_nope, q_pe = mla.query(x, freqs_cis)
    c_kv, k_pe = mla.latent(x, freqs_cis)
    attn = torch.ones(2, 12, dtype=torch.bool)
    attn[1, :4] = False
    mask = padded_causal_mask(attn)
    expanded = mla.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
    absorbed = mla.attend_absorbed(q_nope, q_pe, torch.cat((c_kv, k_pe), -1), mask)
    assert (expanded - absorbed).abs().max() <= 1e-5
    # and with no mask (plain causal) the expanded path's is_causal matches the absorbed path's explicit mask
    expanded_causal = mla.attend_expanded(q_nope, q_pe, c_kv, k_pe, None)
    absorbed_causal = mla.attend_absorbed(q_nope, q_pe, torch.cat((c_kv, k_pe), -1), padded_causal_mask(torch.ones(2, 12)))
    assert (expanded_causal - absorbed_causal).abs().max() <= 1e-5


def test_cached_decode_matches_full_forward_at_every_position():
    model = _tiny()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = LatentCache(model.config, 2, 20)
        step_logits = [model(ids[:, :5], cache=cache).logits]  # prefill 5
        for t in range(5, 20):
            step_logits.append(model(ids[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(step_logits, dim=1)
    assert (cached - full).abs().max() < 1e-5


def test_cached_decode_with_left_padding_matches_unpadded_sequences():
    model = _tiny()
    torch.manual_seed(2)
    a = torch.randint(2, 128, (1, 9))
    b = torch.randint(2, 128, (1, 4))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits[0], model(b).logits[0]
        batch = torch.zeros(2, 9, dtype=torch.long)
        batch[0], batch[1, 5:] = a[0], b[0]
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[0], mask[1, 5:] = True, True
        cache = LatentCache(model.config, 2, 9)
        prefill = model(batch[:, :6], attention_mask=mask[:, :6], cache=cache).logits
        rest = [model(batch[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache).logits for t in range(6, 9)]
    logits = torch.cat([prefill, *rest], dim=1)
    assert (logits[0] - ref_a).abs().max() < 1e-5
    assert (logits[1, 5:] - ref_b).abs().max() < 1e-5


def test_cache_holds_only_latent_and_rope_key():
    model = _tiny()
    cfg = model.config
    cache = LatentCache(cfg, batch_size=3, max_len=7)
    assert cache.latent.shape == (cfg.num_hidden_layers, 3, 7, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.bytes_per_token_per_layer() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    with torch.no_grad():
        model(ids, cache=cache)
        # what is cached is exactly kv_a_layernorm(c_KV) and the roped shared key of each layer's input
        x = model.embed_tokens(ids)
        freqs_cis = model.rotary(torch.arange(7).expand(3, 7))
        c_kv, k_pe = model.layers[0].self_attn.latent(model.layers[0].input_layernorm(x), freqs_cis)
    assert torch.allclose(cache.latent[0, :, :, : cfg.kv_lora_rank], c_kv, atol=1e-6)
    assert torch.allclose(cache.latent[0, :, :, cfg.kv_lora_rank:], k_pe, atol=1e-6)


def test_cache_overflow_is_a_clear_error():
    model = _tiny()
    cache = LatentCache(model.config, 1, 4)
    try:
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    except ValueError as e:
        assert "latent cache holds 4 tokens" in str(e)
    else:
        raise AssertionError("expected a ValueError")
