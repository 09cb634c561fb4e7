"""seekstack's own checkpoint format: `config.json` + safetensors, sharded with an index past a size threshold.

Layout (the Hugging Face convention, so standard tools can read it):
    config.json
    model.safetensors                                   (one shard), or
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json   {"metadata": ..., "weight_map": {...}}
Keys are the module names of `Transformer.state_dict()`. Tied weights are stored once. Written to a temp dir and
renamed, so an interrupted save never leaves a half-written checkpoint in place. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .transformer import Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(RuntimeError):
    """The checkpoint on disk is missing, incomplete or does not fit the model; the message names file and key."""


def _storage_key(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               dtype: torch.dtype | None = None) -> None:
    """Write `model` to directory `path` atomically (replaces an existing checkpoint there)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        write_model(model, tmp, max_shard_bytes, dtype)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(model: Transformer, path: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                dtype: torch.dtype | None = None) -> None:
    """Write config.json and the safetensors shards into the existing directory `path` (not atomic by itself)."""
    state = _storage_key(model)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
                 for k, v in state.items()}
    state = {k: v.cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    model.config.to_json(os.path.join(path, "config.json"))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def replace_dir(src: str, dst: str) -> None:
    """Atomically move directory src to dst; an existing dst is swapped out first and removed after."""
    old = None
    if os.path.exists(dst):
        old = dst + ".old-" + next(tempfile._get_candidate_names())
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> shard file for a checkpoint directory, validating the index."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e}); re-save the checkpoint") from None
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{index}: shard {name!r} is listed but missing from {path}")
        return weight_map
    single = os.path.join(path, SINGLE_NAME)
    if not os.path.isfile(single):
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}; is this a seekstack checkpoint?")
    try:
        with safe_open(single, "pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", strict: bool = True) -> Transformer:
    """Build a Transformer from `path/config.json` and fill it from the safetensors shards."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = ModelConfig.from_json(os.path.join(path, "config.json"))
    weight_map = checkpoint_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = _storage_key(model)
    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path}: checkpoint does not match config.json: missing keys {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if key in expected:
            by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        file = os.path.join(path, name)
        try:
            with safe_open(file, "pt", device=str(device)) as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if t.shape != expected[key].shape:
                        raise CheckpointError(f"{file}: `{key}` has shape {tuple(t.shape)}, config.json implies "
                                              f"{tuple(expected[key].shape)}")
                    state[key] = t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    model = model.to_empty(device=device)
    model.rotary.reset_parameters()  # non-persistent buffer: recompute on the real device
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for router in (m.gate for m in model.moe_layers()):
        router.tokens_per_expert.zero_()
    model.load_state_dict(state, strict=False, assign=False)
    if dtype is not None:
        model = model.to(dtype)
    return model
