"""Multi-token prediction (V3 §2.2): target alignment per depth, the total-loss formula, gradient weighting by
lambda, the depth-k module against a hand computation, and causality of the main and MTP logits.

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_mtp.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.moe import MoE
from model.norm import RMSNorm
from model.transformer import Transformer


@pytest.fixture
def mtp_model(tiny_config, randomize_bias):
    """Tiny V3 model with D = 2 MTP depths, non-unit norm weights and a small random routing bias."""
    cfg = tiny_config(num_nextn_predict_layers=2, initializer_range=0.05, mtp_loss_lambda=0.3,
                      aux_loss_alpha=0.01)
    model = Transformer(cfg)
    randomize_bias(model, 0.05)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model


def hand_ce(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean over (b, i) with labels[b, i + shift] != -100 of -log softmax(logits[b, i])[labels[b, i + shift]]."""
    logp = logits.double().log_softmax(-1)
    terms = []
    B, T, _ = logits.shape
    for b in range(B):
        for i in range(T - shift):
            target = int(labels[b, i + shift])
            if target != -100:
                terms.append(-logp[b, i, target])
    return torch.stack(terms).mean()


def test_mtp_targets_are_shifted_by_depth(mtp_model):
    cfg = mtp_model.config
    B, T = 2, 10
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    labels = ids.clone()
    labels[0, 4] = -100
    labels[1, 9] = -100
    out = mtp_model(ids, labels=labels, return_mtp_logits=True)
    assert len(out.mtp_logits) == 2 and len(out.mtp_losses) == 2
    assert out.mtp_logits[0].shape == (B, T, cfg.vocab_size)

    torch.testing.assert_close(out.ce_loss.double(), hand_ce(out.logits, labels, 1), rtol=1e-5, atol=1e-6)
    for k in (1, 2):
        # depth k at position i predicts token i + k + 1
        expected = hand_ce(out.mtp_logits[k - 1], labels, k + 1)
        torch.testing.assert_close(out.mtp_losses[k - 1].double(), expected, rtol=1e-5, atol=1e-6)
        # the off-by-one alternatives are different numbers (so the check above is discriminative)
        assert abs(float(hand_ce(out.mtp_logits[k - 1].detach(), labels, k)) - float(expected.detach())) > 1e-4


def test_total_loss_formula(mtp_model):
    cfg = mtp_model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    moe_stats = []
    hooks = [m.register_forward_hook(lambda mod, inp, outp: moe_stats.append(outp[1]))
             for m in mtp_model.modules() if isinstance(m, MoE)]
    try:
        out = mtp_model(ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    assert out.mtp_logits == []  # not asked for
    D = cfg.num_nextn_predict_layers
    # one main MoE layer + one MoE block per MTP depth, each with alpha * L_Bal
    assert len(moe_stats) == 1 + D
    balance = sum(s.balance_loss for s in moe_stats)
    torch.testing.assert_close(out.balance_loss, balance)
    assert out.balance_loss > 0
    expected = out.ce_loss + cfg.mtp_loss_lambda / D * (out.mtp_losses[0] + out.mtp_losses[1]) + balance
    torch.testing.assert_close(out.loss, expected)
    assert out.expert_load.shape == (1, cfg.n_routed_experts)  # main-model layers only


def test_mtp_loss_gradient_scales_with_lambda(mtp_model):
    model = mtp_model
    model.config.aux_loss_alpha = 0.0  # isolate the MTP term (the MTP MoE block would add its balance loss)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    eh = [m.eh_proj.weight for m in model.mtp]

    def grads(lam):
        model.config.mtp_loss_lambda = lam
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out, {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}

    out1, g1 = grads(0.3)
    out2, g2 = grads(0.6)
    out0, g0 = grads(0.0)
    for k in range(2):
        name = f"mtp.{k}.eh_proj.weight"
        assert g1[name].abs().max() > 1e-7, name
        torch.testing.assert_close(g2[name], 2 * g1[name], rtol=1e-4, atol=1e-10)
    assert eh[0].grad is not None
    # lambda = 0: every MTP parameter gets zero gradient; the main model gets exactly the CE gradient.
    for name, g in g0.items():
        if name.startswith("mtp."):
            assert g is None or torch.count_nonzero(g) == 0, name
    torch.testing.assert_close(out0.loss, out0.ce_loss)
    ce_grad = torch.autograd.grad(model(ids, labels=ids).ce_loss, model.lm_head.weight)[0]
    torch.testing.assert_close(g0["lm_head.weight"], ce_grad)
    # ... and with lambda > 0 the MTP loss reaches the shared trunk too (h^0 feeds the MTP modules)
    assert not torch.allclose(g1["layers.0.self_attn.o_proj.weight"], g0["layers.0.self_attn.o_proj.weight"])


def test_mtp_modules_equal_hand_computation(mtp_model):
    model = mtp_model.eval()
    B, T = 2, 9
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    out = model(ids, return_mtp_logits=True)
    assert out.loss is None and len(out.mtp_logits) == 2

    freqs_cis = model.rotary(torch.arange(T).expand(B, T))
    # h^0 is the final normed hidden state of the main model
    h0 = model.norm(_main_trunk(model, ids, freqs_cis))
    torch.testing.assert_close(out.hidden_states, h0)
    torch.testing.assert_close(out.logits, model.lm_head(h0))

    h = h0
    for k, module in enumerate(model.mtp, start=1):
        emb = model.embed_tokens(F.pad(ids[:, k:], (0, k)))  # Emb(t_{i+k}); the tail is never used causally
        h_in = module.eh_proj(torch.cat((module.enorm(emb), module.hnorm(h)), dim=-1))  # embedding first
        h, _ = module.block(h_in, freqs_cis, None)
        logits = model.lm_head(module.norm(h))
        n = T - k  # positions with a real token t_{i+k}
        torch.testing.assert_close(out.mtp_logits[k - 1][:, :n], logits[:, :n], rtol=1e-5, atol=1e-5)

        # sensitivity: the paper's order [hnorm(h); enorm(emb)] gives different logits
        swapped = module.eh_proj(torch.cat((module.hnorm(h0 if k == 1 else h), module.enorm(emb)), dim=-1))
        assert not torch.allclose(swapped, h_in)


def _main_trunk(model, ids, freqs_cis):
    h = model.embed_tokens(ids)
    for layer in model.layers:
        h, _ = layer(h, freqs_cis, None)
    return h


# --------------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("depths", [0, 2])
def test_causality(tiny_config, randomize_bias, depths):
    cfg = tiny_config(num_nextn_predict_layers=depths, initializer_range=0.05)
    model = randomize_bias(Transformer(cfg), 0.05).eval()
    B, T, t = 2, 12, 7
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    changed = ids.clone()
    changed[:, t:] = torch.randint(0, cfg.vocab_size, (B, T - t))
    changed[:, t] = (ids[:, t] + 1) % cfg.vocab_size  # make sure position t really changes
    with torch.no_grad():
        a = model(ids, return_mtp_logits=True)
        b = model(changed, return_mtp_logits=True)

    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t], rtol=0, atol=1e-5)
    assert (a.logits[:, t:] - b.logits[:, t:]).abs().max() > 1e-4
    assert len(a.mtp_logits) == depths
    for k, (la, lb) in enumerate(zip(a.mtp_logits, b.mtp_logits), start=1):
        # depth k at position i sees tokens up to i + k: positions < t - k are unaffected, t - k is affected
        torch.testing.assert_close(la[:, : t - k], lb[:, : t - k], rtol=0, atol=1e-5)
        assert (la[:, t - k] - lb[:, t - k]).abs().max() > 1e-4, k
