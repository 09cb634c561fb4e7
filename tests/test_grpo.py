"""The GRPO loop end to end on a tiny model: metrics, rollout/training log-prob agreement, exact resume,
reference KL, dynamic sampling, config refusals.

Run: python -m pytest -q tests/test_grpo.py
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model import Transformer, preset, save_model
from rl.grpo import main
from tests.test_pretrain import _metrics as _rows
from tests.tiny_checkpoint import save_tiny_checkpoint

COMMON = ["--grpo.prompts_per_step", "4", "--grpo.num_generations", "4", "--grpo.max_completion_length", "12",
          "--grpo.micro_batch", "8", "--metrics.eval_problems", "4", "--metrics.eval_samples", "2",
          "--metrics.progress", "false", "--task.rewards", "tests.rl_test_rewards:digit_share",
          "--task.reward_weights", "1.0", "--optimizer.lr", "0.003", "--optimizer.warmup_steps", "1",
          "--grpo.threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("grpo") / "base")


def test_loop_logs_metrics_and_rollout_logprobs_match_training(base, tmp_path):
    run = str(tmp_path / "run")
    assert main(COMMON + ["--model.init_from", base, "--run-dir", run, "--grpo.steps", "2"]) == 0
    rows = _rows(run)
    assert rows[0]["step"] == 0 and "accuracy" in rows[0] and "accuracy_mean@2" in rows[0]
    last = rows[-1]
    for key in ("reward_mean", "reward_std", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy",
                "completion_length_mean", "completion_length_max", "truncation_rate", "frac_reward_zero_std",
                "rollout_tokens_per_s", "train_tokens_per_s", "step_seconds", "logp_diff_max", "accuracy"):
        assert key in last, key
    assert all(r["logp_diff_max"] <= 1e-5 for r in rows[1:])  # generator and training kernels agree
    assert all(abs(r["ratio_mean"] - 1.0) < 1e-5 for r in rows[1:])  # mu = 1: on-policy ratio is 1
    assert os.path.isfile(os.path.join(run, "final", "tokenizer.json"))
    samples = [json.loads(line) for line in open(os.path.join(run, "samples.jsonl"))]
    assert samples and {"prompt", "completion", "reward"} <= samples[0].keys()


def test_resume_continues_bit_for_bit(base, tmp_path):
    args = COMMON + ["--model.init_from", base, "--grpo.steps", "4", "--checkpoint.every", "2",
                     "--metrics.eval_every", "0"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert main(args + ["--run-dir", full]) == 0
    assert main(args + ["--run-dir", cut]) == 0
    shutil.rmtree(os.path.join(cut, "checkpoints", "step_00000004"))  # as if killed after step 2's checkpoint
    shutil.rmtree(os.path.join(cut, "final"))
    assert main(args + ["--run-dir", cut, "--resume", "auto"]) == 0
    a = load_file(os.path.join(full, "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the rerun steps replace their old log rows instead of repeating them
    assert [r["step"] for r in _rows(cut)] == [r["step"] for r in _rows(full)] == [0, 1, 2, 3, 4]
    samples = lambda run: [json.loads(line)["step"] for line in open(os.path.join(run, "samples.jsonl"))]  # noqa: E731
    assert samples(cut) == samples(full)
    assert any(not torch.equal(a[k], load_file(os.path.join(base, "model.safetensors"))[k]) for k in a)


def test_reference_kl_and_dynamic_sampling(base, tmp_path):
    run = str(tmp_path / "kl")
    assert main(COMMON + ["--model.init_from", base, "--run-dir", run, "--grpo.steps", "2", "--grpo.beta", "0.1",
                          "--grpo.num_iterations", "2", "--grpo.dynamic_sampling", "true",
                          "--grpo.loss_type", "grpo", "--metrics.eval_every", "0"]) == 0
    rows = _rows(run)[1:]
    assert rows[-1]["kl"] > 0  # the policy moved away from the frozen reference
    assert "refilled_groups" in rows[-1]


def test_overlong_shaping_all_truncated_bnpo_and_no_heldout_rows(base, tmp_path):
    """soft_overlong sees the completion lengths; bnpo with every completion masked is a zero-gradient step; a
    JSONL too small for a held-out split logs no accuracy instead of NaN; per-function std is logged."""
    data = tmp_path / "six.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i}?", "answer": str(2 * i)}) + "\n" for i in range(6)))
    run = str(tmp_path / "edge")
    assert main(COMMON + ["--model.init_from", base, "--run-dir", run, "--grpo.steps", "1",
                          "--task.name", str(data), "--task.rewards", "tests.rl_test_rewards:digit_share,soft_overlong",
                          "--task.reward_weights", "1,1", "--grpo.max_completion_length", "3",
                          "--grpo.loss_type", "bnpo", "--grpo.mask_truncated_completions", "true"]) == 0
    text = open(os.path.join(run, "metrics.jsonl")).read()
    assert "NaN" not in text
    rows = _rows(run)
    assert "accuracy" not in rows[-1]
    last = rows[-1]
    assert last["rewards/soft_overlong_penalty/errors"] == 0 and last["rewards/soft_overlong_penalty/mean"] < 0
    assert "rewards/digit_share/std" in last and last["truncation_rate"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--grpo.num_generations", "1"], "num_generations"),
    (["--grpo.loss_type", "ppo"], "loss_type"),
    (["--task.reward_weights", "1,2,3"], "reward_weights"),
    (["--grpo.beta", "-0.1"], "beta"),
    (["--grpo.temperature", "0"], "temperature"),
    (["--grpo.top_p", "1.5"], "top_p"),
])
def test_config_refusals(base, argv, message, capsys):
    assert main(["--model.init_from", base] + argv) == 2
    assert message in capsys.readouterr().err


def test_missing_tokenizer_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny")), tmp_path / "m")
    assert main(["--model.init_from", str(tmp_path / "m"), "--run-dir", str(tmp_path / "r")]) == 1
    assert "tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("q_lora", [True, False])
def test_shared_prompt_forward_equals_whole_rows(q_lora):
    """rl/logprobs.py: one forward per distinct prompt (its latent cache repeated for the G completions) gives the
    log-probs, entropies and gradients of running every [prompt; completion] row whole."""
    from rl.logprobs import completion_logprobs, prompt_groups

    torch.manual_seed(0)
    model = Transformer(preset("tiny", **({} if q_lora else {"q_lora_rank": None})))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.02)
    model.train()
    g = torch.Generator().manual_seed(1)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]  # 3 groups of G = 3, left-padded to 4
    G, N = 3, 6
    P = max(map(len, prompts))
    prompt_ids = torch.zeros(len(prompts) * G, P, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        prompt_ids[i * G:(i + 1) * G, P - len(p):] = torch.tensor(p)
        prompt_mask[i * G:(i + 1) * G, P - len(p):] = True
    completion_ids = torch.randint(3, 100, (len(prompts) * G, N), generator=g)
    lengths = torch.tensor([6, 2, 4, 1, 6, 5, 3, 6, 2])
    completion_mask = torch.arange(N)[None] < lengths[:, None]
    completion_ids[~completion_mask] = 0  # padding after each completion's end

    first, inverse = prompt_groups(prompt_ids, prompt_mask)
    assert first.tolist() == [0, 3, 6] and inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, entropy = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7,
                                            share_prompts=share)
        (logp * completion_mask).sum().backward()
        results[share] = (logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                            if p.grad is not None})
    (lp0, ent0, g0), (lp1, ent1, g1) = results[False], results[True]
    torch.testing.assert_close(lp1[completion_mask], lp0[completion_mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1[completion_mask], ent0[completion_mask], rtol=0, atol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trl_boolean_scale_rewards_is_accepted(tmp_path):
    from rl.grpo import GRPOConfig
    from train.config import load_job_config

    job = tmp_path / "job.toml"
    job.write_text("[grpo]\nscale_rewards = false\n")
    assert load_job_config(GRPOConfig, ["--config", str(job)]).grpo.scale_rewards == "none"
    assert load_job_config(GRPOConfig, ["--grpo.scale_rewards", "true"]).grpo.scale_rewards == "group"
    assert load_job_config(GRPOConfig, ["--grpo.scale_rewards", "batch"]).grpo.scale_rewards == "batch"


def test_addition_refuses_a_template():
    from rl.sources import build_source

    with pytest.raises(ValueError, match="template"):
        build_source("addition", 0, "Q: {question} A:")


def test_replaced_groups_carry_their_own_per_function_scores():
    from model.generate import GenerationOutput
    from rl.grpo import _replace_groups
    from rl.rewards import RewardResult

    def roll(n, width, value):
        out = GenerationOutput(torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.bool),
                               torch.full((n, width), value), torch.ones(n, width, dtype=torch.bool),
                               torch.zeros(n, width), torch.ones(n, dtype=torch.bool))
        rewards = RewardResult(per_function={"acc": [float(value)] * n, "fmt": [0.5] * n}, total=[value + 0.5] * n,
                               errors={"acc": 1, "fmt": 0}, timeouts={"acc": 0, "fmt": 2})
        return {"out": out, "texts": [str(value)] * n, "prompts": ["p"] * n, "rewards": rewards}

    merged = _replace_groups(roll(4, 3, 0), roll(2, 5, 1), dead=[1], G=2)
    assert merged["rewards"].per_function["acc"] == [0.0, 0.0, 1.0, 1.0]
    assert merged["rewards"].total == [0.5, 0.5, 1.5, 1.5] and merged["texts"] == ["0", "0", "1", "1"]
    assert merged["rewards"].errors == {"acc": 2, "fmt": 0} and merged["rewards"].timeouts == {"acc": 0, "fmt": 4}
    assert merged["out"].completion_ids.shape == (4, 5) and merged["out"].completion_ids[2, :5].tolist() == [1] * 5
