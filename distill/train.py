"""Logit distillation: `python -m distill.train --config configs/distill_*.toml [--section.key=value ...]`
(also under `torchrun --nproc_per_node=N -m distill.train ...` for data parallelism).

A student (cut out of the teacher with `student.init = prune` (distill/prune.py), built from a preset with the
teacher's vocabulary, or loaded with `student.init_from`) learns from a teacher's next-token distributions on
prompt/response rows (distill/data.py), with the per-token objective of distill/losses.py:

    ℓ = α·CE(y, z_S) + (1 − α)·T²·D(p_T ‖ p_S)     on response tokens; D = forward KL, reverse KL or JSD(β)

The teacher signal comes one of three ways (`teacher.mode`):
    online   the frozen teacher runs in this job (no grad): full-vocabulary logits, or its top-k (`teacher.top_k`)
    offline  top-k ids / log-probs streamed from a `python -m distill.cache_teacher` cache (the cache is also the
             training set: its rows replace [data]); the teacher checkpoint is loaded only for on-policy batches
             (and read once to cut a pruned student)
    none     no teacher: plain supervised training on the same rows (α must be 1) — the CE-only baseline
and, with `distill.lmbda` = λ > 0, a λ share of the micro-batches are on-policy (GKD, Agarwal et al. 2024): the
student samples completions of the batch's prompts (model.generate), the teacher scores them (full vocabulary, or
its top-k with `teacher.top_k`), and the divergence is taken on the student's own tokens (no CE there: student
samples have no gold labels). Which micro-batches are on-policy is drawn from (seed, step, micro-step), so it depends
on how a step is split (grad_accum x ranks); the share does not.

One optimizer step: build every micro-batch (generation and teacher forwards under no_grad) -> count the step's loss
tokens over all micro-batches and ranks -> that count / world is the one normaliser of distill/losses.py (exact
under micro-batching, accumulation and data parallelism) -> forward/backward per micro-batch -> gradient average
over ranks -> skip if non-finite -> clip -> AdamW -> MoE bias update -> metrics line (metrics.jsonl: loss, ce_loss,
kd_loss, top1_agreement, onpolicy_fraction, ...) -> held-out greedy accuracy / checkpoint when due.

Checkpoints and exact resume are train/checkpoint.py's; the data position is the step itself, and generation is
seeded by (seed, step, micro-step, rank), so a resumed run repeats the uninterrupted one bit for bit.

Simplified, honestly: an online teacher's logits are materialised for a whole micro-batch ([B, L, V] fp32: fine for
the built-in 102-token vocabulary, ~0.5 GB per 1k tokens at DeepSeek-V3's 129k, where `teacher.top_k` or the offline
cache is the way; no chunked/fused KL as Liger's); data parallelism only (no TP/EP for the student or teacher);
the teacher of on-policy batches runs in the same process, not behind a server.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from model import ModelConfig, Transformer, load_model, preset, save_model
from model.balance import update_expert_bias
from model.generate import generate
from train.checkpoint import CheckpointCorrupt, latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from train.config import CheckpointConfig, JobConfigError, MetricsConfig, OptimizerConfig, ParallelismConfig, to_toml
from train.corpus import greedy_accuracy
from train.data import DataError, eos_id
from train.distributed import DistInfo, barrier
from train.entry import run_job
from train.optim import build_optimizer, lr_at, set_lr
from train.sft import SFTDataset

from .cache_teacher import TopKCache, check_student
from .data import held_out_problems, load_examples, pad_id, prompts_of
from .losses import DIVERGENCES, TOPK_MODES, DistillStats, TopK, distill_loss, topk_teacher
from .teacher import VocabMismatch, check_vocab, load_teacher, side, teacher_logits

MODES = ("online", "offline", "none")


# NOTE: plain data parallelism (tp = ep = 1, so the data-parallel group is the world), reduced with torch.distributed
# directly: SUM, then divide (gloo has no reliable AVG). model/parallel's sync_gradients serves parallelised models;
# the student here is a plain module, and these two helpers are all it needs.
def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_mean_grads(params: list[torch.nn.Parameter], world: int) -> None:
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in group]), world) / world
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@dataclass
class TeacherSection:
    path: str = ""  # teacher checkpoint directory with tokenizer.json (online mode, on-policy batches)
    mode: str = "online"  # online | offline | none (CE-only baseline)
    cache: str = ""  # offline: a directory written by `python -m distill.cache_teacher`
    top_k: int = 0  # online: 0 = the full vocabulary, k = the teacher's top-k only
    topk_mode: str = "renorm"  # renorm | rest (see distill/losses.py)


@dataclass
class StudentSection:
    init: str = "scratch"  # scratch (preset + overrides below) | prune (cut from the teacher: distill/prune.py)
    init_from: str = ""  # or start from this seekstack checkpoint (its tokenizer.json must match the teacher's)
    keep_layers: list[int] = field(default_factory=lambda: [0, 1])  # prune: teacher blocks kept
    keep_experts: int = 4  # prune: routed experts kept per MoE block (the most used; 0 = all)
    preset: str = "tiny"  # scratch: this preset with the teacher's vocab_size and the overrides below
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 384  # dense SwiGLU width
    n_routed_experts: int = 0  # 0 = dense MLP in every layer; > 0 keeps the preset's MoE with this many experts
    num_nextn_predict_layers: int = 0  # MTP depth (unused by the distillation loss)
    bias_update_speed: float = 0.001  # MoE aux-loss-free bias update (MoE students only)


@dataclass
class DataSection:
    source: str = "builtin"  # builtin (the addition task's training problems) or a prompt/response JSONL
    num_problems: int = 20000  # built-in training problems
    flawed_fraction: float = 0.0  # built-in: share of sloppy worked solutions (train/corpus.py; pretraining's is 0.3)
    template: str = "arithmetic"  # for JSONL rows: plain | arithmetic | r1 | a string with {prompt}
    seq_len: int = 128  # rows are truncated to seq_len + 1 tokens


@dataclass
class DistillSection:
    alpha: float = 0.5  # weight of the hard-label CE (1 = supervised only, 0 = distillation only)
    temperature: float = 2.0  # T of the KD term, applied to both distributions, with the T² factor
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # JSD(β): β weights the teacher (0 = forward KL, 1 = reverse KL)
    lmbda: float = 0.0  # share of micro-batches that are on-policy student generations (GKD's λ)
    max_new_tokens: int = 64  # on-policy completion budget
    gen_temperature: float = 1.0  # on-policy sampling temperature
    gen_top_p: float = 1.0


@dataclass
class TrainingSection:
    steps: int = 200
    micro_batch: int = 32  # rows per rank per micro-step
    grad_accum: int = 1
    max_skipped_steps: int = 5
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_seconds: float = 0.0  # stop (evaluate, checkpoint) after the step that crosses this wall time


@dataclass
class DistillMetrics(MetricsConfig):
    eval_every: int = 50
    eval_problems: int = 128  # held-out addition problems for greedy accuracy (0 skips it)
    eval_rows: int = 64  # held-out rows for val_loss (response CE), val_kd, val_top1_agreement


@dataclass
class DistillConfig:
    run_dir: str = "runs/distill"
    seed: int = 0
    resume: str = ""  # "auto" (latest valid checkpoint in run_dir, if any) or a checkpoint path
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    data: DataSection = field(default_factory=DataSection)
    distill: DistillSection = field(default_factory=DistillSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3, warmup_steps=10))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50, keep=2))
    metrics: DistillMetrics = field(default_factory=DistillMetrics)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)

    def validate(self) -> None:
        t, d = self.teacher, self.distill
        if self.parallelism.tp != 1 or self.parallelism.ep != 1:
            raise JobConfigError("distill.train runs data parallel only (torchrun with parallelism.tp = ep = 1)")
        if t.mode not in MODES:
            raise JobConfigError(f"`teacher.mode` is {t.mode!r}; use one of {', '.join(MODES)}")
        if t.mode == "online" and not t.path:
            raise JobConfigError("`teacher.path` is required for teacher.mode = online")
        if t.mode == "offline" and not t.cache:
            raise JobConfigError("`teacher.cache` is required for teacher.mode = offline (write it with "
                                 "`python -m distill.cache_teacher`)")
        if self.student.init not in ("scratch", "prune"):
            raise JobConfigError(f"`student.init` is {self.student.init!r}; use scratch or prune")
        if self.student.init == "prune" and (not t.path or self.student.init_from):
            raise JobConfigError("`student.init` = prune cuts the student out of the teacher: it needs "
                                 "`teacher.path` and no `student.init_from`")
        if t.mode == "none" and d.alpha != 1.0:
            raise JobConfigError(f"teacher.mode = none trains on hard labels only: set `distill.alpha` = 1 "
                                 f"(got {d.alpha})")
        if d.lmbda > 0 and not t.path:
            raise JobConfigError("`distill.lmbda` > 0 (on-policy batches) needs `teacher.path`: the teacher scores "
                                 "the student's samples")
        if d.lmbda > 0 and t.mode == "none":
            raise JobConfigError("`distill.lmbda` > 0 needs a teacher (teacher.mode online or offline)")
        if not 0.0 <= d.alpha <= 1.0 or not 0.0 <= d.beta <= 1.0 or not 0.0 <= d.lmbda <= 1.0:
            raise JobConfigError("`distill.alpha`, `distill.beta` and `distill.lmbda` must be in [0, 1]")
        if d.temperature <= 0 or d.gen_temperature <= 0:
            raise JobConfigError("`distill.temperature` and `distill.gen_temperature` must be > 0")
        if d.divergence not in DIVERGENCES:
            raise JobConfigError(f"`distill.divergence` is {d.divergence!r}; use one of {', '.join(DIVERGENCES)}")
        if t.topk_mode not in TOPK_MODES:
            raise JobConfigError(f"`teacher.topk_mode` is {t.topk_mode!r}; use one of {', '.join(TOPK_MODES)}")
        for key in ("steps", "micro_batch", "grad_accum"):
            if getattr(self.training, key) < 1:
                raise JobConfigError(f"`training.{key}` must be >= 1")


# ------------------------------------------------------------------------------------------------ model building
def build_student(cfg: DistillConfig, vocab_size: int) -> Transformer:
    s = cfg.student
    if s.init_from:
        model = load_model(s.init_from)
    else:
        base = preset(s.preset).to_dict()
        base.update(vocab_size=vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
                    num_attention_heads=s.num_attention_heads, intermediate_size=s.intermediate_size,
                    num_nextn_predict_layers=s.num_nextn_predict_layers)
        if s.n_routed_experts > 0:
            base["n_routed_experts"] = s.n_routed_experts
            base["n_group"] = min(base.get("n_group") or 1, s.n_routed_experts)
        else:
            base.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None, n_group=None,
                        topk_group=None)
        torch.manual_seed(cfg.seed)
        model = Transformer(ModelConfig.from_dict(base, source="[student]"))
    model.config.bias_update_speed = s.bias_update_speed
    return model


class DistillTrainer:
    def __init__(self, cfg: DistillConfig, dist: DistInfo, log=None):
        from tokenizers import Tokenizer

        self.cfg, self.dist = cfg, dist
        self._log = log
        t = cfg.teacher
        self.teacher, self.cache = None, None
        if t.mode == "offline":
            self.cache = TopKCache(t.cache, seed=cfg.seed)
        if t.path:
            self.tokenizer_path = os.path.join(t.path, "tokenizer.json")
            if t.mode == "online" or cfg.distill.lmbda > 0:
                self.teacher, self.tokenizer_path = load_teacher(t.path, dist.device)
        elif self.cache is not None:
            self.tokenizer_path = self.cache.tokenizer_path
        elif cfg.student.init_from:
            self.tokenizer_path = os.path.join(cfg.student.init_from, "tokenizer.json")
        else:  # CE-only with no teacher at all: the built-in task's tokenizer
            from train.corpus import build_tokenizer

            os.makedirs(cfg.run_dir, exist_ok=True)
            self.tokenizer_path = os.path.join(cfg.run_dir, "tokenizer.json")
            build_tokenizer().save(self.tokenizer_path)
        if not os.path.isfile(self.tokenizer_path):
            raise VocabMismatch(f"{self.tokenizer_path}: no tokenizer.json")
        if self.cache is not None and self.teacher is not None:
            check_vocab(self.cache.vocab_side(), side(self.teacher.config.vocab_size, self.tokenizer_path),
                        f"teacher cache {t.cache}", f"teacher {t.path}")
        self.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        if self.teacher is not None:
            vocab = self.teacher.config.vocab_size
        elif self.cache is not None:
            vocab = self.cache.spec["model_vocab_size"]
        else:
            vocab = self.tokenizer.get_vocab_size()
        if cfg.student.init == "prune":
            self.student = self._pruned_student().to(dist.device)
        else:
            self.student = build_student(cfg, vocab).to(dist.device)
        student_tok = (os.path.join(cfg.student.init_from, "tokenizer.json") if cfg.student.init_from
                       else self.tokenizer_path)
        if self.teacher is not None:
            check_vocab(side(self.teacher.config.vocab_size, self.tokenizer_path),
                        side(self.student.config.vocab_size, student_tok))
        if self.cache is not None:
            check_student(self.cache, self.student.config.vocab_size, student_tok)
        self.eos, self.pad = eos_id(self.tokenizer), pad_id(self.tokenizer)
        self.optimizer = build_optimizer(self.student, cfg.optimizer)
        self.step = 0
        self.state = {"skipped_steps": 0, "tokens_seen": 0, "teacher": self._teacher_identity()}
        d = cfg.data
        self.train_set = None
        if self.cache is None:
            examples = load_examples(d.source, self.tokenizer, seed=cfg.seed, num_problems=d.num_problems,
                                     template=d.template, seq_len=d.seq_len, flawed_fraction=d.flawed_fraction)
            self.train_set = SFTDataset(examples, d.seq_len, cfg.seed, self.pad, packing=False)
        self.held_out = held_out_problems(cfg.seed, max(cfg.metrics.eval_problems, cfg.metrics.eval_rows, 1))
        self._val_examples = self._held_out_examples()

    def _pruned_student(self) -> Transformer:
        from .prune import expert_usage, prune_teacher

        s, t = self.cfg.student, self.cfg.teacher
        teacher = self.teacher if self.teacher is not None else load_teacher(t.path)[0]
        if self.cache is not None:  # expert usage on the first training rows (the same whatever the run's seed)
            rows = [self.cache.row(0, i) for i in range(min(256, self.cache.manifest["shards"][self.cache.names[0]]
                                                            ["rows"]))]
            ids = self.cache.batch_of(rows, eos_id(self.tokenizer))["input_ids"]
        else:
            ex = load_examples(self.cfg.data.source, self.tokenizer, seed=self.cfg.seed, num_problems=256,
                               template=self.cfg.data.template, seq_len=self.cfg.data.seq_len)[:256]
            ids = SFTDataset(ex, self.cfg.data.seq_len, 0, eos_id(self.tokenizer), False).batch(
                0, 0, 0, 1, len(ex), 1)["input_ids"]
        usage = expert_usage(teacher, list(ids.to(self.dist.device).split(64)))
        student = prune_teacher(teacher, s.keep_layers, s.keep_experts, usage)
        student.config.bias_update_speed = s.bias_update_speed
        return student

    def _held_out_examples(self):
        from train.sft import encode_pairs

        pairs = [(p.question, p.solution()[len("<think>"):]) for p in self.held_out[:self.cfg.metrics.eval_rows]]
        return encode_pairs(pairs, self.tokenizer, "arithmetic", self.cfg.data.seq_len) if pairs else []

    def _teacher_identity(self) -> str:
        t = self.cfg.teacher
        if t.mode == "offline":
            return f"cache:{os.path.abspath(t.cache)}:{self.cache.spec['teacher_sha256'][:16]}"
        return f"{t.mode}:{os.path.abspath(t.path) if t.path else ''}"

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            (self._log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    # ---------------------------------------------------------------------------------------- resume
    def maybe_resume(self) -> None:
        resume = self.cfg.resume
        if not resume:
            return
        path = latest_valid(self.cfg.run_dir, log=self.log) if resume == "auto" else resume
        if path is None:
            if list_checkpoints(self.cfg.run_dir):
                raise JobConfigError(f"{self.cfg.run_dir}: every checkpoint is corrupt; nothing to resume from")
            self.log(f"resume=auto: no checkpoint in {self.cfg.run_dir}, starting fresh")
            return
        try:
            model, opt, state = load_checkpoint(path, lambda m: build_optimizer(m, self.cfg.optimizer))
        except CheckpointCorrupt as e:
            raise JobConfigError(f"cannot resume: {e}") from None
        if state.get("teacher") != self.state["teacher"]:
            raise JobConfigError(f"{path}: was distilled from {state.get('teacher')}, but this job's teacher is "
                                 f"{self.state['teacher']}; use another run_dir")
        self.student.load_state_dict(model.state_dict())
        self.optimizer.load_state_dict(opt.state_dict())
        self.step = state.pop("step")
        self.state.update(state)
        self._truncate_metrics()
        self.log(f"resumed from {path} at step {self.step}")

    def _truncate_metrics(self) -> None:
        path = os.path.join(self.cfg.run_dir, "metrics.jsonl")
        if not self.dist.is_main or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= self.step]
        with open(path, "w") as f:
            f.writelines(lines)

    # ---------------------------------------------------------------------------------------- batches
    def _is_onpolicy(self, step: int, micro: int) -> bool:
        lmbda = self.cfg.distill.lmbda
        if lmbda <= 0:
            return False
        return float(np.random.default_rng([self.cfg.seed, 7, step, micro]).random()) < lmbda  # same on all ranks

    def _rows(self, step: int, micro: int) -> dict:
        t = self.cfg.training
        if self.cache is not None:
            return self.cache.batch(step, micro, self.dist.rank, self.dist.world, t.micro_batch, t.grad_accum,
                                    self.pad)
        return self.train_set.batch(step, micro, self.dist.rank, self.dist.world, t.micro_batch, t.grad_accum)

    def _teacher_signal(self, input_ids: torch.Tensor, attention_mask, start: int, n: int):
        logits = teacher_logits(self.teacher, input_ids, attention_mask)[:, start:start + n]
        k = self.cfg.teacher.top_k
        return topk_teacher(logits, k, self.cfg.distill.temperature) if k else logits

    @torch.no_grad()
    def micro_batch(self, step: int, micro: int) -> dict:
        """Everything one forward/backward needs: ids, attention mask, the logits window [start, start + n), its
        targets and masks, and the teacher signal (logits [B, n, V], a TopK, or None)."""
        rows = self._rows(step, micro)
        dev = self.dist.device
        if self._is_onpolicy(step, micro):
            d = self.cfg.distill
            gen = torch.Generator(device=dev).manual_seed(
                int(np.random.default_rng([self.cfg.seed, 11, step, micro, self.dist.rank]).integers(2**62)))
            out = generate(self.student, prompts_of(rows), d.max_new_tokens, temperature=d.gen_temperature,
                           top_p=d.gen_top_p, eos_token_id=self.eos, pad_token_id=self.pad, generator=gen)
            ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
            attn = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
            P, N = out.prompt_ids.shape[1], out.completion_ids.shape[1]
            mb = {"input_ids": ids, "attention_mask": attn, "start": P - 1, "n": N, "targets": out.completion_ids,
                  "mask": out.completion_mask, "ce_mask": torch.zeros_like(out.completion_mask), "onpolicy": True}
            mb["teacher"] = self._teacher_signal(ids.to(dev), attn.to(dev), P - 1, N)
            mb["sampled_tokens"] = int(out.completion_mask.sum())
            return mb
        ids, labels = rows["input_ids"], rows["labels"]
        targets = labels[:, 1:]
        mb = {"input_ids": ids, "attention_mask": None, "start": 0, "n": ids.shape[1] - 1, "targets": targets,
              "mask": targets != -100, "ce_mask": None, "onpolicy": False}
        if self.cfg.teacher.mode == "offline":
            mb["teacher"] = rows["topk"]
        elif self.cfg.teacher.mode == "online":
            mb["teacher"] = self._teacher_signal(ids.to(dev), None, 0, ids.shape[1] - 1)
        else:
            mb["teacher"] = None
        return mb

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, d = self.cfg, self.cfg.distill
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg.training.steps, cfg.optimizer)
        set_lr(self.optimizer, lr)
        batches = [self.micro_batch(self.step, m) for m in range(cfg.training.grad_accum)]
        t_gen = time.perf_counter() - t0
        count = all_reduce_sum(torch.tensor([float(sum(int(mb["mask"].sum()) for mb in batches))],
                                            dtype=torch.float64), self.dist.world)
        normalizer = max(float(count[0]), 1.0) / self.dist.world
        self.student.train()
        stats, onpolicy_tokens = DistillStats(), 0
        dev = self.dist.device
        for mb in batches:
            attn = mb["attention_mask"].to(dev) if mb["attention_mask"] is not None else None
            logits = self.student(mb["input_ids"].to(dev), attention_mask=attn).logits
            logits = logits[:, mb["start"]:mb["start"] + mb["n"]]
            teacher = mb["teacher"]
            if isinstance(teacher, TopK):
                teacher = TopK(teacher.ids.to(dev), teacher.logprobs.to(dev), teacher.temperature)
            ce_mask = mb["ce_mask"].to(dev) if mb["ce_mask"] is not None else None
            res = distill_loss(logits, mb["targets"].to(dev), teacher, mb["mask"].to(dev), normalizer=normalizer,
                               alpha=d.alpha, temperature=d.temperature, kind=d.divergence, beta=d.beta,
                               topk_mode=cfg.teacher.topk_mode, ce_mask=ce_mask)
            if res.loss.requires_grad:
                res.loss.backward()
            stats = stats + res.stats
            onpolicy_tokens += int(mb["mask"].sum()) if mb["onpolicy"] else 0
        params = [p for p in self.student.parameters() if p.requires_grad]
        all_reduce_mean_grads(params, self.dist.world)
        totals = all_reduce_sum(torch.tensor(stats.as_list() + [float(onpolicy_tokens),
                                                                float(sum(mb["onpolicy"] for mb in batches))],
                                             dtype=torch.float64), self.dist.world)
        tokens, kd_sum, ce_tokens, ce_sum, agree_sum, on_tok, on_mb = totals.tolist()
        loss = (d.alpha * ce_sum + (1 - d.alpha) * kd_sum) / max(tokens, 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0
                                                   else float("inf"))
        metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
        if ce_tokens:
            metrics["ce_loss"] = ce_sum / ce_tokens
        if cfg.teacher.mode != "none":
            metrics["kd_loss"] = kd_sum / max(tokens, 1.0)
            metrics["top1_agreement"] = agree_sum / max(tokens, 1.0)
        metrics["onpolicy_fraction"] = on_mb / (len(batches) * self.dist.world)
        metrics["onpolicy_tokens"] = int(on_tok)
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            update_expert_bias(self.student, 0.0)
            self.state["skipped_steps"] += 1
            self.log(f"warning: step {self.step + 1}: non-finite loss/grad ({loss}, {float(grad_norm)}); step "
                     f"skipped ({self.state['skipped_steps']}/{cfg.training.max_skipped_steps})")
            if self.state["skipped_steps"] > cfg.training.max_skipped_steps:
                raise JobConfigError(f"stopping: {self.state['skipped_steps']} non-finite steps; the last good "
                                     f"checkpoint in {cfg.run_dir}/checkpoints is kept. Lower the learning rate.")
            metrics["skipped"] = True
            return metrics
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_expert_bias(self.student, self.student.config.bias_update_speed)
        self.state["tokens_seen"] += int(tokens)
        seconds = time.perf_counter() - t0
        metrics.update(tokens=int(tokens), tokens_seen=self.state["tokens_seen"], tokens_per_s=tokens / seconds,
                       step_seconds=seconds, generation_seconds=t_gen)
        return metrics

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out response CE (val_loss; val_kd and val_top1_agreement when the teacher is loaded) and greedy
        accuracy."""
        m, out = self.cfg.metrics, {}
        self.student.eval()
        if self._val_examples:
            ds = SFTDataset(self._val_examples, self.cfg.data.seq_len, 0, self.pad, packing=False)
            batch = ds.batch(0, 0, 0, 1, len(self._val_examples), 1)
            ids = batch["input_ids"].to(self.dist.device)
            targets = batch["labels"][:, 1:].to(self.dist.device)
            mask = targets != -100
            logits = self.student(ids).logits[:, :-1]
            teacher = teacher_logits(self.teacher, ids)[:, :-1] if self.teacher is not None else None
            res = distill_loss(logits, targets, teacher, mask, normalizer=1.0,
                               alpha=1.0, temperature=self.cfg.distill.temperature, kind=self.cfg.distill.divergence,
                               beta=self.cfg.distill.beta)
            out["val_loss"] = res.stats.ce_sum / max(res.stats.ce_tokens, 1.0)
            if teacher is not None:
                out["val_kd"] = res.stats.kd_sum / max(res.stats.tokens, 1.0)
                out["val_top1_agreement"] = res.stats.agree_sum / max(res.stats.tokens, 1.0)
        if m.eval_problems:
            out["accuracy"] = greedy_accuracy(self.student, self.tokenizer, self.held_out[:m.eval_problems],
                                              self.cfg.distill.max_new_tokens, self.eos)
        self.student.train()
        return out

    # ---------------------------------------------------------------------------------------- loop
    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.cfg.run_dir, self.step, self.student, self.optimizer, self.state,
                            to_toml(self.cfg), keep=self.cfg.checkpoint.keep, model_files=[self.tokenizer_path])
        barrier(self.dist.world)

    def run(self) -> dict:
        cfg = self.cfg
        steps = cfg.training.steps
        os.makedirs(cfg.run_dir, exist_ok=True)
        main = self.dist.is_main
        if main:
            with open(os.path.join(cfg.run_dir, "job.toml"), "w") as f:
                f.write(to_toml(cfg))
            n = sum(p.numel() for p in self.student.parameters())
            self.log(f"distill: student {n / 1e6:.2f}M parameters, teacher {self.state['teacher']}, "
                     f"alpha {cfg.distill.alpha}, T {cfg.distill.temperature}, {cfg.distill.divergence}, "
                     f"lambda {cfg.distill.lmbda}; {steps} steps of {cfg.training.micro_batch} x "
                     f"{cfg.training.grad_accum} x {self.dist.world} rows; run dir {cfg.run_dir}")
        metrics_f = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if main else None
        bar = None
        if main and cfg.metrics.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="distill", file=sys.stderr, dynamic_ncols=True)
        last: dict = {}
        started = time.perf_counter()
        try:
            while self.step < steps:
                last = self.train_step()
                self.step += 1
                last["step"] = self.step
                t = cfg.training.max_seconds
                if t and float(all_reduce_sum(torch.tensor([time.perf_counter() - started], dtype=torch.float64),
                                              self.dist.world)) / self.dist.world >= t:
                    self.log(f"time budget of {t:.0f}s reached at step {self.step}")
                    steps = self.step
                if self.step == steps or (cfg.metrics.eval_every and self.step % cfg.metrics.eval_every == 0):
                    last.update(self.evaluate())
                    if main:
                        self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                                                                   if k.startswith(("val_", "accuracy"))))
                if metrics_f:
                    metrics_f.write(json.dumps(last) + "\n")
                    metrics_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", agree=f"{last.get('top1_agreement', 0):.3f}")
                    bar.update(1)
                if self.step == steps or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
        finally:
            if metrics_f:
                metrics_f.close()
            if bar is not None:
                bar.close()
        if main:
            final = os.path.join(cfg.run_dir, "final")
            save_model(self.student, final)
            shutil.copy(self.tokenizer_path, os.path.join(final, "tokenizer.json"))
        return last


def main(argv: list[str] | None = None) -> int:
    return run_job(DistillConfig, argv, "python -m distill.train", __doc__, run,
                   threads=lambda cfg: cfg.training.threads, errors=(DataError, VocabMismatch, ValueError))


def run(cfg: DistillConfig, dist: DistInfo) -> int:
    trainer = DistillTrainer(cfg, dist)
    trainer.maybe_resume()
    last = trainer.run()
    if dist.is_main:
        print(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
