"""tools.convert_hf: Hugging Face DeepSeek-V3/V2 checkpoints (sharded, FP8, with MTP) -> seekstack, and its refusals.

Random tiny transformers models are saved to temp dirs (multi-shard via a small max_shard_size), then edited on disk
where a case needs it: an MTP layer added by hand (transformers writes none), FP8 block quantisation done here, and
broken copies for each refusal.

Run: python -m pytest -q tests/test_convert_hf.py
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import load_model
from model.block import Block
from model.hf_mapping import hf_state_dict_to_seekstack, hf_to_seekstack
from tests.hf_helpers import BASE, YARN, make_hf_model
from tools import convert_hf, hf_reader, hf_stream

INDEX = "model.safetensors.index.json"
FP8_KEY = re.compile(r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")


# ------------------------------------------------------------------------------------------ checkpoint helpers
def write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"unk_token": "[UNK]"}, f)


def save_hf(hf, path, shard_size: str = "100KB") -> str:
    """save_pretrained into `path` with a small max_shard_size (several shards + index) and tokenizer files."""
    hf.save_pretrained(path, max_shard_size=shard_size)
    write_tokenizer(path)
    return str(path)


def read_dir(path) -> dict[str, tuple[str, torch.Tensor]]:
    """tensor name -> (shard file, tensor) of a small checkpoint directory."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        out.update({k: (name, t) for k, t in load_file(os.path.join(path, name)).items()})
    return out


def write_dir(path, entries: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Rewrite the shards and the index of `path` to hold exactly `entries`."""
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name == INDEX:
            os.remove(os.path.join(path, name))
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for key, (name, t) in entries.items():
        by_file.setdefault(name, {})[key] = t.contiguous()
    for name, tensors in by_file.items():
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for k, (n, _) in entries.items()}}, f)


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def edit_config(path, **changes) -> dict:
    cfg = read_json(os.path.join(path, "config.json"))
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


def add_mtp_layer(path, seed: int = 0) -> None:
    """Append MTP layer L = num_hidden_layers the way DeepSeek-V3 stores it, random values, in its own shard."""
    entries = read_dir(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    L, D = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rand(shape, norm=False):
        r = torch.randn(shape, generator=g)
        return 1 + 0.1 * r if norm else 0.08 * r

    mtp = {}
    for key, (_, t) in entries.items():  # a full decoder block, shaped like the last (MoE) layer
        prefix = f"model.layers.{L - 1}."
        if key.startswith(prefix):
            rest = key[len(prefix):]
            mtp[f"model.layers.{L}.{rest}"] = rand(t.shape, norm=rest.endswith("norm.weight"))
    p = f"model.layers.{L}."
    mtp.update({p + "enorm.weight": rand(D, True), p + "hnorm.weight": rand(D, True),
                p + "eh_proj.weight": rand((D, 2 * D)), p + "shared_head.norm.weight": rand(D, True),
                p + "embed_tokens.weight": entries["model.embed_tokens.weight"][1].clone(),
                p + "shared_head.head.weight": entries["lm_head.weight"][1].clone()})
    entries.update({k: ("model-mtp.safetensors", t) for k, t in mtp.items()})
    write_dir(path, entries)
    edit_config(path, num_nextn_predict_layers=1)


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek block FP8: per 128x128 block scale = amax/448, W_fp8 = W/scale; edge blocks zero-padded then cut."""
    M, N = w.shape
    Mb, Nb = -(-M // block), -(-N // block)
    padded = torch.zeros(Mb * block, Nb * block)
    padded[:M, :N] = w
    blocks = padded.view(Mb, block, Nb, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(Mb * block, Nb * block)[:M, :N]
    return q.contiguous(), scale.float()


def dequantize_ref(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The reference formula: W[i, j] = float(W_fp8[i, j]) * scale_inv[i // 128, j // 128]."""
    M, N = q.shape
    s = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:M, :N]
    return q.float() * s


def fp8_copy(src, dst) -> dict[str, torch.Tensor]:
    """Block-quantise the projections of `src` (as in the released V3) into `dst`; returns the dequantised HF
    state dict that the conversion must reproduce exactly."""
    shutil.copytree(src, dst)
    entries = read_dir(dst)
    reference = {}
    for key, (name, t) in list(entries.items()):
        reference[key] = t
        if FP8_KEY.search(key):
            q, s = quantize_fp8(t)
            entries[key] = (name, q)
            entries[key + "_scale_inv"] = (name, s)
            reference[key] = dequantize_ref(q, s)
    write_dir(dst, entries)
    edit_config(dst, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]})
    return reference


def convert(src, dst, *args) -> int:
    return convert_hf.main(["--src", str(src), "--dst", str(dst), "--quiet", *args])


def assert_nothing_written(dst) -> None:
    parent = os.path.dirname(os.path.abspath(dst))
    assert not os.path.exists(dst)
    assert not [n for n in os.listdir(parent) if n.startswith(".tmp-")], os.listdir(parent)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """V3 with expert groups (4 groups, top-2) and YaRN, saved in ~10 shards; returns (hf model, dir)."""
    hf = make_hf_model(seed=5, rope_parameters=YARN)
    return hf, save_hf(hf, tmp_path_factory.mktemp("hf") / "v3")


@pytest.fixture(scope="module")
def v3_mtp(v3, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "v3-mtp"
    shutil.copytree(v3[1], path)
    add_mtp_layer(path)
    return str(path)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """A V3 whose linear dims are not multiples of 128 (200, 300, 168 = 160 + 8 ...), then block-quantised."""
    hf = make_hf_model(seed=7, hidden_size=200, intermediate_size=300, moe_intermediate_size=136, q_lora_rank=144,
                       kv_lora_rank=160, num_attention_heads=2, num_hidden_layers=2, n_routed_experts=4,
                       n_group=2, topk_group=1)
    base = save_hf(hf, tmp_path_factory.mktemp("hf") / "bf")
    path = str(tmp_path_factory.mktemp("hf") / "fp8")
    return path, fp8_copy(base, path)


def random_ids(vocab: int, shape=(2, 70), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ tests
def test_v3_groups_yarn_multishard(v3, tmp_path):
    hf, src = v3
    weight_map = read_json(os.path.join(src, INDEX))["weight_map"]
    files_of_layer1 = {f for k, f in weight_map.items() if k.startswith("model.layers.1.mlp.experts.")}
    assert len(files_of_layer1) > 1  # one layer's experts span input shards
    dst = tmp_path / "out"
    assert convert(src, dst, "--max-shard-size", "200KB") == 0
    assert os.path.isfile(dst / INDEX) and len([n for n in os.listdir(dst) if n.endswith(".safetensors")]) > 1
    ours = load_model(dst).eval()
    reference = hf_state_dict_to_seekstack({k: t for k, (_, t) in read_dir(src).items()}, ours.config)
    state = ours.state_dict()
    assert set(state) == set(reference)
    for key, t in reference.items():
        assert torch.equal(state[key], t), key
    bias = state["layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    assert ours.config.rope_scaling["type"] == "yarn" and ours.config.n_group == 4
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        delta = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"max |dlogit| V3 converted vs transformers: {delta:.2e}")
    assert delta < 1e-4


def test_bf16_keeps_router_and_bias_exact(v3, tmp_path):
    src = v3[1]
    dst = tmp_path / "bf16"
    assert convert(src, dst, "--dtype", "bf16") == 0
    stored = load_file(dst / "model.safetensors")
    hf_state = {k: t for k, (_, t) in read_dir(src).items()}
    for key, t in stored.items():
        assert t.dtype == (torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16), key
    assert torch.equal(stored["layers.2.mlp.gate.e_score_correction_bias"],
                       hf_state["model.layers.2.mlp.gate.e_score_correction_bias"])
    assert torch.equal(stored["layers.2.mlp.gate.weight"], hf_state["model.layers.2.mlp.gate.weight"].bfloat16())
    assert read_json(dst / "config.json")["torch_dtype"] == "bfloat16"


def test_v2_lite_shape(tmp_path):
    """q_lora_rank null (plain q_proj), softmax routing, greedy top-k, no router bias, V2-Lite's YaRN mscale."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "max_position_embeddings",
            "initializer_range")
    torch.manual_seed(11)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(
        **{k: BASE[k] for k in keys}, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
        routed_scaling_factor=1.0, rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})).eval()
    src = save_hf(hf, tmp_path / "v2")
    assert convert(src, tmp_path / "out") == 0
    ours = load_model(tmp_path / "out").eval()
    c = ours.config
    assert (c.model_type, c.q_lora_rank, c.scoring_func, c.topk_method, c.norm_topk_prob) == \
        ("deepseek_v2", None, "softmax", "greedy", False)
    assert c.rope_scaling["mscale_all_dim"] == 0.707
    assert hasattr(ours.layers[0].self_attn, "q_proj")
    assert not ours.layers[1].mlp.gate.e_score_correction_bias.any()
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        delta = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"max |dlogit| V2-Lite-shaped converted vs transformers: {delta:.2e}")
    assert delta < 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_fp8_dequantised_exactly(fp8, tmp_path, monkeypatch, dtype):
    src, reference_hf = fp8
    shapes = {tuple(t.shape) for k, t in reference_hf.items() if FP8_KEY.search(k)}
    assert any(d > 128 and d % 128 for s in shapes for d in s)  # several blocks, partial edge blocks
    assert (168, 200) in shapes  # kv_a_proj_with_mqa: kv_lora_rank + rope rows, as V3's 576
    # Tiny slabs and read windows: multi-slab dequantisation (row0 > 0) and re-opened shards are exercised.
    monkeypatch.setattr(hf_stream, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(hf_reader, "WINDOW_BYTES", 20_000)
    dst = tmp_path / "out"
    assert convert(src, dst, "--dtype", dtype) == 0
    cfg = read_json(dst / "config.json")
    assert "quantization_config" not in cfg
    stored = load_file(dst / "model.safetensors")
    config = load_model(dst).config
    reference = hf_state_dict_to_seekstack(reference_hf, config)
    from_fp8 = {hf_to_seekstack(k, config).key for k in reference_hf if FP8_KEY.search(k)}
    assert set(stored) == set(reference)
    for key, ref in reference.items():
        want = ref.bfloat16() if dtype == "auto" and key in from_fp8 else ref  # auto: FP8 -> bf16, rest kept
        assert stored[key].dtype == want.dtype and torch.equal(stored[key], want), key


def test_mtp_layer_mapped_and_used(v3_mtp, tmp_path, capsys):
    dst = tmp_path / "out"
    assert convert(v3_mtp, dst) == 0
    assert "warning" not in capsys.readouterr().err  # the MTP copies of embedding and head equal the main ones
    model = load_model(dst).eval()
    cfg = model.config
    L, p = cfg.num_hidden_layers, f"model.layers.{cfg.num_hidden_layers}."
    assert cfg.num_nextn_predict_layers == 1
    hf = {k: t for k, (_, t) in read_dir(v3_mtp).items()}
    assert torch.equal(model.mtp[0].eh_proj.weight, hf[p + "eh_proj.weight"])
    assert torch.equal(model.mtp[0].block.self_attn.kv_b_proj.weight, hf[p + "self_attn.kv_b_proj.weight"])

    ids = random_ids(cfg.vocab_size, (2, 12), seed=3)
    with torch.no_grad():
        out = model(ids, return_mtp_logits=True)
        h = out.hidden_states  # the main model's final normed hidden state h_i

        def rms(x, w):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

        emb = hf["model.embed_tokens.weight"][F.pad(ids[:, 1:], (0, 1), value=0)]  # Emb(t_{i+1})
        block = Block(cfg, L).eval()
        mapped = hf_state_dict_to_seekstack({k: t for k, t in hf.items() if k.startswith(p)}, cfg)
        block.load_state_dict({k.removeprefix("mtp.0.block."): t for k, t in mapped.items()
                               if k.startswith("mtp.0.block.")})
        freqs_cis = model.rotary(torch.arange(ids.shape[1]).expand_as(ids))

        def mtp_logits(first, second):
            x = torch.cat((first, second), dim=-1) @ hf[p + "eh_proj.weight"].T
            y = block(x, freqs_cis)[0]
            return rms(y, hf[p + "shared_head.norm.weight"]) @ hf[p + "shared_head.head.weight"].T

        e, hh = rms(emb, hf[p + "enorm.weight"]), rms(h, hf[p + "hnorm.weight"])
        expected = mtp_logits(e, hh)
        swapped = mtp_logits(hh, e)  # the paper's [h; emb] order: must not match
    delta = (out.mtp_logits[0] - expected).abs().max().item()
    print(f"max |dlogit| MTP vs hand computation: {delta:.2e}")
    assert delta < 1e-5
    assert (out.mtp_logits[0] - swapped).abs().max() > 1e-2


def test_no_mtp_drops_mtp_layer(v3, v3_mtp, tmp_path):
    assert convert(v3_mtp, tmp_path / "out", "--no-mtp") == 0
    model = load_model(tmp_path / "out").eval()
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids).logits - v3[0](ids).logits).abs().max() < 1e-4


def test_promised_but_absent_mtp_is_noted(v3, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(v3[1], src)
    edit_config(src, num_nextn_predict_layers=1)  # transformers' default config does this
    assert convert(src, tmp_path / "out") == 0
    assert "no MTP tensors" in capsys.readouterr().err
    assert read_json(tmp_path / "out" / "config.json")["num_nextn_predict_layers"] == 0


def test_tokenizer_files_copied(v3, tmp_path):
    from tokenizers import Tokenizer

    assert convert(v3[1], tmp_path / "out") == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(tmp_path / "out" / name), name
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("w3 w17").ids == [3, 17]


# ---------------------------------------------------------------------------------------------------- refusals
def _drop_shard(path):
    wm = read_json(os.path.join(path, INDEX))["weight_map"]
    os.remove(os.path.join(path, wm["model.layers.1.self_attn.o_proj.weight"]))
    return [wm["model.layers.1.self_attn.o_proj.weight"], "missing"]


def _truncate(path):
    name = read_json(os.path.join(path, INDEX))["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    with open(os.path.join(path, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, name)) - 100)
    return [name, "truncated"]


def _bad_shape(path):
    entries = read_dir(path)
    name, t = entries["model.layers.0.self_attn.kv_b_proj.weight"]
    entries["model.layers.0.self_attn.kv_b_proj.weight"] = (name, t[:-8])
    write_dir(path, entries)
    return [name, "model.layers.0.self_attn.kv_b_proj.weight", "config.json"]


def _unknown_key(path):
    entries = read_dir(path)
    name = entries["model.norm.weight"][0]
    entries["model.layers.0.mlp.adapter.weight"] = (name, torch.zeros(4, 4))
    write_dir(path, entries)
    return [name, "model.layers.0.mlp.adapter.weight", "unknown"]


def _missing_key(path):
    entries = read_dir(path)
    del entries["model.layers.2.mlp.experts.5.up_proj.weight"]
    write_dir(path, entries)
    return ["model.layers.2.mlp.experts.5.up_proj.weight", "missing"]


def _unsupported_arch(path):
    edit_config(path, model_type="llama")
    return ["config.json", "model_type", "llama"]


def _mtp_beyond_config(path):
    add_mtp_layer(path)
    edit_config(path, num_nextn_predict_layers=0)
    return ["model-mtp.safetensors", "model.layers.3.", "num_nextn_predict_layers"]


REFUSALS = {"missing-shard": _drop_shard, "truncated-shard": _truncate, "shape-vs-config": _bad_shape,
            "unknown-key": _unknown_key, "missing-key": _missing_key, "unsupported-arch": _unsupported_arch,
            "mtp-beyond-config": _mtp_beyond_config}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case, v3, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(v3[1], src)
    expected = REFUSALS[case](str(src))
    dst = tmp_path / "out" / "ckpt"
    assert convert(src, dst) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, (text, err)
    assert not os.path.exists(tmp_path / "out")  # refused before anything was created


def test_fp8_weight_without_scale_refused(fp8, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(fp8[0], src)
    entries = read_dir(src)
    del entries["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
    write_dir(src, entries)
    assert convert(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in err and "_scale_inv" in err
    assert_nothing_written(tmp_path / "out")


def test_interrupted_conversion_leaves_nothing(v3, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_write = convert_hf.ShardedWriter.write

    def flaky_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_write(self, *args)

    monkeypatch.setattr(convert_hf.ShardedWriter, "write", flaky_write)
    assert convert(v3[1], tmp_path / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "out")


def test_existing_destination_needs_overwrite(v3, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert convert(v3[1], dst) == 2
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert convert(v3[1], dst, "--overwrite") == 0
    assert not (dst / "keep.txt").exists() and load_model(dst) is not None
    assert convert(v3[1], v3[1], "--overwrite") == 2  # never onto the source


def test_tp_ep_writes_a_sharded_layout_that_loads_anywhere(tmp_path):
    """--tp/--ep write per-rank shards + manifest; they load into any layout and consolidate to the same model."""
    from model.parallel.checkpoint import consolidate
    from tools.convert_hf import main as convert_main

    hf = make_hf_model(seed=5)
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "single"), "--quiet"]) == 0
    assert convert_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "sharded"), "--tp", "2", "--ep", "2",
                         "--quiet"]) == 0
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "sharded.json" in files and sum(f.startswith("shard-") for f in files) >= 2
    consolidate(tmp_path / "sharded", tmp_path / "back")
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "back")
    ids = torch.arange(24).view(2, 12) % hf.config.vocab_size
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert convert_main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "bad"), "--tp", "3",
                         "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
