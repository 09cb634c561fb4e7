"""Built-in verifiable tasks (rl/tasks.py): deterministic generation, disjoint train/held-out splits, correct
worked traces, the safe Countdown checker, the R1-Zero prompt, and JSONL refusals with line numbers.

Run: PYTHONPATH=. python -m pytest -q tests/test_rl_tasks.py
"""

import json
import re

import pytest

from rl.rewards import accuracy_reward, format_reward, tag_count_reward
from rl.tasks import (
    R1_ZERO_TEMPLATE,
    ArithmeticTask,
    CountdownError,
    CountdownTask,
    DatasetError,
    arithmetic_problem,
    check_countdown,
    countdown_reward,
    evaluate_countdown,
    format_prompt,
    is_heldout,
    load_jsonl,
)

# ------------------------------------------------------------------------------------------------------ arithmetic

def test_generation_is_deterministic_from_seed_and_index():
    task = ArithmeticTask(digits=(1, 4))
    assert task.problems(7, 20) == ArithmeticTask(digits=(1, 4)).problems(7, 20)
    assert task.problem(7, 3) == task.problems(7, 10)[3] == task.problems(7, 5, start=3)[0]
    assert task.problems(7, 20) != task.problems(8, 20)
    assert task.problems(7, 20, "heldout") == task.problems(7, 20, "heldout")


def test_train_and_heldout_are_disjoint_whatever_the_seeds():
    task = ArithmeticTask(ops=("+",), digits=(1, 2), heldout_fraction=0.2)  # a small space: collisions are likely
    train = {p.question for seed in (0, 1, 2) for p in task.problems(seed, 300)}
    heldout = {p.question for seed in (0, 5) for p in task.problems(seed, 100, "heldout")}
    assert train and heldout and not train & heldout
    assert all(not is_heldout(q, 0.2) for q in train) and all(is_heldout(q, 0.2) for q in heldout)
    assert len(heldout) > 50  # and the held-out set is not degenerate


_STEP = re.compile(r"(\d+)([+\-*])(\d+)(?:([+\-])(\d+))?=(-?\d+)")


@pytest.mark.parametrize("ops", [("+",), ("-",), ("*",)])
def test_traces_are_correct_step_by_step(ops):
    task = ArithmeticTask(ops=ops, digits=(1, 5))
    for p in task.problems(3, 60) + task.problems(3, 20, "heldout"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+\-*]) (\d+)\?", p.question).groups()
        truth = eval(f"{a}{op}{b}")
        assert p.answer == str(truth)
        assert p.solution.startswith("<think>\n") and p.solution.endswith(f"</think>\n<answer>{truth}</answer>")
        steps = _STEP.findall(p.solution)
        assert steps, p.solution
        for x, o1, y, o2, z, result in steps:  # every arithmetic statement in the trace is true
            value = eval(f"{x}{o1}{y}{o2}{z}")
            assert value == int(result), (p.question, x, o1, y, o2, z, result)


def test_trace_scores_one_and_wrong_answer_zero():
    problems = ArithmeticTask().problems(0, 30) + [arithmetic_problem(45, "-", 902), arithmetic_problem(0, "*", 7)]
    for p in problems:
        prompt = format_prompt(p.question)
        completion = p.full_text()[len(prompt):]  # what the model generates after the prefilled <think>
        assert accuracy_reward([prompt], [completion], answer=[p.answer]) == [1.0]
        assert format_reward([prompt], [completion]) == [1.0] and tag_count_reward([prompt], [completion]) == [1.0]
        wrong = completion.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
        assert accuracy_reward([prompt], [wrong], answer=[p.answer]) == [0.0]


def test_negative_subtraction_trace():
    p = arithmetic_problem(45, "-", 902)
    assert p.answer == "-857" and p.value == -857 and "compute 902-45 and negate" in p.solution


def test_r1_zero_template_ends_with_prefilled_think():
    prompt = format_prompt("What is 1 + 1?")
    assert prompt.endswith("User: What is 1 + 1?\nAssistant: <think>") and R1_ZERO_TEMPLATE.endswith("<think>")
    assert format_prompt("q {x}", "Q: {question} A:") == "Q: q {x} A:"
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt("q", "no placeholder")
    p = ArithmeticTask().problem(0, 0)
    # the tag is prefilled by the prompt, not generated a second time
    assert p.full_text().count("<think>") == R1_ZERO_TEMPLATE.count("<think>")
    assert p.full_text("Q: {question}\nA:").endswith(p.solution)  # no prefill: the trace keeps its <think>


def test_arithmetic_config_errors():
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=(3, 2))
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().problem(0, 0, "test")


# ------------------------------------------------------------------------------------------------------- countdown

def test_countdown_problems_are_solvable_deterministic_and_split():
    task = CountdownTask()
    problems = task.problems(0, 40)
    assert problems == CountdownTask().problems(0, 40)
    heldout = {p.question for p in task.problems(0, 20, "heldout")}
    assert not heldout & {p.question for p in problems}
    for p in problems:
        row = p.row()
        completion = p.solution.removeprefix("<think>")
        assert countdown_reward([format_prompt(p.question)], [completion], numbers=[row["numbers"]],
                                target=[row["target"]]) == [1.0]


@pytest.mark.parametrize("expression", ["(50 - 25) * 3 + 7", "50 + 25 + 7", "7 + 3 * (50 - 25) = 82",
                                        "((50 - 25)) * 3 + 7", "25 * 3 + 7"])
def test_countdown_accepts_valid(expression):
    assert check_countdown(expression, [50, 25, 3, 7], 82)


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('echo hi')", "only digits"),
    ("2**10", "Pow"),
    ("50 // 25", "FloorDiv"),
    ("-50 + 25", "UnaryOp"),
    ("7.0 + 3", "only digits"),
    ("25 + 25", "beyond the given numbers"),
    ("50 + 4", "beyond the given numbers"),
    ("50 / (25 - 25)", "beyond"),
    ("(3 - 3) ", "beyond"),
    ("50 +", "not a valid expression"),
    ("(" * 150 + "50" + ")" * 150, "longer than"),
    ("", "empty"),
    ("0x32", "only digits"),
    ("50 25", "not a valid expression"),
])
def test_countdown_rejects_invalid_and_unsafe(expression, reason):
    with pytest.raises(CountdownError, match=reason):
        evaluate_countdown(expression, [50, 25, 3, 7])
    assert not check_countdown(expression, [50, 25, 3, 7], 82)


def test_countdown_exact_division_and_wrong_result():
    assert evaluate_countdown("7 / 2 * 2", [7, 2, 2]) == 7  # exact fractions, no float rounding
    with pytest.raises(CountdownError, match="division by zero"):
        evaluate_countdown("7 / (2 - 2)", [7, 2, 2])
    assert not check_countdown("50 + 25", [50, 25, 3, 7], 82)
    assert not check_countdown("(50 - 25) * 3 + 7 = 81", [50, 25, 3, 7], 82)


# ----------------------------------------------------------------------------------------------------------- JSONL

def test_jsonl_loads_valid_rows(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4, "source": "x"}\n\n{"prompt": "Half?", "answer": "1/2"}\n')
    assert load_jsonl(path) == [{"prompt": "2+2?", "answer": "4", "source": "x"}, {"prompt": "Half?", "answer": "1/2"}]
    path.write_text(json.dumps({"question": "q", "gold": 3}) + "\n")
    assert load_jsonl(path, prompt_field="question", answer_field="gold") == [{"prompt": "q", "answer": "3"}]


def test_jsonl_refusals_name_file_and_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = ['{"prompt": "ok", "answer": "1"}', '{"prompt": "broken", ', '["a list"]', '{"prompt": "no answer"}',
             '{"prompt": 7, "answer": "1"}', '{"prompt": "p", "answer": null}', '{"prompt": "p", "answer": true}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert str(path) in message and "6 malformed line(s)" in message
    for expected in ["line 2: invalid JSON", "line 3: expected a JSON object, got list",
                     "line 4: missing field 'answer'", "line 5: field 'prompt' must be a non-empty string, got int",
                     "line 6: field 'answer' must be a non-empty string or a number, got null", "line 7: field"]:
        assert expected in message
    assert "line 1" not in message
    with pytest.raises(DatasetError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="line 1: not UTF-8"):
        load_jsonl(tmp_path / "latin1.jsonl")
