"""Shared fixtures for the seekstack model tests (CPU, fp32, seeded, tiny dims).

Run everything with:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from model.config import ModelConfig, preset

# The tests use tiny tensors: one intra-op thread is fastest, and it avoids OpenMP oversubscription stalls (seconds
# per forward) when the 2 cores are shared with other jobs. Override with SEEKSTACK_TEST_THREADS=n.
torch.set_num_threads(int(os.environ.get("SEEKSTACK_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state and in fp32."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def tiny_config():
    """Builder: `tiny_config(**overrides)` -> ModelConfig from the `tiny` preset (64-d, 8 experts, 2 layers)."""

    def build(**overrides) -> ModelConfig:
        return preset("tiny", **overrides)

    return build


@pytest.fixture
def router_config():
    """Builder for a router-only config whose hidden size equals the expert count, so an identity router weight
    makes the router logits equal the input: `router_config(n_routed_experts=8, n_group=4, ...)`."""

    def build(**overrides) -> ModelConfig:
        E = overrides.get("n_routed_experts", 8)
        base = dict(hidden_size=E, n_routed_experts=E, num_experts_per_tok=2, n_group=1, topk_group=1,
                    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                    routed_scaling_factor=2.5)
        return preset("tiny", **{**base, **overrides})

    return build


@pytest.fixture
def init_params():
    """`init_params(module, std=0.1)`: N(0, std) for every matrix-shaped parameter, ones for 1-D (norm) weights.

    Modules such as MoE / GroupedExperts / Router allocate with torch.empty; this gives them finite values.
    """

    @torch.no_grad()
    def init(module: nn.Module, std: float = 0.1) -> nn.Module:
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)
        return module

    return init


@pytest.fixture
def randomize_bias():
    """`randomize_bias(model, scale=0.02)`: small random e_score_correction_bias on every Router (non-trivial routing)."""
    from model.router import Router

    @torch.no_grad()
    def rand(model: nn.Module, scale: float = 0.02) -> nn.Module:
        for m in model.modules():
            if isinstance(m, Router):
                m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias) * scale)
        return model

    return rand
