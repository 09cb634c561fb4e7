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

from model import load_model
from model.checkpoint import write_model

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointCorrupt(RuntimeError):
    pass


def _sha256(path: str) -> str:
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
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
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
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str, step: int, model, optimizer, trainer_state: dict, job_toml: str,
                    keep: int = 3, model_files: list[str] | None = None) -> str:
    """Write checkpoint `step` atomically; prune to the `keep` newest. Returns its path."""
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
        manifest = {name: _sha256(os.path.join(tmp, name)) for name in _files(tmp)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"step": step, "files": manifest}, f, indent=2)
        for fd_path in [os.path.join(tmp, n) for n in manifest] + [os.path.join(tmp, "manifest.json")]:
            with open(fd_path, "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
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
        if _sha256(file) != digest:
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
