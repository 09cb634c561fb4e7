"""GRPO, R1-Zero style: `python -m rl.grpo [--config configs/grpo_*.toml] [--section.key=value ...]`
(also under `torchrun --nproc_per_node=N -m rl.grpo [--parallelism.tp T] [--parallelism.ep E]`).

One step (DeepSeekMath §4.1, R1 §2.2):
 1. take `prompts_per_step` prompts (each data-parallel replica a contiguous share of whole prompt groups);
 2. sample `num_generations` (G) completions per prompt with seekstack's latent-cache generator; the generator's
    per-token log-probs are the old-policy log-probs (same kernels as training; the max |Δlogp| against the
    training recomputation is logged as `logp_diff_max`);
 3. score them with the rule-based rewards (parallel workers, time-limited), gather over ranks, group advantages;
    optionally drop groups whose rewards have zero spread and refill them (DAPO dynamic sampling);
 4. reference log-probs from the frozen initial policy (skipped when beta = 0);
 5. `num_iterations` (mu) passes; each pass is `steps_per_generation` optimizer steps over equal slices of the
    groups, micro-batched; the loss is rl/loss.py's with one normaliser per optimizer step (exact under
    micro-batching and data parallelism);
 6. AdamW step, then the MoE aux-loss-free bias update from the step's loads (`bias_update_speed`, 0 disables).

Option names follow TRL's GRPOConfig where the concept is the same (num_generations, max_completion_length,
temperature, top_p, top_k, num_iterations, epsilon, epsilon_high, beta, loss_type, scale_rewards,
mask_truncated_completions, reward_weights).

Under torchrun (train/distributed.py): the policy (and the reference) are sharded for the layout. Rollouts run per
MODEL-PARALLEL GROUP (the `mp` consecutive ranks joined by TP or EP collectives; one group per process without
tp/ep): every rank of a group generates the group's contiguous share of the step's prompts with the same sampling
seed, hash((seed, step, group index, refill round)), so they run the same decode steps. Training runs per
DATA-PARALLEL REPLICA: replica d trains on prompts [d * P/dp, (d+1) * P/dp) of the step (whole groups, inside its
model-parallel group's share). Rewards are gathered over all groups before advantages (scale_rewards=batch sees the
whole step), the loss normaliser counts over the data-parallel group, gradients go through model/parallel's
sync_gradients and the layout-aware clip, and the expert-bias update sums the loads over the data-parallel group.
With tp = ep = 1 and one process this is the single-process algorithm exactly; with tp = 2 on 2 processes (one
group, one replica), or ep = 2 (one group of two replicas), the step is the single-process step on the same prompts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from model.balance import update_expert_bias
from model.generate import GenerationOutput, check_sampling, generate
from model.parallel import clip_grad_norm_, comm_stats, sync_gradients
from train.checkpoint import (CheckpointCorrupt, CheckpointMismatch, export_final, resolve_resume, restore_checkpoint,
                              save_checkpoint)
from train.entry import run_job
from train.config import CheckpointConfig, JobConfigError, MetricsConfig, OptimizerConfig, ParallelismConfig, to_toml
from train.distributed import DistInfo, dp_max, dp_sum, world_gather, world_sum
from train.optim import build_optimizer, lr_at, set_lr
from train.pretrain import load_for_layout, validate_parallelism
from train.trainer import comm_metrics, truncate_jsonl

from .logprobs import completion_logprobs
from .loss import LOSS_TYPES, SCALE_REWARDS, LossStats, group_advantages, grpo_loss, loss_normalizer
from .rewards import RewardResult, RewardRunner, SoftOverlongPenalty
from .sources import build_source


@dataclass
class GRPOModel:
    init_from: str = "runs/pretrain/final"  # seekstack checkpoint (with tokenizer.json) to start from
    bias_update_speed: float = 0.001  # gamma of the MoE bias update during RL; 0 disables


@dataclass
class GRPOTask:
    name: str = "addition"  # addition | arithmetic | countdown | PATH.jsonl
    template: str = ""  # prompt template with {question}; "" = the task's default
    # built-in names (accuracy, format, tag_count, language_consistency, countdown, soft_overlong) or module:function
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1])
    # worker processes evaluating rewards (a reward that raises, hangs or crashes scores 0 and is counted); 0 = in
    # this process with a thread time limit (faster, but a crash takes the run down and a hung call keeps its thread)
    reward_workers: int = 2
    reward_timeout_s: float = 5.0
    overlong_cache_length: int = 0  # soft_overlong (DAPO): the penalty ramps over the last L_cache tokens; 0 = max/4


@dataclass
class GRPOHyper:
    steps: int = 60
    prompts_per_step: int = 16
    num_generations: int = 8  # G
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_iterations: int = 1  # mu
    steps_per_generation: int = 1  # optimizer steps per generation batch (each on a slice of the groups)
    micro_batch: int = 64  # sequences per forward/backward (per data-parallel replica)
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0 = same as epsilon; DAPO clip-higher uses 0.28
    beta: float = 0.0  # KL coefficient (R1: 0.001); 0 skips the reference model
    loss_type: str = "dapo"  # grpo | bnpo | dapo | dr_grpo
    scale_rewards: str | bool = "group"  # group | batch | none (Dr. GRPO); TRL's true / false = group / none
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False  # DAPO: drop zero-spread groups and refill
    max_refills: int = 3
    share_prompts: bool = True  # one forward per distinct prompt in the update, not G (rl/logprobs.py)
    threads: int = 0


@dataclass
class GRPOMetrics(MetricsConfig):
    eval_every: int = 20
    eval_problems: int = 128  # held-out problems for greedy pass@1 and sampled mean@k
    eval_samples: int = 8  # k of mean@k; 0 skips the sampled accuracy
    log_samples: int = 2  # completions written to samples.jsonl per step


@dataclass
class GRPOConfig:
    run_dir: str = "runs/grpo"
    seed: int = 0
    resume: str = ""
    model: GRPOModel = field(default_factory=GRPOModel)
    task: GRPOTask = field(default_factory=GRPOTask)
    grpo: GRPOHyper = field(default_factory=GRPOHyper)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, weight_decay=0.0, warmup_steps=3, schedule="constant", grad_clip=1.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=20, keep=2))
    metrics: GRPOMetrics = field(default_factory=GRPOMetrics)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)

    def validate(self) -> None:
        g = self.grpo
        if g.num_generations < 2:
            raise JobConfigError("`grpo.num_generations` must be >= 2 (advantages compare completions of a prompt)")
        if g.loss_type not in LOSS_TYPES:
            raise JobConfigError(f"`grpo.loss_type` is {g.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        if isinstance(g.scale_rewards, bool) or g.scale_rewards in ("true", "false"):  # TRL's boolean form
            g.scale_rewards = "group" if g.scale_rewards in (True, "true") else "none"
        if g.beta < 0:
            raise JobConfigError(f"`grpo.beta` (KL coefficient) must be >= 0, got {g.beta}")
        if g.scale_rewards not in SCALE_REWARDS:
            raise JobConfigError(f"`grpo.scale_rewards` is {g.scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}")
        if g.prompts_per_step % g.steps_per_generation:
            raise JobConfigError("`grpo.prompts_per_step` must be divisible by `grpo.steps_per_generation`")
        if len(self.task.rewards) != len(self.task.reward_weights):
            raise JobConfigError(f"{len(self.task.rewards)} `task.rewards` but {len(self.task.reward_weights)} "
                                 f"`task.reward_weights`")
        for key in ("steps", "prompts_per_step", "max_completion_length", "num_iterations", "micro_batch"):
            if getattr(g, key) < 1:
                raise JobConfigError(f"`grpo.{key}` must be >= 1")
        if g.temperature <= 0:
            raise JobConfigError(f"`grpo.temperature` must be > 0 (GRPO samples, and its log-probs divide by it), "
                                 f"got {g.temperature}")
        try:
            check_sampling(g.temperature, g.top_k, g.top_p)
        except ValueError as e:
            raise JobConfigError(f"`grpo.*` sampling: {str(e).removeprefix('generate: ')}") from None
        validate_parallelism(self.parallelism)

    def validate_layout(self, dist: DistInfo) -> None:
        """Checks that need the world size: every data-parallel replica gets whole prompt groups, equal slices."""
        g, dp = self.grpo, dist.dp
        if g.prompts_per_step % dp:
            raise JobConfigError(f"`grpo.prompts_per_step` = {g.prompts_per_step} must be divisible by the data-"
                                 f"parallel size dp = {dist.world} processes / tp {dist.tp} = {dp} (a prompt's group "
                                 f"never crosses replicas)")
        if (g.prompts_per_step // dp * g.num_generations) % g.steps_per_generation:
            raise JobConfigError(f"each replica's {g.prompts_per_step // dp} prompts x {g.num_generations} "
                                 f"generations do not split into `grpo.steps_per_generation` = "
                                 f"{g.steps_per_generation} equal slices; change prompts_per_step")


# ------------------------------------------------------------------------------------------------ rollout helpers
class TextCodec:
    """Token ids <-> text with the checkpoint's tokenizer; completions drop EOS/padding, keep tag tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise JobConfigError(f"{tok_path}: GRPO needs the checkpoint's tokenizer.json")
        self.path = tok_path
        self.tok = Tokenizer.from_file(tok_path)
        self.eos = [i for i in (self.tok.token_to_id(t) for t in ("<|endoftext|>", "</s>")) if i is not None]
        self.pad = self.tok.token_to_id("<|pad|>")
        drop = set(self.eos) | ({self.pad} if self.pad is not None else set())
        self.drop = drop

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self.drop], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------ the trainer
class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        cfg.validate_layout(dist)
        self.codec = TextCodec(cfg.model.init_from)
        self.policy = load_for_layout(cfg.model.init_from, dist)  # this rank's shards, any checkpoint layout
        self.policy.config.bias_update_speed = cfg.model.bias_update_speed
        self.reference = None
        if cfg.grpo.beta > 0:
            self.reference = load_for_layout(cfg.model.init_from, dist).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.optimizer = build_optimizer(self.policy, cfg.optimizer)
        self.source = build_source(cfg.task.name, cfg.seed, cfg.task.template)
        self.rewards = RewardRunner(build_rewards(cfg), cfg.task.reward_weights, cfg.task.reward_workers,
                                    cfg.task.reward_timeout_s)
        self.step = 0
        self._warned_no_heldout = False
        self.state = {"reference": os.path.abspath(cfg.model.init_from), "samples_seen": 0}
        self.total_steps = cfg.grpo.steps * cfg.grpo.num_iterations * cfg.grpo.steps_per_generation

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    # ---------------------------------------------------------------------------------------- resume
    def maybe_resume(self) -> None:
        """Collective under torchrun: every rank restores its shards and optimizer state of the same checkpoint."""
        resume = self.cfg.resume
        if not resume:
            return
        try:
            path = resolve_resume(resume, self.cfg.run_dir, self.dist, log=self.log)
        except CheckpointCorrupt as e:
            raise JobConfigError(str(e)) from None
        if path is None:
            self.log("resume=auto: no checkpoint yet, starting fresh")
            return
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                reference = json.load(f).get("reference")
        except (OSError, json.JSONDecodeError):
            reference = self.state["reference"]  # restore_checkpoint names the problem
        if reference != self.state["reference"]:
            raise JobConfigError(f"{path}: was trained against reference {reference}, but "
                                 f"model.init_from is {self.state['reference']}")
        try:
            state = restore_checkpoint(path, self.policy, self.optimizer, self.dist)
        except (CheckpointCorrupt, CheckpointMismatch) as e:
            raise JobConfigError(f"cannot resume: {e}") from None
        self.step = state.pop("step")
        self.state.update(state)
        if self.dist.is_main:  # the steps after the checkpoint are run again: their old log rows go
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(os.path.join(self.cfg.run_dir, name), self.step)
        self.log(f"resumed from {path} at step {self.step}")

    # ---------------------------------------------------------------------------------------- rollout
    def rollout(self, rows, step: int, salt: int = 0) -> dict:
        """Sample G completions of each row and score them. Collective over the model-parallel group: its ranks
        pass the same rows and share the seed (the group index; the process rank without tp/ep)."""
        g = self.cfg.grpo
        G = g.num_generations
        prompts = [self.codec.encode(r.prompt) for r in rows for _ in range(G)]
        gen = torch.Generator(device=self.dist.device).manual_seed(
            hash((self.cfg.seed, step, self.dist.mp_index, salt)) % (2**63))
        t0 = time.perf_counter()
        out = generate(self.policy, prompts, g.max_completion_length, temperature=g.temperature, top_k=g.top_k,
                       top_p=g.top_p, eos_token_id=self.codec.eos, pad_token_id=self.codec.pad or 0,
                       generator=gen)
        seconds = time.perf_counter() - t0
        texts = [self.codec.decode(ids) for ids in out.completions()]
        prompt_texts = [r.prompt for r in rows for _ in range(G)]
        fields = {k: [r.fields[k] for r in rows for _ in range(G)] for k in rows[0].fields}
        result = self.rewards(prompt_texts, texts, completion_ids=out.completions(), **fields)
        return {"out": out, "texts": texts, "prompts": prompt_texts, "rewards": result,
                "answers": fields.get("answer"), "seconds": seconds, "rows": rows}

    def gather_rewards(self, group_rewards: torch.Tensor) -> torch.Tensor:
        """The step's rewards [prompts_per_step * G] in prompt order on every rank, from this rank's model-parallel
        group's [prompts_per_step / groups * G]: all-gathered over the world, each group's first rank's copy taken
        (the ranks of a group score the same completions; one copy keeps every rank's decisions identical)."""
        if self.dist.world == 1:
            return group_rewards
        rows = world_gather(group_rewards, self.dist)  # [world, n]
        return rows[::self.dist.mp].flatten()  # groups are consecutive blocks of mp ranks

    def _shares(self) -> tuple[int, int, slice, slice]:
        """(prompts per model-parallel group, per replica, this replica's sequences in the step, the same rows
        inside its group's rollout)."""
        d, G, P = self.dist, self.cfg.grpo.num_generations, self.cfg.grpo.prompts_per_step
        per_group, per_replica = P // d.mp_groups, P // d.dp
        first = d.dp_rank * per_replica  # replica d's first prompt; its group starts at mp_index * per_group
        own = slice(first * G, (first + per_replica) * G)
        offset = first - d.mp_index * per_group
        return per_group, per_replica, own, slice(offset * G, (offset + per_replica) * G)

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        G = g.num_generations
        t_start = time.perf_counter()
        comm_stats.reset()
        per_group, _, own, in_group = self._shares()
        r = self.dist.mp_index
        rows = self.source.train_rows(self.step, g.prompts_per_step)[r * per_group:(r + 1) * per_group]
        roll = self.rollout(rows, self.step)
        all_rewards = self.gather_rewards(torch.tensor(roll["rewards"].total, dtype=torch.float32))
        self._last_roll = roll
        refills = 0
        if g.dynamic_sampling:
            roll, all_rewards, refills = self._dynamic_sampling(roll, all_rewards)
            self._last_roll = roll
        adv_all = group_advantages(all_rewards, G, g.scale_rewards)
        rewards, advantages = all_rewards[own], adv_all[own]  # this replica's sequences
        n_local = rewards.numel()
        zero_std = float((all_rewards.view(-1, G).std(dim=1) == 0).float().mean())

        out = _rows_of(roll["out"], in_group)
        completion_mask = out.completion_mask.clone()
        truncated = ~out.finished
        if g.mask_truncated_completions:
            completion_mask &= ~truncated[:, None]
        old_logp = out.logprobs
        ref_logp = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = completion_logprobs(self.reference, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                               out.completion_mask, g.temperature, g.share_prompts)[0]

        t_train = time.perf_counter()
        stats, logp_diff, entropy_sum, loads_steps = LossStats(), 0.0, 0.0, []
        order = torch.arange(n_local)
        slices = order.view(g.steps_per_generation, -1) if g.steps_per_generation > 1 else order[None]
        self.policy.train()
        lr, stepped = 0.0, 0
        for it in range(g.num_iterations):
            for sl in slices:
                lr = lr_at(self.state.get("optimizer_steps", 0), self.total_steps, cfg.optimizer)
                set_lr(self.optimizer, lr)
                lengths = completion_mask[sl].sum(1)
                counts = dp_sum(torch.tensor([float(len(sl)), float(lengths.sum())], dtype=torch.float64),
                                self.dist)
                normalizer = self._normalizer(counts)
                for mb in sl.split(g.micro_batch):
                    logp, entropy = completion_logprobs(self.policy, out.prompt_ids[mb], out.prompt_mask[mb],
                                                        out.completion_ids[mb], out.completion_mask[mb],
                                                        g.temperature, g.share_prompts)
                    m = completion_mask[mb]
                    if it == 0:
                        if stepped == 0:  # later slices see a policy already moved by this step's updates
                            diff = (logp.detach() - old_logp[mb]).abs()[out.completion_mask[mb]]
                            logp_diff = max(logp_diff, float(diff.max()) if diff.numel() else 0.0)
                        entropy_sum += float(entropy.detach()[m].sum())
                    res = grpo_loss(logp, old_logp[mb], None if ref_logp is None else ref_logp[mb], advantages[mb],
                                    m, loss_type=g.loss_type, epsilon=g.epsilon,
                                    epsilon_high=g.epsilon_high or None, beta=g.beta, normalizer=normalizer)
                    res.loss.backward()
                    stats = stats + res.stats
                sync_gradients(self.policy, self.dist.layout)
                clip_grad_norm_(self.policy, self.dist.layout, cfg.optimizer.grad_clip or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                loads = update_expert_bias(self.policy, self.policy.config.bias_update_speed,
                                           reduce_fn=self.dist.layout.reduce_expert_load)
                if loads is not None:
                    loads_steps.append(loads)
                self.state["optimizer_steps"] = self.state.get("optimizer_steps", 0) + 1
                stepped += 1
        train_seconds = time.perf_counter() - t_train
        comm = comm_stats.snapshot()
        metrics = self._metrics(roll, out, rewards, adv_all, stats, completion_mask, truncated, zero_std, logp_diff,
                                entropy_sum, lr, refills, time.perf_counter() - t_start, train_seconds, loads_steps,
                                in_group)
        if self.dist.world > 1:
            metrics.update(comm_metrics(comm, self.dist))
        return metrics

    def _normalizer(self, counts: torch.Tensor) -> float:
        """rl.loss's normaliser for one optimizer step from the (dp-summed) sequence and token counts."""
        g = self.cfg.grpo
        n_seq, n_tok = int(counts[0]), int(counts[1])
        lengths = [n_tok] + [0] * (n_seq - 1)  # only the totals matter to the normaliser
        if n_tok == 0:  # every completion masked (e.g. all truncated): the loss is 0 whatever divides it
            return 1.0
        return loss_normalizer(torch.tensor(lengths), g.loss_type, g.max_completion_length, self.dist.dp)

    def _dynamic_sampling(self, roll, all_rewards):
        """DAPO: replace groups whose rewards have zero spread with fresh prompts, up to max_refills rounds.

        Decided on the step's gathered rewards, so every rank runs the same rounds; the dead groups of all
        model-parallel groups draw one batch of fresh rows, each group rolling out its own (in prompt order)."""
        g = self.cfg.grpo
        G = g.num_generations
        per_group = g.prompts_per_step // self.dist.mp_groups
        lo = self.dist.mp_index * per_group
        refills = 0
        for attempt in range(1, g.max_refills + 1):
            dead = (all_rewards.view(-1, G).std(dim=1) == 0).nonzero().flatten().tolist()
            if not dead:
                break
            fresh_rows = self.source.train_rows(10_000_000 + self.step * 97 + attempt, len(dead))
            mine = [i for i, group in enumerate(dead) if lo <= group < lo + per_group]
            if mine:
                fresh = self.rollout([fresh_rows[i] for i in mine], self.step, salt=attempt)
                roll = _replace_groups(roll, fresh, [dead[i] - lo for i in mine], G)
            all_rewards = self.gather_rewards(torch.tensor(roll["rewards"].total, dtype=torch.float32))
            refills += len(dead)
        return roll, all_rewards, refills

    # ---------------------------------------------------------------------------------------- metrics
    def _metrics(self, roll, out, rewards, adv_all, stats, completion_mask, truncated, zero_std, logp_diff,
                 entropy_sum, lr, refills, step_seconds, train_seconds, loads_steps, in_group) -> dict:
        """Sums over the data-parallel group of this replica's sequences (`out`, `rewards`: its share)."""
        lengths = out.completion_mask.sum(1).float()
        rr = roll["rewards"]
        names = list(rr.per_function)
        per_function = [v for k in names for v in (sum(rr.per_function[k][in_group]),  # this replica's share
                                                   sum(x * x for x in rr.per_function[k][in_group]))]
        local = torch.tensor([float(rewards.sum()), float((rewards ** 2).sum()), float(rewards.numel()),
                              float(lengths.sum()), float(truncated.float().sum()), stats.num_tokens,
                              stats.clip_low, stats.clip_high, stats.outside, stats.kl_sum, stats.ratio_sum,
                              entropy_sum, float(completion_mask.sum()), *per_function], dtype=torch.float64)
        tot = dp_sum(local, self.dist)
        peaks = dp_max(torch.tensor([float(lengths.max()), logp_diff], dtype=torch.float64), self.dist)
        # error / timeout counts are per rollout (model-parallel group), counted by each of its mp ranks
        failures = world_sum(torch.tensor([float(c) for k in names for c in (rr.errors[k], rr.timeouts[k])],
                                          dtype=torch.float64), self.dist) / self.dist.mp
        n = tot[2]
        mean = tot[0] / n
        metrics = {
            "step": self.step + 1, "lr": lr, "reward_mean": float(mean),
            "reward_std": float((tot[1] / n - mean ** 2).clamp(min=0).sqrt()),
            "completion_length_mean": float(tot[3] / n), "completion_length_max": int(peaks[0]),
            "truncation_rate": float(tot[4] / n), "frac_reward_zero_std": zero_std,
            "clip_ratio/low_mean": float(tot[6] / tot[5].clamp(min=1)),
            "clip_ratio/high_mean": float(tot[7] / tot[5].clamp(min=1)),
            "clip_ratio/region_mean": float(tot[8] / tot[5].clamp(min=1)),
            "kl": float(tot[9] / tot[5].clamp(min=1)), "ratio_mean": float(tot[10] / tot[5].clamp(min=1)),
            "entropy": float(tot[11] / tot[12].clamp(min=1)), "logp_diff_max": float(peaks[1]),
            "rollout_tokens_per_s": float(roll["out"].completion_mask.sum()) / roll["seconds"],
            "train_tokens_per_s": float(tot[5]) / max(train_seconds, 1e-9) / self.dist.dp,
            "rollout_seconds": roll["seconds"], "train_seconds": train_seconds, "step_seconds": step_seconds,
            "refilled_groups": refills, "advantage_abs_mean": float(adv_all.abs().mean()),
        }
        for i, name in enumerate(names):
            f_mean = float(tot[13 + 2 * i]) / max(float(n), 1.0)
            metrics[f"rewards/{name}/mean"] = f_mean
            metrics[f"rewards/{name}/std"] = max(float(tot[14 + 2 * i]) / max(float(n), 1.0) - f_mean ** 2, 0.0) ** 0.5
            metrics[f"rewards/{name}/errors"] = int(round(float(failures[2 * i])))
            metrics[f"rewards/{name}/timeouts"] = int(round(float(failures[2 * i + 1])))
        for name in ("accuracy", "accuracy_reward"):
            if f"rewards/{name}/mean" in metrics:
                metrics["accuracy_train_sampled"] = metrics[f"rewards/{name}/mean"]
        if loads_steps:
            loads = loads_steps[-1]
            metrics["expert_load"] = loads.tolist()
            metrics["expert_load_max_over_mean"] = [round(float(x), 4)
                                                    for x in loads.max(1).values / loads.mean(1).clamp(min=1e-9)]
        for name, messages in rr.messages.items():  # say why a reward scored 0, not only how often
            self.log(f"warning: step {self.step + 1}: reward {name}: {rr.errors[name]} errors, "
                     f"{rr.timeouts[name]} timeouts; first: {messages[0]}")
        if metrics["truncation_rate"] > 0.5:
            self.log(f"warning: step {self.step + 1}: {metrics['truncation_rate']:.0%} of completions hit "
                     f"max_completion_length={self.cfg.grpo.max_completion_length} (raise it, or their rewards are "
                     f"mostly format failures)")
        if zero_std > 0.5:
            self.log(f"warning: step {self.step + 1}: {zero_std:.0%} of groups have zero reward spread and give no "
                     f"gradient (the silent-zero-gradient trap); consider grpo.dynamic_sampling=true, a larger "
                     f"num_generations, or a higher temperature")
        return metrics

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy pass@1 and sampled mean@k on held-out rows (each model-parallel group generates its share; the
        sums over all ranks count every group mp times, which the ratio cancels)."""
        from .evaluate import heldout_accuracy

        m, g = self.cfg.metrics, self.cfg.grpo
        rows = self.source.heldout_rows(m.eval_problems)
        if not rows:  # e.g. a small JSONL whose held-out split is empty: report nothing rather than NaN
            if not self._warned_no_heldout:
                self.log(f"warning: task {self.cfg.task.name!r} has no held-out rows (or metrics.eval_problems = 0); "
                         f"held-out accuracy is not measured")
                self._warned_no_heldout = True
            return {}
        share = len(rows) // self.dist.mp_groups
        r = self.dist.mp_index
        rows = rows[r * share:(r + 1) * share] or rows
        acc = heldout_accuracy(self.policy, self.codec, rows, g.max_completion_length, m.eval_samples,
                               g.temperature, g.top_p, g.top_k, seed=self.cfg.seed)
        k = m.eval_samples
        res = torch.tensor([acc["accuracy"] * len(rows), float(len(rows)),
                            acc.get(f"accuracy_mean@{k}", 0.0) * len(rows) * k, float(len(rows) * k)],
                           dtype=torch.float64)
        res = world_sum(res, self.dist)
        out = {"accuracy": float(res[0] / res[1])}
        if m.eval_samples:
            out[f"accuracy_mean@{m.eval_samples}"] = float(res[2] / res[3])
        return out

    # ---------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.run_dir, exist_ok=True)
        main = self.dist.is_main
        if main:
            with open(os.path.join(cfg.run_dir, "job.toml"), "w") as f:
                f.write(to_toml(cfg))
        metrics_f = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a") if main else None
        samples_f = open(os.path.join(cfg.run_dir, "samples.jsonl"), "a") if main else None
        bar = None
        if main and cfg.metrics.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.grpo.steps, initial=self.step, desc="grpo", file=sys.stderr, dynamic_ncols=True)
        summary = {}
        try:
            if self.step == 0:
                summary["before"] = self.evaluate()
                self.log(f"held-out before GRPO: {summary['before']}")
                if metrics_f:
                    metrics_f.write(json.dumps({"step": 0, **summary["before"]}) + "\n")
            last = {}
            while self.step < cfg.grpo.steps:
                last = self.train_step()
                self.step += 1
                if self.step == cfg.grpo.steps or (cfg.metrics.eval_every and self.step % cfg.metrics.eval_every == 0):
                    held_out = self.evaluate()
                    last.update(held_out)
                    if held_out:
                        self.log(f"step {self.step}: held-out accuracy {held_out['accuracy']:.3f}")
                if metrics_f:
                    metrics_f.write(json.dumps(last) + "\n")
                    metrics_f.flush()
                if samples_f and cfg.metrics.log_samples:
                    self._log_samples(samples_f)
                if bar is not None:
                    bar.set_postfix(reward=f"{last['reward_mean']:.3f}", len=f"{last['completion_length_mean']:.0f}")
                    bar.update(1)
                if self.step == cfg.grpo.steps or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    save_checkpoint(cfg.run_dir, self.step, self.policy, self.optimizer, self.state, to_toml(cfg),
                                    keep=cfg.checkpoint.keep, model_files=[self.codec.path], dist=self.dist)
            summary["after"] = {k: v for k, v in last.items() if k.startswith("accuracy")}
        finally:
            for f in (metrics_f, samples_f):
                if f:
                    f.close()
            if bar is not None:
                bar.close()
            self.rewards.close()
        export_final(self.policy, os.path.join(cfg.run_dir, "final"), self.dist, [self.codec.path])
        return summary

    def _log_samples(self, f) -> None:
        roll = getattr(self, "_last_roll", None)
        if roll is None:
            return
        for i in range(min(self.cfg.metrics.log_samples, len(roll["texts"]))):
            f.write(json.dumps({"step": self.step, "prompt": roll["prompts"][i], "completion": roll["texts"][i],
                                "reward": roll["rewards"].total[i]}) + "\n")
        f.flush()


def build_rewards(cfg: GRPOConfig) -> list:
    """The reward specs of `task.rewards`, with `soft_overlong` bound to this run's lengths (DAPO eq. 13)."""
    g, t = cfg.grpo, cfg.task
    cache = t.overlong_cache_length or max(1, g.max_completion_length // 4)
    return [SoftOverlongPenalty(g.max_completion_length, min(cache, g.max_completion_length))
            if spec == "soft_overlong" else spec for spec in t.rewards]


def _rows_of(out: GenerationOutput, rows: slice) -> GenerationOutput:
    """The sequences `rows` of a rollout (padding widths kept: the loss and log-probs ignore padding)."""
    return GenerationOutput(out.prompt_ids[rows], out.prompt_mask[rows], out.completion_ids[rows],
                            out.completion_mask[rows], out.logprobs[rows], out.finished[rows])


def _replace_groups(roll, fresh, dead: list[int], G: int) -> dict:
    """Put fresh groups in place of the dead ones (tensors re-padded to a common width)."""
    a, b = roll["out"], fresh["out"]
    rows_a = [i * G + j for i in range(len(dead)) for j in range(G)]
    rows_dead = [d * G + j for d in dead for j in range(G)]

    def merge_left(x, y, fill):
        width = max(x.shape[1], y.shape[1])
        x2 = torch.nn.functional.pad(x, (width - x.shape[1], 0), value=fill)
        y2 = torch.nn.functional.pad(y, (width - y.shape[1], 0), value=fill)
        x2[rows_dead] = y2[rows_a]
        return x2

    def merge_right(x, y, fill):
        width = max(x.shape[1], y.shape[1])
        x2 = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)
        y2 = torch.nn.functional.pad(y, (0, width - y.shape[1]), value=fill)
        x2[rows_dead] = y2[rows_a]
        return x2

    finished = a.finished.clone()
    finished[rows_dead] = b.finished[rows_a]
    out = GenerationOutput(merge_left(a.prompt_ids, b.prompt_ids, 0), merge_left(a.prompt_mask, b.prompt_mask, False),
                           merge_right(a.completion_ids, b.completion_ids, 0),
                           merge_right(a.completion_mask, b.completion_mask, False),
                           merge_right(a.logprobs, b.logprobs, 0.0), finished)
    texts, prompts = list(roll["texts"]), list(roll["prompts"])
    for src, dst in zip(rows_a, rows_dead):
        texts[dst], prompts[dst] = fresh["texts"][src], fresh["prompts"][src]
    old_r, new_r = roll["rewards"], fresh["rewards"]
    total = list(old_r.total)
    per_function = {name: list(scores) for name, scores in old_r.per_function.items()}
    for src, dst in zip(rows_a, rows_dead):
        total[dst] = new_r.total[src]
        for name in per_function:
            per_function[name][dst] = new_r.per_function[name][src]
    # errors / timeouts count every reward call the step made, the dropped groups' included
    rewards = RewardResult(per_function=per_function, total=total,
                           errors={k: v + new_r.errors[k] for k, v in old_r.errors.items()},
                           timeouts={k: v + new_r.timeouts[k] for k, v in old_r.timeouts.items()},
                           messages={**new_r.messages, **old_r.messages}, seconds=old_r.seconds + new_r.seconds)
    return dict(roll, out=out, texts=texts, prompts=prompts, rewards=rewards)


def run(cfg: GRPOConfig, dist) -> int:
    trainer = GRPOTrainer(cfg, dist)
    trainer.maybe_resume()
    summary = trainer.run()
    if dist.is_main:
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(GRPOConfig, argv, "python -m rl.grpo", __doc__, run, threads=lambda cfg: cfg.grpo.threads,
                   errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
