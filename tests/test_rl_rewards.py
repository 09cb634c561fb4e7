"""Rewards and the reward runner (rl/rewards.py): accuracy, R1-Zero format, tag count, language consistency, DAPO
overlong shaping, `module:function` loading, and parallel evaluation that survives rewards that raise, hang or crash.

Run: PYTHONPATH=. python -m pytest -q tests/test_rl_rewards.py

This module stays free of torch imports: the runner's worker processes import it to find the test rewards below.
"""

import os
import time

import pytest

from rl.rewards import (
    FORMAT_RE,
    RewardRunner,
    SoftOverlongPenalty,
    accuracy_reward,
    answers_match,
    extract_answer,
    format_reward,
    full_response,
    language_consistency_reward,
    language_share,
    load_reward,
    parse_number,
    tag_count_reward,
)

PREFILLED = "User: What is 2 + 3?\nAssistant: <think>"  # the template ends with the prefilled tag
PLAIN = "User: What is 2 + 3?\nAssistant:"


# ----------------------------------------------------------------- rewards the runner tests send to worker processes

def sleepy_reward(prompts, completions, **_):
    """Hangs forever on the completion "hang"."""
    if completions[0] == "hang":
        time.sleep(3600)
    return [1.0]


def raising_reward(prompts, completions, **_):
    if completions[0] == "boom":
        raise RuntimeError("reward bug")
    return [0.5]


def crashing_reward(prompts, completions, **_):
    if completions[0] == "die":
        os._exit(3)
    return [len(completions[0]) / 10]


def bad_output_reward(prompts, completions, **_):
    return {"a": [float("nan")], "b": ["text"], "c": [1.0, 2.0]}.get(completions[0], [2.0])


def pid_reward(prompts, completions, **_):
    return [float(os.getpid())]


NOT_CALLABLE = 3


# --------------------------------------------------------------------------------------------------------- accuracy

def test_parse_number_forms():
    assert parse_number("42") == 42 and parse_number(" -3.5 ") == -3.5 and parse_number("1,234") == 1234
    assert parse_number("$7$") == 7 and parse_number("1/2") == parse_number("\\frac{1}{2}") == parse_number("0.5")
    assert parse_number("\\boxed{8}") == 8 and parse_number("1e3") == 1000 and parse_number("72.") == 72
    assert parse_number("x = 5") is None and parse_number("1, 2") is None and parse_number("") is None


def test_accuracy_numeric_with_tolerance_and_exact_big_integers():
    completions = ["<think>...</think><answer>834</answer>", "<answer> 834.0 </answer>", "<answer>835</answer>",
                   "no answer tag: 834", "<answer>0.3333333</answer>",
                   "<answer>123456789012345678901</answer>"]
    gold = ["834", "834", "834", "834", "1/3", "123456789012345678900"]
    assert accuracy_reward([PLAIN] * 6, completions, answer=gold) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_accuracy_uses_the_last_answer_tag():
    assert extract_answer("<answer>1</answer> wait <answer>2</answer>") == "2"
    assert extract_answer("nothing") is None


def test_latex_answers():
    """math-verify decides LaTeX equivalence when installed; without it, normalised strings (exact forms only)."""
    assert answers_match("\\dfrac{1}{2}", "\\frac{1}{2}")  # numeric (and string) equal either way
    assert answers_match("\\text{yes}", "yes")
    try:
        import math_verify  # noqa: F401
    except ImportError:
        pytest.skip("math-verify not installed: LaTeX equivalence falls back to string compare")
    assert answers_match("$1+x^2$", "x^2+1") and not answers_match("x^2+2", "x^2+1")
    assert answers_match("\\sqrt{4}", "2")


def test_without_math_verify_falls_back_to_normalised_strings_and_says_so(monkeypatch):
    from rl import rewards
    monkeypatch.setattr(rewards, "_math_verify", False)
    monkeypatch.setattr(rewards, "_warned_no_math_verify", False)
    with pytest.warns(RuntimeWarning, match="math-verify is not installed"):
        assert answers_match("$x^2 + 1$", "\\boxed{x^2+1}")
    assert not answers_match("1+x^2", "x^2+1")  # equivalent, but only math-verify can tell
    assert answers_match("12", "12.0")  # numbers never need it


# ------------------------------------------------------------------------------------------------- format and shaping

def test_format_reward_r1_zero_template():
    good = ["reason</think><answer>5</answer>", "reason\n</think>\n\n<answer>\n5\n</answer>\n"]
    bad = ["reason</think>5", "</think><answer>5</answer> trailing", "a</think><answer></answer>",
           "a</think><answer>5</answer><answer>6</answer>", "a<think>b</think><answer>5</answer>"]
    assert format_reward([PREFILLED] * 7, good + bad) == [1.0, 1.0, 0, 0, 0, 0, 0]
    # the same response scores the same whether <think> was prefilled by the template or generated
    assert format_reward([PLAIN], ["<think>reason</think><answer>5</answer>"]) == [1.0]
    assert format_reward([PLAIN], ["reason</think><answer>5</answer>"]) == [0.0]
    assert full_response(PREFILLED, "x") == "<think>x" and full_response(PLAIN, "x") == "x"
    assert FORMAT_RE.match("<think>a</think><answer>b</answer>").group("answer") == "b"


def test_tag_count_quarter_per_tag_used_once():
    assert tag_count_reward([PREFILLED], ["r</think><answer>5</answer>"]) == [1.0]
    assert tag_count_reward([PLAIN], ["r</think><answer>5</answer>"]) == [0.75]  # no <think>
    assert tag_count_reward([PREFILLED], ["r</think><answer>5</answer></answer>"]) == [0.75]
    assert tag_count_reward([PLAIN], ["plain text"]) == [0.0]


def test_language_consistency_en_and_zh():
    assert language_share("First add 3 and 4, then 7.", "en") == 1.0
    assert language_share("First 我们 add", "en") == pytest.approx(2 / 4)  # 2 English words, 2 CJK characters
    assert language_share("首先计算 3+4", "zh") == 1.0
    assert language_share("1+2=3", "en") == 0.0  # no words at all earns nothing
    completion = "add three and 4, 然后</think><answer>seven</answer>"  # the answer is not reasoning
    assert language_consistency_reward([PREFILLED], [completion]) == [pytest.approx(3 / 5)]
    assert language_consistency_reward([PREFILLED], [completion], language=["zh"]) == [pytest.approx(2 / 5)]
    with pytest.raises(ValueError, match="language"):
        language_share("x", "fr")


def test_soft_overlong_penalty_dapo_eq13():
    penalty = SoftOverlongPenalty(max_length=100, cache_length=20)
    lengths = [50, 80, 90, 100, 101]
    assert penalty([""] * 5, [""] * 5, completion_lengths=lengths) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert penalty([""], [""], completion_ids=[[1] * 85]) == [-0.25]
    with pytest.raises(ValueError, match="completion_lengths"):
        penalty([""], [""])


# ---------------------------------------------------------------------------------------------------------- loading

def test_load_reward_builtins_and_paths():
    assert load_reward("accuracy") is accuracy_reward
    assert load_reward("tests.test_rl_rewards:raising_reward") is raising_reward
    assert load_reward("countdown").__name__ == "countdown_reward"
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        load_reward("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward("rl.rewards:missing")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward("tests.test_rl_rewards:NOT_CALLABLE")
    with pytest.raises(ValueError, match="neither a built-in"):
        load_reward("acuracy")


# ----------------------------------------------------------------------------------------------------------- runner

def test_runner_in_process_weights_and_errors():
    with RewardRunner(["format", raising_reward, bad_output_reward], weights=[1.0, 2.0, 1.0], num_workers=0,
                      timeout_s=None) as runner:
        out = runner([PREFILLED] * 4, ["r</think><answer>5</answer>", "boom", "a", "b"])
    assert out.per_function["format_reward"] == [1.0, 0.0, 0.0, 0.0]
    assert out.per_function["raising_reward"] == [0.5, 0.0, 0.5, 0.5]
    assert out.per_function["bad_output_reward"] == [2.0, 2.0, 0.0, 0.0]
    assert out.total == [4.0, 2.0, 1.0, 1.0]
    assert out.errors == {"format_reward": 0, "raising_reward": 1, "bad_output_reward": 2}
    assert "RuntimeError: reward bug" in out.messages["raising_reward"][0]
    assert out.as_metrics()["rewards/raising_reward/errors"] == 1


def test_runner_in_process_thread_timeout():
    runner = RewardRunner([sleepy_reward], num_workers=0, timeout_s=0.3)
    start = time.monotonic()
    out = runner(["p"] * 3, ["ok", "hang", "ok"])
    assert time.monotonic() - start < 5
    assert out.per_function["sleepy_reward"] == [1.0, 0.0, 1.0] and out.timeouts["sleepy_reward"] == 1


def test_runner_workers_survive_hangs_raises_and_crashes():
    funcs = [sleepy_reward, raising_reward, crashing_reward, "accuracy"]
    with RewardRunner(funcs, num_workers=2, timeout_s=1.0) as runner:
        pids = runner.worker_pids()
        completions = ["ok", "hang", "boom", "die", "<answer>5</answer>", "ok"]
        start = time.monotonic()
        out = runner([PLAIN] * 6, completions, answer=["5"] * 6)
        elapsed = time.monotonic() - start
        assert elapsed < 15, f"took {elapsed:.1f} s"
        assert out.per_function["sleepy_reward"] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
        assert out.timeouts == {"sleepy_reward": 1, "raising_reward": 0, "crashing_reward": 0, "accuracy_reward": 0}
        assert out.per_function["raising_reward"] == [0.5, 0.5, 0.0, 0.5, 0.5, 0.5]
        assert out.errors["raising_reward"] == 1 and out.errors["crashing_reward"] == 1
        assert "exit code 3" in out.messages["crashing_reward"][0]
        assert out.per_function["crashing_reward"][3] == 0.0 and out.per_function["crashing_reward"][0] == 0.2
        assert out.per_function["accuracy_reward"] == [0, 0, 0, 0, 1.0, 0]
        assert set(runner.worker_pids()) != set(pids)  # the hung and the crashed workers were replaced

        # the pool is reused: a second call starts no process and spreads work over both workers
        pids = runner.worker_pids()
        out = runner(["p"] * 8, ["x"] * 8, answer=["1"] * 8)
        assert runner.worker_pids() == pids and sum(out.errors.values()) + sum(out.timeouts.values()) == 0
    assert runner.worker_pids() == []


def test_runner_spreads_work_over_processes():
    with RewardRunner([pid_reward], num_workers=2, timeout_s=5.0) as runner:
        out = runner(["p"] * 40, ["x"] * 40)
        assert set(out.per_function["pid_reward"]) <= {float(p) for p in runner.worker_pids()}
        assert os.getpid() not in out.per_function["pid_reward"]


def test_runner_refuses_unpicklable_functions_and_bad_inputs():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        RewardRunner([lambda prompts, completions, **_: [1.0]], num_workers=1)
    runner = RewardRunner(["format"], num_workers=0)
    with pytest.raises(ValueError, match="one value per completion"):
        runner(["p", "p"], ["a", "b"], answer=["1"])
    with pytest.raises(ValueError, match="weights"):
        RewardRunner(["format"], weights=[1.0, 2.0])


def test_accuracy_on_countdown_rows_uses_the_countdown_verifier():
    completions = ["<answer>17</answer>", "<answer>10+7</answer>", "<answer>15+2</answer>",
                   "<answer>(12-2)+15-8</answer>"]
    # the bare target, or numbers the row does not give, are not answers; 15 + 2 over [12, 2, 15] is
    assert accuracy_reward(["q"] * 4, completions, answer=["17"] * 4, numbers=[[12, 2, 15]] * 4,
                           target=[17] * 4) == [0.0, 0.0, 1.0, 0.0]


def np_scalar_reward(prompts, completions, **_):
    import numpy as np

    return [np.float32(0.25) for _ in completions]


def np_array_reward(prompts, completions, **_):
    import numpy as np

    return np.ones(len(completions), dtype=np.int64)


def test_numpy_scores_are_accepted_and_std_is_reported():
    result = RewardRunner([np_scalar_reward, np_array_reward], timeout_s=None)(["p", "q"], ["a", "bb"])
    assert result.per_function == {"np_scalar_reward": [0.25, 0.25], "np_array_reward": [1.0, 1.0]}
    assert sum(result.errors.values()) == 0
    metrics = RewardRunner([length_reward], timeout_s=None)(["p", "q"], ["a", "bbb"]).as_metrics()
    assert metrics["rewards/length_reward/mean"] == 2.0 and metrics["rewards/length_reward/std"] == 1.0
    assert metrics["reward_std"] == 1.0


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_calls_queued_behind_a_hung_call_are_rescored_by_the_new_worker():
    # one worker holds several calls at once (rl.rewards.PIPELINE); killing it for the hang must not lose the rest
    with RewardRunner([sleepy_reward], num_workers=1, timeout_s=0.5) as runner:
        out = runner(["p"] * 5, ["ok", "hang", "ok", "ok", "ok"])
    assert out.per_function["sleepy_reward"] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert out.timeouts == {"sleepy_reward": 1} and out.errors == {"sleepy_reward": 0}
