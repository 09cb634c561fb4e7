"""Distillation losses (distill/losses.py): hand-computed KL / reverse KL / JSD(β) values, the Hinton α·CE + T²·KL
objective, top-k teachers (renormalised and with a rest bucket), masking, float64 gradchecks, and the invariance of
the global-token normaliser under micro-batching and data-parallel splitting.

Run: PYTHONPATH=. python -m pytest -q tests/test_distill_losses.py
"""

import math

import pytest
import torch

from distill.losses import (DistillStats, TopK, distill_loss, divergence, forward_kl, generalized_jsd, kd_per_token,
                            reverse_kl, supports, token_normalizer, topk_rest_exact, topk_teacher)

F64 = torch.float64
P = [0.7, 0.2, 0.1]  # teacher
Q = [0.5, 0.3, 0.2]  # student


def _log(x):
    return torch.tensor(x, dtype=F64).log()


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# ----------------------------------------------------------------------------------------------- divergences

def test_forward_and_reverse_kl_by_hand():
    fwd = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    rev = 0.5 * math.log(0.5 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.1)
    assert float(forward_kl(_log(Q), _log(P))) == pytest.approx(fwd, abs=1e-12)
    assert float(reverse_kl(_log(Q), _log(P))) == pytest.approx(rev, abs=1e-12)
    assert fwd == pytest.approx(0.0851, abs=1e-4) and rev == pytest.approx(0.0920, abs=1e-4)
    assert float(forward_kl(_log(P), _log(P))) == 0.0


def test_jsd_beta_weights_the_teacher():
    beta = 0.3  # m = 0.3 p_T + 0.7 p_S; JSD = 0.3 KL(p_T||m) + 0.7 KL(p_S||m)
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    expected = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
    assert float(generalized_jsd(_log(Q), _log(P), beta)) == pytest.approx(expected, abs=1e-12)
    swapped = beta * _kl(Q, [beta * q + (1 - beta) * p for p, q in zip(P, Q)]) + \
        (1 - beta) * _kl(P, [beta * q + (1 - beta) * p for p, q in zip(P, Q)])
    assert abs(expected - swapped) > 1e-4  # the convention matters: β on the student would give another value
    js = 0.5 * _kl(P, [(p + q) / 2 for p, q in zip(P, Q)]) + 0.5 * _kl(Q, [(p + q) / 2 for p, q in zip(P, Q)])
    assert float(divergence(_log(Q), _log(P), "jsd", 0.5)) == pytest.approx(js, abs=1e-12)
    assert js <= math.log(2)


def test_jsd_end_points_are_forward_and_reverse_kl_and_the_limits_agree():
    s, t = torch.randn(4, 9, dtype=F64).log_softmax(-1), torch.randn(4, 9, dtype=F64).log_softmax(-1)
    assert torch.equal(generalized_jsd(s, t, 0.0), forward_kl(s, t))  # TRL: beta=0 -> KL(teacher || student)
    assert torch.equal(generalized_jsd(s, t, 1.0), reverse_kl(s, t))  # TRL: beta=1 -> KL(student || teacher)
    eps = 1e-6
    assert torch.allclose(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-4)
    assert torch.allclose(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-4)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


# --------------------------------------------------------------------------------------- temperature and Hinton

def test_temperature_is_applied_to_both_with_the_t_squared_factor():
    zs, zt = torch.tensor([[1.0, 0.0, -1.0]], dtype=F64), torch.tensor([[2.0, 0.5, 0.0]], dtype=F64)
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 0.0, -1.0)]
    pt = [math.exp(v / T) for v in (2.0, 0.5, 0.0)]
    ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
    assert float(kd_per_token(zs, zt, temperature=T)) == pytest.approx(T * T * _kl(pt, ps), abs=1e-12)
    assert float(kd_per_token(zs, zt, temperature=T, kind="reverse_kl")) == pytest.approx(T * T * _kl(ps, pt),
                                                                                           abs=1e-12)


def test_t_squared_keeps_the_soft_gradient_scale_at_high_temperature():
    # Hinton §2.1: ∂(T²·KL)/∂z_s = T (q − p) → (z_s − z_t)/V for zero-mean logits and large T (no 1/T² decay).
    zt = torch.tensor([0.3, -0.1, -0.2], dtype=F64)
    grads = []
    for T in (10.0, 40.0):
        zs = torch.tensor([0.1, 0.2, -0.3], dtype=F64, requires_grad=True)
        kd_per_token(zs, zt, temperature=T).backward()
        grads.append(zs.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0.05)
    assert torch.allclose(grads[1], (torch.tensor([0.1, 0.2, -0.3], dtype=F64) - zt) / 3, rtol=0.05)


def test_hinton_objective_alpha_ce_plus_t2_kl_by_hand():
    zs = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 0.5, 0.2]]], dtype=F64)
    zt = torch.tensor([[[2.0, 0.5, 0.0], [0.1, 0.1, 3.0]]], dtype=F64)
    labels = torch.tensor([[0, 2]])
    alpha, T = 0.25, 3.0
    expected = 0.0
    for n in range(2):
        logq1 = zs[0, n].log_softmax(-1)
        ce = -float(logq1[labels[0, n]])
        ps, pt = (zs[0, n] / T).softmax(-1).tolist(), (zt[0, n] / T).softmax(-1).tolist()
        expected += alpha * ce + (1 - alpha) * T * T * _kl(pt, ps)
    out = distill_loss(zs, labels, zt, None, normalizer=2.0, alpha=alpha, temperature=T)
    assert float(out.loss) == pytest.approx(expected / 2, abs=1e-12)
    assert out.stats.tokens == 2 and out.stats.ce_tokens == 2
    ce_only = distill_loss(zs, labels, None, None, normalizer=2.0, alpha=1.0)
    assert float(ce_only.loss) == pytest.approx(float(torch.nn.functional.cross_entropy(zs[0], labels[0])), abs=1e-12)
    with pytest.raises(ValueError, match="needs a teacher"):
        distill_loss(zs, labels, None, None, normalizer=2.0, alpha=0.5)


# ------------------------------------------------------------------------------------------------------- top-k

def test_topk_renorm_by_hand_and_exact_at_any_temperature():
    zt = torch.tensor([3.0, 1.0, 0.0, -2.0], dtype=F64)
    zs = torch.tensor([0.5, 1.5, 0.0, 1.0], dtype=F64)
    top = topk_teacher(zt, 2)  # ids 0, 1
    assert top.ids.tolist() == [0, 1]
    s, t = supports(zs, top, 1.0, "renorm")
    pt = [math.exp(3) / (math.exp(3) + math.exp(1)), math.exp(1) / (math.exp(3) + math.exp(1))]
    ps = [math.exp(0.5) / (math.exp(0.5) + math.exp(1.5)), math.exp(1.5) / (math.exp(0.5) + math.exp(1.5))]
    assert t.exp().tolist() == pytest.approx(pt, abs=1e-12) and s.exp().tolist() == pytest.approx(ps, abs=1e-12)
    assert float(kd_per_token(zs, top, temperature=1.0)) == pytest.approx(_kl(pt, ps), abs=1e-12)
    # cached at T_c = 1, used at T = 2: equals renormalising softmax(z_t / 2) over the same ids
    T = 2.0
    _, t2 = supports(zs, top, T, "renorm")
    direct = (zt[[0, 1]] / T).log_softmax(-1)
    assert torch.allclose(t2, direct, atol=1e-12)
    # a teacher cached at T_c = 2 and used at T = 1 also recovers softmax(z_t) over the ids
    top_c2 = topk_teacher(zt, 2, temperature=2.0)
    assert torch.allclose(supports(zs, top_c2, 1.0, "renorm")[1], zt[[0, 1]].log_softmax(-1), atol=1e-12)


def test_topk_rest_bucket_by_hand_and_temperature_guard():
    zt = torch.tensor([3.0, 1.0, 0.0, -2.0], dtype=F64)
    zs = torch.tensor([0.5, 1.5, 0.0, 1.0], dtype=F64)
    pt_full, ps_full = zt.softmax(-1).tolist(), zs.softmax(-1).tolist()
    pt = [pt_full[0], pt_full[1], pt_full[2] + pt_full[3]]
    ps = [ps_full[0], ps_full[1], ps_full[2] + ps_full[3]]
    top = topk_teacher(zt, 2)
    s, t = supports(zs, top, 1.0, "rest")
    assert t.exp().tolist() == pytest.approx(pt, abs=1e-12) and s.exp().tolist() == pytest.approx(ps, abs=1e-12)
    assert float(kd_per_token(zs, top, temperature=1.0, topk_mode="rest")) == pytest.approx(_kl(pt, ps), abs=1e-12)
    _, exact_rest = topk_rest_exact(zt, 2)
    assert float(exact_rest.exp()) == pytest.approx(pt[2], abs=1e-12)
    with pytest.raises(ValueError, match="rest.*temperature"):
        supports(zs, top, 2.0, "rest")
    # k = V: the rest bucket is empty on both sides -> the full KL, finite, no NaN gradient
    zs_g = zs.clone().requires_grad_(True)
    full = kd_per_token(zs_g, topk_teacher(zt, 4), temperature=1.0, topk_mode="rest")
    assert float(full.detach()) == pytest.approx(_kl(pt_full, ps_full), abs=1e-9)
    full.backward()
    assert torch.isfinite(zs_g.grad).all()


def test_fp16_cached_rest_mass_never_goes_negative():
    zt = torch.tensor([[12.0, 0.0, -1.0, -3.0]])  # top-3 hold ~all the mass: fp16 rounding can push the sum past 1
    top = topk_teacher(zt, 3)
    top16 = TopK(top.ids.to(torch.int32), top.logprobs.half(), 1.0)
    s, t = supports(torch.zeros(1, 4), top16, 1.0, "rest")
    assert torch.isfinite(t).all() and float(t[0, -1].exp()) >= 0.99e-6
    assert torch.isfinite(kd_per_token(torch.zeros(1, 4), top16, topk_mode="rest", kind="reverse_kl")).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_kind", ["dense", "renorm", "rest"])
def test_gradcheck_float64(kind, teacher_kind):
    torch.manual_seed(1)
    zs = torch.randn(3, 6, dtype=F64, requires_grad=True)
    zt = torch.randn(3, 6, dtype=F64, requires_grad=teacher_kind == "dense")
    if teacher_kind == "dense":
        assert torch.autograd.gradcheck(lambda a, b: kd_per_token(a, b, temperature=1.7, kind=kind, beta=0.3),
                                        (zs, zt))
    else:
        top = topk_teacher(zt.detach(), 3, temperature=1.7)
        assert torch.autograd.gradcheck(
            lambda a: kd_per_token(a, top, temperature=1.7, kind=kind, beta=0.3, topk_mode=teacher_kind), (zs,))


def test_gradcheck_full_loss_with_mask_and_labels():
    torch.manual_seed(2)
    zs = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    zt = torch.randn(2, 3, 5, dtype=F64)
    labels = torch.tensor([[1, 4, -100], [0, 2, 3]])
    mask = labels != -100
    assert torch.autograd.gradcheck(
        lambda a: distill_loss(a, labels, zt, mask, normalizer=5.0, alpha=0.3, temperature=2.0, kind="jsd").loss,
        (zs,))


# ------------------------------------------------------------------------------------------- masking, normaliser

def test_masked_positions_contribute_nothing_even_with_garbage():
    torch.manual_seed(3)
    zs, zt = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    ref = distill_loss(zs, labels, zt, mask, normalizer=4.0, alpha=0.5, temperature=2.0)
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[~mask] = 1e30
    zt2[~mask] = float("nan")
    zs2.requires_grad_(True)
    out = distill_loss(zs2, labels, zt2, mask, normalizer=4.0, alpha=0.5, temperature=2.0)
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss), rel=1e-6)
    out.loss.backward()
    assert zs2.grad[~mask].abs().max() == 0 and torch.isfinite(zs2.grad).all()
    assert out.stats.tokens == 4


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_micro_batching_and_data_parallel_give_the_whole_batch_loss_and_gradient(teacher_kind):
    torch.manual_seed(4)
    B, N, V = 6, 5, 11
    zs = torch.randn(B, N, V, dtype=F64)
    zt = torch.randn(B, N, V, dtype=F64)
    labels = torch.randint(0, V, (B, N))
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(N)[None] < lengths[:, None]  # ragged: padding at the end of each row
    teacher = zt if teacher_kind == "dense" else topk_teacher(zt, 4)
    kw = dict(alpha=0.4, temperature=2.0, kind="jsd", beta=0.3)

    def run(rows, normalizer, width=None):
        w = width or N
        z = zs[rows, :w].clone().requires_grad_(True)
        t = teacher[rows, :w] if teacher_kind == "dense" else teacher[(rows, slice(0, w))]
        out = distill_loss(z, labels[rows, :w], t, mask[rows, :w], normalizer=normalizer, **kw)
        out.loss.backward()
        g = torch.zeros(B, N, V, dtype=F64)
        g[rows, :w] = z.grad
        return out.loss.detach(), g, out.stats

    rows_all = torch.arange(B)
    whole, g_whole, st_whole = run(rows_all, token_normalizer(mask))
    # gradient accumulation over uneven micro-batches, each trimmed to its own padding width
    splits = [torch.tensor([0]), torch.tensor([1, 2]), torch.tensor([3, 4, 5])]
    norm = token_normalizer([mask[s] for s in splits])
    assert norm == token_normalizer(mask) == float(lengths.sum())
    parts = [run(s, norm, width=int(lengths[s].max())) for s in splits]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole), abs=1e-12)
    assert torch.allclose(sum(p[1] for p in parts), g_whole, atol=1e-12)
    stats = parts[0][2] + parts[1][2] + parts[2][2]
    assert stats.as_list() == pytest.approx(st_whole.as_list(), abs=1e-9)
    # two data-parallel ranks: normaliser = global count / world, DDP averages the rank gradients
    ranks = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    norm_dp = token_normalizer([mask[r] for r in ranks], world_size=2)
    g_dp = sum(run(r, norm_dp)[1] for r in ranks) / 2
    assert torch.allclose(g_dp, g_whole, atol=1e-12)


def test_token_normalizer_and_stats():
    assert token_normalizer(torch.tensor([[1, 1, 0], [1, 0, 0]])) == 3
    assert token_normalizer([torch.ones(2, 2), 4], world_size=4) == 2.0
    with pytest.raises(ValueError, match="empty step"):
        token_normalizer(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="normalizer"):
        distill_loss(torch.zeros(1, 1, 3), None, torch.zeros(1, 1, 3), None, normalizer=0, alpha=0.0)
    zs = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    zt = torch.tensor([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    out = distill_loss(zs, torch.tensor([[0, 1]]), zt, None, normalizer=1.0, alpha=0.5)
    assert out.stats.agree_sum == 1.0  # position 0 agrees on the top-1, position 1 does not
    assert isinstance(out.stats + DistillStats(), DistillStats)
