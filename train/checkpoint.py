"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

    RUN_DIR/checkpoints/step_00000100/
        model/                  seekstack checkpoint (config.json + safetensors), loadable by model.load_model
        optimizer.safetensors   optimizer state tensors;  optimizer.json: param groups and the tensor index
        rng.safetensors         torch RNG state;          trainer_state.json: step, counters, numpy/python RNG
        job.toml                the resolved job config
        manifest.json           SHA-256 of every file above (written last: a checkpoint without it is partial)

The directory is assembled under a temp name and renamed into place, so a crash or SIGKILL leaves either the old
set of checkpoints or the new one, never a half-written step. `latest_valid` verifies the manifest hashes and falls
back to the previous checkpoint (naming the bad one) when the newest is corrupt; resuming an explicit corrupt path
is refused.

With tensor or expert parallelism (tp or ep > 1) the parameters are split over ranks and the same directory holds
    model/                  a sharded checkpoint (model/parallel/checkpoint.py: config.json, shard-*.safetensors
                            written by the ranks that own each distinct slice, sharded.json), plus tokenizer.json
    ranks/rank_00000/       optimizer.safetensors + optimizer.json + rng.safetensors of each rank (its optimizer
                            state covers its own shards), one directory per rank
    trainer_state.json      with "layout": {world_size, tp, ep, ep_borrows_tp}; job.toml; manifest.json last
Every rank writes into the temp directory (all ranks must share the filesystem), rank 0 hashes and renames.
Resume needs the same layout (the optimizer shards are per rank); to change layout start a new run from the
weights (`--model.init_from RUN/checkpoints/step_N/model`, resharded by load_sharded) or from RUN/final, which is
always a consolidated single-process checkpoint (`export_final`). Pure data parallelism (tp = ep = 1) keeps the
single-process format (rank 0 writes it; the replicas are identical) and resumes under any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model import load_model, save_model
from model.checkpoint import write_model
from model.parallel import consolidate, load_sharded, save_sharded
from model.parallel.fsdp import is_sharded, local, wrap_like

from .distributed import DistInfo, barrier, broadcast_object

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointCorrupt(RuntimeError):
    pass


class CheckpointMismatch(RuntimeError):
    """The checkpoint is intact but was saved under a layout this run cannot resume from."""


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(f for f in out if f != "manifest.json")


def _optimizer_to_files(optimizer: torch.optim.Optimizer, path: str) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):  # an FSDP state is saved as this rank's chunk (resume needs the same layout)
                tensors[f"{idx}.{name}"] = local(value).detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "optimizer.json"), "w") as f:
        json.dump({"param_groups": sd["param_groups"], "scalars": scalars}, f)


def _optimizer_from_files(optimizer: torch.optim.Optimizer, path: str) -> None:
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "optimizer.json")) as f:
        meta = json.load(f)
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for group in meta["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, entries in state.items():
        p = params[idx] if idx < len(params) else None
        if p is not None and is_sharded(p):  # rewrap this rank's chunks as the parameter's DTensor
            for name, value in entries.items():
                if torch.is_tensor(value) and value.shape == local(p).shape and value.dim() > 0:
                    entries[name] = wrap_like(value.to(local(p).device), p)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _layout_record(dist: DistInfo) -> dict:
    d = dist.layout.dims
    record = {"world_size": d.world_size, "tp": d.tp, "ep": d.ep, "ep_borrows_tp": d.ep_borrows_tp}
    if d.fsdp:
        record["fsdp"] = True
    return record


def _rank_dir(path: str, rank: int) -> str:
    return os.path.join(path, "ranks", f"rank_{rank:05d}")


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict, job_toml: str,
                    keep: int = 3, model_files: list[str] | None = None, dist: DistInfo | None = None) -> str:
    """Write checkpoint `step` atomically; prune to the `keep` newest. Returns its path.

    Collective when `dist` spans several processes: every rank calls it (sharded layouts write per-rank files;
    otherwise rank 0 writes the single-process format while the others wait)."""
    if dist is not None and dist.world > 1:
        if dist.sharded:
            return _save_sharded_checkpoint(run_dir, step, model, optimizer, trainer_state, job_toml, keep,
                                            model_files, dist)
        final = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
        if dist.is_main:
            _save_single(run_dir, step, model, optimizer, trainer_state, job_toml, keep, model_files)
        barrier(dist)
        return final
    return _save_single(run_dir, step, model, optimizer, trainer_state, job_toml, keep, model_files)


def _finish(tmp: str, final: str, step: int) -> None:
    """Hash every file, write manifest.json last, fsync, rename into place."""
    manifest = {name: file_sha256(os.path.join(tmp, name)) for name in _files(tmp)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "files": manifest}, f, indent=2)
    for fd_path in [os.path.join(tmp, n) for n in manifest] + [os.path.join(tmp, "manifest.json")]:
        with open(fd_path, "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)


def _save_sharded_checkpoint(run_dir, step, model, optimizer, trainer_state, job_toml, keep, model_files,
                             dist: DistInfo) -> str:
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}-sharded")  # one name all ranks know
    if dist.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "ranks"))
    barrier(dist)
    try:
        save_sharded(model, os.path.join(tmp, "model"), dist.layout)  # collective; ends with a barrier
        mine = _rank_dir(tmp, dist.rank)
        os.makedirs(mine)
        _optimizer_to_files(optimizer, mine)
        save_file({"torch": torch.get_rng_state()}, os.path.join(mine, "rng.safetensors"))
        barrier(dist)
        if dist.is_main:
            for extra in model_files or []:
                shutil.copy(extra, os.path.join(tmp, "model", os.path.basename(extra)))
            state = dict(trainer_state, step=step, numpy_rng=_np_state(), python_rng=_py_state(),
                         layout=_layout_record(dist))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=2)
            with open(os.path.join(tmp, "job.toml"), "w") as f:
                f.write(job_toml)
            _finish(tmp, final, step)
            for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(dist)
    return final


def _save_single(run_dir: str, step: int, model, optimizer, trainer_state: dict, job_toml: str,
                 keep: int = 3, model_files: list[str] | None = None) -> str:
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root)
    try:
        os.makedirs(os.path.join(tmp, "model"))
        write_model(model, os.path.join(tmp, "model"))
        for extra in model_files or []:  # e.g. tokenizer.json, so the model directory is self-contained
            shutil.copy(extra, os.path.join(tmp, "model", os.path.basename(extra)))
        _optimizer_to_files(optimizer, tmp)
        save_file({"torch": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
        state = dict(trainer_state, step=step, numpy_rng=_np_state(), python_rng=_py_state())
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        with open(os.path.join(tmp, "job.toml"), "w") as f:
            f.write(job_toml)
        _finish(tmp, final, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if STEP_DIR.match(n)]


def verify(path: str) -> None:
    """Raise CheckpointCorrupt naming the problem if `path` is partial or any file's hash differs."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise CheckpointCorrupt(f"{path}: no manifest.json (partial checkpoint)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (json.JSONDecodeError, KeyError):
        raise CheckpointCorrupt(f"{manifest_path}: unreadable manifest") from None
    for name, digest in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointCorrupt(f"{file}: missing")
        if file_sha256(file) != digest:
            raise CheckpointCorrupt(f"{file}: content does not match its SHA-256 in manifest.json (corrupt)")


def latest_valid(run_dir: str, log=print) -> str | None:
    """Newest checkpoint that verifies; corrupt ones are named and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointCorrupt as e:
            log(f"warning: skipping corrupt checkpoint: {e}")
    return None


def load_checkpoint(path: str, optimizer) -> tuple[object, dict]:
    """Verify and load (model, trainer_state); the optimizer state is loaded into `optimizer` (built by the caller
    for the returned model via the `optimizer` factory callable)."""
    verify(path)
    model = load_model(os.path.join(path, "model"))
    opt = optimizer(model)
    _optimizer_from_files(opt, path)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["torch"])
    np.random.set_state(_np_unpack(state.pop("numpy_rng")))
    random.setstate(_py_unpack(state.pop("python_rng")))
    return model, opt, state


def resolve_resume(resume: str, run_dir: str, dist: DistInfo, log=print) -> str | None:
    """The checkpoint to resume: `resume` itself, or for "auto" the newest valid one in run_dir (None: none yet;
    CheckpointCorrupt: there are checkpoints but every one is corrupt). Rank 0 decides; collective."""
    if not resume:
        return None
    if resume != "auto":
        return resume
    answer = None
    if dist.is_main:
        path = latest_valid(run_dir, log=log)
        answer = ("ok", path) if path is not None or not list_checkpoints(run_dir) else \
            ("corrupt", f"{run_dir}: every checkpoint is corrupt; nothing to resume from")
    kind, value = broadcast_object(answer, dist)
    if kind == "corrupt":
        raise CheckpointCorrupt(value)
    return value


def restore_checkpoint(path: str, model, optimizer, dist: DistInfo | None = None) -> dict:
    """Load checkpoint `path` into an existing (possibly parallelised) model and its optimizer, and restore the RNGs;
    returns the trainer state (with "step"). Collective: rank 0 verifies the hashes and every rank learns the verdict.

    Raises CheckpointCorrupt (partial or hash mismatch) or CheckpointMismatch (saved under another layout)."""
    dist = dist or DistInfo()
    error = None
    if dist.is_main:
        try:
            verify(path)
        except CheckpointCorrupt as e:
            error = str(e)
    error = broadcast_object(error, dist)
    if error:
        raise CheckpointCorrupt(error)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    saved = state.pop("layout", None)
    here = _layout_record(dist)
    sharded = os.path.isdir(os.path.join(path, "ranks"))
    if sharded and saved != here:
        raise CheckpointMismatch(
            f"{path} was saved under layout {saved}; this run is {here}. Optimizer state is sharded per rank, so "
            f"resume with the same torchrun size and --parallelism; to continue under another layout start a new "
            f"run from its weights with --model.init_from {os.path.join(path, 'model')} (resharded on load)")
    if not sharded and dist.sharded:
        raise CheckpointMismatch(
            f"{path} is a single-process (data-parallel) checkpoint; its optimizer state cannot be split over "
            f"tp={dist.tp} ep={dist.ep}. Resume with --parallelism.tp 1 --parallelism.ep 1, or start a new run from "
            f"its weights with --model.init_from {os.path.join(path, 'model')}")
    load_sharded(model, os.path.join(path, "model"))  # either format, resharded to this rank's slices
    where = _rank_dir(path, dist.rank) if sharded else path
    _optimizer_from_files(optimizer, where)
    torch.set_rng_state(load_file(os.path.join(where, "rng.safetensors"))["torch"])
    np.random.set_state(_np_unpack(state.pop("numpy_rng")))
    random.setstate(_py_unpack(state.pop("python_rng")))
    return state


def export_final(model, final: str, dist: DistInfo | None = None, model_files: list[str] | None = None) -> None:
    """Write `final` as a consolidated single-process checkpoint (model.load_model, tools.generate, rl.grpo,
    tools.export_hf open it) with `model_files` (e.g. tokenizer.json) beside it. Collective under torchrun: a
    sharded model is saved with save_sharded next to `final`, consolidated by rank 0, and the shards removed."""
    dist = dist or DistInfo()
    final = os.path.abspath(final)
    if dist.sharded:
        shards = final + ".shards"
        save_sharded(model, shards, dist.layout)
        if dist.is_main:
            consolidate(shards, final)
            shutil.rmtree(shards, ignore_errors=True)
    elif dist.is_main:
        save_model(model, final)
    if dist.is_main:
        for extra in model_files or []:
            if extra and os.path.isfile(extra):
                shutil.copy(extra, os.path.join(final, os.path.basename(extra)))
    barrier(dist)


def _np_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _np_unpack(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_unpack(s):
    return (s[0], tuple(s[1]), s[2])


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
