"""Rule-based rewards for GRPO and a parallel, time-limited reward runner.

Every reward is a plain function `reward(prompts, completions, **row_fields) -> list[float]`, one float per
completion; `row_fields` are the dataset columns, one value per completion (e.g. `answer=[...]`). Extra keywords
must be accepted (`**_`), because every function receives every column.

Built-ins (`load_reward(name)` also takes these names):
    accuracy              1 if the <answer> content equals the row's `answer` (numbers exactly, or within 1e-6 for
                          decimals; LaTeX via math-verify when installed, else normalised strings), else 0
    format                1 if the response is exactly <think>…</think><answer>…</answer> (R1-Zero), else 0
    tag_count             0.25 for each of <think>, </think>, <answer>, </answer> used exactly once (open-r1)
    language_consistency  share of the reasoning's words in the target language, 'en' or 'zh' (DeepSeek-R1 §2.3.3)
    countdown             rl.tasks.countdown_reward (safe AST check of an arithmetic expression)
  and SoftOverlongPenalty(max_length, cache_length) for DAPO's overlong shaping (needs `completion_lengths`).

The prompt template may end with the prefilled "<think>" (R1-Zero as implemented by understand-r1-zero, and our
default in rl/tasks.py). The model then never writes that tag, so `full_response(prompt, completion)` puts it back
before the format / tag-count / language rewards look at the text: the same completion scores the same whether the
tag was prefilled or generated.

`RewardRunner` calls each function once per sample, in worker processes (spawn context) with a time limit per
call: a call that raises, returns garbage, dies, or runs past the limit scores 0 and is counted; a hung worker is
killed and replaced. Workers are started once and reused across calls.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import numbers
import pickle
import queue
import re
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import wait

RewardFn = Callable[..., list]
THINK_PREFILL = "<think>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# ----------------------------------------------------------------------------------------------------- text parsing

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
# R1-Zero format: optional whitespace, <think>, text without tags, </think>, optional whitespace (spaces,
# newlines), <answer>, text without tags and not blank, </answer>, optional whitespace, end.
FORMAT_RE = re.compile(rf"^\s*<think>(?P<think>{_NO_TAG})</think>\s*<answer>(?P<answer>{_NO_TAG})</answer>\s*$",
                       re.DOTALL)


def full_response(prompt: str, completion: str) -> str:
    """The response as if the model had written everything after "Assistant:": re-attaches a prefilled <think>."""
    return THINK_PREFILL + completion if prompt.rstrip().endswith(THINK_PREFILL) else completion


def completion_after_prompt(prompt: str, response: str) -> str:
    """Inverse of `full_response`: what the model must generate after `prompt` to produce `response`."""
    if prompt.rstrip().endswith(THINK_PREFILL) and response.lstrip().startswith(THINK_PREFILL):
        return response.lstrip()[len(THINK_PREFILL):]
    return response


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>…</answer>, stripped; None when there is none."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_think(text: str) -> str:
    """The reasoning: from the first <think> (or the start) to </think>, <answer> or the end."""
    start = text.find(THINK_PREFILL)
    body = text[start + len(THINK_PREFILL):] if start >= 0 else text
    return re.split(r"</think>|<answer>", body, maxsplit=1)[0]


# ------------------------------------------------------------------------------------------------------- accuracy

_BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def parse_number(text: str) -> Fraction | None:
    """An exact rational from "42", "-3.5", "1,234", "$7", "1/2", "\\frac{1}{2}", "1e3", "\\boxed{8}"; else None."""
    s = _strip_wrappers(text)
    s = _THOUSANDS_RE.sub("", s).replace(" ", "").removeprefix("+")
    m = _FRAC_RE.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(/-?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(text: str) -> str:
    """Loose string form for the fallback compare: no $, \\boxed, \\text, \\left/\\right, spaces, case, final dot."""
    s = _strip_wrappers(text)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"\\(left|right|,|;|!)", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s).lower()


def _strip_wrappers(text: str) -> str:
    s = text.strip().strip("$").strip()
    m = _BOXED_RE.match(s)
    if m:
        s = m.group(1).strip()
    return s.rstrip(".").strip()


_math_verify = None  # module once imported, False when missing
_warned_no_math_verify = False


def _load_math_verify():
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify
            _math_verify = math_verify
        except ImportError:
            _math_verify = False
    return _math_verify


def answers_match(predicted: str, gold: str, abs_tol: float = 1e-6) -> bool:
    """Numbers: |pred − gold| ≤ abs_tol, computed exactly on rationals (so 20-digit products are exact). Otherwise
    math-verify (`pip install math-verify`) if installed, else normalised string equality (with a one-time warning).
    """
    global _warned_no_math_verify
    p, g = parse_number(predicted), parse_number(gold)
    if p is not None and g is not None:
        return abs(p - g) <= Fraction(abs_tol)
    mv = _load_math_verify()
    if mv:
        verdict = _math_verify_equal(mv, predicted, gold)
        if verdict is not None:
            return verdict
    elif not _warned_no_math_verify:
        warnings.warn("math-verify is not installed (pip install math-verify): non-numeric answers are compared as "
                      "normalised strings, so equivalent LaTeX forms may score 0", RuntimeWarning, stacklevel=2)
        _warned_no_math_verify = True
    return normalize_answer(predicted) == normalize_answer(gold)


def _math_verify_equal(mv, predicted: str, gold: str) -> bool | None:
    """math-verify verdict, or None when the gold does not parse. Its signal.alarm timeouts only work on the main
    thread, so elsewhere they are off (the RewardRunner's time limit still applies)."""
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    wrap = lambda s: s if ("$" in s or "\\boxed" in s) else f"${s}$"
    gold_parsed = mv.parse(wrap(gold), parsing_timeout=limit)
    if not gold_parsed:
        return None
    return bool(mv.verify(gold_parsed, mv.parse(wrap(predicted), parsing_timeout=limit), timeout_seconds=limit))


def accuracy_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence, numbers=None, target=None,
                    **_) -> list[float]:
    """1.0 when the completion's last <answer>…</answer> equals the row's `answer` (see `answers_match`), else 0.0.

    Countdown rows (fields `numbers` and `target`) are checked by the Countdown verifier instead: the answer must be
    an expression over the given numbers, each used at most once, that reaches the target; the bare target, or a
    sum of other numbers, is not an answer."""
    if numbers is not None and target is not None:
        from .tasks import countdown_reward

        return countdown_reward(prompts, completions, numbers, target)
    if answer is None:
        raise ValueError("accuracy_reward needs the dataset column `answer`")
    scores = []
    for completion, gold in zip(completions, answer):
        predicted = extract_answer(completion)
        scores.append(float(predicted is not None and answers_match(predicted, str(gold))))
    return scores


# ---------------------------------------------------------------------------------------------- format and shaping

def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """1.0 when `full_response` matches FORMAT_RE (R1-Zero: <think>…</think> then <answer>…</answer>, whitespace
    allowed around and between them, no nested or repeated tags, non-blank answer), else 0.0."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        m = FORMAT_RE.match(full_response(prompt, completion))
        scores.append(float(bool(m and m.group("answer").strip())))
    return scores


def tag_count_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once (open-r1's
    tag_count_reward, without its newline requirements since our template does not ask for newlines)."""
    return [0.25 * sum(full_response(p, c).count(tag) == 1 for tag in TAGS) for p, c in zip(prompts, completions)]


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT_RE = re.compile(rf"[{_CJK}]|[^\W\d_{_CJK}]+")  # one CJK character, or one run of other letters (a word)


def language_share(text: str, language: str) -> float:
    """Share of the text's units in the target language: units are CJK characters and words of other letters
    (digits, punctuation and symbols are language-neutral and ignored). 'en': words of ASCII letters only;
    'zh': CJK characters. No units at all gives 0.0 (empty reasoning earns nothing)."""
    units = _UNIT_RE.findall(text)
    if not units:
        return 0.0
    if language == "en":
        hits = sum(u.isascii() for u in units)
    elif language == "zh":
        hits = sum(len(u) == 1 and bool(re.match(f"[{_CJK}]", u)) for u in units)
    else:
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    return hits / len(units)


def language_consistency_reward(prompts: Sequence[str], completions: Sequence[str], language="en",
                                **_) -> list[float]:
    """DeepSeek-R1's language-consistency reward: the share of target-language words in the <think> part.
    `language` is 'en' or 'zh', or a per-row column of those."""
    languages = [language] * len(completions) if isinstance(language, str) else list(language)
    return [language_share(extract_think(full_response(p, c)), lang)
            for p, c, lang in zip(prompts, completions, languages)]


@dataclass
class SoftOverlongPenalty:
    """DAPO's soft overlong punishment (eq. 13), in tokens:

        R(y) = 0                                  if |y| ≤ L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max   (linear from 0 to −1)
             = −1                                 if |y| > L_max
    scaled by `penalty`. Needs the row field `completion_lengths` (token counts) or `completion_ids`.
    """

    max_length: int
    cache_length: int
    penalty: float = 1.0
    __name__ = "soft_overlong_penalty"

    def __post_init__(self):
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(f"need 0 < cache_length ≤ max_length, got {self.cache_length}, {self.max_length}")

    def __call__(self, prompts, completions, completion_lengths=None, completion_ids=None, **_) -> list[float]:
        if completion_lengths is None:
            if completion_ids is None:
                raise ValueError("soft_overlong_penalty needs the row field completion_lengths= (or completion_ids=)"
                                 " in tokens")
            completion_lengths = [len(ids) for ids in completion_ids]
        start = self.max_length - self.cache_length
        return [self.penalty * (-1.0 if n > self.max_length else min(0.0, (start - n) / self.cache_length))
                for n in completion_lengths]


# --------------------------------------------------------------------------------------------------------- loading

BUILTIN_REWARDS: dict[str, RewardFn | str] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language_consistency": language_consistency_reward,
    "countdown": "rl.tasks:countdown_reward",
}


def load_reward(spec: str) -> RewardFn:
    """A built-in reward name (BUILTIN_REWARDS) or a user reward "package.module:function"."""
    target = BUILTIN_REWARDS.get(spec, spec)
    if callable(target):
        return target
    if ":" not in target:
        raise ValueError(f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor a "
                         f"'package.module:function' path")
    module_name, _, attr_path = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def reward_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__


# ----------------------------------------------------------------------------------------------------------- runner

@dataclass
class RewardResult:
    per_function: dict[str, list[float]]  # name -> one score per sample (0.0 where it failed)
    total: list[float]  # Σ_k weight_k · score_k per sample
    errors: dict[str, int]  # calls that raised, returned something other than one finite number, or crashed
    timeouts: dict[str, int]  # calls that ran past timeout_s
    messages: dict[str, list[str]] = field(default_factory=dict)  # the first few error messages per function
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        """rewards/{name}/mean|std|errors|timeouts, reward (mean total) and reward_std (population std)."""
        out = {"reward": _mean(self.total), "reward_std": _std(self.total)}
        for name, scores in self.per_function.items():
            out[f"rewards/{name}/mean"] = _mean(scores)
            out[f"rewards/{name}/std"] = _std(scores)
            out[f"rewards/{name}/errors"] = self.errors[name]
            out[f"rewards/{name}/timeouts"] = self.timeouts[name]
        return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def _std(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs), 1))


class RewardRunner:
    """Evaluate reward functions sample by sample, in parallel, with a time limit per call.

    Args:
        funcs: callables or `load_reward` specs. With num_workers > 0 they are sent to worker processes, so they
            must be importable module-level functions or picklable objects (no lambdas or closures).
        weights: one per function (default 1.0 each); `total` is the weighted sum.
        num_workers: 0 evaluates in this process. There the time limit runs each call in a daemon thread and
            abandons it when late: the call is scored 0 and counted, but Python cannot kill a thread, so a hung
            call keeps its thread (and a busy loop its CPU) until the process exits. Use workers for untrusted
            rewards. num_workers ≥ 1 starts that many processes ('spawn' context unless mp_context names another);
            a worker past the limit is killed (SIGKILL) and replaced.
        timeout_s: limit per (function, sample) call in seconds; None means no limit.
        start_timeout_s: how long a new worker may take to start (imports) before the runner gives up.

    Use as a context manager, or call close(); workers are reused across calls until then. As with any
    spawn multiprocessing, the main script must guard its entry point with `if __name__ == "__main__":`.
    Spawned workers never inherit CUDA state, so the runner is safe to create after the model is on the GPU.
    """

    def __init__(self, funcs: Sequence[RewardFn | str], weights: Sequence[float] | None = None,
                 num_workers: int = 0, timeout_s: float | None = 10.0, mp_context: str | None = None,
                 start_timeout_s: float = 60.0):
        self.funcs = [load_reward(f) if isinstance(f, str) else f for f in funcs]
        if not self.funcs:
            raise ValueError("RewardRunner needs at least one reward function")
        self.weights = [1.0] * len(self.funcs) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} weights for {len(self.funcs)} reward functions")
        if num_workers < 0 or (timeout_s is not None and timeout_s <= 0):
            raise ValueError(f"need num_workers ≥ 0 and timeout_s > 0 or None, got {num_workers}, {timeout_s}")
        self.names = _unique([reward_name(f) for f in self.funcs])
        self.num_workers, self.timeout_s, self.start_timeout_s = num_workers, timeout_s, start_timeout_s
        self._workers: list[_Worker] = []
        if num_workers:
            for fn, name in zip(self.funcs, self.names):
                try:
                    pickle.dumps(fn)
                except Exception as e:  # noqa: BLE001  (pickling can fail in many ways; all mean "not sendable")
                    raise ValueError(f"reward {name!r} cannot be sent to worker processes ({e}); define it at module"
                                     f" level, or use num_workers=0") from None
            self._ctx = _mp_context(mp_context)
            self._workers = [self._start_worker() for _ in range(num_workers)]

    # -- public API

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **row_fields) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for key, values in row_fields.items():
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise ValueError(f"row field {key!r} must be a list with one value per completion ({n})")
        if self.num_workers and not self._workers:
            raise RuntimeError("this RewardRunner is closed")
        started = time.monotonic()
        scores = [[0.0] * n for _ in self.funcs]
        errors, timeouts = [0] * len(self.funcs), [0] * len(self.funcs)
        messages: list[list[str]] = [[] for _ in self.funcs]

        def record(fi: int, i: int, status: str, value) -> None:
            if status == "ok":
                scores[fi][i] = value
            else:
                (timeouts if status == "timeout" else errors)[fi] += 1
                if len(messages[fi]) < 5:
                    messages[fi].append(f"sample {i}: {value}")

        tasks = [(fi, i, prompts[i], completions[i], {k: [v[i]] for k, v in row_fields.items()})
                 for fi in range(len(self.funcs)) for i in range(n)]
        if self.num_workers:
            self._run_in_workers(tasks, record)
        elif self.timeout_s is None:
            for fi, i, prompt, completion, fields in tasks:
                record(fi, i, *_call_one(self.funcs[fi], prompt, completion, fields))
        else:
            self._run_in_thread(tasks, record)
        total = [sum(w * s[i] for w, s in zip(self.weights, scores)) for i in range(n)]
        return RewardResult(per_function=dict(zip(self.names, scores)), total=total,
                            errors=dict(zip(self.names, errors)), timeouts=dict(zip(self.names, timeouts)),
                            messages={nm: m for nm, m in zip(self.names, messages) if m},
                            seconds=time.monotonic() - started)

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110  (interpreter shutdown: nothing left to report to)
            pass

    # -- in-process evaluation

    def _run_in_thread(self, tasks, record) -> None:
        """One daemon thread works through the calls in order; a call that does not answer within the limit is
        scored as a timeout, its thread abandoned, and a fresh thread takes the calls after it (so a step starts one
        thread, not one per call)."""
        pending = deque(tasks)
        while pending:
            answers: queue.SimpleQueue = queue.SimpleQueue()  # a fresh queue: a late thread's answers go nowhere

            def work(batch=list(pending), answers=answers):
                for fi, i, prompt, completion, fields in batch:
                    answers.put(_call_one(self.funcs[fi], prompt, completion, fields))

            threading.Thread(target=work, daemon=True).start()
            while pending:
                fi, i, *_ = pending[0]
                try:
                    status, value = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    pending.popleft()
                    record(fi, i, "timeout", f"no result within {self.timeout_s} s (thread abandoned)")
                    break
                pending.popleft()
                record(fi, i, status, value)

    # -- worker processes

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self.funcs), daemon=True,
                                    name="seekstack-reward-worker")
        process.start()
        child.close()
        return _Worker(process, parent, time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _run_in_workers(self, tasks, record) -> None:
        """Each worker gets up to PIPELINE calls ahead (no round trip between two samples); the time limit runs per
        call, from the previous call's answer. A late worker is killed: its current call is a timeout, the calls
        queued behind it go back to the pool."""
        pending = deque(tasks)
        while pending or any(w.tasks for w in self._workers):
            for w in self._workers:
                while w.ready and len(w.tasks) < PIPELINE and pending:
                    task = pending.popleft()
                    try:
                        w.conn.send((task[0], *task[2:]))
                    except OSError:
                        pass  # the worker died while idle: _poll sees the closed pipe, scores this 0 and replaces it
                    if not w.tasks:
                        w.deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
                    w.tasks.append(task)
            wait([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                 timeout=self._next_wakeup())
            for w in list(self._workers):
                self._poll(w, record, pending)
            now = time.monotonic()
            for w in list(self._workers):
                if w.tasks and w.deadline is not None and now >= w.deadline:
                    head = w.tasks.popleft()
                    record(head[0], head[1], "timeout", f"no result within {self.timeout_s} s (worker killed)")
                    pending.extendleft(reversed(w.tasks))
                    self._replace(w)
                elif not w.ready and now - w.started > self.start_timeout_s:
                    self.close()
                    raise RuntimeError(f"a reward worker did not start within {self.start_timeout_s} s")

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        times = [w.deadline for w in self._workers if w.tasks and w.deadline is not None]
        times += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
        return max(0.0, min(times) - now) if times else 1.0

    def _poll(self, w: _Worker, record, pending: deque) -> None:
        closed = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                elif w.tasks:
                    head = w.tasks.popleft()
                    record(head[0], head[1], msg[0], msg[1])
                    w.deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        except (EOFError, OSError):
            closed = True  # the worker is gone (or going): its end of the pipe is closed
        if closed:
            w.process.join(timeout=1)
        if closed or not w.process.is_alive():
            if not w.ready:
                code = w.process.exitcode
                self.close()
                raise RuntimeError(f"a reward worker exited with code {code} while starting (see its traceback "
                                   f"above): reward functions must be importable in a fresh Python process")
            if w.tasks:
                head = w.tasks.popleft()
                record(head[0], head[1], "error", f"worker died (exit code {w.process.exitcode})")
                pending.extendleft(reversed(w.tasks))
            self._replace(w)


# Calls a worker may hold at once: enough to hide the pipe round trip, few enough that a killed worker's queue is short.
PIPELINE = 8


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: object
    started: float
    ready: bool = False
    tasks: deque = field(default_factory=deque)  # calls sent and not answered yet, oldest first
    deadline: float | None = None  # when the oldest of them is late

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            if not self.tasks and self.process.is_alive():
                self.conn.send(None)
                self.process.join(timeout=1)
        except (OSError, EOFError):
            pass
        self.kill()


def _worker_main(conn, funcs) -> None:
    """Worker loop: receive (function index, prompt, completion, fields), answer ("ok", score) or ("error", msg)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if any(fn is accuracy_reward for fn in funcs):
        _load_math_verify()  # import sympy now (~1 s), not inside some step's first LaTeX answer
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fi, prompt, completion, fields = msg
        try:
            conn.send(_call_one(funcs[fi], prompt, completion, fields))
        except (BrokenPipeError, OSError):
            return


def _call_one(fn, prompt, completion, fields) -> tuple[str, object]:
    """Call a reward on one sample; ("ok", float) or ("error", message)."""
    try:
        out = fn([prompt], [completion], **fields)
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # numpy array / torch tensor
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != 1:
            return "error", f"returned {type(out).__name__} of length {_len(out)}, expected a list of 1 float"
        value = out[0]
        if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
            value = float(value)  # int, bool, numpy / torch scalars
        if not isinstance(value, float) or not math.isfinite(value):
            return "error", f"returned {value!r}, expected a finite number"
        return "ok", value
    except Exception as e:  # noqa: BLE001  (a reward's bug must never stop training: it is counted and reported)
        return "error", f"{type(e).__name__}: {e}"


def _len(x) -> object:
    try:
        return len(x)
    except TypeError:
        return "n/a"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _mp_context(name: str | None):
    # spawn by default: fresh interpreters are cheap here (this module imports no torch), safe after CUDA init, and,
    # unlike a fork server, never left stale in a process that was itself forked (e.g. a forked torchrun-style rank)
    ctx = multiprocessing.get_context(name or "spawn")
    if name == "forkserver":
        # Imported once in the fork server, so every (re)started worker gets them for free. Only takes effect
        # if the fork server is not running yet; missing modules are skipped.
        ctx.set_forkserver_preload(["__main__", "rl.rewards", "rl.tasks", "math_verify"])
    return ctx
