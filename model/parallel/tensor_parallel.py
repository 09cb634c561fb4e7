"""Tensor parallelism for the DeepSeek decoder, applied from outside the model (gpt-fast `tp.py` style).

The weights stay plain `nn.Parameter`s holding this rank's slice, so the single-device code runs unchanged on a
shard: MLA infers its local head count from the weights (including the absorbed decode path, which reads
`kv_b_proj.weight` per head), and the stacked experts are just fewer experts. Collectives are inserted at region
boundaries with the autograd-aware f/g ops of collectives.py:

    MLA          input copy_to_tp | q_a_proj, q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm replicated (the
                 latent cache stays whole on every rank) | q_b_proj (or q_proj) and kv_b_proj split by heads
                 (rows) | o_proj split by heads (columns) + SUM all-reduce, bias added once after the reduction
    dense MLP    input copy_to_tp | gate_proj, up_proj rows | down_proj columns + SUM all-reduce
    MoE          router replicated (runs on all tokens: same routing, load and balance loss on every TP rank) |
                 shared experts: input copy_to_tp, gate/up rows, down columns, output left partial | routed
                 experts: each TP rank computes its 1/tp of the tokens (expert_parallel.AllToAllDispatcher) and
                 returns them zero-padded, also partial | one SUM all-reduce on the MoE output
    embedding    split by vocabulary rows; out-of-shard ids give zeros; SUM all-reduce
    output head  input copy_to_tp, split by vocabulary rows; vocab-parallel cross-entropy (max / sum-exp /
                 target-logit all-reduces of [N] vectors: full logits are never gathered); logits returned
                 without a loss (generation) are all-gathered

Gradients: parameters inside a region that are replicated (MLA's down-projections and their norms) only see
their rank's heads in the backward pass, so their gradients are partial sums over TP; data_parallel.sync_gradients
sums them over the TP group as well ("dp+tp"). Routed experts see only the tokens routed to them from their EP
group and are summed over every rank holding them ("edp", plan.py). Everything else (the router included: it runs
on all tokens and its top-k weights enter the dispatcher through copy_to_tp) gets complete gradients for its
slice.

NOTE: DTensor's ColwiseParallel/RowwiseParallel would wrap the weights as DTensors; MLA's absorbed decode reshapes
`kv_b_proj.weight` by the local head count and the stacked experts are indexed per local expert, so plain local
shards (and one resharding path in checkpoint.py) are simpler here. DeviceMesh still names the groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..block import Block
from ..mla import MLA
from ..mlp import MLP
from ..moe import MoE
from ..transformer import Transformer
from .collectives import all_reduce_max_, copy_to_tp, gather_last_dim, reduce_from_tp
from .layout import Layout
from .plan import ParallelPlan


class RowParallelLinear(nn.Module):
    """y = reduce(x_local W_local^T) + b, W sliced along its input dim; `reduce=False` leaves y partial."""

    def __init__(self, linear: nn.Linear, group, start: int, stop: int, reduce: bool = True):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[:, start:stop].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.group, self.reduce = group, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce:
            y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_local={self.weight.shape[1]}, out={self.weight.shape[0]}, reduce={self.reduce}"


class VocabParallelEmbedding(nn.Embedding):
    """Vocabulary rows [start, stop) of an nn.Embedding. Still an nn.Embedding, so code that treats embeddings
    specially by type (train/optim.py: no weight decay) sees the same module kinds as on one process."""

    def __init__(self, embedding: nn.Embedding, group, start: int, stop: int):
        super().__init__(stop - start, embedding.embedding_dim, _weight=embedding.weight.detach()[start:stop].clone(),
                         device=embedding.weight.device, dtype=embedding.weight.dtype)
        self.group, self.vocab_start = group, start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside.unsqueeze(-1)
        return reduce_from_tp(h, self.group)


class VocabParallelHead(nn.Module):
    """Output head holding vocabulary rows [start, stop); returns this rank's logits [..., V/tp]."""

    def __init__(self, linear: nn.Linear, group, start: int, stop: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach()[start:stop].clone())
        self.group, self.vocab_start = group, start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(h, self.group), self.weight)


class VocabParallelCrossEntropy:
    """Drop-in for transformer.shifted_cross_entropy on vocab-sharded logits [B, T, V/tp] (fp32 math).

        loss_i = log sum_v exp(z_iv - m_i) - (z_i,y_i - m_i),  m_i = max_v z_iv
    with the max, the sum of exponentials and the target logit each all-reduced over TP as [N] vectors.
    """

    def __init__(self, group, vocab_start: int):
        self.group, self.vocab_start = group, vocab_start

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
        z = logits[:, : logits.shape[1] - shift].float().flatten(0, 1)  # [N, V_local]
        targets = labels[:, shift:].flatten()
        valid = targets != -100
        with torch.no_grad():
            m = all_reduce_max_(z.max(dim=-1).values, self.group)  # any per-row constant works; no grad needed
        z = z - m.unsqueeze(1)
        sum_exp = reduce_from_tp(z.exp().sum(dim=-1), self.group)
        local = targets - self.vocab_start
        inside = valid & (local >= 0) & (local < z.shape[1])
        target_logit = z.gather(1, local.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
        target_logit = reduce_from_tp(torch.where(inside, target_logit, 0.0), self.group)
        loss = torch.where(valid, sum_exp.log() - target_logit, 0.0)
        return loss.sum() / valid.sum()


class GatherVocab:
    """Full-vocabulary logits from the shards (all-gather along the last dim; backward keeps this rank's slice)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(logits, self.group)


class _CopyInput:
    """Forward pre-hook: the module's first positional input enters a TP region."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, args):
        return (copy_to_tp(args[0], self.group),) + tuple(args[1:])


class _ReduceMoEOutput:
    """Forward hook: the MoE output (routed chunk + shared experts, both partial over TP) is summed once."""

    def __init__(self, group):
        self.group = group

    def __call__(self, module, args, output):
        y, stats = output
        return reduce_from_tp(y, self.group), stats


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = t.shape[dim] // size
    return t.detach().narrow(dim, rank * n, n).clone()


def _colwise_(linear: nn.Linear, rank: int, size: int) -> None:
    """Keep output rows [rank*n, (rank+1)*n) of an nn.Linear in place (bias sliced alike)."""
    linear.weight = nn.Parameter(_shard(linear.weight, 0, rank, size))
    if linear.bias is not None:
        linear.bias = nn.Parameter(_shard(linear.bias, 0, rank, size))
    linear.out_features = linear.weight.shape[0]


def _tp_mla(mla: MLA, prefix: str, layout: Layout, plan: ParallelPlan) -> None:
    g, t, tp = layout.tp_group, layout.tp_rank, layout.tp
    q = mla.q_proj if hasattr(mla, "q_proj") else mla.q_b_proj
    q_name = "q_proj" if hasattr(mla, "q_proj") else "q_b_proj"
    for name, lin in ((q_name, q), ("kv_b_proj", mla.kv_b_proj)):
        _colwise_(lin, t, tp)
        plan.shard(f"{prefix}.{name}.weight", "tp", 0)
    width = mla.o_proj.in_features // tp
    mla.o_proj = RowParallelLinear(mla.o_proj, g, t * width, (t + 1) * width)
    plan.shard(f"{prefix}.o_proj.weight", "tp", 1)
    for name, _ in mla.named_parameters():
        if name.split(".")[0] in ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm"):
            plan.partial_over_tp(f"{prefix}.{name}")
    mla.register_forward_pre_hook(_CopyInput(g))


def _tp_mlp(mlp: MLP, prefix: str, layout: Layout, plan: ParallelPlan, reduce: bool) -> None:
    g, t, tp = layout.tp_group, layout.tp_rank, layout.tp
    for name in ("gate_proj", "up_proj"):
        _colwise_(getattr(mlp, name), t, tp)
        plan.shard(f"{prefix}.{name}.weight", "tp", 0)
    width = mlp.down_proj.in_features // tp
    mlp.down_proj = RowParallelLinear(mlp.down_proj, g, t * width, (t + 1) * width, reduce=reduce)
    plan.shard(f"{prefix}.down_proj.weight", "tp", 1)
    mlp.register_forward_pre_hook(_CopyInput(g))


def apply_tp(model: Transformer, layout: Layout, plan: ParallelPlan) -> None:
    """Shard `model` in place over layout.tp_group (see the module docstring); records every shard in `plan`."""
    g, t, tp = layout.tp_group, layout.tp_rank, layout.tp
    V = model.config.vocab_size
    lo, hi = t * V // tp, (t + 1) * V // tp
    tied = model.config.tie_word_embeddings
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, g, lo, hi)
    plan.shard("embed_tokens.weight", "tp", 0)
    model.lm_head = VocabParallelHead(model.lm_head, g, lo, hi)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    plan.shard("lm_head.weight", "tp", 0)
    model.cross_entropy = VocabParallelCrossEntropy(g, lo)
    model.gather_logits = GatherVocab(g)

    for prefix, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        _tp_mla(block.self_attn, f"{prefix}.self_attn", layout, plan)
        if isinstance(block.mlp, MoE):
            if block.mlp.shared_experts is not None:
                _tp_mlp(block.mlp.shared_experts, f"{prefix}.mlp.shared_experts", layout, plan, reduce=False)
            block.mlp.register_forward_hook(_ReduceMoEOutput(g))
        else:
            _tp_mlp(block.mlp, f"{prefix}.mlp", layout, plan, reduce=True)
