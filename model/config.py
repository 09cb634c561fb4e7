"""Model architecture config, loadable from a DeepSeek-V3/V2 or transformers `config.json` as it is.

Field names are those of transformers' `DeepseekV3Config` (and the hub `config.json` of DeepSeek-V3/R1/V2), so a
checkpoint's config loads unchanged. RoPE settings are accepted both in the v4/hub form (`rope_theta` +
`rope_scaling`) and in the transformers-v5 form (`rope_parameters` with `rope_theta` inside); internally they are
normalised to `rope_theta` + `rope_scaling` (None for plain RoPE).

A few seekstack-only training knobs live here too because they belong to the architecture's objective
(`mtp_loss_lambda`, `aux_loss_alpha`, `bias_update_speed`); transformers ignores them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent; the message names the source, the key and the fix."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA has no GQA; kept for config round trips
    # MLA (DeepSeek-V2 §2.1): low-rank query/KV projections and the decoupled RoPE key.
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # DeepSeekMoE (V3 §2.1.2).
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # Positions.
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    # Rotary channel layout: True = interleaved pairs (DeepSeek's checkpoints; transformers' default), False =
    # the half-split pairs (x_i, x_i+d/2) of transformers' `rope_interleave: false` (rotate_half).
    rope_interleave: bool = True
    # Multi-token prediction (V3 §2.2).
    num_nextn_predict_layers: int = 0
    # Misc.
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006  # V3 report §4.2: "initialized with a standard deviation of 0.006"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # seekstack training objective (V3 §2.1.2, §2.2); not part of the transformers config.
    mtp_loss_lambda: float = 0.3  # λ in L = L_main + λ/D Σ_k L_MTP^k
    aux_loss_alpha: float = 0.0001  # α of the complementary sequence-wise balance loss
    bias_update_speed: float = 0.001  # γ of the aux-loss-free bias update
    # Keys from the source config.json that seekstack does not use, kept so an export writes them back.
    extra: dict = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE iff layer_idx >= first_k_dense_replace (and on the moe_layer_freq grid); MTP blocks count on."""
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ----------------------------------------------------------------------------------------------
    def validate(self, source: str = "ModelConfig") -> None:
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: `{key}` {msg}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            fail("model_type", f"is {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                fail(key, f"must be a positive integer, got {getattr(self, key)!r}")
        if self.qk_nope_head_dim < 0:
            fail("qk_nope_head_dim", "must be >= 0")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", f"must be a positive integer or null (plain q_proj), got {self.q_lora_rank}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"is {self.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        if self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be >= 0")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(fail)
        if not self.is_moe:
            return
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", f"is {self.scoring_func!r}; use 'sigmoid' (V3) or 'softmax' (V2)")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"is {self.topk_method!r}; use one of {', '.join(TOPK_METHODS)}")
        if not K or K <= 0 or K > E:
            fail("num_experts_per_tok", f"must be in [1, n_routed_experts={E}], got {K}")
        if not self.moe_intermediate_size or self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "must be a positive integer for an MoE model")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", "must be >= 1")
        for key in ("n_group", "topk_group"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                fail(key, f"must be a positive integer or null (no group limit), got {value!r}")
        n_group, topk_group = self.n_group or 1, self.topk_group or 1
        # Checked for every routing method: `greedy` ignores the groups, but inconsistent ones are a config error.
        if E % n_group:
            fail("n_group", f"= {n_group} does not divide n_routed_experts = {E}; pick a divisor of {E}")
        if topk_group > n_group:
            fail("topk_group", f"= {topk_group} exceeds n_group = {n_group}; it must be <= n_group")
        if self.topk_method == "greedy":
            return
        if topk_group * (E // n_group) < K:
            fail("num_experts_per_tok", f"= {K} exceeds the {topk_group * (E // n_group)} experts that "
                 f"topk_group={topk_group} groups of {E // n_group} hold; raise topk_group or lower the top-k")
        if self.topk_method == "noaux_tc" and E // n_group < 2:
            fail("n_group", f"leaves {E // n_group} expert per group; the V3 group score (sum of top-2) needs >= 2")

    def _validate_rope_scaling(self, fail) -> None:
        rs = self.rope_scaling
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            fail("rope_scaling.type", f"is {kind!r}; only 'yarn' (or no rope_scaling) is supported")
        if "original_max_position_embeddings" not in rs:
            fail("rope_scaling.original_max_position_embeddings", "is required for YaRN")
        if rs.get("factor") is not None and rs["factor"] <= 0:
            fail("rope_scaling.factor", "must be positive")

    # ----------------------------------------------------------------------------------------------
    @property
    def yarn_factor(self) -> float:
        rs = self.rope_scaling
        if rs.get("factor") is not None:
            return float(rs["factor"])
        return self.max_position_embeddings / rs["original_max_position_embeddings"]

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale(s, mscale_all_dim)^2 under YaRN (DeepSeek's folded YaRN temperature)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor, self.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        d.pop("architectures", None)
        d.pop("transformers_version", None)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: `model_type` is {model_type!r}; seekstack loads "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
        if "num_local_experts" in d and "n_routed_experts" not in d:
            d["n_routed_experts"] = d.pop("num_local_experts")
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if kind != "default":
                d["rope_scaling"] = {"type": kind, **rope_params}
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            rs.setdefault("type", rs.pop("rope_type", None))
            rs.pop("rope_type", None)
            if rs["type"] == "default":
                rs = None
            elif rs["type"] == "yarn":
                rs.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
            d["rope_scaling"] = rs
        else:
            d["rope_scaling"] = None
        if model_type == "deepseek_v2":
            # transformers' V2 defaults: softmax, greedy, no renormalisation.
            for key, value in (("scoring_func", "softmax"), ("topk_method", "greedy"), ("norm_topk_prob", False),
                               ("routed_scaling_factor", 1.0), ("first_k_dense_replace", 0)):
                if d.get(key) is None:
                    d[key] = value
        if d.get("topk_method") is None:
            d["topk_method"] = "noaux_tc" if d.get("scoring_func", "sigmoid") == "sigmoid" else "greedy"
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = dict(d.pop("extra", {}) or {})
        extra.update({k: d.pop(k) for k in list(d) if k not in known})
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in known}, extra=extra)
        except ConfigError as e:
            raise ConfigError(str(e).replace("ModelConfig:", f"{source}:", 1)) from None
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: bad value type ({e})") from None
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file; pass a checkpoint directory holding config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self, hf: bool = False) -> dict[str, Any]:
        """Plain dict; `hf=True` adds what transformers expects (architectures) and drops seekstack-only keys."""
        d = asdict(self)
        extra = d.pop("extra")
        if hf:
            for key in ("mtp_loss_lambda", "aux_loss_alpha", "bias_update_speed"):
                d.pop(key)
            d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3"
                                  else "DeepseekV2ForCausalLM"]
        out = {**extra, **d}
        if out.get("torch_dtype") is None:
            out.pop("torch_dtype")
        return out

    def to_json(self, path: str | os.PathLike, hf: bool = False) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(hf=hf), f, indent=2, sort_keys=True)
            f.write("\n")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (V3 report §4.3), 1 for s <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# Named size presets (torchtitan "flavors"). `small` is the benchmark preset of bench/model_bench.py.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 num_nextn_predict_layers=1, max_position_embeddings=256, initializer_range=0.02),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
                  num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                  num_nextn_predict_layers=1, max_position_embeddings=1024, initializer_range=0.02),
    "deepseek-v3": dict(vocab_size=129280, num_nextn_predict_layers=1, max_position_embeddings=163840,
                        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             q_lora_rank=None, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                             n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
                             norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1,
                             max_position_embeddings=163840,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")
