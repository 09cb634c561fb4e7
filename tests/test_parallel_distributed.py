"""TP / EP / DP on CPU with gloo against the single-process model: loss, every gradient, the weights after three
AdamW steps (with the aux-loss-free bias update in between), greedy generation, and sharded checkpoints that
reshard on load. Two spawns (2 and 4 ranks) run all sub-cases against one single-process reference on the same
global batch (computed by the parent; forked workers inherit it). Errors are the worst over all ranks.

Run: PYTHONPATH=. python -m pytest -q -m distributed tests/test_parallel_distributed.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from model import Transformer, load_model, preset
from model.balance import update_expert_bias
from model.generate import generate
from model.parallel import (Layout, ParallelDims, build_layout, clip_grad_norm_, comm_stats, consolidate, gather_full,
                            load_sharded, parallelize, save_sharded, sync_gradients)
from tests.distributed_helpers import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed

TOL = 1e-5
# (name, tp, ep, ep_borrows_tp)
CASES_TWO = [("dp2", 1, 1, False), ("tp2", 2, 1, False), ("ep2", 1, 2, False), ("tp2_ep2_borrow", 2, 2, True)]
CASES_FOUR = [("ep2tp2", 2, 2, False),
              ("tp4", 4, 1, False),  # the 3-prompt decode leaves TP rank 3 an empty token chunk
              ("tp2_ep4_borrow", 2, 4, True)]
SEQ = 12
# DeepSeek-V2-style variant: plain q_proj, biased kv_a_proj/o_proj, tied embeddings, softmax greedy routing
V2STYLE = dict(q_lora_rank=None, attention_bias=True, tie_word_embeddings=True, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, n_group=1, topk_group=1)
STEPS = 3
PROMPTS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]


def _build(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides))
    with torch.no_grad():  # a non-zero routing bias, so selection != top-k of the scores alone
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.02)
    return model


def _global_batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(1))


def _train(model: Transformer, layout: Layout, ids: torch.Tensor):
    """STEPS AdamW steps on this rank's rows; returns (global losses, full grads of step 0, full final weights)."""
    # NOTE: eps=1e-6, not 1e-8: Adam's step g / (|g| + eps) turns a 1e-10 difference on a ~1e-9 gradient (summation
    # order across ranks) into ~1e-4 of weight at lr 1e-2; a larger eps and a small lr bound that amplification.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.1)
    local = ids[layout.batch_slice(ids.shape[0])]
    losses, grads0 = [], None
    for step in range(STEPS):
        loss = model(local, labels=local).loss
        loss.backward()
        sync_gradients(model, layout)
        if step == 0:
            grads0 = gather_full(model, layout, grads=True)
        loss = loss.detach().clone()
        if layout.dp > 1:
            dist.all_reduce(loss, group=layout.dp_group)
            loss /= layout.dp
        losses.append(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, model.config.bias_update_speed, reduce_fn=layout.reduce_expert_load)
    return torch.stack(losses), grads0, gather_full(model, layout)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _generate(model):
    out = generate(model, PROMPTS, 8, greedy=True, eos_token_id=[])
    return out.completions(), out.logprobs


def _reference(**overrides):
    model = _build(**overrides)
    tokens, logprobs = _generate(model)
    losses, grads, weights = _train(model, Layout(ParallelDims(1)), _global_batch())
    return dict(tokens=tokens, logprobs=logprobs, losses=losses, grads=grads, weights=weights)


def _equivalence(ref, tp: int, ep: int, borrow: bool = False, **overrides) -> dict:
    layout = build_layout(tp=tp, ep=ep, ep_borrows_tp=borrow)
    model = parallelize(_build(**overrides), layout)
    tokens, logprobs = _generate(model)
    comm_stats.reset()
    losses, grads, weights = _train(model, layout, _global_batch())
    comm = torch.tensor([comm_stats.bytes["all_reduce"], comm_stats.bytes["all_to_all"]], dtype=torch.float64)
    dist.all_reduce(comm)  # all-to-all payloads differ per rank (routing); their sum does not
    errors = torch.tensor([float((losses - ref["losses"]).abs().max()), _max_diff(grads, ref["grads"]),
                           _max_diff(weights, ref["weights"]), float(tokens != ref["tokens"]),
                           float((logprobs - ref["logprobs"]).abs().max())], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)  # the worst rank
    return dict(loss=float(errors[0]), grad=float(errors[1]), weight=float(errors[2]),
                tokens_equal=not errors[3], logprob=float(errors[4]),
                comm_per_rank_step=(comm / (STEPS * layout.world_size)).tolist(), model=model, layout=layout)


def _grad_norm_case(tp: int, ep: int, fsdp: bool = False) -> float:
    """clip_grad_norm_ over shards equals torch's on the full model (global batch, one backward)."""
    ids = _global_batch()
    ref = _build()
    ref(ids, labels=ids).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    layout = build_layout(tp=tp, ep=ep, fsdp=fsdp)
    model = parallelize(_build(), layout)
    local = ids[layout.batch_slice(ids.shape[0])]
    model(local, labels=local).loss.backward()
    sync_gradients(model, layout)
    norm = clip_grad_norm_(model, layout, 0.5)
    clipped = gather_full(model, layout, grads=True)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    return max(abs(float(norm - ref_norm)), _max_diff(clipped, {k: ref_grads[k] for k in clipped}))


def _worker_two(rank, world, ref, ref_v2):
    results = {}
    for name, tp, ep, borrow in CASES_TWO:
        r = _equivalence(ref, tp, ep, borrow)
        r.pop("model"), r.pop("layout")
        results[name] = r
    r = _equivalence(ref_v2, 2, 2, True, **V2STYLE)
    r.pop("model"), r.pop("layout")
    results["v2style_tp2_ep2_borrow"] = r
    results["grad_norm_tp2"] = _grad_norm_case(2, 1)
    return results


def _worker_four(rank, world, ref, ckpt_dir):
    from safetensors.torch import save_file

    results = {}
    for name, tp, ep, borrow in CASES_FOUR[1:]:
        r = _equivalence(ref, tp, ep, borrow)
        r.pop("model"), r.pop("layout")
        results[name] = r
    r = _equivalence(ref, 2, 2)
    model, layout = r.pop("model"), r.pop("layout")
    results["ep2tp2"] = r
    # sharded checkpoint at ep=2 x tp=2, reloaded at ep=4 (tp=1) and tp=4 (ep=1)
    save_sharded(model, os.path.join(ckpt_dir, "ckpt"), layout)
    full = gather_full(model, layout)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(ckpt_dir, "full.safetensors"))
    for name, tp, ep, borrow in (("reload_ep4", 1, 4, False), ("reload_tp4", 4, 1, False),
                                 ("reload_tp2_ep4_borrow", 2, 4, True)):
        other_layout = build_layout(tp=tp, ep=ep, ep_borrows_tp=borrow)
        other = parallelize(_build(), other_layout)
        load_sharded(other, os.path.join(ckpt_dir, "ckpt"))
        results[name] = _max_diff(gather_full(other, other_layout), full)
    results["grad_norm_ep2tp2"] = _grad_norm_case(2, 2)
    return results


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def two_ranks(reference):
    return run_distributed(_worker_two, 2, args=(reference, _reference(**V2STYLE)), timeout_s=180)


@pytest.fixture(scope="module")
def four_ranks(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("four")
    return run_distributed(_worker_four, 4, args=(reference, str(path)), timeout_s=240), path


def _check(r):
    assert r["loss"] < TOL, r
    assert r["grad"] < TOL, r
    assert r["weight"] < TOL, r
    assert r["tokens_equal"], r
    assert r["logprob"] < TOL, r


@pytest.mark.parametrize("case", CASES_TWO, ids=[c[0] for c in CASES_TWO])
def test_two_rank_layouts_match_single_process(two_ranks, case):
    _check(two_ranks[case[0]])


def test_v2_style_model_matches_single_process(two_ranks):
    _check(two_ranks["v2style_tp2_ep2_borrow"])


@pytest.mark.parametrize("case", CASES_FOUR, ids=[c[0] for c in CASES_FOUR])
def test_four_rank_layouts_match_single_process(four_ranks, case):
    _check(four_ranks[0][case[0]])


@pytest.mark.parametrize("world,case", [(2, c) for c in CASES_TWO] + [(4, c) for c in CASES_FOUR],
                         ids=[c[0] for c in CASES_TWO + CASES_FOUR])
def test_tools_plan_predicts_the_measured_communication(two_ranks, four_ranks, world, case):
    from tools.plan import plan

    name, tp, ep, borrow = case
    measured = (two_ranks if world == 2 else four_ranks[0])[name]["comm_per_rank_step"]
    predicted = plan(preset("tiny"), world, tp, ep, batch_tokens=4 * SEQ, seq_len=SEQ, dtype="fp32",
                     ep_borrows_tp=borrow)["comm_bytes_per_step"]
    assert measured == [predicted["all_reduce"], predicted["all_to_all"]]


def test_grad_norm_clipping_matches_torch(two_ranks, four_ranks):
    assert two_ranks["grad_norm_tp2"] < TOL
    assert four_ranks[0]["grad_norm_ep2tp2"] < TOL


def test_sharded_checkpoint_reshards(four_ranks):
    results, _ = four_ranks
    assert results["reload_ep4"] == results["reload_tp4"] == results["reload_tp2_ep4_borrow"] == 0.0


def test_sharded_checkpoint_consolidates_for_single_process(four_ranks, tmp_path):
    from safetensors.torch import load_file

    _, path = four_ranks
    consolidate(path / "ckpt", tmp_path / "single")
    model = load_model(tmp_path / "single")
    full = load_file(path / "full.safetensors")
    state = model.state_dict()
    for k, v in full.items():
        assert torch.equal(state[k], v), k
    # and into a plain (unparallelised) model directly
    plain = _build()
    load_sharded(plain, path / "ckpt")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in full.items())


def _worker_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.all_reduce(torch.ones(1))  # would wait forever for rank 1
    return "unreachable"


def _worker_hangs(rank, world):
    import time

    time.sleep(60)


def test_failing_rank_stops_the_others_with_its_error():
    import time

    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed: ValueError: boom on purpose"):
        run_distributed(_worker_raises, 2, timeout_s=60)
    assert time.monotonic() - t0 < 30


def test_hung_ranks_are_killed_after_the_timeout():
    with pytest.raises(DistributedTestError, match=r"timed out after 2s; ranks still running \(killed\): \[0, 1\]"):
        run_distributed(_worker_hangs, 2, timeout_s=2)
