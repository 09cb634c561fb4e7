"""Parallel runtime pieces that need no processes: rank arithmetic and validation, the expert-major permutation,
the TP token split, the dispatcher and the vocab-parallel CE on one rank, the sharding plan, and sharded
checkpoints at world size 1 (which must never initialise torch.distributed).

Run: PYTHONPATH=. python -m pytest -q tests/test_parallel_layout.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from model import CheckpointError, Transformer, load_model, preset
from model.dispatch import LocalDispatcher
from model.parallel import (AllToAllDispatcher, ParallelConfigError, ParallelDims, ParallelPlan, consolidate,
                            init_distributed, load_sharded, parallelize, save_sharded, sync_gradients)
from model.parallel.expert_parallel import (
    inverse_permutation,
    source_to_expert_major,
    tp_token_range,
)
from model.parallel.tensor_parallel import VocabParallelCrossEntropy
from model.transformer import shifted_cross_entropy


# ---- layout ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,tp,ep,borrow", [(1, 1, 1, False), (2, 2, 1, False), (2, 1, 2, False),
                                                (4, 2, 2, False), (8, 2, 2, False), (8, 1, 4, False),
                                                (8, 4, 2, False), (12, 2, 3, False), (2, 2, 2, True),
                                                (4, 2, 2, True), (8, 2, 4, True), (8, 4, 2, True), (8, 2, 8, True)])
def test_groups_partition_the_ranks(world, tp, ep, borrow):
    d = ParallelDims(world, tp, ep, borrow)
    assert d.dp * d.tp == world and d.edp * d.ep == world
    for family, size in ((d.tp_ranks, tp), (d.dp_ranks, d.dp), (d.ep_ranks, ep), (d.edp_ranks, d.edp)):
        groups = {tuple(family(r)) for r in range(world)}
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))  # disjoint and covering
        assert all(r in family(r) for r in range(world))
    for r in range(world):
        c = d.coords(r)
        assert r == c["d"] * tp + c["t"] == d.expert_rank(c["h"], c["e"])
        assert [d.coords(q)["e"] for q in d.ep_ranks(r)] == list(range(ep))  # group order = expert-slice order
        assert all(d.coords(q)["e"] == c["e"] for q in d.edp_ranks(r))  # EDP ranks hold the same experts
        if not borrow:
            assert set(d.ep_ranks(r)) <= set(d.dp_ranks(r))  # EP borrows data-parallel ranks only
        elif ep <= tp:
            assert set(d.ep_ranks(r)) <= set(d.tp_ranks(r))
        else:
            assert set(d.tp_ranks(r)) <= set(d.ep_ranks(r))


def test_docstring_example_groups():
    d = ParallelDims(8, tp=2, ep=2)
    assert d.tp_ranks(2) == [2, 3] and d.dp_ranks(1) == [1, 3, 5, 7]
    assert d.ep_ranks(0) == [0, 2] and d.ep_ranks(5) == [5, 7]
    assert d.edp_ranks(2) == [2, 3, 6, 7] and d.edp_ranks(1) == [0, 1, 4, 5]
    assert d.coords(2) == {"d": 1, "t": 0, "e": 1, "h": 0}
    b = ParallelDims(8, tp=2, ep=2, ep_borrows_tp=True)
    assert b.ep_ranks(5) == [4, 5] and b.edp_ranks(1) == [1, 3, 5, 7] and b.coords(1)["e"] == 1


@pytest.mark.parametrize("world,tp,ep,match", [
    (4, 3, 1, r"tp=3 does not divide world_size=4"),
    (4, 2, 4, r"ep=4 does not divide dp=2 .*borrows data-parallel ranks"),
    (0, 1, 1, r"world_size must be a positive integer"),
    (12, 4, 6, r"ep=6 with ep_borrows_tp needs ep to divide world_size=12 and to divide or be a multiple of tp=4"),
])
def test_bad_degrees_are_refused(world, tp, ep, match):
    with pytest.raises(ParallelConfigError, match=match):
        ParallelDims(world, tp, ep, ep_borrows_tp="borrows_tp" in match)


@pytest.mark.parametrize("overrides,tp,ep,match", [
    ({}, 8, 1, r"num_attention_heads = 4 is not divisible by tp=8"),
    (dict(num_attention_heads=6), 4, 1, r"num_attention_heads = 6 is not divisible by tp=4"),
    (dict(vocab_size=130), 4, 1, r"vocab_size = 130 is not divisible by tp=4"),
    (dict(n_routed_experts=6, n_group=1, topk_group=1), 1, 4, r"n_routed_experts = 6 is not divisible by ep=4"),
    (dict(n_routed_experts=None), 1, 2, r"ep=2 needs an MoE model"),
])
def test_model_must_split_evenly(overrides, tp, ep, match):
    cfg = preset("tiny", **overrides)
    with pytest.raises(ParallelConfigError, match=match):
        ParallelDims(8, tp, ep).validate(cfg)


def test_world_size_one_never_initialises_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    layout = init_distributed(tp=1, ep=1)
    assert layout.world_size == 1 and layout.tp_group is None
    torch.manual_seed(0)
    ref = Transformer(preset("tiny"))
    torch.manual_seed(0)
    model = parallelize(Transformer(preset("tiny")), layout)
    ids = torch.arange(24).view(2, 12)
    out, expected = model(ids, labels=ids), ref(ids, labels=ids)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    sync_gradients(model, layout)
    assert all(torch.equal(p.grad, grads[k]) for k, p in model.named_parameters())
    assert not dist.is_initialized()


# ---- expert parallel pieces ---------------------------------------------------------------------------------------
def _expert_major_by_labels(counts):
    """Reference: label every received row (source, expert, i) and sort by (expert, source, i)."""
    rows = [(s, e, i) for s in range(counts.shape[0]) for e in range(counts.shape[1])
            for i in range(int(counts[s, e]))]
    return [rows.index(x) for x in sorted(rows, key=lambda x: (x[1], x[0], x[2]))]


@pytest.mark.parametrize("counts", [
    [[2, 1], [0, 3]],  # 2 sources x 2 local experts
    [[4, 0, 1]],  # one source
    [[3], [2], [0]],  # one local expert
    [[0, 2], [0, 1]],  # an expert with no tokens
    [[0, 0], [0, 0]],  # nothing at all
])
def test_source_to_expert_major(counts):
    counts = torch.tensor(counts)
    index = source_to_expert_major(counts)
    assert index.tolist() == _expert_major_by_labels(counts)
    if index.numel():
        assert torch.equal(index[inverse_permutation(index)], torch.arange(index.numel()))


@pytest.mark.parametrize("T,tp", [(12, 2), (3, 2), (3, 4), (1, 2), (0, 2), (7, 3)])
def test_tp_token_range_tiles_the_tokens(T, tp):
    ranges = [tp_token_range(T, tp, t) for t in range(tp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(hi - lo for lo, hi in ranges) - min(hi - lo for lo, hi in ranges) <= -(-T // tp)


def test_alltoall_dispatcher_on_one_rank_equals_local():
    T, K, E, D = 10, 3, 6, 5
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    outs = []
    for disp in (LocalDispatcher(E), AllToAllDispatcher(E)):
        x_RD, counts, state = disp.dispatch(x, ids)
        y = disp.combine(x_RD * 2.0, w, state)
        outs.append((x_RD, counts, y))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_vocab_parallel_ce_on_one_rank_equals_cross_entropy():
    logits = torch.randn(2, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 3] = -100
    ce = VocabParallelCrossEntropy(None, 0)
    for shift in (1, 2):
        a = ce(logits, labels, shift)
        ga, = torch.autograd.grad(a, logits)
        b = shifted_cross_entropy(logits, labels, shift)
        gb, = torch.autograd.grad(b, logits)
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-7)


# ---- sharding plan ------------------------------------------------------------------------------------------------
def test_plan_owners_tile_each_tensor():
    model = Transformer(preset("tiny"))
    dims = ParallelDims(8, tp=2, ep=2)
    plans = [ParallelPlan(model, dims, r) for r in range(8)]
    for plan in plans:
        plan.shard("lm_head.weight", "tp", 0)
        plan.shard("layers.1.mlp.experts.down_proj", "ep", 0, grad="edp")
    assert plans[0].owners("lm_head.weight") == [0, 1]  # d = 0, both TP slices
    assert plans[0].owners("layers.1.mlp.experts.down_proj") == [0, 2]  # EP group 0 = {0, 2}, both slices
    assert plans[0].owners("norm.weight") == [0]
    for name in ("lm_head.weight", "layers.1.mlp.experts.down_proj", "norm.weight"):
        slices = sorted(plans[r].local_slice(name) for r in plans[0].owners(name))
        dim = slices[0][0]
        assert slices[0][1] == 0 and slices[-1][2] == plans[0].global_shapes[name][dim]
        assert all(a[2] == b[1] for a, b in zip(slices, slices[1:]))
    assert plans[5].local_slice("lm_head.weight") == (0, 64, 128)  # rank 5: t = 1 of vocab 128
    assert plans[2].local_slice("layers.1.mlp.experts.down_proj") == (0, 4, 8)  # rank 2: e = 1 of 8 experts


# ---- sharded checkpoint at world size 1 ---------------------------------------------------------------------------
def test_sharded_checkpoint_round_trip_single_process(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", tie_word_embeddings=True))
    save_sharded(model, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "shard-00000.safetensors", "sharded.json"]
    manifest = json.loads((tmp_path / "ck" / "sharded.json").read_text())
    assert "lm_head.weight" not in manifest["tensors"]  # tied: stored once
    torch.manual_seed(1)
    other = Transformer(preset("tiny", tie_word_embeddings=True))
    load_sharded(other, tmp_path / "ck")
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    consolidate(tmp_path / "ck", tmp_path / "single")
    single = load_model(tmp_path / "single")
    for k, v in model.state_dict().items():
        assert torch.equal(single.state_dict()[k], v), k
    assert not dist.is_initialized()


def test_sharded_checkpoint_refusals(tmp_path):
    model = Transformer(preset("tiny"))
    with pytest.raises(CheckpointError, match="no sharded.json"):
        load_sharded(model, tmp_path)
    save_sharded(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"`embed_tokens.weight` has global shape \(128, 64\), the model "
                                              r"expects \(256, 64\)"):
        load_sharded(Transformer(preset("tiny", vocab_size=256)), tmp_path / "ck")
