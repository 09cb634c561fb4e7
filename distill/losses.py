"""Distillation objectives as pure functions: Hinton KD, forward / reverse KL, generalized JSD(β), top-k teachers.

Notation: student logits z_S, teacher logits z_T, temperature T, p_T = softmax(z_T / T), p_S = softmax(z_S / T),
one position at a time (the vocabulary is the last dimension; every other dimension is positions).

    forward KL   KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)        mass-covering ("supervised KD", Hinton)
    reverse KL   KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T)        mode-seeking (MiniLLM, GKD with β = 1)
    JSD(β)       β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m),   m = β·p_T + (1 − β)·p_S

JSD(β) follows TRL's `generalized_jsd_loss` (GKD, Agarwal et al. 2024): β WEIGHTS THE TEACHER, both in the
mixture m and on the KL(p_T ‖ m) term. The end points are special-cased as TRL does: β = 0 is the forward KL and
β = 1 the reverse KL. (The formula itself goes to 0 at both ends; its continuous limits are JSD(β)/β → KL(p_T‖p_S)
as β → 0 and JSD(β)/(1 − β) → KL(p_S‖p_T) as β → 1, so the special cases are the rescaled limits.) β = 0.5 is
the symmetric Jensen–Shannon divergence, bounded by log 2.

The Hinton objective per token (arXiv 1503.02531; DistillKit's default recipe):

    ℓ = α·CE(y, softmax(z_S)) + (1 − α)·T²·D(p_T ‖ p_S)

The hard-label CE is at temperature 1; the divergence D is between BOTH distributions at temperature T, times T²
(soft-target gradients scale as 1/T², so T² keeps the hard/soft balance when T changes). TRL's GKDTrainer does
neither (its `temperature` only affects sampling); DistillationTrainer applies T but not T².

Top-k teachers (`TopK`: the teacher's k most likely ids and their log-probs, e.g. from the offline cache). Two ways
to turn them into a distribution over a common support with the student, `topk_mode`:

    "renorm"  both p_T and p_S renormalised over the teacher's k ids (k-way distributions). Exact at any loss
              temperature: the cached log-probs are z_T/T_c − log Z, so log p·T_c/T renormalises to softmax(z_T/T)
              over the k ids. Says nothing about the mass outside the k ids (the α·CE term covers that).
    "rest"    k + 1 buckets: the k ids and one "rest" bucket holding the remaining mass 1 − Σ_k p (the student's
              rest is the logsumexp of its other logits, exact). Needs the loss temperature to equal the one the
              log-probs were computed at (the teacher's tail at another temperature is unknown): refused otherwise.
              A cached teacher's rest mass is 1 − Σ exp(fp16 log-probs), floored at `REST_FLOOR` (fp16 rounding can
              make the sum exceed 1 by ~1e-4). TRL's ServerDistillationTrainer calls this `loss_add_tail`,
              DistillKit `missing_probability_handling`.

THE NORMALISER CONTRACT (the same as rl/loss.py's; see its module docstring). Every loss here is
Σ_{this micro-batch's masked tokens} ℓ / normalizer, where `normalizer` is ONE number per optimizer step: the
number of loss tokens of every micro-batch of every data-parallel rank, divided by the world size
(`token_normalizer`). So summing micro-batch losses (gradient accumulation) gives exactly the whole-batch loss and
DDP's gradient average gives exactly the whole-batch gradient, whatever the split or the padding. Do not divide by
the accumulation steps as well. (verl-project/verl #7200 and TRL #4719 are this bug in the wild.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOPK_MODES = ("renorm", "rest")
REST_FLOOR = 1e-6  # smallest rest-bucket mass of a cached (fp16) teacher
LOG_FLOOR = -1e4  # log-probs are clamped here so 0·log 0 terms are 0 (not NaN) in values and gradients


@dataclass
class TopK:
    """A top-k teacher: ids [..., k] (any int dtype) and log p_T [..., k] (full-vocabulary log-probs at
    `temperature`, any float dtype), sorted by decreasing probability (ids[..., 0] is the teacher's top-1)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    temperature: float = 1.0

    def __getitem__(self, index) -> TopK:
        return TopK(self.ids[index], self.logprobs[index], self.temperature)


# ------------------------------------------------------------------------------------------------- divergences

def _p_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) over the last dim, with 0·log 0 = 0."""
    logp, logq = logp.clamp(min=LOG_FLOOR), logq.clamp(min=LOG_FLOOR)
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T ‖ p_S) per position: Σ_v p_T (log p_T − log p_S). Inputs are log-probs over the same support."""
    return _p_log_ratio(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_S ‖ p_T) per position: Σ_v p_S (log p_S − log p_T)."""
    return _p_log_ratio(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(β) = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β p_T + (1 − β) p_S (β weights the teacher; TRL/GKD).

    β = 0 returns the forward KL and β = 1 the reverse KL (TRL's special cases; module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    s, t = student_logp.clamp(min=LOG_FLOOR), teacher_logp.clamp(min=LOG_FLOOR)
    log_m = torch.logaddexp(t + torch.log(torch.tensor(beta, dtype=t.dtype)),
                            s + torch.log(torch.tensor(1.0 - beta, dtype=s.dtype)))
    return beta * _p_log_ratio(t, log_m) + (1.0 - beta) * _p_log_ratio(s, log_m)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """One of DIVERGENCES per position ("jsd" uses `beta`)."""
    if kind == "forward_kl":
        return forward_kl(student_logp, teacher_logp)
    if kind == "reverse_kl":
        return reverse_kl(student_logp, teacher_logp)
    if kind == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


# --------------------------------------------------------------------------------------------- teacher supports

def topk_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The k most likely ids of softmax(z_T / temperature) and their (full-vocabulary) log-probs (fp32 or wider)."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab={teacher_logits.shape[-1]}], got {k}")
    logp = (teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)) / temperature).log_softmax(-1)
    values, ids = logp.topk(k, dim=-1)
    return TopK(ids, values, temperature)


def _rest_logsumexp(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ ids} exp(logp_v) [...,1]: the exact log mass outside the ids (−inf floor-clamped if none)."""
    outside = logp.scatter(-1, ids, float("-inf"))
    return outside.logsumexp(-1, keepdim=True).clamp(min=LOG_FLOOR)


def supports(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float = 1.0,
             topk_mode: str = "renorm") -> tuple[torch.Tensor, torch.Tensor]:
    """(student log-probs, teacher log-probs) at `temperature` over a common support, last dim.

    Args:
        student_logits: [..., V] raw student logits.
        teacher: [..., V] raw teacher logits (full vocabulary), or a `TopK` (see the module docstring for modes).
        temperature: the loss temperature T, applied to both distributions.
        topk_mode: "renorm" (k-way) or "rest" (k + 1 buckets); ignored for a full-vocabulary teacher.
    Returns:
        Two tensors [..., V] (dense), [..., k] (renorm) or [..., k + 1] (rest), fp32 or wider.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z_s = student_logits.to(dtype) / temperature
    if not isinstance(teacher, TopK):
        if teacher.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ (same vocabulary required)")
        return z_s.log_softmax(-1), (teacher.to(dtype) / temperature).log_softmax(-1)
    ids = teacher.ids.long()
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k teacher positions {tuple(ids.shape[:-1])} do not match the student's "
                         f"{tuple(student_logits.shape[:-1])}")
    t_logp = teacher.logprobs.to(dtype)
    if topk_mode == "renorm":
        t = (t_logp * (teacher.temperature / temperature)).log_softmax(-1)
        return z_s.gather(-1, ids).log_softmax(-1), t
    if topk_mode == "rest":
        if abs(temperature - teacher.temperature) > 1e-9:
            raise ValueError(f"topk_mode='rest' needs the loss temperature ({temperature}) to equal the temperature "
                             f"the teacher's top-k log-probs were computed at ({teacher.temperature}): the tail mass "
                             f"at another temperature is unknown. Use topk_mode='renorm', or re-cache at "
                             f"T={temperature}")
        s_full = z_s.log_softmax(-1)
        if ids.shape[-1] >= student_logits.shape[-1]:  # k = V: no rest, both sides are the full distribution
            return s_full.gather(-1, ids), t_logp
        s = torch.cat([s_full.gather(-1, ids), _rest_logsumexp(s_full, ids)], dim=-1)
        rest = (1.0 - t_logp.exp().sum(-1, keepdim=True)).clamp(min=REST_FLOOR)
        return s, torch.cat([t_logp, rest.log()], dim=-1)
    raise ValueError(f"topk_mode must be one of {TOPK_MODES}, got {topk_mode!r}")


def topk_rest_exact(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[TopK, torch.Tensor]:
    """A top-k teacher and its exact log rest mass [..., 1] (for online teachers and tests)."""
    top = topk_teacher(teacher_logits, k, temperature)
    full = (teacher_logits.to(top.logprobs.dtype) / temperature).log_softmax(-1)
    return top, _rest_logsumexp(full, top.ids)


# --------------------------------------------------------------------------------------------------- the loss

def kd_per_token(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, *, temperature: float = 1.0,
                 kind: str = "forward_kl", beta: float = 0.5, topk_mode: str = "renorm") -> torch.Tensor:
    """T²·D(p_T ‖ p_S) per position [...] (D one of DIVERGENCES, both distributions at temperature T)."""
    s, t = supports(student_logits, teacher, temperature, topk_mode)
    return temperature ** 2 * divergence(s, t, kind, beta)


@dataclass
class DistillStats:
    """Sums over one (micro-)batch's loss tokens; add micro-batches with `+`, then divide by the token counts."""

    tokens: float = 0.0  # positions in the KD mask
    kd_sum: float = 0.0  # Σ T²·D
    ce_tokens: float = 0.0  # positions with a hard label in the CE mask
    ce_sum: float = 0.0  # Σ CE (temperature 1)
    agree_sum: float = 0.0  # Σ [argmax student == teacher top-1]

    def __add__(self, other: DistillStats) -> DistillStats:
        return DistillStats(*(a + b for a, b in zip(self.as_list(), other.as_list())))

    def as_list(self) -> list[float]:
        return [self.tokens, self.kd_sum, self.ce_tokens, self.ce_sum, self.agree_sum]


@dataclass
class DistillOutput:
    loss: torch.Tensor  # scalar: this micro-batch's Σ ℓ / normalizer; backward() it, add micro-batch values
    stats: DistillStats


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor | None, teacher: torch.Tensor | TopK | None,
                 mask: torch.Tensor | None, *, normalizer: float, alpha: float = 0.5, temperature: float = 1.0,
                 kind: str = "forward_kl", beta: float = 0.5, topk_mode: str = "renorm",
                 ce_mask: torch.Tensor | None = None) -> DistillOutput:
    """This micro-batch's share of the step's distillation loss:

        loss = Σ_{positions} [ α·ce_mask·CE(y, z_S) + (1 − α)·mask·T²·D(p_T ‖ p_S) ] / normalizer

    Args:
        student_logits: [B, N, V] student logits, position n predicting labels[:, n] (already shifted).
        labels: [B, N] hard labels (ids; −100 or anything where ce_mask is False is ignored); None = no CE term.
        teacher: [B, N, V] teacher logits, a `TopK` with [B, N, k] tensors, or None (CE only; needs alpha = 1).
        mask: [B, N] bool, True where the KD term counts (response tokens; False on prompt and padding).
            None = every position.
        normalizer: one number per optimizer step, `token_normalizer` over every micro-batch and rank.
        alpha: weight of the hard-label CE; 1 is plain supervised training, 0 pure distillation.
        temperature: T of the KD term (both distributions), with the T² factor.
        kind, beta, topk_mode: the divergence (DIVERGENCES), JSD's β, and the top-k support (TOPK_MODES).
        ce_mask: [B, N] where the CE term counts; defaults to `mask` & (labels ≥ 0). On-policy batches (student
            samples, no gold labels) pass an all-False mask.
    """
    if not normalizer or normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (token_normalizer over the whole step), got {normalizer!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if teacher is None and alpha < 1.0:
        raise ValueError(f"alpha={alpha} < 1 needs a teacher")
    B, N = student_logits.shape[:2]
    mask = torch.ones(B, N, dtype=torch.bool, device=student_logits.device) if mask is None else mask.bool()
    stats = DistillStats(tokens=float(mask.sum()))
    zero = student_logits.new_zeros((), dtype=torch.promote_types(student_logits.dtype, torch.float32))
    total = zero
    if labels is not None and alpha > 0:
        cm = (mask if ce_mask is None else ce_mask.bool()) & (labels >= 0)
        if cm.any():
            ce = F.cross_entropy(student_logits[cm].to(zero.dtype), labels[cm], reduction="sum")
            total = total + alpha * ce
            stats.ce_sum, stats.ce_tokens = float(ce.detach()), float(cm.sum())
    if teacher is not None and mask.any():
        if isinstance(teacher, TopK):
            t_sel, t_top1 = teacher[mask], teacher.ids[mask][:, 0].long()
        else:
            t_sel = teacher[mask]
            t_top1 = t_sel.argmax(-1)
        s_sel = student_logits[mask]
        with torch.set_grad_enabled(alpha < 1.0 and torch.is_grad_enabled()):  # alpha = 1: KD is only measured
            kd = kd_per_token(s_sel, t_sel, temperature=temperature, kind=kind, beta=beta,
                              topk_mode=topk_mode).sum()
        if alpha < 1.0:
            total = total + (1.0 - alpha) * kd
        stats.kd_sum = float(kd.detach())
        stats.agree_sum = float((s_sel.detach().argmax(-1) == t_top1).sum())
    return DistillOutput(loss=total / normalizer, stats=stats)


def token_normalizer(masks, world_size: int = 1) -> float:
    """The one normaliser of an optimizer step: loss tokens of every micro-batch on every rank / world size.

    Args:
        masks: a [B, N] mask, an int count, or a list of those (one per micro-batch). With data parallelism
            all-reduce the count over ranks first (or pass every rank's masks).
        world_size: data-parallel ranks (DDP averages gradients, so the global count is divided by it).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pieces = masks if isinstance(masks, (list, tuple)) else [masks]
    count = sum(int(p) if isinstance(p, (int, float)) else int(torch.as_tensor(p).bool().sum()) for p in pieces)
    if count <= 0:
        raise ValueError("empty step: no loss tokens to normalise")
    return count / world_size
