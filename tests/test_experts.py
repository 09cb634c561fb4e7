"""Routed experts: grouped GEMM path == padded bmm path == per-expert loop == naive per-token SwiGLU (forward and
backward), the automatic choice between them, LocalDispatcher round trip, float64 gradcheck.

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_experts.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.experts as experts_mod
from model.dispatch import LocalDispatcher
from model.experts import GroupedExperts, choose_impl, grouped_mm_supported, grouped_swiglu

IMPLS = ("grouped_mm", "padded", "loop")


def naive_rows(x_RD, gate_up, down, expert_of_row):
    """y_r = W_down[e] (silu(W_gate[e] x_r) * W_up[e] x_r), one row at a time; gate rows come first in gate_up."""
    I = down.shape[-1]
    out = []
    for x, e in zip(x_RD, expert_of_row.tolist()):
        gate, up = gate_up[e, :I] @ x, gate_up[e, I:] @ x
        out.append(down[e] @ (F.silu(gate) * up))
    return torch.stack(out) if out else x_RD.new_zeros(0, down.shape[1])


def make_case(E, D, I, counts, dtype=torch.float32):
    counts_E = torch.tensor(counts)
    R = int(counts_E.sum())
    x = torch.randn(R, D, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(E, 2 * I, D, dtype=dtype) * 0.5).requires_grad_()
    down = (torch.randn(E, D, I, dtype=dtype) * 0.5).requires_grad_()
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts_E)
    return x, gate_up, down, counts_E, expert_of_row


def grads(y, inputs, grad_out):
    return torch.autograd.grad(y, inputs, grad_out, retain_graph=True)


# Experts 1 and 4 (and the last one in the second case) receive no tokens.
@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 0, 6], [0, 4, 1, 7, 2, 0]])
def test_grouped_mm_equals_loop_equals_naive(counts):
    E, D, I = 6, 16, 8
    x, gate_up, down, counts_E, expert_of_row = make_case(E, D, I, counts)
    w1 = gate_up.transpose(-2, -1)
    assert grouped_mm_supported(x, w1) and grouped_mm_supported(x, down.transpose(-2, -1))
    g = torch.randn(x.shape[0], D)

    y_ref = naive_rows(x, gate_up, down, expert_of_row)
    ref = grads(y_ref, (x, gate_up, down), g)
    for impl in IMPLS:
        y = grouped_swiglu(x, gate_up, down, counts_E, impl=impl)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=impl)
        for got, want, name in zip(grads(y, (x, gate_up, down), g), ref, ("x", "gate_up_proj", "down_proj")):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{impl}: {name}")
        # experts without tokens get exactly zero weight gradient
        gu_grad = grads(y, (gate_up,), g)[0]
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.count_nonzero(gu_grad[e]) == 0, impl


def test_grouped_mm_backward_accepts_any_grad_layout():
    """`grouped_swiglu(...).sum().backward()` must work on both paths (the grad of a sum is an expanded tensor).

    Known issue at the time of writing: torch's CPU grouped_mm backward rejects non-contiguous output grads
    ("Invalid strides/sizes") -- see the report; the fix is to make the incoming grad contiguous in grouped_swiglu.
    """
    E, D, I = 4, 8, 4
    x, gate_up, down, counts_E, expert_of_row = make_case(E, D, I, [3, 0, 5, 2])
    ref = torch.autograd.grad(naive_rows(x, gate_up, down, expert_of_row).sum(), (x, gate_up, down))
    for impl in IMPLS:
        y = grouped_swiglu(x, gate_up, down, counts_E, impl=impl)
        got = torch.autograd.grad(y.sum(), (x, gate_up, down))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_shapes_fall_back_to_loop(monkeypatch):
    # D = 6, I = 3 in fp32: rows of 24 / 12 bytes are not 16-byte aligned, so CPU grouped_mm does not apply.
    E, D, I = 3, 6, 3
    x, gate_up, down, counts_E, expert_of_row = make_case(E, D, I, [2, 0, 3])
    assert not grouped_mm_supported(x, gate_up.transpose(-2, -1))

    calls = []
    real = experts_mod._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_mod, "_grouped_mm", spy)
    monkeypatch.setattr(experts_mod, "PADDED_MAX_ROWS", 0)  # CPU padded path off: grouped_mm or the loop
    y_auto = grouped_swiglu(x, gate_up, down, counts_E)  # impl="auto"
    assert calls == []  # fell back to the loop
    torch.testing.assert_close(y_auto, naive_rows(x, gate_up, down, expert_of_row), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_auto)
    ref = grads(naive_rows(x, gate_up, down, expert_of_row), (x, gate_up, down), g)
    for got, want in zip(grads(y_auto, (x, gate_up, down), g), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Aligned shapes take the grouped GEMM automatically.
    x2, gu2, dn2, c2, _ = make_case(3, 8, 4, [2, 0, 3])
    grouped_swiglu(x2, gu2, dn2, c2)
    assert len(calls) == 2


def test_grouped_mm_supported_rules():
    x = torch.randn(4, 8)
    assert grouped_mm_supported(x, torch.randn(2, 8, 4))  # 16-byte rows
    assert not grouped_mm_supported(x, torch.randn(2, 8, 3))
    assert not grouped_mm_supported(x, torch.randn(2, 6, 4))
    # float64: 2 elements make 16 bytes
    assert grouped_mm_supported(x.double(), torch.randn(2, 8, 2, dtype=torch.float64))


def test_grouped_experts_module_matches_naive():
    module = GroupedExperts(4, 16, 8)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.3)
        module.down_proj.normal_(0, 0.3)
    assert module.num_experts == 4
    counts = torch.tensor([2, 3, 0, 4])
    x = torch.randn(9, 16)
    expected = naive_rows(x, module.gate_up_proj, module.down_proj, torch.repeat_interleave(torch.arange(4), counts))
    for impl in ("auto",) + IMPLS:
        module.impl = impl
        torch.testing.assert_close(module(x, counts), expected, rtol=1e-5, atol=1e-5)


def test_zero_rows_total():
    E, D, I = 3, 8, 4
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    x = torch.zeros(0, D)
    for impl in ("auto",) + IMPLS:
        y = grouped_swiglu(x, gate_up, down, torch.zeros(E, dtype=torch.int64), impl=impl)
        assert y.shape == (0, D)


# --------------------------------------------------------------------------------------------------- dispatcher
def test_local_dispatcher_round_trip_equals_naive_weighted_sum():
    T, D, I, E, K = 11, 16, 8, 6, 3
    x = torch.randn(T, D, requires_grad=True)
    # distinct experts per token; expert 5 is never used
    ids = torch.stack([torch.randperm(5)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    gate_up = torch.randn(E, 2 * I, D) * 0.3
    down = torch.randn(E, D, I) * 0.3

    disp = LocalDispatcher(E)
    x_RD, counts_E, state = disp.dispatch(x, ids)
    assert counts_E.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist() and counts_E[5] == 0
    # rows are grouped by expert, and each row is a copy of its token
    row_expert = torch.repeat_interleave(torch.arange(E), counts_E)
    assert torch.equal(ids.flatten()[state], row_expert)
    torch.testing.assert_close(x_RD, x[state // K])
    y = disp.combine(grouped_swiglu(x_RD, gate_up, down, counts_E), w, state)

    expected = torch.stack([
        sum(w[t, k] * naive_rows(x[t:t + 1], gate_up, down, ids[t, k:k + 1])[0] for k in range(K))
        for t in range(T)
    ])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(T, D)
    for got, want in zip(grads(y, (x, w), g), grads(expected, (x, w), g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_local_dispatcher_identity_experts():
    """With identity experts, combine(dispatch(x)) = x * sum_k w_tk exactly."""
    T, D, E, K = 7, 4, 5, 2
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    disp = LocalDispatcher(E)
    x_RD, counts, state = disp.dispatch(x, ids)
    torch.testing.assert_close(disp.combine(x_RD, w, state), x * w.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------------- gradcheck
def test_gradcheck_loop_path_float64():
    E, D, I = 3, 3, 2
    x, gate_up, down, counts_E, _ = make_case(E, D, I, [2, 0, 1], dtype=torch.float64)

    def f(x, gate_up, down):
        return grouped_swiglu(x, gate_up, down, counts_E, impl="loop")

    assert torch.autograd.gradcheck(f, (x, gate_up, down), eps=1e-6, atol=1e-6)

    def padded(x, gate_up, down):
        return grouped_swiglu(x, gate_up, down, counts_E, impl="padded")

    assert torch.autograd.gradcheck(padded, (x, gate_up, down), eps=1e-6, atol=1e-6)


def test_auto_choice_rules():
    """CPU: padded bmm for few rows when padding at most quadruples the rows; grouped GEMM otherwise (aligned)."""
    E, D, I = 4, 8, 4
    w1, w2 = torch.randn(E, D, 2 * I), torch.randn(E, I, D)
    balanced = torch.tensor([3, 2, 3, 2])  # 4 experts x 3 slots = 12 <= 4 x 10 rows
    assert choose_impl(torch.randn(10, D), w1, w2, balanced) == "padded"
    skewed = torch.tensor([0, 11, 0, 0, 1, 0, 0, 0])  # 8 experts x 11 slots = 88 > 4 x 12 rows
    w1_8, w2_8 = torch.randn(8, D, 2 * I), torch.randn(8, I, D)
    assert choose_impl(torch.randn(12, D), w1_8, w2_8, skewed) == "grouped_mm"
    many = torch.full((E,), experts_mod.PADDED_MAX_ROWS // E + 1)
    assert choose_impl(torch.randn(int(many.sum()), D), w1, w2, many) == "grouped_mm"
    with pytest.raises(ValueError, match="impl must be one of"):
        grouped_swiglu(torch.randn(10, D), w1.transpose(1, 2), w2.transpose(1, 2), balanced, impl="fast")
