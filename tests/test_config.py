"""ModelConfig: loading transformers / DeepSeek hub configs, JSON round trips, validation messages, softmax scale.

Run:  cd /work/main && PYTHONPATH=. python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import json
import math

import pytest

from model.config import ConfigError, ModelConfig, preset, yarn_mscale

YARN_V3 = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
               mscale_all_dim=1.0)


def hub_v3_dict(**overrides) -> dict:
    """A DeepSeek-V3 hub-style config.json (tiny sizes, V3 keys and spellings, plus keys seekstack ignores)."""
    d = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", **YARN_V3},
        "torch_dtype": "bfloat16", "ep_size": 1, "transformers_version": "4.33.1",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    }
    d.update(overrides)
    return d


# --------------------------------------------------------------------------------------------------- transformers
def test_transformers_v5_config_with_rope_parameters_round_trips():
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                          max_position_embeddings=163840, rope_theta=50000.0,
                          rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, **YARN_V3))
    d = hf.to_dict()
    assert "rope_parameters" in d and "rope_scaling" not in d  # the v5 form is what we are testing
    cfg = ModelConfig.from_dict(d)

    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling["type"] == "yarn"
    for key, value in YARN_V3.items():
        assert cfg.rope_scaling[key] == value, key
    assert cfg.q_lora_rank is None
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.n_group, cfg.topk_group) == (64, 8, 4, 2)
    assert cfg.qk_head_dim == 24
    assert cfg.yarn_factor == 40.0
    assert cfg.rope_interleave is True  # transformers' default: interleaved pairs, as DeepSeek's checkpoints
    # Keys that seekstack does not model survive as extras and are written back.
    assert cfg.extra["pretraining_tp"] == 1
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.rope_scaling == cfg.rope_scaling and again.q_lora_rank is None


def test_transformers_default_rope_gives_no_scaling():
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                          n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    cfg = ModelConfig.from_dict(hf.to_dict())
    assert cfg.rope_scaling is None
    assert cfg.rope_theta == 10000.0
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5, rel=1e-12)


# --------------------------------------------------------------------------------------------------- hub config
def test_hub_style_config_loads_and_json_round_trips(tmp_path):
    cfg = ModelConfig.from_dict(hub_v3_dict())
    assert cfg.rope_scaling == {"type": "yarn", **YARN_V3}
    assert cfg.rope_theta == 10000
    assert (cfg.scoring_func, cfg.topk_method, cfg.num_nextn_predict_layers) == ("sigmoid", "noaux_tc", 1)
    assert cfg.torch_dtype == "bfloat16"
    assert cfg.extra["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg.extra["ep_size"] == 1 and "auto_map" in cfg.extra
    # Dropped on load: transformers' bookkeeping keys.
    assert "architectures" not in cfg.extra and "transformers_version" not in cfg.extra

    path = tmp_path / "config.json"
    cfg.to_json(path)
    on_disk = json.loads(path.read_text())
    assert on_disk["quantization_config"] == hub_v3_dict()["quantization_config"]
    assert on_disk["rope_scaling"]["type"] == "yarn"
    back = ModelConfig.from_json(path)
    assert back == cfg  # dataclass equality covers extra too
    assert back.extra == cfg.extra
    # A directory holding config.json loads too.
    assert ModelConfig.from_json(tmp_path) == cfg

    # hf=True adds architectures and drops the seekstack-only training knobs, still loadable.
    cfg.to_json(tmp_path / "hf.json", hf=True)
    hf_disk = json.loads((tmp_path / "hf.json").read_text())
    assert hf_disk["architectures"] == ["DeepseekV3ForCausalLM"]
    assert not {"mtp_loss_lambda", "aux_loss_alpha", "bias_update_speed"} & set(hf_disk)
    assert ModelConfig.from_json(tmp_path / "hf.json").extra["quantization_config"] == cfg.extra["quantization_config"]


def test_hub_rope_scaling_without_factor_uses_position_ratio():
    rs = {"type": "yarn", "original_max_position_embeddings": 4096}
    cfg = ModelConfig.from_dict(hub_v3_dict(rope_scaling=rs, max_position_embeddings=4096 * 8))
    assert cfg.yarn_factor == 8.0


# --------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_routed_experts=9, n_group=4), "n_group"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="random"), "topk_method"),
        (dict(model_type="llama"), "model_type"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling.type"),
    ],
)
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(hub_v3_dict(**overrides), source="my/config.json")
    msg = str(err.value)
    assert f"`{key}`" in msg, msg
    assert "my/config.json" in msg, msg


def test_validation_messages_are_specific():
    with pytest.raises(ConfigError, match=r"`topk_group` = 3 exceeds n_group = 2"):
        preset("tiny", n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match=r"`n_group` = 3 does not divide n_routed_experts = 8"):
        preset("tiny", n_group=3, topk_group=1)
    # 4 groups of 2 experts, 1 group allowed -> only 2 experts reachable, top-3 impossible.
    with pytest.raises(ConfigError, match=r"`num_experts_per_tok` = 3 exceeds the 2 experts"):
        preset("tiny", n_group=4, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ConfigError, match=r"`scoring_func` is 'tanh'"):
        preset("tiny", scoring_func="tanh")
    with pytest.raises(ConfigError, match=r"`model_type` is 'mixtral'"):
        ModelConfig(model_type="mixtral")
    with pytest.raises(ConfigError, match=r"`rope_scaling.type` is 'linear'"):
        preset("tiny", rope_scaling={"type": "linear", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'"):
        preset("huge")


def test_greedy_ignores_the_group_limit_but_not_inconsistent_groups():
    # greedy routing has no group limit: a top-k larger than topk_group groups hold is fine there ...
    cfg = preset("tiny", topk_method="greedy", scoring_func="softmax", n_group=4, topk_group=1, num_experts_per_tok=4)
    assert cfg.topk_method == "greedy"
    # ... but group settings that contradict each other are still a config error, whatever the method
    for bad, key in ((dict(n_group=3, topk_group=1), "n_group"), (dict(n_group=2, topk_group=3), "topk_group"),
                     (dict(n_group=0), "n_group"), (dict(topk_group=-1), "topk_group")):
        with pytest.raises(ConfigError, match=key):
            preset("tiny", topk_method="greedy", scoring_func="softmax", **bad)


def test_from_json_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json(path)
    assert str(path) in str(err.value)


def test_from_json_invalid_json_names_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "deepseek_v3", ')
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json(path)
    assert str(path) in str(err.value)
    assert "JSON" in str(err.value)


def test_from_json_validation_error_names_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hub_v3_dict(scoring_func="relu")))
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_json(path)
    assert str(path) in str(err.value) and "`scoring_func`" in str(err.value)


# --------------------------------------------------------------------------------------------------- softmax scale
def test_softmax_scale_v3_preset():
    cfg = preset("deepseek-v3")
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert cfg.qk_head_dim == 192
    assert cfg.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert round(cfg.softmax_scale, 4) == 0.1352
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=5e-7)
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.368888, abs=1e-6)


def test_softmax_scale_v2_lite_mscale():
    cfg = preset("deepseek-v2-lite")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert m * m == pytest.approx(1.5896, abs=1e-4)
    assert cfg.q_lora_rank is None and cfg.scoring_func == "softmax" and cfg.topk_method == "greedy"


def test_yarn_mscale_is_one_without_scaling():
    assert yarn_mscale(1.0, 0.707) == 1.0
    assert yarn_mscale(0.5) == 1.0
    assert yarn_mscale(math.e, 1.0) == pytest.approx(1.1)
