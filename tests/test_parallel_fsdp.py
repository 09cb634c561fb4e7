"""FSDP2 over the data-parallel ranks (model/parallel/fsdp.py), alone and under EP / TP, against the single-process
model on the same global batch: loss, every gradient (gathered), the weights after three AdamW steps, greedy
generation, the clipped gradient norm, and sharded checkpoints written from FSDP chunks and read back into FSDP and
non-FSDP layouts. Also checks that the non-expert parameters really are split (each rank holds ~1/dp of them).

Run: PYTHONPATH=. python -m pytest -q -m distributed tests/test_parallel_fsdp.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from model.parallel import build_layout, gather_full, load_sharded, parallelize, save_sharded
from model.parallel.fsdp import expert_parameters, is_sharded, local
from model.parallel.layout import ParallelConfigError, ParallelDims
from tests.distributed_helpers import run_distributed
from tests.test_parallel_distributed import (TOL, _build, _generate, _global_batch, _grad_norm_case, _max_diff,
                                             _reference, _train)

pytestmark = pytest.mark.distributed

# (name, tp, ep)
CASES_TWO = [("fsdp_dp2", 1, 1), ("fsdp_ep2", 1, 2)]
CASES_FOUR = [("fsdp_tp2_ep2", 2, 2)]


def _case(ref, tp: int, ep: int, ckpt_dir: str) -> dict:
    layout = build_layout(tp=tp, ep=ep, fsdp=True)
    model = parallelize(_build(), layout)
    experts = expert_parameters(model)
    dense = [p for p in model.parameters() if p not in experts]
    held = sum(local(p).numel() for p in dense)
    whole = sum(p.numel() for p in dense)  # DTensor numel = the rank's whole (TP-sliced) size
    held_total = sum(local(p).numel() for p in {id(p): p for p in model.parameters()}.values())
    tokens, logprobs = _generate(model)
    losses, grads, weights = _train(model, layout, _global_batch())
    errors = torch.tensor([float((losses - ref["losses"]).abs().max()), _max_diff(grads, ref["grads"]),
                           _max_diff(weights, ref["weights"]), float(tokens != ref["tokens"]),
                           float((logprobs - ref["logprobs"]).abs().max())], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)

    # sharded checkpoint from FSDP chunks; read back into a fresh FSDP model and into the same layout without FSDP
    path = os.path.join(ckpt_dir, f"ckpt_tp{tp}_ep{ep}")
    save_sharded(model, path, layout)
    reload_errors = []
    for fsdp in (True, False):
        other_layout = build_layout(tp=tp, ep=ep, fsdp=fsdp)
        other = parallelize(_fresh(), other_layout)
        load_sharded(other, path)
        reload_errors.append(_max_diff(gather_full(other, other_layout), weights))
    return dict(loss=float(errors[0]), grad=float(errors[1]), weight=float(errors[2]), tokens_equal=not errors[3],
                logprob=float(errors[4]), held_fraction=held / whole, dp=layout.dp, held_total=held_total,
                tp=tp, ep=ep, world=layout.world_size,
                all_dense_sharded=all(is_sharded(p) for p in dense),
                experts_plain=not any(is_sharded(p) for p in experts),
                reload_fsdp=reload_errors[0], reload_plain=reload_errors[1])


def _fresh():
    torch.manual_seed(123)  # different weights, so a load that misses a tensor shows
    from model import Transformer, preset

    return Transformer(preset("tiny"))


def _worker(rank, world, ref, ckpt_dir, cases):
    results = {name: _case(ref, tp, ep, ckpt_dir) for name, tp, ep in cases}
    name, tp, ep = cases[-1]
    results[f"grad_norm_{name}"] = _grad_norm_case(tp, ep, fsdp=True)
    return results


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def results(reference, tmp_path_factory):
    two = run_distributed(_worker, 2, args=(reference, str(tmp_path_factory.mktemp("fsdp2")), CASES_TWO),
                          timeout_s=240)
    four = run_distributed(_worker, 4, args=(reference, str(tmp_path_factory.mktemp("fsdp4")), CASES_FOUR),
                           timeout_s=240)
    return {**two, **four}


@pytest.mark.parametrize("case", CASES_TWO + CASES_FOUR, ids=[c[0] for c in CASES_TWO + CASES_FOUR])
def test_fsdp_layouts_match_single_process(results, case):
    r = results[case[0]]
    assert r["loss"] < TOL and r["grad"] < TOL and r["weight"] < TOL, r
    assert r["tokens_equal"] and r["logprob"] < TOL, r


@pytest.mark.parametrize("case", CASES_TWO + CASES_FOUR, ids=[c[0] for c in CASES_TWO + CASES_FOUR])
def test_fsdp_really_shards_the_dense_parameters(results, case):
    r = results[case[0]]
    assert r["all_dense_sharded"] and r["experts_plain"], r
    # dim-0 chunks over dp ranks: about 1/dp of the rank's dense parameters (rounding up small dims)
    assert r["held_fraction"] <= 1 / r["dp"] + 0.05, r


@pytest.mark.parametrize("case", CASES_TWO + CASES_FOUR, ids=[c[0] for c in CASES_TWO + CASES_FOUR])
def test_fsdp_checkpoint_round_trip(results, case):
    r = results[case[0]]
    assert r["reload_fsdp"] == 0.0 and r["reload_plain"] == 0.0, r


@pytest.mark.parametrize("case", CASES_TWO + CASES_FOUR, ids=[c[0] for c in CASES_TWO + CASES_FOUR])
def test_tools_plan_counts_the_fsdp_chunks_a_rank_holds(results, case):
    from model import preset
    from tools.plan import plan

    r = results[case[0]]
    predicted = plan(preset("tiny"), r["world"], r["tp"], r["ep"], batch_tokens=r["world"] * 12, seq_len=12,
                     dtype="fp32", fsdp=True)["params_per_rank"]["total"]
    assert predicted == r["held_total"], (predicted, r["held_total"])


def test_fsdp_grad_norm_clipping_matches_torch(results):
    for name in ("grad_norm_fsdp_ep2", "grad_norm_fsdp_tp2_ep2"):
        assert results[name] < TOL, (name, results[name])


def test_fsdp_needs_data_parallel_ranks():
    with pytest.raises(ParallelConfigError, match="fsdp shards parameters over the data-parallel ranks"):
        ParallelDims(2, tp=2, fsdp=True)
    assert ParallelDims(4, tp=2, fsdp=True).mp == 4  # FSDP joins the DP ranks: one generation group
    assert ParallelDims(4, tp=2).mp == 2
