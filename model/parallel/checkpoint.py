"""Sharded checkpoints: every rank writes the distinct slices it owns, one manifest describes them, and loading
into any layout (or a single process) reads just the boxes it needs.

Layout on disk (safetensors + JSON, no pickle):
    config.json                              the model config (as model/checkpoint.py writes it)
    shard-00000.safetensors ...              one file per rank that owns a slice, keys = state-dict names
    sharded.json                             {"format", "layout": {world_size, tp, ep},
                                              "tensors": {name: {"shape", "dtype",
                                                                 "pieces": [{"file", "dim", "start", "stop"}]}}}
A piece is the slice [start, stop) of dimension `dim` of the global tensor. Loading computes, for every tensor,
the slice this rank holds under *its* plan and copies the intersection of that box with each piece (safetensors
reads only the requested box): one resharding path for every (saved layout, loaded layout) pair. A single-process
checkpoint (model/checkpoint.py) reads through the same path as one piece per tensor, so `load_sharded` (and
`load_parallel`, which builds this rank's shards on "meta" first and never holds the full model) accepts both.

The directory is written under `<path>.partial` and renamed by rank 0, so an interrupted save leaves any previous
checkpoint in place. All ranks must see the same filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, checkpoint_files, replace_dir, save_model
from ..config import ModelConfig
from ..transformer import Transformer
from .fsdp import apply_fsdp, is_sharded, local, shard_like, unshard
from .layout import Layout
from .parallelize import parallelize
from .plan import ParallelPlan, plan_of

MANIFEST_NAME = "sharded.json"
FORMAT = "seekstack-sharded-v1"


def _barrier(layout: Layout | None) -> None:
    if layout is not None and layout.world_size > 1:
        dist.barrier()


def _stored_keys(model: Transformer, gather: bool = True) -> dict[str, torch.Tensor]:
    """State-dict entries written to disk; FSDP chunks gathered to the rank's whole tensor (collective) if asked."""
    state = model.state_dict()
    if gather:
        state = {k: unshard(v) for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as embed_tokens.weight
    return state


def _shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _manifest(plan: ParallelPlan, state: dict[str, torch.Tensor]) -> dict:
    tensors = {}
    for name, t in state.items():
        pieces = []
        for r in plan.owners(name):
            dim, start, stop = plan.local_slice(name, r)
            pieces.append({"file": _shard_file(r), "dim": dim, "start": start, "stop": stop})
        tensors[name] = {"shape": list(plan.global_shapes[name]), "dtype": str(t.dtype).removeprefix("torch."),
                         "pieces": pieces}
    d = plan.dims
    return {"format": FORMAT, "layout": {"world_size": d.world_size, "tp": d.tp, "ep": d.ep}, "tensors": tensors}


def save_sharded(model: Transformer, path: str | os.PathLike, layout: Layout | None = None) -> None:
    """Collective: every rank of `layout` calls it with the same path."""
    path = os.path.abspath(os.fspath(path))
    plan = plan_of(model)
    rank = layout.rank if layout is not None else 0
    tmp = path + ".partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.config.to_json(os.path.join(tmp, "config.json"))
    _barrier(layout)
    state = _stored_keys(model)
    mine = {k: v.detach().contiguous().cpu() for k, v in state.items() if plan.owns(k)}
    if mine:
        save_file(mine, os.path.join(tmp, _shard_file(rank)), metadata={"format": "pt"})
    _barrier(layout)
    if rank == 0:
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(_manifest(plan, state), f, indent=1)
        replace_dir(tmp, path)
    _barrier(layout)


def _single_process_manifest(path: str) -> dict:
    """The manifest of a single-process checkpoint: every tensor one piece covering it whole."""
    tensors = {}
    for name, file in checkpoint_files(path).items():
        with safe_open(os.path.join(path, file), "pt") as f:
            shape = list(f.get_slice(name).get_shape())
        tensors[name] = {"shape": shape, "pieces": [{"file": file, "dim": 0, "start": 0,
                                                     "stop": shape[0] if shape else 1}]}
    return {"format": FORMAT, "layout": {"world_size": 1, "tp": 1, "ep": 1}, "tensors": tensors}


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(file):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            return _single_process_manifest(path)  # raises CheckpointError if it is not one either
        raise CheckpointError(f"{path}: no {MANIFEST_NAME} and no single-process checkpoint; not a seekstack "
                              f"checkpoint directory")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


@torch.no_grad()
def load_sharded(model: Transformer, path: str | os.PathLike) -> None:
    """Fill `model` (parallelised or not) in place from a sharded checkpoint saved under any layout, or from a
    single-process checkpoint."""
    path = os.fspath(path)
    manifest = _read_manifest(path)
    plan = plan_of(model)
    state = _stored_keys(model, gather=False)
    missing = sorted(set(state) - set(manifest["tensors"]))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    with contextlib.ExitStack() as stack:
        files = {}

        def open_file(name):
            if name not in files:
                files[name] = stack.enter_context(safe_open(os.path.join(path, name), "pt"))
            return files[name]

        for name, target in state.items():
            entry = manifest["tensors"][name]
            if tuple(entry["shape"]) != plan.global_shapes[name]:
                raise CheckpointError(f"{path}: `{name}` has global shape {tuple(entry['shape'])}, the model "
                                      f"expects {plan.global_shapes[name]}")
            box = _read_box(open_file, name, entry, plan, target.shape)
            local(target).copy_(shard_like(box, target) if is_sharded(target) else box)


def _read_box(open_file, name: str, entry: dict, plan: ParallelPlan, local_shape) -> torch.Tensor:
    """This rank's slice of `name`, assembled from the intersections of its box with every saved piece."""
    shape = entry["shape"]
    if not shape:
        return open_file(entry["pieces"][0]["file"]).get_tensor(name)
    dim, start, stop = plan.local_slice(name)
    want = [(0, n) for n in shape]
    want[dim] = (start, stop)
    out, filled = None, 0
    for piece in entry["pieces"]:
        have = [(0, n) for n in shape]
        have[piece["dim"]] = (piece["start"], piece["stop"])
        box = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(want, have)]
        if any(lo >= hi for lo, hi in box):
            continue
        part = open_file(piece["file"]).get_slice(name)[tuple(slice(lo - h0, hi - h0)
                                                              for (lo, hi), (h0, _) in zip(box, have))]
        if out is None:
            out = torch.empty(local_shape, dtype=part.dtype)
        out[tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(box, want))] = part
        filled += part.numel()
    if out is None or filled != out.numel():
        raise CheckpointError(f"`{name}`: the saved pieces do not cover slice [{start}, {stop}) of dim {dim}")
    return out


def _materialize(model: Transformer, device: torch.device | str = "cpu") -> Transformer:
    """Allocate a model built on "meta" (values undefined until loaded); recompute what checkpoints do not hold."""
    model = model.to_empty(device=device)
    model.rotary.reset_parameters()
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for moe in model.moe_layers():
        moe.gate.tokens_per_expert.zero_()
    return model


def load_parallel(path: str | os.PathLike, layout: Layout, device: torch.device | str = "cpu") -> Transformer:
    """This rank's shards of the checkpoint at `path` (sharded under any layout, or single-process), parallelised
    for `layout`: built on "meta", sharded, then filled by `load_sharded`, so the full model is never allocated.
    Raises ParallelConfigError if the model does not split over `layout`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = ModelConfig.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = Transformer(config)
    model = _materialize(parallelize(model, layout, fsdp=False), device)
    load_sharded(model, path)
    if layout.dims.fsdp:
        apply_fsdp(model, layout)  # chunks the loaded tensors over DP; the rank's whole copies are freed
    return model


def consolidate(path: str | os.PathLike, out_path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Rewrite a sharded checkpoint as a single-process one (model.checkpoint.load_model reads it)."""
    path = os.fspath(path)
    config = ModelConfig.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = Transformer(config)
    model = _materialize(model)
    load_sharded(model, path)
    save_model(model, out_path, dtype=dtype)


def shard_offline(path: str | os.PathLike, out_path: str | os.PathLike, tp: int = 1, ep: int = 1,
                  ep_borrows_tp: bool = False) -> None:
    """Write the checkpoint at `path` (single-process or sharded) as the sharded layout of a tp x ep job, in one
    process, one rank's share at a time (never the full model): what `save_sharded` would write from the job's
    ranks, for `tools.convert_hf --tp/--ep`. The world is the smallest that holds the layout (dp = ep unless EP
    borrows TP ranks); larger jobs of the same tp/ep load it by resharding (every tensor piece is addressable)."""
    from .layout import ParallelDims

    path, out_path = os.fspath(path), os.path.abspath(os.fspath(out_path))
    world = tp * (1 if ep_borrows_tp else ep)
    dims = ParallelDims(world, tp, ep, ep_borrows_tp)
    tmp = out_path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = None
        for rank in range(world):
            model = load_parallel(path, Layout(dims, rank, init_groups=False))
            plan, state = plan_of(model), _stored_keys(model)
            if rank == 0:
                model.config.to_json(os.path.join(tmp, "config.json"))
                manifest = _manifest(plan, state)
            mine = {k: v.detach().contiguous().cpu() for k, v in state.items() if plan.owns(k)}
            if mine:
                save_file(mine, os.path.join(tmp, _shard_file(rank)), metadata={"format": "pt"})
            del model, state, mine
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=1)
        replace_dir(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
