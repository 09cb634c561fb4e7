"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

No decay on norms, biases and (unless `decay_embeddings`) the embedding and output head. The MoE routing bias is a
buffer, not a parameter: it is moved by the aux-loss-free update (model/balance.py), never by the optimizer.

Schedules (step s of S, warmup W, peak lr, floor lr * min_lr_ratio):
    warmup:   lr * (s + 1) / W                                  for s < W
    cosine:   floor + (lr - floor) * (1 + cos(pi * p)) / 2      p = (s - W) / (S - W)
    wsd:      lr until the last `decay_fraction` of the steps, then linear down to the floor
    constant: lr
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.parallel.fsdp import is_sharded

from .config import OptimizerConfig


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    no_decay_modules = (nn.Embedding,)
    decay, no_decay = [], []
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_embedding = isinstance(module, no_decay_modules) or module_name.endswith("lm_head")
            if p.dim() < 2 or (is_embedding and not cfg.decay_embeddings):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if any(is_sharded(p) for p in decay + no_decay):
        # FSDP's DTensor parameters in groups of their own: a foreach step cannot mix DTensors and plain tensors
        # (the routed experts stay plain under FSDP)
        groups = [{**g, "params": [p for p in g["params"] if is_sharded(p) == sharded]}
                  for sharded in (False, True) for g in groups]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=True)


def lr_at(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    floor = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(total_steps * cfg.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (floor - cfg.lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, wsd or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
