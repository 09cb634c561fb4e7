"""seekstack checkpoint format: round trip, sharding with an index, atomic replace, and clear refusals.

Run: python -m pytest -q tests/test_checkpoint.py
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, Transformer, load_model, preset, save_model


def _model(**kw):
    torch.manual_seed(0)
    m = Transformer(preset("tiny", **kw)).eval()
    with torch.no_grad():
        for r in (mod.gate for mod in m.moe_layers()):
            r.e_score_correction_bias.normal_(0, 0.1)
    return m


def _logits(m):
    ids = torch.arange(20).view(2, 10) % m.config.vocab_size
    with torch.no_grad():
        return m(ids).logits


def test_round_trip_single_file(tmp_path):
    m = _model()
    save_model(m, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ck")
    assert torch.equal(_logits(loaded), _logits(m))
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_with_index(tmp_path):
    m = _model()
    save_model(m, tmp_path / "ck", max_shard_bytes=100_000)
    files = os.listdir(tmp_path / "ck")
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert torch.equal(_logits(load_model(tmp_path / "ck")), _logits(m))


def test_tied_embeddings_stored_once(tmp_path):
    m = _model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    save_model(m, tmp_path / "ck")
    assert "lm_head.weight" not in load_file(tmp_path / "ck" / "model.safetensors")
    loaded = load_model(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(_logits(loaded), _logits(m))


def test_bf16_save_keeps_router_bias_fp32(tmp_path):
    m = _model()
    save_model(m, tmp_path / "ck", dtype=torch.bfloat16)
    state = load_file(tmp_path / "ck" / "model.safetensors")
    assert state["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert state["layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    loaded = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    bias = loaded.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, m.layers[1].mlp.gate.e_score_correction_bias)
    assert loaded.rotary.inv_freq.dtype == torch.float32


def test_save_replaces_existing_checkpoint_atomically(tmp_path):
    save_model(_model(), tmp_path / "ck")
    m2 = _model(num_hidden_layers=3)
    save_model(m2, tmp_path / "ck")
    assert load_model(tmp_path / "ck").config.num_hidden_layers == 3
    assert [p for p in os.listdir(tmp_path) if p != "ck"] == []  # no temp or old dirs left behind


def test_refusals_name_file_and_key(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    m = _model()
    save_model(m, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(weights)

    bad = dict(state)
    bad.pop("norm.weight")
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \['norm.weight'\]"):
        load_model(tmp_path / "ck")

    bad = dict(state, extra_thing=torch.zeros(1))
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match="unexpected keys.*extra_thing"):
        load_model(tmp_path / "ck")

    bad = dict(state)
    bad["norm.weight"] = torch.ones(3)
    save_file(bad, weights)
    with pytest.raises(CheckpointError, match=r"norm.weight.*shape \(3,\)"):
        load_model(tmp_path / "ck")

    weights.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ck")

    os.remove(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "ck")


def test_missing_shard_named(tmp_path):
    save_model(_model(), tmp_path / "ck", max_shard_bytes=100_000)
    shard = sorted(p for p in os.listdir(tmp_path / "ck") if p.startswith("model-"))[1]
    os.remove(tmp_path / "ck" / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_model(tmp_path / "ck")
