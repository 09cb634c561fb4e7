"""tools.export_hf: seekstack -> Hugging Face layout. Round trips are bit-identical, transformers loads the result
with no missing or unexpected weights (bar the MTP layer it does not implement) and gives the same logits.

Run: python -m pytest -q tests/test_export_hf.py
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model import Transformer, load_model, preset, save_model
from model.router import Router
from tests.hf_helpers import BASE, YARN, make_hf_model
from tests.test_convert_hf import INDEX, add_mtp_layer, read_dir, read_json, save_hf, write_dir
from tools import convert_hf, export_hf

YARN_SEEKSTACK = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                      mscale=1.0, mscale_all_dim=1.0)
NATIVE = {
    "v3-mtp-yarn": dict(rope_scaling=YARN_SEEKSTACK, initializer_range=0.1),
    "v2-no-q-lora": dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy",
                         norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                         num_nextn_predict_layers=0, initializer_range=0.1),
}


def export(src, dst, *args) -> int:
    return export_hf.main(["--src", str(src), "--dst", str(dst), "--quiet", *args])


def v2_hf_model(seed: int = 0):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "max_position_embeddings",
            "initializer_range")
    torch.manual_seed(seed)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**{k: BASE[k] for k in keys}, q_lora_rank=None, n_shared_experts=2,
                                                  topk_method="greedy", routed_scaling_factor=1.0)).eval()


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory):
    """seekstack-native checkpoints (sharded), with random norms and router biases so every tensor matters."""
    out = {}
    for name, overrides in NATIVE.items():
        torch.manual_seed(len(name))
        model = Transformer(preset("tiny", **overrides)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
            for m in model.modules():
                if isinstance(m, Router) and model.config.model_type == "deepseek_v3":
                    m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias) * 0.05)
        path = tmp_path_factory.mktemp("ss") / name
        save_model(model, path, max_shard_bytes=100_000)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("case", list(NATIVE))
def test_transformers_loads_export_with_same_logits(case, native_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    model, src = native_ckpt[case]
    assert os.path.isfile(src / INDEX)  # sharded input
    dst = tmp_path / "hf"
    assert export(src, dst, "--max-shard-size", "150KB") == 0
    assert os.path.isfile(dst / INDEX)  # sharded output
    hf, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True)
    hf.eval()
    L = model.config.num_hidden_layers
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert bool(info["unexpected_keys"]) == (model.config.num_nextn_predict_layers > 0)
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if "v3" in case else "DeepseekV2ForCausalLM")
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids).logits, hf(ids).logits
    delta = (ours - ref).abs().max().item()
    print(f"max |dlogit| {case} seekstack vs transformers on the export: {delta:.2e}")
    assert ours.abs().max() > 0.5 and delta < 1e-4
    hf_cfg = read_json(dst / "config.json")
    assert not {"mtp_loss_lambda", "aux_loss_alpha", "bias_update_speed"} & set(hf_cfg)


def test_mtp_layer_written_with_shared_copies(native_ckpt, tmp_path):
    model, src = native_ckpt["v3-mtp-yarn"]
    assert export(src, tmp_path / "hf") == 0
    hf = {k: t for k, (_, t) in read_dir(tmp_path / "hf").items()}
    p = f"model.layers.{model.config.num_hidden_layers}."
    state = model.state_dict()
    assert torch.equal(hf[p + "embed_tokens.weight"], state["embed_tokens.weight"])
    assert torch.equal(hf[p + "shared_head.head.weight"], state["lm_head.weight"])
    assert torch.equal(hf[p + "shared_head.norm.weight"], state["mtp.0.norm.weight"])
    assert torch.equal(hf[p + "eh_proj.weight"], state["mtp.0.eh_proj.weight"])
    I = model.config.moe_intermediate_size
    assert torch.equal(hf[p + "mlp.experts.3.up_proj.weight"], state["mtp.0.block.mlp.experts.gate_up_proj"][3, I:])


@pytest.mark.parametrize("case", ["v3-mtp", "v2"])
def test_round_trip_is_bit_identical(case, tmp_path):
    """HF -> seekstack -> HF at fp32: the same tensor names, dtypes and values; tokenizer files carried along."""
    from tokenizers import Tokenizer

    hf = make_hf_model(seed=2, rope_parameters=YARN) if case == "v3-mtp" else v2_hf_model(seed=2)
    src = save_hf(hf, tmp_path / "hf")
    if case == "v3-mtp":
        add_mtp_layer(src)
    assert convert_hf.main(["--src", src, "--dst", str(tmp_path / "ss"), "--quiet"]) == 0
    assert export(tmp_path / "ss", tmp_path / "back") == 0
    before, after = read_dir(src), read_dir(tmp_path / "back")
    assert set(before) == set(after)
    for key, (_, t) in before.items():
        assert after[key][1].dtype == t.dtype and torch.equal(after[key][1], t), key
    assert Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json")).encode("w5").ids == [5]
    cfg = read_json(tmp_path / "back" / "config.json")
    assert cfg["architectures"] == [type(hf).__name__]
    assert cfg["num_nextn_predict_layers"] == (1 if case == "v3-mtp" else 0)


def test_bf16_export_keeps_bias_fp32(native_ckpt, tmp_path):
    model, src = native_ckpt["v3-mtp-yarn"]
    assert export(src, tmp_path / "hf", "--dtype", "bf16") == 0
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    for key, t in stored.items():
        assert t.dtype == (torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16), key
    bias = model.state_dict()["layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(stored["model.layers.1.mlp.gate.e_score_correction_bias"], bias)
    assert read_json(tmp_path / "hf" / "config.json")["torch_dtype"] == "bfloat16"


def _drop(path):
    entries = read_dir(path)
    del entries["layers.1.mlp.experts.down_proj"]
    write_dir(path, entries)
    return ["layers.1.mlp.experts.down_proj", "missing"]


def _reshape(path):
    entries = read_dir(path)
    name, t = entries["layers.0.self_attn.o_proj.weight"]
    entries["layers.0.self_attn.o_proj.weight"] = (name, t[:, :-1])
    write_dir(path, entries)
    return [name, "layers.0.self_attn.o_proj.weight", "config.json"]


def _extra(path):
    entries = read_dir(path)
    entries["layers.0.extra.weight"] = (entries["norm.weight"][0], torch.zeros(3))
    write_dir(path, entries)
    return [entries["norm.weight"][0], "layers.0.extra.weight", "unknown"]


def _corrupt(path):
    name = read_json(os.path.join(path, INDEX))["weight_map"]["norm.weight"]
    with open(os.path.join(path, name), "r+b") as f:
        f.write(b"\xff" * 8)  # header length
    return [name, "corrupt"]


@pytest.mark.parametrize("breakage", [_drop, _reshape, _extra, _corrupt], ids=lambda f: f.__name__.strip("_"))
def test_export_refusals(breakage, native_ckpt, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(native_ckpt["v3-mtp-yarn"][1], src)
    expected = breakage(str(src))
    assert export(src, tmp_path / "out" / "hf") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, (text, err)
    assert not os.path.exists(tmp_path / "out")


def test_exported_checkpoint_converts_back_to_the_same_model(native_ckpt, tmp_path):
    model, src = native_ckpt["v3-mtp-yarn"]
    assert export(src, tmp_path / "hf") == 0
    assert convert_hf.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ss"), "--quiet"]) == 0
    back = load_model(tmp_path / "ss").state_dict()
    state = model.state_dict()
    assert set(back) == set(state)
    for key, t in state.items():
        assert torch.equal(back[key], t), key
