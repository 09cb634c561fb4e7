"""DeepSeekMoE layer vs a naive per-token computation, expert-load stats, the sequence-wise balance loss (V3 eqs.
17-20) and its gradient, and the aux-loss-free bias update (V3 §2.1.2).

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_moe_balance.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.balance import update_expert_bias
from model.moe import MoE, sequence_balance_loss
from model.router import Router
from model.config import preset
from model.transformer import Transformer


def naive_router(x_TD, W, bias, cfg):
    """V3 noaux_tc routing written out token by token."""
    G, E, K = cfg.n_group, cfg.n_routed_experts, cfg.num_experts_per_tok
    ids, weights = [], []
    for x in x_TD:
        s = torch.sigmoid(W @ x)
        c = s + bias
        group_score = torch.stack([c[g * (E // G):(g + 1) * (E // G)].topk(2).values.sum() for g in range(G)])
        keep = group_score.topk(cfg.topk_group).indices.tolist()
        allowed = [e for e in range(E) if e // (E // G) in keep]
        chosen = sorted(allowed, key=lambda e: -float(c[e].detach()))[:K]
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        ids.append(chosen)
        weights.append(w)
    return ids, weights


def swiglu(x, gate_w, up_w, down_w):
    return down_w @ (F.silu(gate_w @ x) * (up_w @ x))


@pytest.fixture
def moe_setup(tiny_config, init_params, randomize_bias):
    cfg = tiny_config(n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = init_params(MoE(cfg), std=0.1)
    randomize_bias(moe, 0.05)
    return cfg, moe


def test_moe_forward_equals_naive(moe_setup):
    cfg, moe = moe_setup
    B, T, D = 2, 9, cfg.hidden_size
    x = torch.randn(B, T, D)
    y, stats = moe(x)
    assert y.shape == (B, T, D)

    x_TD = x.reshape(-1, D)
    ids, weights = naive_router(x_TD, moe.gate.weight, moe.gate.e_score_correction_bias, cfg)
    I = cfg.moe_intermediate_size
    gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
    sh = moe.shared_experts
    expected = []
    for t, xt in enumerate(x_TD):
        out = swiglu(xt, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        for e, w in zip(ids[t], weights[t]):
            out = out + w * swiglu(xt, gu[e, :I], gu[e, I:], dn[e])
        expected.append(out)
    torch.testing.assert_close(y.reshape(-1, D), torch.stack(expected), rtol=1e-5, atol=1e-5)

    # Load = bincount of the selected experts.
    naive_load = torch.bincount(torch.tensor(ids).flatten(), minlength=cfg.n_routed_experts).float()
    torch.testing.assert_close(stats.load, naive_load)
    assert stats.load.sum() == B * T * cfg.num_experts_per_tok
    assert stats.balance_loss is None  # not requested


def test_moe_grouped_and_loop_paths_agree(moe_setup):
    cfg, moe = moe_setup
    x = torch.randn(2, 5, cfg.hidden_size)
    moe.experts.impl = "loop"
    y_loop, _ = moe(x)
    g_loop = torch.autograd.grad(y_loop.square().sum(), list(moe.parameters()), allow_unused=True)
    moe.experts.impl = "grouped_mm"
    y_gmm, _ = moe(x)
    g_gmm = torch.autograd.grad(y_gmm.square().sum(), list(moe.parameters()), allow_unused=True)
    torch.testing.assert_close(y_gmm, y_loop, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_gmm, g_loop):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- balance loss
def test_sequence_balance_loss_hand_case():
    # B = 2 sequences, T = 3 tokens, E = 4 experts, K = 2.
    scores = torch.tensor([
        [[0.8, 0.6, 0.4, 0.2], [0.1, 0.1, 0.1, 0.7], [0.5, 0.5, 0.5, 0.5]],
        [[0.9, 0.1, 0.5, 0.5], [0.9, 0.1, 0.5, 0.5], [0.9, 0.1, 0.5, 0.5]],
    ])
    ids = torch.tensor([
        [[0, 1], [3, 0], [3, 2]],
        [[0, 2], [2, 0], [0, 2]],
    ])
    # seq 0: normalised rows (.4 .3 .2 .1), (.1 .1 .1 .7), (.25 x4) -> P = (.75 .65 .55 1.05) / 3
    #        counts (2 1 1 2) -> f = 4/(2*3) * counts = (4 2 2 4) / 3 -> sum f P = 9.6 / 9
    # seq 1: P = (.45 .05 .25 .25), counts (3 0 3 0) -> f = (2 0 2 0) -> sum f P = 1.4
    expected = (9.6 / 9 + 1.4) / 2
    assert sequence_balance_loss(scores, ids).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_balance_loss_general_formula():
    B, T, E, K = 3, 10, 8, 2
    scores = torch.rand(B, T, E)
    ids = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(B)])
    total = 0.0
    for b in range(B):
        f = [E / (K * T) * int((ids[b] == i).sum()) for i in range(E)]
        P = [float((scores[b, :, i] / scores[b].sum(-1)).mean()) for i in range(E)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    assert sequence_balance_loss(scores, ids).item() == pytest.approx(total / B, rel=1e-5)
    # perfectly uniform scores give exactly 1 whatever the routing
    assert sequence_balance_loss(torch.full((B, T, E), 0.3), ids).item() == pytest.approx(1.0, rel=1e-6)


def test_moe_reports_alpha_times_balance_loss(moe_setup):
    cfg, moe = moe_setup
    x = torch.randn(2, 6, cfg.hidden_size)
    _, stats = moe(x, balance_alpha=0.01)
    ids, _, scores = moe.gate(x.reshape(-1, cfg.hidden_size))
    expected = 0.01 * sequence_balance_loss(scores.view(2, 6, -1), ids.view(2, 6, -1))
    torch.testing.assert_close(stats.balance_loss, expected)


def test_balance_loss_gradient_scales_with_alpha(tiny_config, randomize_bias):
    cfg = tiny_config(num_nextn_predict_layers=0, initializer_range=0.1)
    model = randomize_bias(Transformer(cfg), 0.05)
    router_w = model.layers[1].mlp.gate.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 12))

    def run(alpha):
        model.config.aux_loss_alpha = alpha
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out, router_w.grad.clone()

    out0, g0 = run(0.0)
    out1, g1 = run(0.01)
    out2, g2 = run(0.02)
    assert out0.balance_loss is None
    assert torch.equal(out0.expert_load, out1.expert_load)  # same routing in all runs
    torch.testing.assert_close(out1.loss, out0.loss + out1.balance_loss)
    torch.testing.assert_close(out2.balance_loss, 2 * out1.balance_loss)
    # The balance loss adds alpha * dL_Bal/dW to the router weight gradient, linearly in alpha.
    d1, d2 = g1 - g0, g2 - g0
    assert d1.abs().max() > 1e-6
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-3, atol=1e-9)
    model.config.aux_loss_alpha = 0.01
    out = model(ids, labels=ids)
    direct = torch.autograd.grad(out.balance_loss, router_w)[0]
    torch.testing.assert_close(d1, direct, rtol=1e-3, atol=1e-9)


# --------------------------------------------------------------------------------------------------- bias update
def test_update_expert_bias_exact_step(tiny_config):
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = Transformer(cfg)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 2  # layer 1 and the MTP block
    with torch.no_grad():
        routers[0].e_score_correction_bias.copy_(torch.arange(8) * 0.1)
        routers[0].tokens_per_expert.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5]))  # mean 5
        routers[1].tokens_per_expert.copy_(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 12]))  # mean 5
    before = [r.e_score_correction_bias.clone() for r in routers]

    loads = update_expert_bias(model, gamma=0.01, reduce_fn=None)
    assert loads.shape == (2, 8)
    torch.testing.assert_close(loads[0], torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5]))
    torch.testing.assert_close(routers[0].e_score_correction_bias - before[0],
                               torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(routers[1].e_score_correction_bias - before[1],
                               torch.tensor([0.01, 0.01, 0.01, 0.01, 0, -0.01, -0.01, -0.01]))
    for r in routers:
        assert torch.count_nonzero(r.tokens_per_expert) == 0
        assert r.e_score_correction_bias.dtype == torch.float32


def test_update_expert_bias_gamma_zero_and_empty_load(tiny_config):
    model = Transformer(tiny_config())
    router = next(m for m in model.modules() if isinstance(m, Router))
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.randn(8))
        router.tokens_per_expert.copy_(torch.tensor([9.0, 1, 0, 0, 3, 3, 3, 5]))
    before = router.e_score_correction_bias.clone()
    update_expert_bias(model, gamma=0.0, reduce_fn=None)
    assert torch.equal(router.e_score_correction_bias, before)
    assert torch.count_nonzero(router.tokens_per_expert) == 0
    # no tokens counted (e.g. an eval-only step): nothing moves
    update_expert_bias(model, gamma=0.05, reduce_fn=None)
    assert torch.equal(router.e_score_correction_bias, before)


def test_update_expert_bias_uses_reduce_fn(tiny_config):
    model = Transformer(tiny_config(num_nextn_predict_layers=0))
    router = next(m for m in model.modules() if isinstance(m, Router))
    with torch.no_grad():
        router.tokens_per_expert.copy_(torch.tensor([4.0, 4, 4, 4, 4, 4, 4, 0]))
    # a fake "all-reduce" that adds another rank's loads, making expert 0 the overloaded one
    other = torch.tensor([[20.0, 0, 0, 0, 0, 0, 0, 4]])
    loads = update_expert_bias(model, gamma=0.1, reduce_fn=lambda t: t + other)
    torch.testing.assert_close(loads[0], torch.tensor([24.0, 4, 4, 4, 4, 4, 4, 4]))  # mean 7
    torch.testing.assert_close(router.e_score_correction_bias,
                               torch.tensor([-0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))


def test_dense_model_has_no_routers(tiny_config):
    model = Transformer(tiny_config(n_routed_experts=None, num_nextn_predict_layers=0))
    assert update_expert_bias(model, gamma=0.01, reduce_fn=None) is None


def test_loads_accumulate_only_in_training(moe_setup):
    cfg, moe = moe_setup
    x = torch.randn(2, 7, cfg.hidden_size)
    moe.eval()
    _, stats = moe(x)
    assert stats.load.sum() == 2 * 7 * 3  # reported in eval too ...
    assert torch.count_nonzero(moe.gate.tokens_per_expert) == 0  # ... but not accumulated
    moe.train()
    _, s1 = moe(x)
    torch.testing.assert_close(moe.gate.tokens_per_expert, s1.load)
    _, s2 = moe(x[:1])
    torch.testing.assert_close(moe.gate.tokens_per_expert, s1.load + s2.load)


def _cv(load: torch.Tensor) -> float:
    return float(load.std() / load.mean())


@pytest.mark.parametrize("gamma", [0.02, 0.0])
def test_bias_update_balances_a_skewed_router(tiny_config, init_params, gamma):
    cfg = tiny_config()  # 8 experts, top-2, 2 groups of 4 with 1 kept
    moe = init_params(MoE(cfg), std=0.05)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    moe.train()
    cvs, ratios = [], []
    for _ in range(60):
        with torch.no_grad():
            moe(torch.randn(4, 32, cfg.hidden_size))
        load = update_expert_bias(moe, gamma, reduce_fn=None)[0]
        assert load.sum() == 4 * 32 * 2
        cvs.append(_cv(load))
        ratios.append(float(load.max() / load.mean()))
    # experts 0 and 1 take every token at first: max/mean = E/K = 4
    assert ratios[0] == pytest.approx(4.0) and cvs[0] > 1.5
    late_cv, late_ratio = sum(cvs[-10:]) / 10, sum(ratios[-10:]) / 10
    if gamma > 0:
        assert late_cv < 0.25 * cvs[0], cvs
        assert late_ratio < 2.0, ratios
        bias = moe.gate.e_score_correction_bias
        assert bias[:2].max() < 0.5 and bias[2:].min() > 0  # overloaded down, underloaded up
    else:
        assert late_ratio == pytest.approx(4.0)  # no update, no change
        torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))


def test_left_padding_is_never_scored_nor_counted():
    """With an attention_mask, what pad positions hold changes no loss term and no expert load."""
    torch.manual_seed(0)
    cfg = preset("tiny", aux_loss_alpha=0.01, num_nextn_predict_layers=1)
    model = Transformer(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    other = ids.clone()
    other[0, :5] = torch.randint(3, cfg.vocab_size, (5,))
    a = model(ids, attention_mask=mask, labels=labels)
    b = model(other, attention_mask=mask, labels=labels)
    assert torch.equal(a.ce_loss, b.ce_loss) and torch.equal(a.balance_loss, b.balance_loss)
    assert torch.equal(a.mtp_losses[0], b.mtp_losses[0])
    # only real tokens are routed into the loads: 19 tokens x top-k per MoE layer
    assert torch.equal(a.expert_load.sum(dim=1), torch.full((a.expert_load.shape[0],), 19.0 * cfg.num_experts_per_tok))
    # the unpadded row alone gives the same per-sequence balance loss as inside the padded batch (alpha * mean)
    alone = model(ids[1:], labels=labels[1:])
    trimmed = model(ids[:1, 5:], labels=labels[:1, 5:])
    assert torch.allclose(a.balance_loss, (alone.balance_loss + trimmed.balance_loss) / 2, atol=1e-6)
