"""seekstack's GRPO loop vs TRL's GRPOTrainer on the same model, prompts, lengths and sampling: seconds per step.

    PYTHONPATH=. python -m bench.grpo_bench [--steps 5] [--quick] [--threads 2] [--attn auto|sdpa|eager]
                                            [--quiet-wait S] [--work DIR] [--out bench/results]

One seekstack model (preset `small` with the built-in tokenizer, random init, num_nextn_predict_layers=0,
aux_loss_alpha=0) is saved with model.save_model and exported to the transformers layout with tools/export_hf.py
(plus a tokenizer_config.json for PreTrainedTokenizerFast: eos `<|endoftext|>`, pad `<|pad|>`). Then, each in its own
subprocess at the same thread count:

* seekstack: rl.grpo.GRPOTrainer built from rl.grpo's own CLI (`load_job_config`), `train_step()` called directly
  (the held-out evaluation that `run()` does before training is skipped: it is not part of a step);
* TRL: trl.GRPOTrainer on `AutoModelForCausalLM.from_pretrained(HF_DIR)` (DeepseekV3ForCausalLM, fp32,
  experts_implementation="grouped_mm"; attn_implementation per phase, the faster of "sdpa" / "eager" for generation
  and for training, measured first on the step-0 batch unless --attn names one), transformers generation
  (use_vllm=False, its default DynamicCache).

Both sides: the addition task's prompts `build_source("addition", 0).train_rows(step, P)` for steps 0..N (TRL's
dataset holds exactly those rows in order, shuffle_dataset=False, so step s sees the same P prompts), G completions
each (generation batch P*G), max_completion_length L, temperature 1, top_p 1, top_k 0, num_iterations 1, beta 0,
loss_type "dapo", scale_rewards "group", epsilon 0.2, lr 1e-5 constant, grad clip 1.0, one optimizer step per
generation batch (one micro-batch of P*G sequences), fp32, rewards rl.rewards.accuracy_reward + format_reward
(weights 1.0, 0.1; TRL's wrappers decode completion_ids like seekstack does, keeping the tag tokens).

Timing, per step (wall clock): seekstack around `train_step()`; TRL from the on_step_begin to the on_step_end
callback (TRL's logging after on_step_end is not counted). rollout = everything before the policy update:
seekstack's t_train - t_start (generation, rewards, advantages), TRL's `_generate_and_score_completions`
(generation, decoding, rewards, advantages, its bookkeeping). update = step - rollout (forward + backward + clip +
AdamW). The pure generate call is reported separately. The two processes live side by side but never step at the
same time: the orchestrator interleaves their steps (seekstack then TRL on even steps, TRL then seekstack on odd ones)
so slow drift of a shared machine's load hits both. The first step is a warmup; medians over the others are quoted.
Before each step we wait (bounded) for other processes to go quiet and record the foreign CPU load during the step
(bench/timing.py), and each step's CPU time. Results: <out>/grpo_bench.{json,md} (--quick: grpo_bench_quick.*;
--threads T other than 2 adds _tT).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.timing import ForeignLoad, load_average, machine_info, wait_quiet, write_results

# Workloads. `reference` is what the issue asks for; `quick` is a smoke run (tiny model, short lengths).
WORKLOADS = {
    "reference": dict(preset="small", prompts_per_step=8, num_generations=8, max_completion_length=48, steps=5,
                      quiet_wait_s=5.0),
    "quick": dict(preset="tiny", prompts_per_step=2, num_generations=4, max_completion_length=8, steps=2,
                  quiet_wait_s=0.0),
}
TASK, SEED, LR = "addition", 0, 1e-5
REWARDS, REWARD_WEIGHTS = ("accuracy", "format"), (1.0, 0.1)
ATTN_IMPLS = ("sdpa", "eager")
SIDES = ("seekstack", "trl")
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


# ------------------------------------------------------------------------------------------------------------------
# The model, in both layouts


def build_checkpoints(work: str, preset_name: str, seed: int = SEED) -> dict:
    """seekstack checkpoint (+ tokenizer.json) at work/seekstack, its transformers export at work/hf."""
    from model import Transformer, preset, save_model
    from tools.export_hf import export
    from train.corpus import build_tokenizer

    tok = build_tokenizer()
    eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    cfg = preset(preset_name, vocab_size=tok.get_vocab_size(), num_nextn_predict_layers=0, aux_loss_alpha=0.0,
                 eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    src, dst = os.path.join(work, "seekstack"), os.path.join(work, "hf")
    save_model(model, src)
    tok.save(os.path.join(src, "tokenizer.json"))
    export(src, dst, overwrite=True, quiet=True)  # copies tokenizer.json too
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}, f,
                  indent=2)
    return {"seekstack_dir": src, "hf_dir": dst, "preset": preset_name, "vocab_size": cfg.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "eos_token_id": eos, "pad_token_id": pad}


def prompt_rows(steps: int, per_step: int) -> list:
    """The rows seekstack's loop draws at steps 0..steps-1, in order."""
    from rl.sources import build_source

    source = build_source(TASK, SEED)
    return [row for step in range(steps) for row in source.train_rows(step, per_step)]


# ------------------------------------------------------------------------------------------------------------------
# Per-step recording shared by both workers


def cpu_now() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    t = os.times()
    return t.user + t.system


class CpuTimer:
    """Wraps a callable; appends (wall s, CPU s) of every call to `self.calls`."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        t, c = time.perf_counter(), cpu_now()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append((time.perf_counter() - t, cpu_now() - c))

    def since(self, n: int) -> tuple[float, float]:
        return sum(w for w, _ in self.calls[n:]), sum(c for _, c in self.calls[n:])


class StepLog:
    """Per-step wall time and foreign CPU load. Before each step the worker says it is ready (everything of the previous
    step, logging included, is done) and waits for the orchestrator's go byte, which interleaves the two sides'
    steps; then it waits (bounded) for other processes to go quiet. Exiting closes the pipe: ready after the last."""

    def __init__(self, spec: dict):
        self.quiet_wait_s, self.steps, self._load, self._t0, self._waited = spec["quiet_wait_s"], [], None, 0.0, 0.0
        self.go_fd, self.done_fd = spec.get("go_fd"), spec.get("done_fd")

    def begin(self) -> None:
        if self.go_fd is not None:
            os.write(self.done_fd, b"r")
            if not os.read(self.go_fd, 1):
                raise RuntimeError("the orchestrator went away")
        self._waited = wait_quiet(self.quiet_wait_s) if self.quiet_wait_s > 0 else 0.0
        self._load = ForeignLoad().__enter__()
        self._t0, self._c0 = time.perf_counter(), cpu_now()

    def end(self, **fields) -> dict:
        step_s, cpu_s = time.perf_counter() - self._t0, cpu_now() - self._c0
        self._load.__exit__(None, None, None)
        rec = {"step_s": step_s, "cpu_s": cpu_s, "foreign_cores": round(self._load.cores, 2),
               "waited_s": round(self._waited, 1), **fields}
        self.steps.append(rec)
        return rec


def _finish(rec: dict) -> None:
    rec["update_s"] = rec["step_s"] - rec["rollout_s"]
    rec["update_cpu_s"] = rec["cpu_s"] - rec["rollout_cpu_s"]


# ------------------------------------------------------------------------------------------------------------------
# seekstack worker


def seekstack_argv(spec: dict) -> list[str]:
    w = spec["workload"]
    return ["--model.init_from", spec["seekstack_dir"], "--run-dir", os.path.join(spec["work"], "seekstack_run"),
            "--seed", str(SEED), "--task.name", TASK,
            "--task.rewards", ",".join(REWARDS), "--task.reward_weights", ",".join(map(str, REWARD_WEIGHTS)),
            "--grpo.steps", str(spec["total_steps"]), "--grpo.prompts_per_step", str(w["prompts_per_step"]),
            "--grpo.num_generations", str(w["num_generations"]),
            "--grpo.max_completion_length", str(w["max_completion_length"]),
            "--grpo.micro_batch", str(w["prompts_per_step"] * w["num_generations"]),
            "--grpo.temperature", "1.0", "--grpo.top_p", "1.0", "--grpo.top_k", "0", "--grpo.num_iterations", "1",
            "--grpo.steps_per_generation", "1", "--grpo.beta", "0.0", "--grpo.loss_type", "dapo",
            "--grpo.scale_rewards", "group", "--grpo.epsilon", "0.2", "--grpo.threads", str(spec["threads"]),
            "--optimizer.lr", str(LR), "--optimizer.warmup_steps", "0", "--optimizer.schedule", "constant",
            "--optimizer.grad_clip", "1.0", "--optimizer.weight_decay", "0.0",
            "--metrics.eval_every", "0", "--metrics.eval_samples", "0", "--metrics.eval_problems", "4",
            "--metrics.log_samples", "0", "--metrics.progress", "false", "--checkpoint.every", "0"]


def run_seekstack(spec: dict) -> dict:
    from rl.grpo import GRPOConfig, GRPOTrainer
    from train.config import load_job_config
    from train.distributed import init_distributed, shutdown

    argv = seekstack_argv(spec)
    cfg = load_job_config(GRPOConfig, argv)
    torch.set_num_threads(spec["threads"])
    dist = init_distributed(1, 1)
    trainer = GRPOTrainer(cfg, dist)
    trainer.rollout = rollout = CpuTimer(trainer.rollout)  # sampling + rewards, for the rollout's CPU time
    log = StepLog(spec)
    try:
        for _ in range(spec["total_steps"]):
            n = len(rollout.calls)
            log.begin()
            m = trainer.train_step()
            rec = log.end(rollout_s=m["step_seconds"] - m["train_seconds"], rollout_cpu_s=rollout.since(n)[1],
                          generate_s=m["rollout_seconds"],
                          completion_length_mean=m["completion_length_mean"],
                          completion_length_max=m["completion_length_max"], reward_mean=m["reward_mean"],
                          internal_step_s=m["step_seconds"])
            _finish(rec)
            trainer.step += 1
            print(f"seekstack step {trainer.step}: {rec['step_s']:.2f} s", file=sys.stderr, flush=True)
    finally:
        trainer.rewards.close()
        shutdown(dist)
    return {"steps": log.steps, "argv": ["python", "-m", "rl.grpo", *argv],
            "settings": {"optimizer": "torch.optim.AdamW(foreach=True)",
                         "bias_update_speed": cfg.model.bias_update_speed, "reward_workers": cfg.task.reward_workers}}


# ------------------------------------------------------------------------------------------------------------------
# TRL worker


def make_trl_rewards(tokenizer_json: str) -> list:
    """rl.rewards' functions with TRL's reward_funcs signature. TRL's `completions` are decoded with
    skip_special_tokens=True, which drops the <think>/<answer> tag tokens; decode `completion_ids` the way seekstack
    does (only EOS / padding dropped) so both sides score the same text."""
    from rl.grpo import TextCodec
    from rl.rewards import accuracy_reward, format_reward

    codec = TextCodec(os.path.dirname(tokenizer_json))

    def texts(completions, completion_ids):
        return [codec.decode(ids) for ids in completion_ids] if completion_ids is not None else list(completions)

    def accuracy(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
        return accuracy_reward(prompts, texts(completions, completion_ids), answer=answer)

    def format_(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        return format_reward(prompts, texts(completions, completion_ids))

    accuracy.__name__, format_.__name__ = "accuracy_reward", "format_reward"
    return [accuracy, format_]


def load_hf(hf_dir: str, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn,
                                                experts_implementation="grouped_mm")


def pick_attention(model, prompt_ids: list[list[int]], new_tokens: int, pad_id: int) -> dict:
    """The faster attention implementation for each phase of a GRPO step, measured on this batch: sampled generate of
    min(new_tokens, 8) tokens, and training forward+backward over prompt + new_tokens tokens. One warmup, then two
    timed rounds alternating the implementations; min per implementation. Returns {"generate": impl, "train": impl,
    "timings_s": {...}}."""
    P = max(map(len, prompt_ids))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompt_ids])
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompt_ids])[:, None]).long()
    g = torch.Generator().manual_seed(0)
    full = torch.cat([ids, torch.randint(2, model.config.vocab_size, (len(ids), new_tokens), generator=g)], 1)
    full_mask = torch.cat([mask, torch.ones(len(ids), new_tokens, dtype=torch.long)], 1)

    def gen():
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=min(new_tokens, 8), do_sample=True,
                           top_k=0, top_p=1.0, temperature=1.0, pad_token_id=pad_id, eos_token_id=None)
        model.train()

    def train():
        model(input_ids=full, attention_mask=full_mask, use_cache=False).logits.logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    timings = {phase: {impl: [] for impl in ATTN_IMPLS} for phase in ("generate", "train")}
    for rnd in range(3):
        for impl in (ATTN_IMPLS if rnd % 2 == 0 else ATTN_IMPLS[::-1]):
            if rnd == 0 and impl != ATTN_IMPLS[0]:
                continue  # one warmup round, on the first implementation
            model.set_attn_implementation(impl)
            for phase, fn in (("generate", gen), ("train", train)):
                t = time.perf_counter()
                fn()
                if rnd:
                    timings[phase][impl].append(time.perf_counter() - t)
    best = {phase: {impl: round(min(v), 4) for impl, v in d.items()} for phase, d in timings.items()}
    return {"generate": min(best["generate"], key=best["generate"].get),
            "train": min(best["train"], key=best["train"].get), "timings_s": best}


def logit_parity(spec: dict, hf_model, prompt_ids: list[list[int]]) -> float:
    """Max |logit difference| of seekstack's and transformers' models on the first prompts (eval mode)."""
    from model import load_model

    ours = load_model(spec["seekstack_dir"]).eval()
    ids = torch.tensor([p for p in prompt_ids if len(p) == len(prompt_ids[0])][:4])
    hf_model.eval()
    with torch.no_grad():
        diff = (ours(ids).logits - hf_model(input_ids=ids, use_cache=False).logits).abs().max().item()
    hf_model.train()
    return diff


def run_trl(spec: dict) -> dict:
    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    w = spec["workload"]
    P, G, L = w["prompts_per_step"], w["num_generations"], w["max_completion_length"]
    hf_dir = spec["hf_dir"]
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    rows = prompt_rows(spec["total_steps"], P)
    first_ids = [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in rows[:P] for _ in range(G)]

    model = load_hf(hf_dir, "sdpa" if spec["attn"] == "auto" else spec["attn"])
    parity = logit_parity(spec, model, first_ids)
    if spec["attn"] == "auto":
        attn = pick_attention(model, first_ids, L, tok.pad_token_id)
        print(f"trl: attention {attn}", file=sys.stderr, flush=True)
    else:
        attn = {"generate": spec["attn"], "train": spec["attn"], "timings_s": {}}
    model.set_attn_implementation(attn["train"])

    gen_times: list[float] = []
    inner_generate = model.generate

    def timed_generate(*args, **kwargs):
        """model.generate under the generation phase's attention implementation, timed."""
        t = time.perf_counter()
        if attn["generate"] != attn["train"]:
            model.set_attn_implementation(attn["generate"])
        try:
            return inner_generate(*args, **kwargs)
        finally:
            if attn["generate"] != attn["train"]:
                model.set_attn_implementation(attn["train"])
            gen_times.append(time.perf_counter() - t)

    model.generate = timed_generate

    class Trainer(GRPOTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.roll = CpuTimer(super()._generate_and_score_completions)

        def _generate_and_score_completions(self, inputs):
            return self.roll(inputs)

    log = StepLog(spec)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.n_roll, self.n_gen = len(trainer.roll.calls), len(gen_times)
            log.begin()

        def on_step_end(self, args, state, control, **kwargs):
            roll_s, roll_cpu_s = trainer.roll.since(self.n_roll)
            rec = log.end(rollout_s=roll_s, rollout_cpu_s=roll_cpu_s, generate_s=sum(gen_times[self.n_gen:]))
            _finish(rec)
            print(f"trl step {state.global_step}: {rec['step_s']:.2f} s", file=sys.stderr, flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and log.steps and "completions/mean_length" in logs:
                rec = log.steps[-1]
                rec["completion_length_mean"] = logs["completions/mean_length"]
                rec["completion_length_max"] = logs.get("completions/max_length")
                rec["reward_mean"] = logs.get("reward")
                rec["trl_step_time"] = logs.get("step_time")

    dataset = datasets.Dataset.from_dict({"prompt": [r.prompt for r in rows],
                                          "answer": [r.fields["answer"] for r in rows]})
    args = GRPOConfig(
        output_dir=os.path.join(spec["work"], "trl_run"), per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, generation_batch_size=P * G, num_generations=G, max_completion_length=L,
        temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, beta=0.0, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, mask_truncated_completions=False, reward_weights=list(REWARD_WEIGHTS), learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, use_vllm=False,
        bf16=False, fp16=False, use_cpu=True, report_to=[], logging_steps=1, max_steps=spec["total_steps"],
        save_strategy="no", shuffle_dataset=False, seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False)
    trainer = Trainer(model=model, reward_funcs=make_trl_rewards(os.path.join(hf_dir, "tokenizer.json")), args=args,
                      train_dataset=dataset, processing_class=tok, callbacks=[Timer()])
    if not (trainer.args.steps_per_generation == 1 and trainer.args.generation_batch_size == P * G):
        raise RuntimeError(f"TRL resolved steps_per_generation={trainer.args.steps_per_generation}, "
                           f"generation_batch_size={trainer.args.generation_batch_size}")
    trainer.train()
    if not gen_times:
        raise RuntimeError("the model.generate wrapper never ran: TRL generated through another object")
    return {"steps": log.steps, "attn_implementation": {k: attn[k] for k in ("generate", "train")},
            "attn_timings_s": attn["timings_s"],
            "max_abs_logit_diff": parity,
            "settings": {"optim": str(trainer.args.optim), "optimizer": type(trainer.optimizer).__name__,
                         "experts_implementation": model.config._experts_implementation,
                         "generation_config": {k: v for k, v in trainer.generation_config.to_diff_dict().items()
                                               if k != "transformers_version"},
                         "steps_per_generation": trainer.args.steps_per_generation,
                         "generation_batch_size": trainer.args.generation_batch_size},
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__, "datasets": datasets.__version__}}


# ------------------------------------------------------------------------------------------------------------------
# Orchestration and report


class Worker:
    """One side in a fresh interpreter (no shared thread pools, caches or imports), stepped through pipes."""

    def __init__(self, side: str, spec: dict):
        self.side, work = side, spec["work"]
        self.result_path = os.path.join(work, f"result_{side}.json")
        self.log_path = os.path.join(work, f"{side}.log")
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        spec_path = os.path.join(work, f"spec_{side}.json")
        with open(spec_path, "w") as f:
            json.dump({**spec, "go_fd": go_r, "done_fd": ready_w}, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "bench.grpo_bench", "--worker", side, "--spec", spec_path, "--result",
               self.result_path]
        self.t0 = time.perf_counter()
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env,
                                     pass_fds=(go_r, ready_w))
        os.close(go_r)
        os.close(ready_w)
        self.exited = False

    def _fail(self, what: str):
        self.proc.wait()
        with open(self.log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{self.side} worker {what} (exit {self.proc.returncode}); log {self.log_path}:\n{tail}")

    def wait_ready(self, last: bool = False) -> None:
        """Block until the worker asks for its next step (or, after its last, exits)."""
        if not os.read(self.ready_r, 1):
            self.exited = True
            if not last or self.proc.wait() != 0:
                self._fail("stopped early" if not last else "failed")

    def step(self, last: bool) -> None:
        os.write(self.go_w, b"g")
        self.wait_ready(last)

    def result(self) -> dict:
        if self.proc.wait() != 0:
            self._fail("failed")
        self.logf.close()
        for fd in (self.go_w, self.ready_r):
            os.close(fd)
        with open(self.result_path) as f:
            out = json.load(f)
        out["process_wall_s"] = round(time.perf_counter() - self.t0, 1)
        return out

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads) the worker has used so far, from /proc (Linux)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_interleaved(spec: dict) -> dict[str, dict]:
    """Both workers start together (model load, TRL's attention choice); then step i runs on one side while the
    other waits, seekstack first on even steps and TRL first on odd ones, so load drift hits both alike."""
    workers = {side: Worker(side, spec) for side in SIDES}
    idle_cpu = {side: [] for side in SIDES}  # CPU seconds the waiting worker used during this side's steps
    try:
        for w in workers.values():
            w.wait_ready()
        for i in range(spec["total_steps"]):
            last = i == spec["total_steps"] - 1
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
                other = workers[SIDES[1 - SIDES.index(side)]]
                before = None if other.exited else other.cpu_seconds()
                workers[side].step(last)
                after = None if other.exited else other.cpu_seconds()
                idle_cpu[side].append(round(after - before, 3) if before is not None and after is not None else None)
                print(f"step {i} {side}: done", file=sys.stderr, flush=True)
        out = {side: w.result() for side, w in workers.items()}
        for side in SIDES:
            out[side]["other_worker_cpu_s"] = idle_cpu[side]
        return out
    finally:
        for w in workers.values():
            w.kill()


KEYS = ("step_s", "rollout_s", "generate_s", "update_s", "cpu_s", "rollout_cpu_s", "update_cpu_s",
        "completion_length_mean", "completion_length_max", "foreign_cores")


def summarize(all_steps: list[dict], warmup: int = 1) -> dict:
    """Medians over the steps after the first `warmup`."""
    steps = all_steps[warmup:]
    out = {}
    for k in KEYS:
        vals = [s[k] for s in steps if s.get(k) is not None]
        out[k] = round(statistics.median(vals), 4) if vals else None
    out["step_s_min"] = min(s["step_s"] for s in steps)
    out["timed_steps"] = len(steps)
    out["completion_length_mean_all"] = statistics.mean(s["completion_length_mean"] for s in all_steps
                                                        if s.get("completion_length_mean") is not None)
    return out


def notes(r: dict) -> list[str]:
    w, t = r["workload"], r["trl"]
    s = r["summary"]
    attn_why = ("each the faster of sdpa / eager for that phase, measured first on the step-0 batch: "
                + json.dumps(t["attn_timings_s"])) if t["attn_timings_s"] else "given by --attn"
    idle_cpu = max((x for v in r["waiting_worker_cpu_s"].values() for x in v if x is not None), default=0.0)
    return [
        f"Model: seekstack preset `{w['preset']}` ({r['model']['parameters']:,} parameters, vocab "
        f"{r['model']['vocab_size']}, random init, no MTP, aux_loss_alpha 0), exported with tools/export_hf.py and "
        f"loaded by transformers as DeepseekV3ForCausalLM; max |Δlogit| between the two on the step-0 prompts = "
        f"{t['max_abs_logit_diff']:.1e}.",
        f"Step: {w['prompts_per_step']} prompts x G={w['num_generations']} = "
        f"{w['prompts_per_step'] * w['num_generations']} "
        f"completions of at most {w['max_completion_length']} tokens, temperature 1, top_p 1, top_k 0, one optimizer "
        "step on the whole generation batch (one micro-batch), num_iterations 1, beta 0 (no reference model), loss "
        "dapo, fp32, lr 1e-5 constant, grad clip 1.0.",
        "rollout = all work before the policy update (seekstack: sampling with its latent-cache generator, which also "
        "returns the old log-probs, rewards, advantages; TRL: `_generate_and_score_completions`: transformers "
        "generate, decoding, rewards, advantages, metrics gathering). update = step - rollout (forward, backward, "
        "clip, optimizer). generate = the bare generate call inside rollout. CPU-seconds = the process's user + "
        "system time over the same span (all threads; rollout CPU = seekstack's rollout() call, TRL's "
        "_generate_and_score_completions): less sensitive than wall time to other processes on a shared machine, "
        "but they include OpenMP threads spinning at barriers.",
        f"TRL: attn_implementation {t['attn_implementation']['generate']} while generating, "
        f"{t['attn_implementation']['train']} while training ({attn_why})"
        f", experts_implementation={t['settings']['experts_implementation']}, optimizer {t['settings']['optim']} "
        f"(transformers' default); with steps_per_generation=1 and num_iterations=1 TRL computes no separate "
        "old-policy log-prob pass (it uses the detached current ones), like seekstack, which takes them from the "
        f"generator. seekstack: {r['seekstack']['settings']['optimizer']}; it also runs its MoE router-bias update "
        f"(bias_update_speed {r['seekstack']['settings']['bias_update_speed']}) each step, which TRL does not.",
        f"Completion lengths: both sides stop a sequence at EOS and the batch when all stopped or at the max; mean "
        f"completion length seekstack {s['seekstack']['completion_length_mean_all']:.1f} vs TRL "
        f"{s['trl']['completion_length_mean_all']:.1f} tokens, median longest {s['seekstack']['completion_length_max']}"
        f" vs {s['trl']['completion_length_max']} (= decode steps run and the padded training width; a random-init "
        "model samples EOS at about 1/vocab per token, so batches always run to the max). Sampling draws differ "
        "(different RNG streams), so rewards and lengths differ slightly, not the work.",
        f"Timings: medians over {s['seekstack']['timed_steps']} (seekstack) and {s['trl']['timed_steps']} (TRL) steps "
        f"after 1 warmup step, each side in its own process ({r['settings']['threads']} threads), the two sides' steps "
        "interleaved (never concurrent; order alternating). TRL step = on_step_begin to on_step_end (its per-step "
        "logging after on_step_end is not counted); seekstack step = the train_step() call. The waiting process "
        f"used at most {idle_cpu:.2f} CPU-s "
        "during any of the other's steps.",
        f"Shared machine: before each step we waited up to {w['quiet_wait_s']} s for other processes to use < 0.25 "
        f"cores; median foreign load during steps: seekstack {s['seekstack']['foreign_cores']} cores, TRL "
        f"{s['trl']['foreign_cores']} cores (per-step values in the JSON). Load average start/end: "
        f"{r['load_average_start']} / {r['load_average_end']}.",
    ]


def _f(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(r: dict) -> str:
    m, s, w = r["machine"], r["summary"], r["workload"]
    a, b = s["seekstack"], s["trl"]
    lines = [f"# grpo_bench{' (quick)' if r['quick'] else ''}: seekstack GRPO loop vs TRL {m['trl']} GRPOTrainer", "",
             f"Machine: {m['cpu']}, {m['threads']} threads (of {m['logical_cpus']} logical CPUs), torch {m['torch']}, "
             f"transformers {m['transformers']}, trl {m['trl']}, accelerate {m['accelerate']}, Python {m['python']}, "
             f"fp32.", "",
             f"Workload: preset `{w['preset']}`, {w['prompts_per_step']} prompts x G={w['num_generations']}, "
             f"max_completion_length {w['max_completion_length']}; medians over steps after a warmup step.", "",
             "| per GRPO step | seekstack | TRL | TRL / seekstack |", "|---|---:|---:|---:|"]
    rows = [("seconds / step", "step_s"), ("rollout s (generate + rewards + advantages)", "rollout_s"),
            ("&nbsp;&nbsp;of which generate s", "generate_s"), ("update s (fwd + bwd + optimizer)", "update_s"),
            ("CPU-seconds / step (all threads)", "cpu_s"), ("rollout CPU-s", "rollout_cpu_s"),
            ("update CPU-s", "update_cpu_s")]
    for label, k in rows:
        ratio = f"{b[k] / a[k]:.2f}x" if a.get(k) and b.get(k) else "n/a"
        lines.append(f"| {label} | {_f(a.get(k))} | {_f(b.get(k))} | {ratio} |")
    lines.append(f"| mean completion length (tokens) | {_f(a['completion_length_mean_all'], 1)} | "
                 f"{_f(b['completion_length_mean_all'], 1)} | |")
    lines.append(f"| foreign CPU load during steps (cores, median) | {_f(a['foreign_cores'])} | "
                 f"{_f(b['foreign_cores'])} | |")
    sp = r["speedup"]
    lines += ["", f"seekstack is **{sp['step']:.2f}x** faster per step than TRL (fastest steps: "
              f"{sp['step_best']:.2f}x; in CPU-seconds: {sp.get('cpu', float('nan')):.2f}x); target >= 3x: "
              f"**{'met' if sp['step'] >= 3 else 'not met'}**."]
    if max(a["foreign_cores"] or 0, b["foreign_cores"] or 0) >= 0.25:
        lines += ["", "**Warning:** other processes loaded the CPU during the timed steps (shared machine); "
                  "treat the absolute numbers as noisy."]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", f"Command: `{r['command']}`"]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    workload = dict(WORKLOADS["quick" if args.quick else "reference"])
    if args.steps is not None:
        workload["steps"] = args.steps
    if args.quiet_wait is not None:
        workload["quiet_wait_s"] = args.quiet_wait
    torch.set_num_threads(args.threads)
    load_start = load_average()
    keep = args.work is not None
    work = args.work or tempfile.mkdtemp(prefix="grpo_bench-")
    os.makedirs(work, exist_ok=True)
    model = build_checkpoints(work, workload["preset"])
    attn = args.attn or ("sdpa" if args.quick else "auto")
    spec = {"work": work, "threads": args.threads, "workload": workload, "total_steps": workload["steps"] + 1,
            "quiet_wait_s": workload["quiet_wait_s"], "attn": attn, "seekstack_dir": model["seekstack_dir"],
            "hf_dir": model["hf_dir"]}
    results = run_interleaved(spec)
    summary = {side: summarize(results[side]["steps"]) for side in SIDES}
    a, b = summary["seekstack"], summary["trl"]
    trl0 = results["trl"]
    r = {
        "quick": args.quick,
        "command": "PYTHONPATH=. python -m bench.grpo_bench " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
        "machine": {**machine_info(args.threads), **trl0["versions"]},
        "workload": workload, "model": {k: v for k, v in model.items() if not k.endswith("_dir")},
        "settings": {"threads": args.threads, "warmup_steps": 1, "task": TASK, "seed": SEED,
                     "rewards": dict(zip(REWARDS, REWARD_WEIGHTS)), "lr": LR},
        "summary": summary,
        "speedup": {"step": b["step_s"] / a["step_s"], "step_best": b["step_s_min"] / a["step_s_min"],
                    "rollout": b["rollout_s"] / a["rollout_s"], "generate": b["generate_s"] / a["generate_s"],
                    "update": b["update_s"] / a["update_s"], "cpu": b["cpu_s"] / a["cpu_s"],
                    "meaning": "TRL seconds / seekstack seconds (medians)"},
        "seekstack": {k: results["seekstack"][k] for k in ("settings", "argv", "steps")},
        "trl": {k: trl0[k] for k in ("attn_implementation", "attn_timings_s", "max_abs_logit_diff", "settings",
                                     "steps")},
        "process_wall_s": {side: results[side]["process_wall_s"] for side in SIDES},
        "waiting_worker_cpu_s": {side: results[side]["other_worker_cpu_s"] for side in SIDES},
        "load_average_start": load_start, "load_average_end": load_average(),
    }
    r["notes"] = notes(r)
    stem = os.path.join(args.out, "grpo_bench" + ("_quick" if args.quick else "")
                        + (f"_t{args.threads}" if args.threads != 2 else ""))
    write_results(stem, r, markdown(r))
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run, after 1 warmup step (default 5; "
                                                             "--quick: 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 prompts x G=4, 8 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["auto", *ATTN_IMPLS], default=None,
                    help="TRL's attention implementation; auto = the faster per phase, measured (default; --quick: "
                         "sdpa)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="max seconds to wait for other processes to go quiet before each step (default 5; quick 0)")
    ap.add_argument("--work", default=None, help="keep checkpoints, run dirs and worker logs here (default: a temp "
                                                 "dir, removed)")
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.spec) as f:
            spec = json.load(f)
        out = (run_seekstack if args.worker == "seekstack" else run_trl)(spec)
        with open(args.result, "w") as f:
            json.dump(out, f)
        return
    run(args)


if __name__ == "__main__":
    main()
