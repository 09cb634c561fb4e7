"""Router: V3 noaux_tc group-limited selection with the correction bias, V2 softmax routing, and parity with
transformers' DeepseekV3TopkRouter / DeepseekV2TopkRouter.

Most cases are hand-made: the router weight is the identity (hidden_size == n_routed_experts), so the router
logits are exactly the input rows and the scores are sigmoid/softmax of numbers we choose.

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_router.py
"""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.router import Router


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def identity_router(cfg: ModelConfig, bias=None) -> Router:
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.n_routed_experts))
        if bias is not None:
            router.e_score_correction_bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return router


def sigmoid_inputs(*rows) -> torch.Tensor:
    """Inputs whose sigmoid router scores are exactly the given probabilities (identity router weight)."""
    return torch.tensor([[logit(p) for p in row] for row in rows], dtype=torch.float32)


def sorted_route(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each token's (expert id, weight) pairs by expert id, so routers with different top-k order compare."""
    ids_sorted, order = ids.sort(dim=-1)
    return ids_sorted, weights.gather(1, order)


# --------------------------------------------------------------------------------------------------- V3 noaux_tc
# Scores per group of 2: g0 = (0.99, 0.01) sum 1.00, g1 = (0.62, 0.60) sum 1.22, g2 = (0.58, 0.55) sum 1.13,
# g3 = (0.50, 0.30) sum 0.80. Top-2 groups by top-2 sum are g1 and g2, although expert 0 has the best score.
CASE = (0.99, 0.01, 0.62, 0.60, 0.58, 0.55, 0.50, 0.30)


def test_noaux_tc_keeps_groups_with_best_top2_sum(router_config):
    cfg = router_config(n_group=4, topk_group=2, num_experts_per_tok=3)
    router = identity_router(cfg)
    ids, weights, scores = router(sigmoid_inputs(CASE))
    torch.testing.assert_close(scores, torch.tensor([CASE]))
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[2, 3, 4]]  # expert 0 (score 0.99) lives in a dropped group
    expected = torch.tensor([[0.62, 0.60, 0.58]]) / 1.80 * 2.5
    torch.testing.assert_close(weights, expected)


def test_noaux_tc_group_masking_random_tokens(router_config):
    """For random tokens and bias: every selected expert lies in the topk_group groups of best top-2 biased sum."""
    cfg = router_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = identity_router(cfg, bias=torch.randn(16) * 0.1)
    x = torch.randn(200, 16) * 2
    ids, weights, scores = router(x)
    biased = (scores + router.e_score_correction_bias).view(200, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)  # [T, G]
    best_groups = group_score.topk(2, dim=-1).indices.sort(-1).values
    chosen_groups = ids // 4
    for t in range(200):
        assert set(chosen_groups[t].tolist()) <= set(best_groups[t].tolist()), t
        # within the allowed experts, the chosen ones are the top-4 by biased score
        allowed = torch.cat([torch.arange(4) + 4 * g for g in best_groups[t].tolist()])
        top = allowed[(scores[t, allowed] + router.e_score_correction_bias[allowed]).topk(4).indices]
        assert sorted(top.tolist()) == sorted(ids[t].tolist()), t
    # unbiased, normalised weights
    torch.testing.assert_close(weights, scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True) * 2.5)
    assert (chosen_groups.unique(dim=None).numel()) > 2  # routing is not trivially the same for every token


def test_negative_bias_cannot_let_masked_group_win(router_config):
    # 2 groups of 4, keep 1, top-3. Group 0 = (0.9, 0.9, 0.5, 0.4) with bias -10 on experts 2 and 3, group 1 = 0.6s.
    # Biased group-0 top-2 sum 1.8 > 1.2, so group 0 is kept; its 3rd choice has biased score -9.5 < 0. With a
    # 0.0 fill (the old transformers bug) a group-1 expert would win the third slot; with -inf it cannot.
    cfg = router_config(n_group=2, topk_group=1, num_experts_per_tok=3)
    bias = [0.0, 0.0, -10.0, -10.0, 0.0, 0.0, 0.0, 0.0]
    router = identity_router(cfg, bias)
    ids, weights, _ = router(sigmoid_inputs((0.9, 0.9, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6)))
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[0, 1, 2]]
    # the weights use the unbiased scores 0.9, 0.9, 0.5
    torch.testing.assert_close(weights, torch.tensor([[0.9, 0.9, 0.5]]) / 2.3 * 2.5)


def test_uniform_negative_bias_does_not_change_selection(router_config):
    cfg = router_config(n_group=4, topk_group=2, num_experts_per_tok=3)
    router = identity_router(cfg, bias=[-10.0] * 8)
    ids, weights, _ = router(sigmoid_inputs(CASE))
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[2, 3, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.62, 0.60, 0.58]]) / 1.80 * 2.5)


def test_bias_chooses_but_never_weights(router_config):
    cfg = router_config(n_group=1, topk_group=1, num_experts_per_tok=2)
    x = sigmoid_inputs((0.9, 0.8, 0.7, 0.1, 0.2, 0.2, 0.2, 0.2))
    ids, weights, _ = identity_router(cfg)(x)
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.9, 0.8]]) / 1.7 * 2.5)

    # +1 on expert 3 (score 0.1): biased 1.1 beats 0.8, so it is selected, but weighted by its raw 0.1.
    ids, weights, scores = identity_router(cfg, bias=[0, 0, 0, 1.0, 0, 0, 0, 0])(x)
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[0, 3]]
    torch.testing.assert_close(weights, torch.tensor([[2.25, 0.25]]))  # (0.9, 0.1) / 1.0 * 2.5
    torch.testing.assert_close(scores[0, 3], torch.tensor(0.1))  # the returned scores are unbiased too


def test_norm_topk_prob(router_config):
    x = torch.randn(50, 8)
    cfg = router_config(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    ids, weights, scores = identity_router(cfg, bias=torch.randn(8) * 0.1)(x)
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), 2.5))

    cfg = router_config(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
                        norm_topk_prob=False)
    ids2, weights2, scores2 = identity_router(cfg)(x)
    torch.testing.assert_close(weights2, scores2.gather(1, ids2) * 2.5)
    assert not torch.allclose(weights2.sum(-1), torch.full((50,), 2.5))


def test_router_is_fp32_and_shapes(router_config):
    cfg = router_config(n_group=4, topk_group=2, num_experts_per_tok=3)
    router = identity_router(cfg, bias=torch.randn(8) * 0.1).to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.float32  # the bias is never rounded to bf16
    ids, weights, scores = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert ids.shape == (5, 3) and ids.dtype == torch.int64
    assert weights.dtype == torch.float32 and scores.dtype == torch.float32 and scores.shape == (5, 8)


# --------------------------------------------------------------------------------------------------- V2 softmax
# Logits: g0 = (3.0, -5), g1 = (2.6, 2.55), g2 = (2.7, -6), g3 = (0, 0). Group max: 3.0, 2.6, 2.7, 0 -> keep g0, g2.
V2_LOGITS = torch.tensor([[3.0, -5.0, 2.6, 2.55, 2.7, -6.0, 0.0, 0.0]])


def test_v2_group_limited_greedy_uses_group_max_and_no_renorm(router_config):
    cfg = router_config(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=16.0)
    router = identity_router(cfg, bias=torch.randn(8))  # the bias is ignored outside noaux_tc
    ids, weights, scores = router(V2_LOGITS)
    probs = V2_LOGITS.softmax(-1)
    torch.testing.assert_close(scores, probs)
    ids, weights = sorted_route(ids, weights)
    # top-3 within groups 0 and 2 = experts 0, 4 and then 1 (logit -5) -- expert 2 (2.6) is in a dropped group.
    assert ids.tolist() == [[0, 1, 4]]
    torch.testing.assert_close(weights, probs[:, [0, 1, 4]] * 16.0)
    assert weights.sum() < 16.0  # not renormalised


def test_v2_greedy_ignores_groups(router_config):
    cfg = router_config(scoring_func="softmax", topk_method="greedy", n_group=4, topk_group=2,
                        num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=16.0)
    ids, weights, scores = identity_router(cfg)(V2_LOGITS)
    ids, weights = sorted_route(ids, weights)
    assert ids.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(weights, V2_LOGITS.softmax(-1)[:, [0, 2, 4]] * 16.0)


def test_v3_sigmoid_greedy_and_group_limited_differ_from_noaux(router_config):
    # group_limited_greedy on sigmoid scores uses the group max: g0 (0.99) and g1 (0.62) -> {0, 2, 3}.
    cfg = router_config(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)
    ids, _, _ = identity_router(cfg)(sigmoid_inputs(CASE))
    assert sorted(ids[0].tolist()) == [0, 2, 3]
    cfg = router_config(topk_method="greedy", n_group=4, topk_group=1, num_experts_per_tok=3)
    ids, _, _ = identity_router(cfg)(sigmoid_inputs(CASE))
    assert sorted(ids[0].tolist()) == [0, 2, 3]


# --------------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_deepseek_v3_router(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf_cfg = DeepseekV3Config(hidden_size=16, num_attention_heads=4, num_hidden_layers=1, n_routed_experts=16,
                              num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              norm_topk_prob=norm_topk_prob)
    cfg = ModelConfig.from_dict(hf_cfg.to_dict())
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")
    ours, theirs = Router(cfg), DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        ours.weight.normal_(0, 0.5)
        ours.e_score_correction_bias.copy_(torch.randn(16) * 0.05)
        theirs.weight.copy_(ours.weight)
        theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias)

    x = torch.randn(256, 16)
    ids, weights, scores = ours(x)
    logits, hf_weights, hf_ids = theirs(x)
    torch.testing.assert_close(scores, logits.sigmoid())
    ids, weights = sorted_route(ids, weights)
    hf_ids, hf_weights = sorted_route(hf_ids, hf_weights)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)
    # The group limit really bites on this data: plain top-4 of the biased scores differs for some tokens.
    plain = (scores + ours.e_score_correction_bias).topk(4, dim=-1).indices.sort(-1).values
    assert (plain != ids).any(dim=-1).sum() > 0


@pytest.mark.parametrize("topk_method", ["group_limited_greedy", "greedy"])
def test_matches_transformers_deepseek_v2_router(topk_method):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    hf_cfg = DeepseekV2Config(hidden_size=16, num_attention_heads=4, num_hidden_layers=1, n_routed_experts=16,
                              num_experts_per_tok=4, n_group=4, topk_group=2, topk_method=topk_method,
                              routed_scaling_factor=16.0)
    cfg = ModelConfig.from_dict(hf_cfg.to_dict())
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", topk_method, False)
    ours, theirs = Router(cfg), DeepseekV2TopkRouter(hf_cfg)
    with torch.no_grad():
        ours.weight.normal_(0, 1.0)
        theirs.weight.copy_(ours.weight)

    x = torch.randn(256, 16)
    ids, weights, scores = ours(x)
    logits, hf_weights, hf_ids = theirs(x)
    torch.testing.assert_close(scores, logits.softmax(-1))
    ids, weights = sorted_route(ids, weights)
    hf_ids, hf_weights = sorted_route(hf_ids, hf_weights)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)
    if topk_method == "group_limited_greedy":
        greedy = scores.topk(4, dim=-1).indices.sort(-1).values
        assert (greedy != ids).any(dim=-1).sum() > 0  # the group limit changed some tokens' experts
