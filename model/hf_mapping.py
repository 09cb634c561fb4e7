"""The single place that maps Hugging Face DeepSeek-V3/V2 tensor names to seekstack's and back.

HF on-disk layout (see ../shared/reference/deepseek_v3.md §2.2): `model.` prefix, one tensor per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), and MTP modules stored as extra decoder layers
`model.layers.{num_hidden_layers + k}` holding `enorm`, `hnorm`, `eh_proj`, a full block, `shared_head.norm`,
plus duplicates of the shared `embed_tokens` and `shared_head.head` (= lm_head).

seekstack layout: no prefix, experts stacked as `mlp.experts.gate_up_proj` [E, 2I, D] (gate rows first) and
`mlp.experts.down_proj` [E, D, I] (transformers-v5 in-memory layout, also accepted as input), MTP modules at
`mtp.{k}.{enorm,hnorm,eh_proj,norm}` and `mtp.{k}.block.*`.

DeepseekV2 checkpoints have no `mlp.gate.e_score_correction_bias` (their routing never uses one): seekstack keeps a
zero fp32 bias there, filled in on import and left out on export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "shared_head.norm.weight": "norm.weight"}
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # duplicates of the model's embedding / head


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: seekstack key, and for a per-expert tensor its expert index and projection."""
    key: str | None  # None: a duplicate of a shared tensor (MTP embed/head), or an MTP layer that is not kept
    expert: int | None = None
    proj: str | None = None  # gate_proj | up_proj | down_proj


def hf_to_seekstack(hf_key: str, config: ModelConfig) -> Target:
    """Map one HF tensor name; raises KeyError for names that belong to no DeepSeek tensor."""
    if hf_key == "model.embed_tokens.weight":
        return Target("embed_tokens.weight")
    if hf_key == "model.norm.weight":
        return Target("norm.weight")
    if hf_key == "lm_head.weight":
        return Target("lm_head.weight")
    m = _LAYER.match(hf_key)
    if not m:
        raise KeyError(hf_key)
    layer, rest = int(m.group(1)), m.group(2)
    if layer < config.num_hidden_layers:
        prefix = f"layers.{layer}."
    else:
        k = layer - config.num_hidden_layers
        if k >= config.num_nextn_predict_layers:
            return Target(None)
        if rest in _MTP_SHARED:
            return Target(None)
        if rest in _MTP_OWN:
            return Target(f"mtp.{k}.{_MTP_OWN[rest]}")
        prefix = f"mtp.{k}.block."
    e = _EXPERT.match(rest)
    if e:
        proj = e.group(2)
        stacked = "down_proj" if proj == "down_proj" else "gate_up_proj"
        return Target(f"{prefix}mlp.experts.{stacked}", int(e.group(1)), proj)
    return Target(prefix + rest)


def hf_state_dict_to_seekstack(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert a whole (in-memory) HF state dict; per-expert tensors are stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in hf_state.items():
        t = hf_to_seekstack(name, config)
        if t.key is None:
            continue
        if t.expert is None:
            out[t.key] = tensor
        else:
            experts.setdefault(t.key, {}).setdefault(t.proj, {})[t.expert] = tensor
    for key, parts in experts.items():
        out[key] = stack_experts(parts, config.n_routed_experts, key)
    for key in [k for k in out if k.endswith("mlp.gate.weight")]:
        # DeepSeek-V2 routers have no correction bias: a zero bias leaves their routing unchanged.
        out.setdefault(key.removesuffix("weight") + "e_score_correction_bias",
                       torch.zeros(out[key].shape[0], dtype=torch.float32))
    if config.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # one tensor under both names, as the tied model has it
    return out


def stack_experts(parts: dict[str, dict[int, torch.Tensor]], num_experts: int, key: str) -> torch.Tensor:
    """{proj: {expert: W}} -> the stacked tensor for `key` ([E, 2I, D] gate-then-up, or [E, D, I])."""
    projs = ["down_proj"] if key.endswith("down_proj") else ["gate_proj", "up_proj"]
    for proj in projs:
        missing = sorted(set(range(num_experts)) - set(parts.get(proj, {})))
        if missing:
            raise KeyError(f"{key}: {proj} of experts {missing[:8]} missing")
    stacked = [torch.stack([parts[p][e] for e in range(num_experts)]) for p in projs]
    return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)


def seekstack_to_hf(key: str, tensor: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """One seekstack tensor -> its HF on-disk tensors (experts split per expert; MTP under layers.{L+k})."""
    L = config.num_hidden_layers
    if key in ("embed_tokens.weight", "norm.weight"):
        return {f"model.{key}": tensor}
    if key == "lm_head.weight":
        return {key: tensor}
    if key.startswith("layers."):
        layer, rest = key.split(".", 2)[1:]
        prefix = f"model.layers.{layer}."
    elif key.startswith("mtp."):
        k, rest = key.split(".", 2)[1:]
        prefix = f"model.layers.{L + int(k)}."
        own = {v: kk for kk, v in _MTP_OWN.items()}
        if rest in own:
            return {prefix + own[rest]: tensor}
        rest = rest.removeprefix("block.")
    else:
        raise KeyError(key)
    if rest.endswith("mlp.gate.e_score_correction_bias") and not hf_has_router_bias(config):
        return {}  # transformers' DeepseekV2 router has no correction bias (seekstack keeps an unused zero one)
    if rest.endswith("mlp.experts.gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        base = prefix + rest.removesuffix("gate_up_proj")
        out = {}
        for e in range(tensor.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = gate[e]
            out[f"{base}{e}.up_proj.weight"] = up[e]
        return out
    if rest.endswith("mlp.experts.down_proj"):
        base = prefix + rest.removesuffix("down_proj")
        return {f"{base}{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
    return {prefix + rest: tensor}


def seekstack_state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Whole state dict -> HF on-disk layout, including the MTP layers' copies of the shared embedding and head."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("tokens_per_expert"):
            continue
        out.update(seekstack_to_hf(key, tensor, config))
    for hf_key, key in mtp_shared_copies(config).items():
        out[hf_key] = state.get(key, state["embed_tokens.weight"])
    return out


def mtp_shared_copies(config: ModelConfig) -> dict[str, str]:
    """HF name of each MTP layer's duplicate of a shared tensor -> the seekstack tensor it duplicates."""
    head = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    out = {}
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = "embed_tokens.weight"
        out[prefix + "shared_head.head.weight"] = head
    return out


def hf_has_router_bias(config: ModelConfig) -> bool:
    """Whether the HF layout stores `mlp.gate.e_score_correction_bias` (DeepseekV3 does, DeepseekV2 does not)."""
    return config.model_type != "deepseek_v2"
