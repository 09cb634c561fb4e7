"""Verifiable tasks for GRPO: procedurally generated arithmetic and Countdown, the R1-Zero prompt, JSONL datasets.

* Arithmetic: multi-digit +, −, × with configurable digit counts. Problem `index` of `seed` is a pure function of
  (seed, index, split), and a problem belongs to the held-out split iff a hash of its question text says so
  (`is_heldout`), so train and held-out never share a problem, whatever the seeds. Each problem carries a worked
  solution `<think>…</think>\\n<answer>…</answer>` with the column-by-column steps (carries, borrows, partial
  products): the pretraining corpus uses `Problem.full_text()`, GRPO uses the question only.
* Countdown: reach a target with some of the given numbers and + − × ÷, each number at most once. The answer is
  checked by parsing it with `ast` and walking a whitelist (binary + − * / and integer literals drawn from the
  numbers); text is never evaluated.
* Prompt: `R1_ZERO_TEMPLATE` ENDS WITH "<think>" (prefilled, as understand-r1-zero applies the R1-Zero template),
  so completions start inside the reasoning; rl.rewards.full_response puts the tag back before the format reward,
  so a template without the prefill works the same way.
* JSONL: `{"prompt": question, "answer": gold}` per line (GSM8K-style files); every malformed line is reported
  with the file name and its line number.

Run `python -c "from rl.tasks import *; print(ArithmeticTask().problem(0, 0).full_text())"` to see one.
"""

from __future__ import annotations

import abc
import ast
import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from .rewards import completion_after_prompt, extract_answer

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>")
SPLITS = ("train", "heldout")


def format_prompt(question: str, template: str = R1_ZERO_TEMPLATE) -> str:
    """The template with "{question}" replaced (plain replacement: other braces in the template stay as they are)."""
    if "{question}" not in template:
        raise ValueError("the prompt template has no {question} placeholder")
    return template.replace("{question}", question)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # canonical gold answer (for Countdown: the target)
    solution: str  # worked trace "<think>…</think>\n<answer>…</answer>"
    fields: dict = field(default_factory=dict)  # extra row fields the task's reward needs

    @property
    def value(self) -> int:
        """The integer answer (both built-in tasks have one)."""
        return int(self.answer)

    def row(self) -> dict:
        """A dataset row: {"prompt": question, "answer": gold, **fields}."""
        return {"prompt": self.question, "answer": self.answer, **self.fields}

    def full_text(self, template: str = R1_ZERO_TEMPLATE) -> str:
        """Prompt + the completion the model should produce after it (a pretraining / SFT document)."""
        prompt = format_prompt(self.question, template)
        return prompt + completion_after_prompt(prompt, self.solution)


def is_heldout(question: str, fraction: float) -> bool:
    """A fixed hash of the problem text decides its split, independently of any seed."""
    h = int.from_bytes(hashlib.sha256(b"seekstack-heldout\0" + question.encode()).digest()[:8], "big")
    return h < fraction * 2 ** 64


class _SplitGenerator(abc.ABC):
    """Rejection-samples candidates from (seed, index, attempt) until one falls in the requested split; each task
    defines `_candidate`."""

    name = "task"
    heldout_fraction = 0.1
    max_attempts = 10_000

    @abc.abstractmethod
    def _candidate(self, rng: random.Random) -> Problem | None:
        """One random problem of the task, or None to draw again."""

    def problem(self, seed: int, index: int, split: str = "train") -> Problem:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for attempt in range(self.max_attempts):
            p = self._candidate(random.Random(f"{self.name}:{seed}:{split}:{index}:{attempt}"))
            if p is not None and is_heldout(p.question, self.heldout_fraction) == (split == "heldout"):
                return p
        raise ValueError(f"no {split} {self.name} problem found in {self.max_attempts} tries: the problem space is "
                         f"too small for heldout_fraction={self.heldout_fraction}")

    def problems(self, seed: int, count: int, split: str = "train", start: int = 0) -> list[Problem]:
        return [self.problem(seed, i, split) for i in range(start, start + count)]


# ------------------------------------------------------------------------------------------------------ arithmetic

class ArithmeticTask(_SplitGenerator):
    """a op b with op in `ops` ⊆ {"+", "-", "*"} and each operand's digit count uniform in `digits` (lo, hi)."""

    name = "arithmetic"

    def __init__(self, ops: Sequence[str] = ("+", "-", "*"), digits: int | tuple[int, int] = (1, 3),
                 heldout_fraction: float = 0.1):
        bad = set(ops) - {"+", "-", "*"}
        if bad or not ops:
            raise ValueError(f"ops must be a non-empty subset of '+', '-', '*', got {list(ops)}")
        lo, hi = (digits, digits) if isinstance(digits, int) else digits
        if not 1 <= lo <= hi:
            raise ValueError(f"digits must be ≥ 1 and lo ≤ hi, got {digits}")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.ops, self.digits, self.heldout_fraction = tuple(ops), (lo, hi), heldout_fraction

    def _operand(self, rng: random.Random) -> int:
        n = rng.randint(*self.digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)

    def _candidate(self, rng: random.Random) -> Problem:
        a, op, b = self._operand(rng), rng.choice(self.ops), self._operand(rng)
        return arithmetic_problem(a, op, b)


def arithmetic_problem(a: int, op: str, b: int) -> Problem:
    """The problem "What is a op b?" with its worked solution."""
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    steps = {"+": _addition_steps, "-": _subtraction_steps, "*": _multiplication_steps}[op](a, b)
    solution = "<think>\n" + "\n".join(steps) + f"\nSo {a}{op}{b}={value}.\n</think>\n<answer>{value}</answer>"
    return Problem(question=f"What is {a} {op} {b}?", answer=str(value), solution=solution)


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the right (least significant first), zero-padded to width."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def _addition_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [f"Add {a} and {b} column by column from the right."], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}.")
        carry = s // 10
    if carry:
        steps.append(f"The last carry {carry} is the leading digit.")
    return steps


def _subtraction_steps(a: int, b: int) -> list[str]:
    if a < b:
        return ([f"{a} is less than {b}, so compute {b}-{a} and negate it."] + _subtraction_steps(b, a)
                + [f"{b}-{a}={b - a}, negated: {a - b}."])
    width = len(str(a))
    steps, borrow = [f"Subtract {b} from {a} column by column from the right."], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        d = x - y - borrow
        if d >= 0:
            steps.append(f"{x}-{y}-{borrow}={d}, write {d}, borrow 0.")
            borrow = 0
        else:
            steps.append(f"{x}-{y}-{borrow} is negative, borrow: {x + 10}-{y}-{borrow}={d + 10}, write {d + 10}, "
                         f"borrow 1.")
            borrow = 1
    return steps


def _multiplication_steps(a: int, b: int) -> list[str]:
    steps, partials = [f"Multiply {a} by each digit of {b} from the right."], []
    for shift, d in enumerate(_digits(b, len(str(b)))):
        carry, parts = 0, []
        for x in _digits(a, len(str(a))):
            p = x * d + carry
            parts.append(f"{x}*{d}+{carry}={p}, write {p % 10}, carry {p // 10}")
            carry = p // 10
        partial = a * d
        tail = f"; leading {carry}" if carry else ""
        shifted = f", shifted {shift}: {partial * 10 ** shift}" if shift else ""
        steps.append(f"{a}*{d}: " + "; ".join(parts) + f"{tail}. Partial {partial}{shifted}.")
        partials.append(partial * 10 ** shift)
    running = partials[0]
    for p in partials[1:]:
        steps.append(f"{running}+{p}={running + p}.")
        running += p
    return steps


# ------------------------------------------------------------------------------------------------------- countdown

class CountdownError(ValueError):
    """Why a Countdown answer is rejected."""


class CountdownTask(_SplitGenerator):
    """Numbers drawn from 1..max_number (`num_numbers` of them, lo..hi) and a target built from a random
    expression over some of them, so every problem has at least one solution (stored in the trace)."""

    name = "countdown"

    def __init__(self, num_numbers: tuple[int, int] = (3, 4), max_number: int = 20, max_target: int = 200,
                 heldout_fraction: float = 0.1):
        if not 2 <= num_numbers[0] <= num_numbers[1] or max_number < 2 or max_target < 1:
            raise ValueError("need 2 ≤ num_numbers lo ≤ hi, max_number ≥ 2, max_target ≥ 1")
        self.num_numbers, self.max_number, self.max_target = num_numbers, max_number, max_target
        self.heldout_fraction = heldout_fraction

    def _candidate(self, rng: random.Random) -> Problem | None:
        numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.num_numbers))]
        order = rng.sample(numbers, rng.randint(2, len(numbers)))
        value, expr, steps = order[0], str(order[0]), []
        for n in order[1:]:
            ops = ["+", "*"] + (["-"] if value > n else []) + (["/"] if n > 1 and value % n == 0 else [])
            op = rng.choice(ops)
            new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
            steps.append(f"{value}{op}{n}={new}")
            value, expr = new, f"({expr} {op} {n})"
        if not 1 <= value <= self.max_target or value in numbers:
            return None
        expr = expr[1:-1]
        question = (f"Using the numbers {numbers}, create an equation that equals {value}. You can use +, -, * and /, "
                    f"and each number at most once.")
        solution = "<think>\n" + "\n".join(steps) + f"\n</think>\n<answer>{expr}</answer>"
        return Problem(question=question, answer=str(value), solution=solution,
                       fields={"numbers": numbers, "target": value})


_ALLOWED_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
                ast.Div: Fraction.__truediv__}
MAX_EXPRESSION_CHARS = 200


def evaluate_countdown(expression: str, numbers: Sequence[int]) -> Fraction:
    """Exact value of an expression of + − * / over integer literals taken from `numbers` (each at most once).

    Raises CountdownError for anything else: other characters, names, calls, unary minus, powers, floats, a number
    not given or used too often, division by zero, over-long or unparsable text."""
    text = expression.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        raise CountdownError(f"expression is empty or longer than {MAX_EXPRESSION_CHARS} characters")
    if any(c not in "0123456789+-*/() \t" for c in text):
        raise CountdownError("only digits, + - * / and parentheses are allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CountdownError(f"not a valid expression ({type(e).__name__})") from None
    literals = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _ALLOWED_OPS:
                raise CountdownError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
        elif not isinstance(node, (ast.Expression, ast.operator)):
            raise CountdownError(f"{type(node).__name__} is not allowed")
    overused = Counter(literals) - Counter(numbers)
    if overused:
        raise CountdownError(f"uses {sorted(overused.elements())} beyond the given numbers {list(numbers)}")
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Div) and right == 0:
        raise CountdownError("division by zero")
    return _ALLOWED_OPS[type(node.op)](left, right)


def check_countdown(answer: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `answer` (an expression, optionally followed by "= target") evaluates exactly to target."""
    expression, _, rhs = answer.partition("=")
    if rhs.strip() and rhs.strip() != str(target):
        return False
    try:
        return evaluate_countdown(expression, numbers) == target
    except CountdownError:
        return False


def countdown_reward(prompts, completions, numbers, target, **_) -> list[float]:
    """1.0 when the completion's <answer> is an expression reaching `target` with the row's `numbers`, else 0.0."""
    scores = []
    for completion, nums, tgt in zip(completions, numbers, target):
        answer = extract_answer(completion)
        scores.append(float(answer is not None and check_countdown(answer, nums, int(tgt))))
    return scores


# ----------------------------------------------------------------------------------------------------------- JSONL

class DatasetError(ValueError):
    """A dataset file refused, with every problem listed by file and line."""


def load_jsonl(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
               max_reported: int = 20) -> list[dict]:
    """Rows {"prompt": str, "answer": str, ...other fields} from a JSONL file, one JSON object per line.

    `prompt` must be a non-empty string (the question; the template is applied later by `format_prompt`),
    `answer` a string or a number (stored as a string). Blank lines are skipped. Any malformed line refuses the
    whole file with a DatasetError naming the file and the line numbers (up to `max_reported` of them)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    rows, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row, problem = _parse_line(raw, prompt_field, answer_field)
            if problem:
                problems.append(f"line {lineno}: {problem}")
            elif row is not None:
                rows.append(row)
    if problems:
        shown = problems[:max_reported] + ([f"... and {len(problems) - max_reported} more"]
                                           if len(problems) > max_reported else [])
        raise DatasetError(f"{path}: {len(problems)} malformed line(s):\n  " + "\n  ".join(shown))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _parse_line(raw: bytes, prompt_field: str, answer_field: str) -> tuple[dict | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    if not text.strip():
        return None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in (prompt_field, answer_field) if k not in obj]
    if missing:
        return None, "missing field " + ", ".join(repr(k) for k in missing)
    prompt, answer = obj.pop(prompt_field), obj.pop(answer_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return None, f"field {prompt_field!r} must be a non-empty string, got {_describe(prompt)}"
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (isinstance(answer, str)
                                                                                 and not answer.strip()):
        return None, f"field {answer_field!r} must be a non-empty string or a number, got {_describe(answer)}"
    return {"prompt": prompt, "answer": str(answer), **obj}, None


def _describe(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
