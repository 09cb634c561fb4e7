"""The training loop shared by pretraining and SFT (one process, or data/tensor/expert parallel under torchrun).

Per optimizer step: lr from the schedule -> `grad_accum` micro-batches (loss / grad_accum, backward) -> gradient
sync (model/parallel `sync_gradients`: the mean over data-parallel replicas, plus the TP / EP partial sums) -> skip
the step if the loss or gradient is non-finite -> clip (the norm of the full, unsharded gradient) -> AdamW ->
aux-loss-free bias update from the step's expert loads (summed over the data-parallel group) -> metrics line ->
held-out eval / checkpoint when due.

Batches come from a `batches(step, micro, dp_rank, dp) -> dict(input_ids, labels)` callable whose answer is a pure
function of its arguments, which is what makes resume exact: a checkpoint stores the step, model, optimizer and RNG,
and the data position is the step itself. It is called with the data-parallel rank and size (train/distributed.py),
so the TP ranks of one replica train on the same rows and the global batch does not depend on the layout.

Metrics are reduced over the data-parallel group (loss: mean over replicas; tokens: sum), tokens_per_s counts the
whole job, and under torchrun `comm/all_reduce_bytes` / `comm/all_to_all_bytes` give the payload each rank handed to
those collectives during the step (mean over ranks; model/parallel's comm_stats, as tools.plan predicts them).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch

from model import Transformer
from model.balance import update_expert_bias
from model.flops import measure_matmul_peak, training_flops_per_token
from model.parallel import clip_grad_norm_, comm_stats, sync_gradients

from .checkpoint import CheckpointCorrupt, CheckpointMismatch, resolve_resume, restore_checkpoint, save_checkpoint
from .config import CheckpointConfig, MetricsConfig, OptimizerConfig, to_toml
from .distributed import DistInfo, dp_sum, world_sum
from .optim import build_optimizer, lr_at, set_lr

BatchFn = Callable[[int, int, int, int], dict]


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps); the last good checkpoint is kept."""


class Trainer:
    def __init__(self, *, job, model: Transformer, batches: BatchFn, eval_batches: Callable[[int], dict] | None,
                 steps: int, grad_accum: int, optimizer_cfg: OptimizerConfig, checkpoint_cfg: CheckpointConfig,
                 metrics_cfg: MetricsConfig, dist: DistInfo, dtype: str = "fp32", compile: bool = False,
                 max_skipped_steps: int = 5, extra_state: dict | None = None,
                 on_eval: Callable[[Transformer, int], dict] | None = None, model_files: list[str] | None = None,
                 max_seconds: float = 0.0):
        self.job, self.model, self.batches, self.eval_batches = job, model, batches, eval_batches
        self.steps, self.grad_accum = steps, grad_accum
        self.opt_cfg, self.ckpt_cfg, self.metrics_cfg = optimizer_cfg, checkpoint_cfg, metrics_cfg
        self.dist, self.dtype, self.max_skipped = dist, dtype, max_skipped_steps
        self.run_dir = job.run_dir
        self.optimizer = build_optimizer(model, optimizer_cfg)
        self.step = 0
        self.state = {"skipped_steps": 0, "tokens_seen": 0, **(extra_state or {})}
        self.on_eval = on_eval
        self.max_seconds = max_seconds  # > 0: stop (evaluate, checkpoint) once a step ends past this wall time
        self.model_files = [f for f in (model_files or []) if f and os.path.isfile(f)]
        self.forward = torch.compile(model) if compile else model
        self.gamma = model.config.bias_update_speed

    # --------------------------------------------------------------------------------------------- resume
    def maybe_resume(self, resume: str) -> None:
        """Collective under torchrun: every rank loads its shards (and its optimizer state) of the same checkpoint."""
        if not resume:
            return
        try:
            path = resolve_resume(resume, self.run_dir, self.dist, log=self.log)
        except CheckpointCorrupt as e:
            raise TrainingStopped(str(e)) from None
        if path is None:
            self.log(f"resume=auto: no checkpoint in {self.run_dir}, starting fresh")
            return
        try:
            state = restore_checkpoint(path, self.model, self.optimizer, self.dist)
        except (CheckpointCorrupt, CheckpointMismatch) as e:
            raise TrainingStopped(f"cannot resume: {e}") from None
        self.step = state.pop("step")
        self.state.update(state)
        self._truncate_metrics(self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        if self.dist.is_main:
            truncate_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), step)

    # --------------------------------------------------------------------------------------------- loop
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def run(self) -> dict:
        os.makedirs(self.run_dir, exist_ok=True)
        if self.dist.is_main:
            with open(os.path.join(self.run_dir, "job.toml"), "w") as f:
                f.write(to_toml(self.job))
        params = [p for p in self.model.parameters() if p.requires_grad]
        peak = measure_matmul_peak(torch.get_num_threads()) if self.dist.is_main else float("nan")
        bar = self._progress()
        metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a") if self.dist.is_main else None
        last: dict = {}
        try:
            started = time.perf_counter()
            while self.step < self.steps:
                last = self._train_step(params, peak)
                self.step += 1
                last["step"] = self.step
                if self.max_seconds and self._out_of_time(started):
                    self.log(f"time budget of {self.max_seconds:.0f}s reached at step {self.step}")
                    self.steps = self.step  # makes this the final step: evaluate and checkpoint now
                if self._due(self.metrics_cfg.eval_every) and self.eval_batches is not None:
                    last.update(self.evaluate())
                if metrics_file:
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                    bar.update(1)
                if self._due(self.ckpt_cfg.every):
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if metrics_file:
                metrics_file.close()
        return last

    def _out_of_time(self, started: float) -> bool:
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        return float(world_sum(elapsed, self.dist)) / self.dist.world >= self.max_seconds  # ranks agree

    def _due(self, every: int) -> bool:
        return self.step == self.steps or (every > 0 and self.step % every == 0)

    def _progress(self):
        if not (self.dist.is_main and self.metrics_cfg.progress):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.steps, initial=self.step, desc="train", file=sys.stderr, dynamic_ncols=True)

    def _autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _train_step(self, params, peak: float) -> dict:
        t0 = time.perf_counter()
        comm_stats.reset()
        layout = self.dist.layout
        lr = lr_at(self.step, self.steps, self.opt_cfg)
        set_lr(self.optimizer, lr)
        self.model.train()
        totals = {"loss": 0.0, "ce_loss": 0.0, "balance_loss": 0.0}
        mtp: list[float] = []
        tokens = 0
        for micro in range(self.grad_accum):
            batch = self.batches(self.step, micro, self.dist.dp_rank, self.dist.dp)
            input_ids = batch["input_ids"].to(self.dist.device)
            labels = batch["labels"].to(self.dist.device)
            with self._autocast():
                out = self.forward(input_ids, labels=labels)
            (out.loss / self.grad_accum).backward()
            totals["loss"] += out.loss.item() / self.grad_accum
            totals["ce_loss"] += out.ce_loss.item() / self.grad_accum
            if out.balance_loss is not None:
                totals["balance_loss"] += out.balance_loss.item() / self.grad_accum
            for k, v in enumerate(out.mtp_losses):
                if len(mtp) <= k:
                    mtp.append(0.0)
                mtp[k] += v.item() / self.grad_accum
            tokens += int((labels[:, 1:] != -100).sum())
        sync_gradients(self.model, layout)
        reduced = torch.tensor([totals["loss"], totals["ce_loss"], totals["balance_loss"], *mtp, float(tokens)],
                               dtype=torch.float64)
        dp_sum(reduced, self.dist)  # each replica once: the TP ranks of a replica hold the same values
        loss, ce, bal, *mtp_red, tokens_all = (reduced / torch.tensor(
            [self.dist.dp] * (len(reduced) - 1) + [1], dtype=torch.float64)).tolist()

        grad_norm = clip_grad_norm_(self.model, layout, self.opt_cfg.grad_clip if self.opt_cfg.grad_clip > 0
                                    else float("inf"))
        metrics = {"loss": loss, "ce_loss": ce, "lr": lr, "grad_norm": float(grad_norm)}
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            update_expert_bias(self.model, 0.0, reduce_fn=None)  # drop this step's loads (every rank does)
            self.state["skipped_steps"] += 1
            self.log(f"warning: step {self.step + 1}: non-finite loss/grad ({loss}, {float(grad_norm)}); "
                     f"step skipped ({self.state['skipped_steps']}/{self.max_skipped})")
            if self.state["skipped_steps"] > self.max_skipped:
                raise TrainingStopped(f"stopping: {self.state['skipped_steps']} non-finite steps (more than "
                                      f"--training.max_skipped_steps={self.max_skipped}); the last good checkpoint "
                                      f"in {self.run_dir}/checkpoints is kept. Lower the learning rate or check data.")
            metrics["skipped"] = True
            return metrics
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = update_expert_bias(self.model, self.gamma, reduce_fn=layout.reduce_expert_load)
        comm = comm_stats.snapshot()
        self.state["tokens_seen"] += int(tokens_all)
        seconds = time.perf_counter() - t0
        tps = tokens_all / seconds
        metrics.update(balance_loss=bal, tokens=int(tokens_all), tokens_per_s=tps, step_seconds=seconds)
        for k, v in enumerate(mtp_red, start=1):
            metrics[f"mtp_loss_{k}"] = v
        seq_len = batch["input_ids"].shape[1]
        flops = training_flops_per_token(self.model.config, seq_len) * tps
        metrics["mfu"] = flops / (peak * self.dist.world) if math.isfinite(peak) else None
        if self.dist.world > 1:
            metrics.update(comm_metrics(comm, self.dist))
        if loads is not None:
            metrics["expert_load_max_over_mean"] = [round(float(x), 4) for x in loads.max(1).values /
                                                    loads.mean(1).clamp(min=1e-9)]
            metrics["expert_load"] = loads.tolist()
            biases = torch.stack([m.gate.e_score_correction_bias for m in self.model.moe_layers()])
            metrics["bias_min"], metrics["bias_max"] = float(biases.min()), float(biases.max())
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out cross-entropy (main head) over the eval batches, averaged over ranks."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(self.metrics_cfg.eval_batches):
            batch = self.eval_batches(i)  # the caller indexes them by data-parallel rank
            with self._autocast():
                out = self.forward(batch["input_ids"].to(self.dist.device))
            labels = batch["labels"].to(self.dist.device)
            logits = out.logits[:, :-1].float()
            targets = labels[:, 1:]
            valid = targets != -100
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0),
                                                    reduction="none").view_as(targets)
            total += float((nll * valid).sum())
            count += int(valid.sum())
        agg = dp_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        result = {"val_loss": float(agg[0] / agg[1].clamp(min=1))}
        if self.on_eval is not None:
            result.update(self.on_eval(self.model, self.step))
        self.model.train()
        if self.dist.is_main:
            self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                       if isinstance(v, float)))
        return result

    def save(self) -> None:
        """Collective: sharded layouts write every rank's shard and optimizer state (train/checkpoint.py)."""
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state, to_toml(self.job),
                        keep=self.ckpt_cfg.keep, model_files=self.model_files, dist=self.dist)


def comm_metrics(snapshot: dict, dist: DistInfo) -> dict:
    """comm/all_reduce_bytes and comm/all_to_all_bytes of one step: payload per rank, mean over all ranks (the
    all-to-all payload differs per rank with the routing)."""
    kinds = ("all_reduce", "all_to_all")
    t = torch.tensor([float(snapshot.get(k, {}).get("bytes", 0)) for k in kinds], dtype=torch.float64)
    world_sum(t, dist)
    return {f"comm/{k}_bytes": float(v) / dist.world for k, v in zip(kinds, t.tolist())}


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the rows of a per-step JSONL log (metrics, samples) written after `step`: a resumed run rewrites them."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)
