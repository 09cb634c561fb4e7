"""bench/grpo_bench.py's pieces that decide what the two sides run (no timing, no TRL import): seekstack's CLI, the
prompts, the TRL reward wrappers, the summary and report.

Run: python -m pytest -q tests/test_grpo_bench.py
"""

import json

from bench import grpo_bench as gb


def _spec(tmp_path, **workload):
    w = dict(gb.WORKLOADS["reference"], **workload)
    return {"work": str(tmp_path), "threads": 2, "workload": w, "total_steps": w["steps"] + 1, "quiet_wait_s": 0.0,
            "attn": "sdpa", "seekstack_dir": str(tmp_path / "ckpt"), "hf_dir": str(tmp_path / "hf")}


def test_seekstack_cli_matches_the_shared_settings(tmp_path):
    from rl.grpo import GRPOConfig
    from train.config import load_job_config

    cfg = load_job_config(GRPOConfig, gb.seekstack_argv(_spec(tmp_path)))
    g = cfg.grpo
    assert (g.prompts_per_step, g.num_generations, g.max_completion_length, g.micro_batch) == (8, 8, 48, 64)
    assert (g.temperature, g.top_p, g.top_k, g.num_iterations, g.steps_per_generation) == (1.0, 1.0, 0, 1, 1)
    assert (g.beta, g.loss_type, g.scale_rewards, g.steps) == (0.0, "dapo", "group", 6)
    assert cfg.task.rewards == ["accuracy", "format"] and cfg.task.reward_weights == [1.0, 0.1]
    assert cfg.optimizer.lr == gb.LR and cfg.optimizer.warmup_steps == 0 and cfg.optimizer.schedule == "constant"
    assert cfg.metrics.eval_samples == 0 and cfg.checkpoint.every == 0


def test_prompt_rows_are_the_loop_s_rows_in_order():
    from rl.sources import build_source

    rows = gb.prompt_rows(3, 4)
    src = build_source(gb.TASK, gb.SEED)
    assert [r.prompt for r in rows] == [r.prompt for s in range(3) for r in src.train_rows(s, 4)]


def test_trl_reward_wrappers_score_the_tagged_text(tmp_path):
    from train.corpus import build_tokenizer

    tok = build_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    accuracy, fmt = gb.make_trl_rewards(str(path))
    assert (accuracy.__name__, fmt.__name__) == ("accuracy_reward", "format_reward")
    prompt = "What is 1 + 2?\n<think>"
    good = tok.encode(" 1+2=3</think><answer>3</answer>", add_special_tokens=False).ids + [0]  # + EOS
    bad = tok.encode(" no idea", add_special_tokens=False).ids
    # TRL passes text decoded with skip_special_tokens=True (tags gone); the wrappers decode completion_ids instead
    kw = dict(prompts=[prompt] * 2, completions=["1+2=33", "no idea"], completion_ids=[good, bad],
              answer=["3", "3"], trainer_state=None, log_extra=None, log_metric=None)
    assert accuracy(**kw) == [1.0, 0.0]
    assert fmt(**kw) == [1.0, 0.0]


def test_summary_and_report():
    def steps(scale):
        return [{"step_s": scale * (5 if i == 0 else 1 + i / 10), "rollout_s": scale * 0.6, "generate_s": scale * 0.5,
                 "update_s": scale * 0.4, "completion_length_mean": 40.0, "completion_length_max": 48,
                 "foreign_cores": 0.1, "cpu_s": scale * 2.0, "rollout_cpu_s": scale, "update_cpu_s": scale}
                for i in range(4)]

    a, b = gb.summarize(steps(1.0)), gb.summarize(steps(4.0))
    assert a["timed_steps"] == 3 and a["step_s"] == 1.2  # warmup step excluded, median of 1.1, 1.2, 1.3
    r = {"quick": True, "command": "x", "machine": {"cpu": "cpu", "threads": 2, "logical_cpus": 2, "torch": "t",
                                                    "transformers": "tf", "trl": "trl", "accelerate": "acc",
                                                    "python": "3"},
         "workload": gb.WORKLOADS["quick"], "summary": {"seekstack": a, "trl": b},
         "speedup": {"step": b["step_s"] / a["step_s"], "step_best": b["step_s_min"] / a["step_s_min"], "cpu": 4.0},
         "notes": ["n"]}
    md = gb.markdown(r)
    assert "| seconds / step | 1.20 | 4.80 | 4.00x |" in md and "**met**" in md
    json.dumps(r)
