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


def padded_swiglu(x_RD: torch.Tensor, w1_ED2I: torch.Tensor, w2_EID: torch.Tensor,
                  counts_E: torch.Tensor) -> torch.Tensor:
    """The same SwiGLU as two batched matmuls over an [E, C, D] buffer, C = the largest expert's row count.

    Rows are scattered into per-expert slots (zero padding after each expert's rows), multiplied by every expert's
    weights at once, and gathered back. It computes E*C - R padding rows for nothing, but two large `bmm` calls beat
    2E tiny GEMMs when each expert sees a handful of rows (decoding); `auto` picks it only when padding is cheap.
    """
    R, E = x_RD.shape[0], counts_E.shape[0]
    if R == 0:
        return x_RD.new_zeros(0, w2_EID.shape[-1])
    C = int(counts_E.max())
    starts_E = counts_E.cumsum(0) - counts_E
    expert_R = torch.repeat_interleave(torch.arange(E, device=x_RD.device), counts_E, output_size=R)
    slot_R = expert_R * C + torch.arange(R, device=x_RD.device) - starts_E[expert_R]
    x_ECD = x_RD.new_zeros(E * C, x_RD.shape[1]).index_copy(0, slot_R, x_RD).view(E, C, -1)
    gate, up = torch.bmm(x_ECD, w1_ED2I).chunk(2, dim=-1)
    y_ECD = torch.bmm(F.silu(gate) * up, w2_EID)
    return y_ECD.flatten(0, 1).index_select(0, slot_R)


# Above this many routed rows the per-expert GEMMs are big enough for torch's CPU grouped GEMM to win (measured on
# the `small` bench shapes: padded 2x faster at 64 rows, even at ~1K, slower at 8K).
PADDED_MAX_ROWS = 1024
IMPLS = ("auto", "grouped_mm", "padded", "loop")


def choose_impl(x_RD: torch.Tensor, w1_ED2I: torch.Tensor, w2_EID: torch.Tensor, counts_E: torch.Tensor) -> str:
    """`grouped_mm` on CUDA; on CPU the padded bmm for few rows when padding at most quadruples the rows (torch's CPU
    grouped GEMM runs one small GEMM per expert; with few rows both read every expert's weights, which is what
    costs), else `grouped_mm` where its alignment rules hold, else `loop`."""
    R = x_RD.shape[0]
    if x_RD.device.type == "cpu" and 0 < R <= PADDED_MAX_ROWS and counts_E.shape[0] * int(counts_E.max()) <= 4 * R:
        return "padded"
    return "grouped_mm" if grouped_mm_supported(x_RD, w1_ED2I) and grouped_mm_supported(x_RD, w2_EID) else "loop"


def grouped_swiglu(x_RD: torch.Tensor, gate_up_E2ID: torch.Tensor, down_EDI: torch.Tensor,
                   counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y_r = W_down[e] (silu(W_gate[e] x_r) * W_up[e] x_r) for rows r sorted by expert e, counts_E rows each.

    impl: "grouped_mm" (torch's grouped GEMM), "padded" (two bmm over a per-expert padded buffer), "loop" (one GEMM
    per expert, the reference) or "auto" (`choose_impl`). All three are tested against each other.
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_swiglu: impl must be one of {IMPLS}, got {impl!r}")
    # grouped_mm is not autocast-aware: run in the activations' dtype (bf16 under autocast).
    w1 = gate_up_E2ID.transpose(-2, -1).to(x_RD.dtype)  # [E, D, 2I]
    w2 = down_EDI.transpose(-2, -1).to(x_RD.dtype)  # [E, I, D]
    if impl == "auto":
        impl = choose_impl(x_RD, w1, w2, counts_E)
    if impl == "padded":
        return padded_swiglu(x_RD, w1, w2, counts_E)
    if impl == "grouped_mm":
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
        self.impl = "auto"  # see grouped_swiglu

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_RD, self.gate_up_proj, self.down_proj, counts_E, self.impl)
