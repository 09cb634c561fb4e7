"""GRPO objective (rl/loss.py): hand-computed advantages, clip sides, k3 KL, finite-difference gradients, and the
normalisation invariance of every loss_type under micro-batching and data-parallel splitting.

Run: PYTHONPATH=. python -m pytest -q tests/test_rl_loss.py
"""

import math

import pytest
import torch

from rl.loss import (
    LOSS_TYPES,
    LossStats,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    loss_normalizer,
    policy_ratio,
    token_terms,
    zero_std_groups,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------------ advantages

def test_advantages_three_of_ten_correct_scale_none():
    rewards = [1.0, 1.0, 1.0] + [0.0] * 7
    adv = group_advantages(rewards, group_size=10, scale_rewards="none")
    assert torch.allclose(adv, torch.tensor([0.7] * 3 + [-0.3] * 7), atol=1e-6)


def test_advantages_group_divides_by_unbiased_std_plus_eps():
    rewards = torch.tensor([1.0, 1.0, 1.0] + [0.0] * 7, dtype=F64)
    std = math.sqrt((3 * 0.7 ** 2 + 7 * 0.3 ** 2) / 9)  # Bessel: divide by N - 1 = 9 (torch.std, as TRL)
    adv = group_advantages(rewards, group_size=10, scale_rewards="group", eps=1e-4)
    expected = torch.tensor([0.7 / (std + 1e-4)] * 3 + [-0.3 / (std + 1e-4)] * 7, dtype=F64)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert adv.dtype == F64


def test_advantages_batch_keeps_group_mean_and_uses_batch_std():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=F64)
    batch_std = math.sqrt(sum((r - 1.25) ** 2 for r in [1, 0, 3, 1]) / 3)
    adv = group_advantages(rewards, group_size=2, scale_rewards="batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=F64) / batch_std, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_groups_get_exactly_zero_never_nan(scale):
    rewards = [0.1, 0.1, 0.1, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0]
    adv = group_advantages(rewards, group_size=3, scale_rewards=scale)
    assert torch.isfinite(adv).all()
    assert adv[:6].eq(0).all()  # exact zeros even though mean(0.1, 0.1, 0.1) != 0.1 in floating point
    assert adv[6:].abs().sum() > 0
    assert zero_std_groups(rewards, 3).tolist() == [True, True, False]
    assert group_advantages([1.0] * 4, 2, scale).eq(0).all()  # whole batch constant: batch std 0, still 0


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages([1.0, 0.0], 2, "std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([1.0, 0.0], 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 0.0], 3)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([1.0, float("nan")], 2)


# --------------------------------------------------------------------------------------------------------- clipping

def _surrogate_and_grad(ratio, adv, eps=0.2, eps_high=None):
    r = torch.tensor(ratio, dtype=F64, requires_grad=True)
    value = clipped_surrogate(r, torch.tensor(adv, dtype=F64), eps, eps_high)
    value.backward()
    return value.item(), r.grad.item()


@pytest.mark.parametrize("ratio, adv, value, grad", [
    (1.3, 1.0, 1.2, 0.0),  # A > 0 above 1 + ε: clipped constant 1.2·A, no gradient
    (1.3, -1.0, -1.3, -1.0),  # A < 0 above 1 + ε: min keeps ρ·A, gradient flows
    (0.7, -1.0, -0.8, 0.0),  # A < 0 below 1 − ε: clipped constant 0.8·A, no gradient
    (0.7, 1.0, 0.7, 1.0),  # A > 0 below 1 − ε: ρ·A, gradient flows
    (1.1, 2.0, 2.2, 2.0),  # inside the interval: ρ·A either way
    (0.9, -2.0, -1.8, -2.0),
])
def test_clip_engages_only_on_the_side_the_advantage_selects(ratio, adv, value, grad):
    v, g = _surrogate_and_grad(ratio, adv)
    assert v == pytest.approx(value, abs=1e-12) and g == pytest.approx(grad, abs=1e-12)


def test_clip_boundary_is_exact():
    h = 1e-9
    assert _surrogate_and_grad(1.2 + h, 1.0)[1] == 0.0
    assert _surrogate_and_grad(1.2 - h, 1.0)[1] == pytest.approx(1.0)
    assert _surrogate_and_grad(0.8 - h, -1.0)[1] == 0.0
    assert _surrogate_and_grad(0.8 + h, -1.0)[1] == pytest.approx(-1.0)
    assert _surrogate_and_grad(1.2, 1.0)[1] == pytest.approx(1.0)  # on the boundary the gradient still flows


def test_epsilon_high_moves_only_the_upper_clip():
    assert _surrogate_and_grad(1.25, 1.0, 0.2, 0.28) == pytest.approx((1.25, 1.0))  # clipped with ε_high = ε
    assert _surrogate_and_grad(1.25, 1.0, 0.2, None) == pytest.approx((1.2, 0.0))
    assert _surrogate_and_grad(1.3, 1.0, 0.2, 0.28) == pytest.approx((1.28, 0.0))
    assert _surrogate_and_grad(0.75, -1.0, 0.2, 0.28) == pytest.approx((-0.8, 0.0))  # lower side unchanged


def test_clip_fractions_in_stats():
    ratio = torch.tensor([[1.3, 1.3, 0.7, 0.7, 1.0, 1.25]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]], dtype=F64)
    out = grpo_loss(ratio.log(), torch.zeros_like(ratio), None, adv, None, loss_type="dapo", epsilon=0.2,
                    epsilon_high=0.28, normalizer=6)
    assert out.terms.clip_high.tolist() == [[True, False, False, False, False, False]]  # 1.3 > 1.28, 1.25 is not
    assert out.terms.clip_low.tolist() == [[False, False, True, False, False, False]]
    assert out.terms.outside.tolist() == [[True, True, True, True, False, False]]
    out = grpo_loss(ratio.log(), torch.zeros_like(ratio), None, adv, None, loss_type="dapo", epsilon=0.2,
                    normalizer=6)
    assert out.stats.clip_high == 2 and out.stats.clip_low == 1  # 1.3 and 1.25 with A > 0 clip at ε_high = 0.2
    assert out.stats.clip_high_frac == pytest.approx(2 / 6) and out.stats.clip_low_frac == pytest.approx(1 / 6)
    assert out.stats.ratio_mean == pytest.approx(sum([1.3, 1.3, 0.7, 0.7, 1.0, 1.25]) / 6)


def test_policy_ratio_is_exp_of_log_difference():
    logp, old = torch.tensor([-0.5, -2.0], dtype=F64), torch.tensor([-0.7, -1.0], dtype=F64)
    assert torch.allclose(policy_ratio(logp, old), torch.tensor([math.exp(0.2), math.exp(-1.0)], dtype=F64))


# --------------------------------------------------------------------------------------------------------------- KL

def test_k3_hand_values_nonnegative_and_zero_at_equality():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3], dtype=F64))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3], dtype=F64))
    expected = [0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1, 0.0]  # e^d − d − 1, d = ref − logp
    assert torch.allclose(k3_kl(logp, ref), torch.tensor(expected, dtype=F64), atol=1e-15)
    a, b = torch.randn(1000, dtype=F64) * 3, torch.randn(1000, dtype=F64) * 3
    assert (k3_kl(a, b) >= 0).all() and k3_kl(a, a).eq(0).all()


def test_beta_adds_kl_and_needs_reference():
    logp = torch.log(torch.tensor([[0.5]], dtype=F64))
    ref = torch.log(torch.tensor([[0.25]], dtype=F64))
    out = grpo_loss(logp, None, ref, torch.tensor([1.0], dtype=F64), None, loss_type="grpo", beta=0.04,
                    normalizer=1)
    assert out.loss.item() == pytest.approx(-(1.0 - 0.04 * (0.5 - math.log(0.5) - 1)), abs=1e-12)
    assert out.stats.kl_mean == pytest.approx(0.5 - math.log(0.5) - 1)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, None, torch.tensor([1.0]), None, beta=0.1, normalizer=1)


def test_on_policy_loss_value_is_zero_for_centred_advantages_but_gradient_is_not():
    """TRL's "loss is 0 at step 1": ρ = 1 and A sums to zero per group; the gradient −Σ A ∇mean logπ is not 0."""
    logp = torch.randn(4, 5, dtype=F64, requires_grad=True)
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], 4)
    out = grpo_loss(logp, None, None, adv.to(F64), None, loss_type="grpo", normalizer=4)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    out.loss.backward()
    assert logp.grad.abs().sum() > 0


def test_padding_garbage_cannot_produce_nan():
    logp = torch.tensor([[-1.0, 80.0], [-0.5, -0.2]], requires_grad=True)  # float32, exp(80 + 80) would be inf
    old = torch.tensor([[-1.1, -80.0], [-0.4, -0.3]])
    ref = torch.tensor([[-1.0, -90.0], [-0.6, -0.1]])
    mask = torch.tensor([[True, False], [True, True]])
    out = grpo_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, loss_type="dapo", beta=0.1, normalizer=3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert out.stats.num_tokens == 3 and math.isfinite(out.stats.kl_mean)


# ------------------------------------------------------------------------------------- toy policy: FD and invariance

class ToyPolicy:
    """Linear softmax policy in float64: logits = features @ θᵀ, logp = log_softmax(logits)[sampled token]."""

    def __init__(self, batch=6, max_len=7, dim=3, vocab=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(vocab, dim, dtype=F64, generator=g)
        self.features = torch.randn(batch, max_len, dim, dtype=F64, generator=g)
        self.tokens = torch.randint(0, vocab, (batch, max_len), generator=g)
        self.lengths = torch.tensor([5, 2, 7, 1, 4, 6])[:batch]  # different lengths: the classic bug's trigger
        self.mask = torch.arange(max_len)[None, :] < self.lengths[:, None]
        self.old_logp = self.logp(self.theta + 0.4 * torch.randn(vocab, dim, dtype=F64, generator=g)).detach()
        self.ref_logp = self.logp(self.theta + 0.4 * torch.randn(vocab, dim, dtype=F64, generator=g)).detach()
        self.advantages = group_advantages(torch.rand(batch, dtype=F64, generator=g), group_size=3)

    def logp(self, theta, rows=slice(None), width=None):
        feats, toks = self.features[rows], self.tokens[rows]
        if width is not None:
            feats, toks = feats[:, :width], toks[:, :width]
        return (feats @ theta.T).log_softmax(-1).gather(-1, toks[..., None]).squeeze(-1)

    def loss(self, theta, loss_type, normalizer, rows=slice(None), trim=False, **kw):
        """The loss of the sequences `rows`, padded only to their own longest length when `trim`."""
        width = int(self.lengths[rows].max()) if trim else None
        cut = (lambda t: t[rows][:, :width]) if width else (lambda t: t[rows])
        return grpo_loss(self.logp(theta, rows, width), cut(self.old_logp), cut(self.ref_logp),
                         self.advantages[rows], cut(self.mask), loss_type=loss_type, normalizer=normalizer,
                         **kw).loss


KW = {"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.05}
MAX_LEN = 10  # max_completion_length for dr_grpo (larger than the padded width 7, on purpose)


def _grad(policy, loss_type, normalizer, rows=slice(None), trim=False):
    theta = policy.theta.clone().requires_grad_(True)
    loss = policy.loss(theta, loss_type, normalizer, rows, trim, **KW)
    loss.backward()
    return loss.detach(), theta.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_central_differences(loss_type):
    policy = ToyPolicy()
    norm = loss_normalizer(policy.lengths, loss_type, max_completion_length=MAX_LEN)
    _, grad = _grad(policy, loss_type, norm)
    h, numeric = 1e-6, torch.zeros_like(policy.theta)
    for idx in range(policy.theta.numel()):
        e = torch.zeros(policy.theta.numel(), dtype=F64)
        e[idx] = h
        e = e.view_as(policy.theta)
        plus = policy.loss(policy.theta + e, loss_type, norm, **KW)
        minus = policy.loss(policy.theta - e, loss_type, norm, **KW)
        numeric.view(-1)[idx] = (plus - minus) / (2 * h)
    assert torch.allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_normalisation_invariance_whole_vs_microbatches_vs_data_parallel(loss_type):
    policy = ToyPolicy()
    whole_loss, whole_grad = _grad(policy, loss_type, loss_normalizer(policy.mask, loss_type, MAX_LEN))

    # gradient accumulation: uneven micro-batches (1, 2, 3 sequences), each padded to its own length
    micro_batches = [slice(0, 1), slice(1, 3), slice(3, 6)]
    norm = loss_normalizer([policy.lengths[s] for s in micro_batches], loss_type, MAX_LEN)
    acc_loss, acc_grad = 0.0, torch.zeros_like(policy.theta)
    for rows in micro_batches:
        loss, grad = _grad(policy, loss_type, norm, rows, trim=True)
        acc_loss, acc_grad = acc_loss + loss, acc_grad + grad
    assert torch.allclose(acc_loss, whole_loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(acc_grad, whole_grad, rtol=1e-10, atol=1e-12)

    # 2 data-parallel ranks with 2 and 4 sequences (7 and 18 tokens), rank 0 accumulating 2 micro-batches and
    # rank 1 three; DDP averages gradients = SUM over ranks then / world size
    ranks = [[slice(0, 1), slice(1, 2)], [slice(2, 3), slice(3, 4), slice(4, 6)]]
    norm = loss_normalizer(policy.lengths, loss_type, MAX_LEN, world_size=2)  # lengths all-gathered over ranks
    rank_losses, rank_grads = [], []
    for rank in ranks:
        loss, grad = 0.0, torch.zeros_like(policy.theta)
        for rows in rank:
            part_loss, part_grad = _grad(policy, loss_type, norm, rows, trim=True)
            loss, grad = loss + part_loss, grad + part_grad
        rank_losses.append(loss)
        rank_grads.append(grad)
    assert torch.allclose(sum(rank_losses) / 2, whole_loss, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sum(rank_grads) / 2, whole_grad, rtol=1e-10, atol=1e-12)


def test_per_microbatch_token_mean_is_the_classic_bug():
    """What the global normaliser prevents: averaging per-micro-batch token means is not the global token mean."""
    policy = ToyPolicy()
    _, whole_grad = _grad(policy, "dapo", loss_normalizer(policy.mask, "dapo"))
    buggy = sum(_grad(policy, "dapo", loss_normalizer(policy.lengths[s], "dapo"), s)[1] / 2
                for s in [slice(0, 3), slice(3, 6)])
    assert not torch.allclose(buggy, whole_grad, rtol=1e-3)


def test_loss_normalizer_counts():
    lengths = [3, 0, 5]
    assert loss_normalizer(lengths, "grpo") == 3
    assert loss_normalizer(lengths, "dapo") == 8 == loss_normalizer(lengths, "bnpo")
    assert loss_normalizer(lengths, "dr_grpo", max_completion_length=16) == 48
    assert loss_normalizer([torch.tensor([3, 0]), torch.tensor([5])], "dapo", world_size=2) == 4
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert loss_normalizer(mask, "dapo") == 3 and loss_normalizer(mask, "grpo") == 2
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_normalizer(lengths, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        loss_normalizer(lengths, "token_mean")
    with pytest.raises(ValueError, match="empty"):
        loss_normalizer([0, 0], "dapo")


def test_stats_add_up_over_microbatches():
    policy = ToyPolicy()
    full = token_terms(policy.logp(policy.theta), policy.old_logp, policy.ref_logp, policy.advantages, policy.mask,
                       **KW)
    parts = [grpo_loss(policy.logp(policy.theta, s), policy.old_logp[s], policy.ref_logp[s], policy.advantages[s],
                       policy.mask[s], loss_type="dapo", normalizer=25, **KW).stats
             for s in [slice(0, 2), slice(2, 6)]]
    total = parts[0] + parts[1]
    assert isinstance(total, LossStats) and total.num_tokens == 25 and total.num_sequences == 6
    assert total.kl_mean == pytest.approx(float(full.kl[policy.mask].mean()))
    assert total.ratio_mean == pytest.approx(float(full.ratio[policy.mask].mean()))
    assert total.clip_low == int(full.clip_low.sum()) and total.clip_high == int(full.clip_high.sum())
    assert set(total.as_dict()) >= {"clip_ratio/low_mean", "clip_ratio/high_mean", "kl"}
