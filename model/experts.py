"""Routed experts as stacked weights, computed with grouped matmuls over tokens sorted by expert.

Shape suffix legend (torchtitan style): R = routed rows (tokens x top-k, sorted by expert), D = model dim,
I = expert intermediate dim, E = experts held by this module (all of them, or this rank's share under EP).

Weights use transformers' in-memory layout: `gate_up_proj` [E, 2I, D] (gate rows first) and `down_proj` [E, D, I],
so expert parallelism is just a split of dim 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x_RD: torch.Tensor, w_EDN: torch.Tensor) -> bool:
    """torch's grouped GEMM runs on CUDA (bf16/fp32, sm80+) and on CPU when every row stride is 16-byte aligned."""
    if _grouped_mm is None:
        return False
    if x_RD.device.type == "cuda":
        return torch.cuda.get_device_capability(x_RD.device) >= (8, 0)
    if x_RD.device.type != "cpu":
        return False
    elem = x_RD.element_size()
    return all((n * elem) % 16 == 0 for n in (w_EDN.shape[-1], w_EDN.shape[-2]))


def _loop_mm(x_RD: torch.Tensor, w_EDN: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Reference: one matmul per expert over its contiguous slice of rows."""
    outs = [x @ w for x, w in zip(x_RD.split(counts), w_EDN)]
    return torch.cat(outs) if outs else x_RD.new_zeros(0, w_EDN.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands grouped_mm a contiguous gradient (its CPU backward rejects expanded or
    transposed gradients, e.g. the one of `.sum()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_swiglu(x_RD: torch.Tensor, gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor,
                   counts_E: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """y_r = W_down[e] (silu(W_gate[e] x_r) * W_up[e] x_r) for rows r sorted by expert e, counts_E rows each.

    `use_grouped_mm=None` picks torch's grouped GEMM where it applies and the per-expert loop otherwise; both are
    kept and tested against each other.
    """
    # grouped_mm is not autocast-aware: run in the activations' dtype (bf16 under autocast).
    w1 = gate_up_E2ID.transpose(-2, -1).to(x_RD.dtype)  # [E, D, 2I]
    w2 = down_EDI.transpose(-2, -1).to(x_RD.dtype)  # [E, I, D]
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x_RD, w1) and grouped_mm_supported(x_RD, w2)
    if use_grouped_mm:
        offs = counts_E.cumsum(0).to(torch.int32)
        h = _grouped_mm(x_RD, w1, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return _ContiguousGrad.apply(_grouped_mm(F.silu(gate) * up, w2, offs=offs))
    counts = counts_E.tolist()
    h = _loop_mm(x_RD, w1, counts)
    gate, up = h.chunk(2, dim=-1)
    return _loop_mm(F.silu(gate) * up, w2, counts)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter_dim))
        self.use_grouped_mm: bool | None = None  # None = automatic

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_RD, self.gate_up_proj, self.down_proj, counts_E, self.use_grouped_mm)
