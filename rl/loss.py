"""GRPO objective as pure functions: group advantages, importance ratio, clipped surrogate, k3 KL, loss aggregation.

Equations (G completions o_1..o_G per prompt q, tokens o_{i,t}, policy π_θ, sampling policy π_old, reference π_ref):

    A_i       = (r_i − mean_group(r)) / (std(r) + eps)                     DeepSeekMath (GRPO, outcome supervision)
    ρ_{i,t}   = π_θ(o_{i,t}) / π_old(o_{i,t}) = exp(logp − old_logp)      importance ratio
    J_{i,t}   = min(ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i)             PPO clip; ε_high > ε_low: DAPO clip-higher
    KL_{i,t}  = exp(ref − logp) − (ref − logp) − 1                         Schulman's unbiased k3 estimator, ≥ 0
    ℓ_{i,t}   = −(J_{i,t} − β KL_{i,t})                                    per-token loss (DeepSeekMath eq. 3)

Aggregation (`loss_type`), all written as   loss = Σ_{this micro-batch} w_{i,t} ℓ_{i,t} / normalizer:

    grpo     w = 1/|o_i|      normalizer = number of sequences in the step          (1/G Σ_i 1/|o_i| Σ_t, GRPO)
    bnpo     w = 1            normalizer = number of completion tokens in the step  (token mean)
    dapo     w = 1            normalizer = number of completion tokens in the step  (DAPO token-level loss)
    dr_grpo  w = 1            normalizer = number of sequences · max_completion_length   (Dr. GRPO, constant L)

THE NORMALISER CONTRACT. `normalizer` is one number for the whole optimizer step — every micro-batch of every
data-parallel rank — computed once with `loss_normalizer` from the step's lengths (gathered over ranks) and the
world size. `grpo_loss` returns the SUM of its micro-batch's terms divided by it, so

    Σ_micro-batches grpo_loss(...)        == grpo_loss(whole batch)          (gradient accumulation: just add)
    mean_ranks ∇(rank's summed loss)      == ∇ grpo_loss(whole batch)        (DDP averages gradients)

exactly, whatever the split and whatever the padding width of each micro-batch. Split along sequences only
(never cut a sequence's tokens across micro-batches: "grpo" needs each sequence's own length). Do NOT divide by
the number of accumulation steps as well — that is already in the normaliser.

Honest notes on where this differs from TRL (huggingface/trl GRPOTrainer 1.9):
  * TRL's "bnpo" divides by the tokens of the local micro-batch, so it changes with the micro-batch size (its own
    docstring says so). Here "bnpo" is the same global token mean as "dapo"; the name is kept for familiarity.
  * TRL's "grpo" and "dr_grpo" average over the local micro-batch and then divide by the accumulation steps, which
    is exact only when all micro-batches hold the same number of sequences; the global normaliser removes that.
  * The KL is not clamped (TRL does not clamp either; verl clamps the log-ratio to ±20).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


# ----------------------------------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor | Sequence[float], group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages A_i = (r_i − mean_group(r)) / (std + eps) (DeepSeekMath §4.1.2, outcome supervision).

    Args:
        rewards: [N] total reward of each completion, N = num_groups · group_size, the G completions of one prompt
            contiguous (TRL's RepeatSampler layout). Pass the rewards of the whole step gathered over all ranks.
        group_size: G ≥ 2.
        scale_rewards: TRL GRPOConfig semantics —
            "group": std over the group's G rewards (GRPO / R1);
            "batch": mean still per group, std over all N rewards of the batch (PPO-Lite);
            "none":  no division, A_i = r_i − mean_group(r) (Dr. GRPO removes the question-difficulty bias).
            The std is the unbiased (Bessel-corrected, N − 1) estimator, as TRL (`torch.std` / nanstd) and verl.
        eps: added to the std (TRL uses 1e-4, verl 1e-6).

    Returns:
        [N] advantages in the rewards' float dtype (at least float32). A group whose rewards are all equal gets
        exactly 0 (never NaN, never ±tiny from rounding in the mean), whatever `scale_rewards`.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = _as_float_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size], got shape {tuple(r.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be ≥ 2 (a group of one has no baseline), got {group_size}")
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; score unscorable samples as 0 before computing advantages")
    grouped = r.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (r.std() + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0).reshape(-1)


def zero_std_groups(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards are all equal (zero advantage, zero gradient; TRL's
    `frac_reward_zero_std` is its mean, DAPO's dynamic sampling drops these groups)."""
    grouped = _as_float_tensor(rewards).view(-1, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


# ------------------------------------------------------------------------------------------------ per-token terms

def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Importance ratio ρ = π_θ / π_old = exp(logp − old_logp), elementwise."""
    return torch.exp(logp - old_logp)


def clip_ratio(ratio: torch.Tensor, epsilon: float, epsilon_high: float | None = None) -> torch.Tensor:
    """clip(ρ, 1 − ε_low, 1 + ε_high); ε_high defaults to ε_low = `epsilon` (DAPO clip-higher uses 0.2 / 0.28)."""
    high = epsilon if epsilon_high is None else epsilon_high
    return ratio.clamp(1.0 - epsilon, 1.0 + high)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                      epsilon_high: float | None = None) -> torch.Tensor:
    """PPO clipped objective (to maximise), elementwise: J = min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A).

    The min picks the clipped constant — zero gradient — only on the side the advantage's sign selects:
    A > 0 and ρ > 1 + ε_high (do not push a good token further), A < 0 and ρ < 1 − ε_low (do not push a bad token
    further down). Elsewhere J = ρ A with gradient A ∇ρ (also at the boundaries, where both terms tie).
    """
    return torch.minimum(ratio * advantages, clip_ratio(ratio, epsilon, epsilon_high) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) by the k3 estimator: exp(ref − logp) − (ref − logp) − 1 (≥ 0, = 0 iff equal).

    Unbiased for KL(π_θ ‖ π_ref) under samples from π_θ (DeepSeekMath eq. 4; Schulman, "Approximating KL")."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@dataclass
class TokenTerms:
    """Every per-token quantity of the objective, shapes [B, T] (positions outside the mask hold neutral values)."""

    advantages: torch.Tensor  # A broadcast to tokens
    ratio: torch.Tensor  # ρ = exp(logp − old_logp); 1 where masked
    clipped_ratio: torch.Tensor  # clip(ρ, 1 − ε_low, 1 + ε_high)
    unclipped: torch.Tensor  # ρ A
    clipped: torch.Tensor  # clip(ρ) A
    surrogate: torch.Tensor  # min(ρ A, clip(ρ) A)
    kl: torch.Tensor  # k3 estimate, 0 where masked or when no reference is given
    objective: torch.Tensor  # surrogate − β KL (to maximise); the loss is its negative
    clip_low: torch.Tensor  # bool: A < 0 and ρ < 1 − ε_low  (clip active, zero gradient)
    clip_high: torch.Tensor  # bool: A > 0 and ρ > 1 + ε_high (clip active, zero gradient)
    outside: torch.Tensor  # bool: ρ outside [1 − ε_low, 1 + ε_high] whatever A (TRL's clip_ratio/region)


def token_terms(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor | None = None, *, epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0) -> TokenTerms:
    """All per-token terms of ℓ_{i,t} = −(min(ρA, clip(ρ)A) − β KL) (module docstring), before aggregation.

    Args:
        logp: [B, T] log π_θ of the sampled tokens, with grad.
        old_logp: [B, T] log π_old from the rollout, or None for the on-policy case (num_iterations = 1), where
            it is logp.detach() so ρ = 1 in value and ∇ρ = ∇logp.
        ref_logp: [B, T] log π_ref, or None (then KL = 0; required when beta > 0).
        advantages: [B] per sequence (broadcast over tokens) or [B, T] per token.
        mask: [B, T] bool/0-1, True on completion tokens; None = all tokens. Masked positions are neutralised
            before exp, so garbage log-probs in the padding can never make NaN/inf (or NaN gradients).
    """
    if beta and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference policy's log-probs)")
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon / epsilon_high must be ≥ 0, got {epsilon} / {epsilon_high}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)
    old_logp = logp.detach() if old_logp is None else old_logp.to(dtype)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    _check_shapes(logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(logp)

    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    clipped_ratio = clip_ratio(ratio, epsilon, epsilon_high)
    unclipped, clipped = ratio * adv, clipped_ratio * adv
    surrogate = torch.minimum(unclipped, clipped)
    if ref_logp is None:
        kl = torch.zeros_like(logp)
    else:
        zero = torch.zeros_like(logp)
        kl = k3_kl(torch.where(mask, logp, zero), torch.where(mask, ref_logp.to(dtype), zero))  # 0 where masked
    objective = surrogate - beta * kl if beta else surrogate
    high = epsilon if epsilon_high is None else epsilon_high
    r = ratio.detach()
    lo_out, hi_out = (r < 1.0 - epsilon) & mask, (r > 1.0 + high) & mask
    return TokenTerms(advantages=adv, ratio=ratio, clipped_ratio=clipped_ratio, unclipped=unclipped, clipped=clipped,
                      surrogate=surrogate, kl=kl, objective=objective, clip_low=lo_out & (adv < 0),
                      clip_high=hi_out & (adv > 0), outside=lo_out | hi_out)


# -------------------------------------------------------------------------------------------------- aggregation

@dataclass
class LossStats:
    """Sums over the tokens of one (micro-)batch; add micro-batches with `+`, then read the means.

    Exact under any split (all fields are sums). For data parallelism all-reduce (SUM) each field."""

    num_tokens: float = 0.0
    num_sequences: float = 0.0
    clip_low: float = 0.0  # tokens with A < 0 and ρ < 1 − ε_low
    clip_high: float = 0.0  # tokens with A > 0 and ρ > 1 + ε_high
    outside: float = 0.0  # tokens with ρ outside the clip interval, whatever A
    ratio_sum: float = 0.0
    kl_sum: float = 0.0
    surrogate_sum: float = 0.0  # Σ min(ρA, clip(ρ)A) (unweighted token sum)

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def _mean(self, total: float) -> float:
        return total / self.num_tokens if self.num_tokens else 0.0

    @property
    def clip_low_frac(self) -> float:
        return self._mean(self.clip_low)

    @property
    def clip_high_frac(self) -> float:
        return self._mean(self.clip_high)

    @property
    def clip_region_frac(self) -> float:
        return self._mean(self.outside)

    @property
    def ratio_mean(self) -> float:
        return self._mean(self.ratio_sum)

    @property
    def kl_mean(self) -> float:
        return self._mean(self.kl_sum)

    def as_dict(self) -> dict[str, float]:
        """Metric names as TRL logs them (clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, kl)."""
        return {"clip_ratio/low_mean": self.clip_low_frac, "clip_ratio/high_mean": self.clip_high_frac,
                "clip_ratio/region_mean": self.clip_region_frac, "ratio_mean": self.ratio_mean,
                "kl": self.kl_mean, "num_tokens": self.num_tokens}


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: Σ_{this micro-batch} w ℓ / normalizer; backward() it, and add micro-batch values
    stats: LossStats
    terms: TokenTerms


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor | None, *, loss_type: str = "dapo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              normalizer: float) -> LossOutput:
    """This (micro-)batch's share of the step's GRPO loss: Σ_{i,t} w_{i,t} ℓ_{i,t} / normalizer.

    ℓ_{i,t} = −(min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) − β·k3) and w = 1/|o_i| for "grpo", 1 otherwise (module
    docstring). `normalizer` comes from `loss_normalizer` over the WHOLE optimizer step (all micro-batches, all
    ranks, divided by the world size); never compute it from the micro-batch. Arguments as in `token_terms`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not normalizer or normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (from loss_normalizer over the whole step), got {normalizer!r}")
    terms = token_terms(logp, old_logp, ref_logp, advantages, mask, epsilon=epsilon, epsilon_high=epsilon_high,
                        beta=beta)
    m = torch.ones_like(terms.ratio, dtype=torch.bool) if mask is None else mask.bool()
    weights = m.to(terms.objective.dtype)
    if loss_type == "grpo":
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    per_token_loss = torch.where(m, -terms.objective, torch.zeros_like(terms.objective))
    loss = (per_token_loss * weights).sum() / normalizer

    with torch.no_grad():
        stats = LossStats(num_tokens=float(m.sum()), num_sequences=float(m.shape[0]),
                          clip_low=float(terms.clip_low.sum()), clip_high=float(terms.clip_high.sum()),
                          outside=float(terms.outside.sum()), ratio_sum=float(terms.ratio[m].sum()),
                          kl_sum=float(terms.kl[m].sum()), surrogate_sum=float(terms.surrogate[m].sum()))
    return LossOutput(loss=loss, stats=stats, terms=terms)


def loss_normalizer(lengths_or_masks, loss_type: str, max_completion_length: int | None = None,
                    world_size: int = 1) -> float:
    """The one normaliser of an optimizer step, for `grpo_loss(normalizer=...)`.

    Args:
        lengths_or_masks: the completion lengths of EVERY sequence in the step, on all ranks: a 1-D int tensor or
            list of lengths, a [B, T] completion mask, or a list of those (e.g. one per micro-batch). With data
            parallelism all-gather the lengths (or all-reduce the counts) first.
        loss_type: "grpo" → number of sequences (empty completions included, as TRL's mean over sequences);
            "bnpo" / "dapo" → number of completion tokens;
            "dr_grpo" → number of sequences · max_completion_length (the generation budget, not the padded width).
        world_size: data-parallel ranks. DDP averages gradients over ranks, so the global count is divided by it
            (each rank's loss is then world_size times its share, and the average restores the whole-batch value).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    num_sequences, num_tokens = 0, 0
    for piece in _pieces(lengths_or_masks):
        n, t = _count(piece)
        num_sequences, num_tokens = num_sequences + n, num_tokens + t
    if loss_type == "grpo":
        count = num_sequences
    elif loss_type in ("bnpo", "dapo"):
        count = num_tokens
    else:
        if not max_completion_length or max_completion_length <= 0:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (the constant L of Dr. GRPO)")
        count = num_sequences * max_completion_length
    if count <= 0:
        raise ValueError(f"empty step: no {'tokens' if loss_type in ('bnpo', 'dapo') else 'sequences'} to normalise")
    return count / world_size


# -------------------------------------------------------------------------------------------------------- helpers

def _as_float_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.to(torch.float32)


def _check_shapes(logp: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected logp's {tuple(logp.shape)}")


def _pieces(x) -> Iterable:
    """A list of ints is one lengths vector; a list of tensors / lists is several pieces (micro-batches)."""
    if isinstance(x, (list, tuple)) and x and not all(isinstance(v, (int, float)) for v in x):
        return list(x)
    return [x]


def _count(piece) -> tuple[int, int]:
    """(sequences, tokens) of a lengths vector or a [B, T] mask."""
    t = torch.as_tensor(piece)
    if t.dim() == 2:
        return t.shape[0], int(t.bool().sum())
    if t.dim() == 1:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("lengths must be integers")
        if (t < 0).any():
            raise ValueError("lengths must be ≥ 0")
        return t.numel(), int(t.sum())
    raise ValueError(f"expected lengths [B] or a mask [B, T], got shape {tuple(t.shape)}")
