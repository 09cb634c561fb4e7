"""Expert parallelism: each EP rank holds n_routed_experts / ep whole experts and tokens travel to them.

Shape suffixes (as model/dispatch.py): T tokens, D model dim, K top-k, E all experts, e local experts (E / ep),
S source ranks of the EP group, R routed rows leaving this rank, Q rows received by this rank.

`AllToAllDispatcher` implements the dispatcher protocol of model/dispatch.py:

    dispatch(x_TD, topk_ids_TK) -> (x_QD, counts_e, state)
        1. under TP, keep this rank's contiguous 1/tp of the tokens (x enters through copy_to_tp, so its
           gradient is completed over TP)
        2. sort the (token, k) rows by expert (as LocalDispatcher); experts of EP rank j are j*e .. (j+1)*e - 1,
           so the rows bound for each destination are contiguous
        3. exchange the per-expert counts (all_to_all_single of [E] int64), then the rows (autograd
           all_to_all_single with uneven splits)
        4. received rows are source-major (s0: e0 e1 .., s1: e0 e1 ..); permute them local-expert-major
    combine(y_QD, topk_weights_TK, state) -> y_TD
        the inverse permute, the reverse all-to-all, un-sort, weight and sum over k; under TP the result is
        zero-padded back to T rows (a partial sum that the MoE output all-reduce completes)

The experts themselves run the same grouped SwiGLU as a single process on the local slice of the stacked weights.
NOTE: the split sizes need the counts on the host (`.tolist()`), a device sync on GPUs, as in torchtitan.
NOTE: every rank of an EP (or TP) group must run the MoE the same number of times: generation with the same
prompts and seed on every rank does; different prompts per DP replica need a common stop (e.g. eos_token_id=[]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import MoE
from ..transformer import Transformer
from .collectives import all_to_all, all_to_all_counts, copy_to_tp, group_size
from .layout import Layout
from .plan import ParallelPlan


def tp_token_range(num_tokens: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of `num_tokens` that TP rank `tp_rank` routes (ceil-sized chunks, last may be
    short or empty)."""
    chunk = -(-num_tokens // tp_size)
    lo = min(tp_rank * chunk, num_tokens)
    return lo, min(lo + chunk, num_tokens)


def source_to_expert_major(counts_Se: torch.Tensor) -> torch.Tensor:
    """Index Q such that rows[Q] is expert-major, for rows laid out source-major with counts_Se[s, e] rows of
    local expert e from source s. Within one expert the source order is kept."""
    S, e = counts_Se.shape
    flat = counts_Se.flatten()  # segment (s, e) at position s*e + e
    seg_start = (flat.cumsum(0) - flat).view(S, e)
    seg_len = counts_Se.t().flatten()  # segments in the target (expert-major) order
    starts = seg_start.t().flatten()
    total = int(flat.sum())
    # position of each output row inside its segment, plus the segment's start in the source-major layout
    out_seg_begin = seg_len.cumsum(0) - seg_len
    offset = torch.arange(total, device=counts_Se.device) - out_seg_begin.repeat_interleave(seg_len)
    return starts.repeat_interleave(seg_len) + offset


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


@dataclass
class DispatchState:
    order_R: torch.Tensor  # sort of this rank's (token, k) rows by expert
    num_tokens: int  # T before the TP split
    lo: int
    hi: int
    in_splits: list[int] | None = None  # rows sent to each EP rank
    out_splits: list[int] | None = None  # rows received from each EP rank
    unpermute_Q: torch.Tensor | None = None  # expert-major -> source-major


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_group=None, tp_group=None):
        self.num_experts = num_experts
        self.ep_group, self.tp_group = ep_group, tp_group
        self.ep = group_size(ep_group) if ep_group is not None else 1
        self.tp = group_size(tp_group) if tp_group is not None else 1
        self.tp_rank = torch.distributed.get_rank(tp_group) if self.tp > 1 else 0
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts do not split over ep={self.ep}")
        self.num_local = num_experts // self.ep

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        T, K = topk_ids_TK.shape
        lo, hi = 0, T
        if self.tp > 1:
            lo, hi = tp_token_range(T, self.tp, self.tp_rank)
            x_TD = copy_to_tp(x_TD, self.tp_group)[lo:hi]
            topk_ids_TK = topk_ids_TK[lo:hi]
        flat_ids = topk_ids_TK.flatten()
        order_R = flat_ids.argsort(stable=True)
        counts_E = torch.bincount(flat_ids, minlength=self.num_experts)
        x_RD = x_TD.index_select(0, order_R // K)
        state = DispatchState(order_R, T, lo, hi)
        if self.ep == 1:
            return x_RD, counts_E, state
        with torch.no_grad():
            recv_Se = all_to_all_counts(counts_E, self.ep_group).view(self.ep, self.num_local)
        state.in_splits = counts_E.view(self.ep, self.num_local).sum(1).tolist()
        state.out_splits = recv_Se.sum(1).tolist()
        x_QD = all_to_all(x_RD, state.out_splits, state.in_splits, self.ep_group)
        permute_Q = source_to_expert_major(recv_Se)
        state.unpermute_Q = inverse_permutation(permute_Q)
        return x_QD.index_select(0, permute_Q), recv_Se.sum(0), state

    def combine(self, y_QD: torch.Tensor, topk_weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        if self.ep > 1:
            y_QD = y_QD.index_select(0, state.unpermute_Q)
            y_QD = all_to_all(y_QD, state.in_splits, state.out_splits, self.ep_group)
        y_RD = torch.empty_like(y_QD).index_copy(0, state.order_R, y_QD)  # back to (token, k) order
        if self.tp > 1:
            topk_weights_TK = copy_to_tp(topk_weights_TK, self.tp_group)[state.lo:state.hi]
        y_TKD = y_RD.view(state.hi - state.lo, topk_weights_TK.shape[1], y_RD.shape[-1])
        y_TD = torch.bmm(topk_weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
        if self.tp > 1:  # other TP ranks' tokens are theirs to fill: a partial sum over the TP group
            y_TD = F.pad(y_TD, (0, 0, state.lo, state.num_tokens - state.hi))
        return y_TD


def apply_ep(model: Transformer, layout: Layout, plan: ParallelPlan) -> None:
    """Keep this EP rank's experts (dim 0 of the stacked weights) and install the all-to-all dispatcher in every
    MoE layer (also needed for tp > 1 alone, where it splits the tokens over TP)."""
    ep, e = layout.ep, layout.ep_rank
    for prefix, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)
            n = w.shape[0] // ep
            setattr(experts, name, nn.Parameter(w.detach()[e * n:(e + 1) * n].clone()))
            plan.shard(f"{prefix}.experts.{name}", "ep", 0, grad="edp")
        moe.dispatcher = AllToAllDispatcher(moe.num_experts, layout.ep_group if ep > 1 else None,
                                            layout.tp_group if layout.tp > 1 else None)
