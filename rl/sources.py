"""Where GRPO prompts come from: the built-in tasks or a user's JSONL file, split into train and held-out.

    addition     the pretraining default's task (train/corpus.py): "What is 4807 + 395?\\n<think>", compact traces
    arithmetic   rl/tasks.ArithmeticTask (+, -, x) with the R1-Zero template
    countdown    rl/tasks.CountdownTask with the R1-Zero template
    PATH.jsonl   {"prompt": ..., "answer": ...} rows (refused with line numbers when malformed), R1-Zero template

Every source is deterministic: the prompts of step s are a pure function of (seed, s), so a resumed run sees the
same prompts, and held-out rows are disjoint from training rows (split by a hash of the problem).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tasks import R1_ZERO_TEMPLATE, ArithmeticTask, CountdownTask, format_prompt, is_heldout, load_jsonl


@dataclass
class Row:
    prompt: str  # the full prompt text the model continues (template applied)
    fields: dict = field(default_factory=dict)  # reward row fields: answer, numbers, target, ...


class AdditionSource:
    def __init__(self, seed: int):
        from train import corpus

        self.corpus, self.seed = corpus, seed
        self._heldout = corpus.problems(seed, 512, held_out=True)

    def train_rows(self, step: int, count: int) -> list[Row]:
        rng = np.random.default_rng([self.seed, 7, step])
        rows = []
        while len(rows) < count:
            p = self.corpus.sample_problem(rng)
            if not p.is_held_out():
                rows.append(Row(p.prompt, {"answer": str(p.answer)}))
        return rows

    def heldout_rows(self, count: int) -> list[Row]:
        return [Row(p.prompt, {"answer": str(p.answer)}) for p in self._heldout[:count]]


class TaskSource:
    def __init__(self, task, seed: int, template: str):
        self.task, self.seed, self.template = task, seed, template

    def _row(self, p) -> Row:
        return Row(format_prompt(p.question, self.template), {"answer": p.answer, **p.fields})

    def train_rows(self, step: int, count: int) -> list[Row]:
        return [self._row(self.task.problem(self.seed, step * count + i, "train")) for i in range(count)]

    def heldout_rows(self, count: int) -> list[Row]:
        return [self._row(p) for p in self.task.problems(self.seed, count, "heldout")]


class JsonlSource:
    def __init__(self, path: str, seed: int, template: str, heldout_fraction: float = 0.1):
        rows = load_jsonl(path)
        fmt = lambda r: Row(format_prompt(r["prompt"], template), {k: v for k, v in r.items() if k != "prompt"})  # noqa: E731
        self.train = [fmt(r) for r in rows if not is_heldout(r["prompt"], heldout_fraction)]
        self.heldout = [fmt(r) for r in rows if is_heldout(r["prompt"], heldout_fraction)]
        if not self.train:
            raise ValueError(f"{path}: every row fell in the held-out split; add rows")
        self.seed = seed

    def train_rows(self, step: int, count: int) -> list[Row]:
        n = len(self.train)
        out = []
        for g in range(step * count, (step + 1) * count):
            epoch, i = divmod(g, n)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(self.train[int(perm[i])])
        return out

    def heldout_rows(self, count: int) -> list[Row]:
        return self.heldout[:count]


def build_source(task: str, seed: int, template: str = "") -> AdditionSource | TaskSource | JsonlSource:
    if task == "addition":
        if template:
            raise ValueError("task 'addition' keeps the pretraining corpus's own prompts ('What is a + b?\\n<think>'); "
                             "task.template applies to arithmetic, countdown and JSONL tasks")
        return AdditionSource(seed)
    template = template or R1_ZERO_TEMPLATE
    if task == "arithmetic":
        return TaskSource(ArithmeticTask(), seed, template)
    if task == "countdown":
        return TaskSource(CountdownTask(), seed, template)
    if task.endswith(".jsonl"):
        return JsonlSource(task, seed, template)
    raise ValueError(f"unknown task {task!r}: use addition, arithmetic, countdown or a .jsonl file")
