"""The built-in corpus: procedurally generated 3-digit addition with worked column-by-column solutions.

A document is a question, a reasoning trace and an answer:

    What is 807 + 952?
    <think>7+2+0=09 0+5+0=05 8+9+0=17</think><answer>1759</answer><|endoftext|>

Each step adds one column from the right: digit + digit + incoming carry = the two-digit column sum. Fixed-width
operands and steps keep every digit a fixed distance from where it is copied, which a small model learns in
minutes. The question-only form ("What is 807 + 952?\n<think>") is the prompt the GRPO stage samples from.

Imperfect on purpose, as real data is: with probability `flawed_fraction` a worked solution is sloppy — it forgets
the carry into the leading (hundreds) column, and its answer follows the flawed step. When sloppy solutions are the
majority, a model that imitates the corpus learns to forget that carry (greedy decoding picks the majority
behaviour) and gets every problem with a carry into the hundreds wrong. A verifier-rewarded policy can surpass the
data it imitated; a model trained longer on the same data cannot. `flawed_fraction = 0` gives a clean corpus.

Problems are split into training and held-out by a hash of the problem itself (never by seed or position), so the
two sets are disjoint whatever the seed. Generation is deterministic in (seed, index). The tokenizer is character
level (every printable ASCII character) plus the special tokens below, built with `tokenizers` and saved as a
Hugging Face `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, "<think>", "</think>", "<answer>", "</answer>"]
HELD_OUT_PERCENT = 10
ANSWER_RE = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def prompt(self) -> str:
        return self.question + "\n<think>"

    @property
    def digits(self) -> int:
        return len(str(max(self.a, self.b)))

    @property
    def carries_into_leading_column(self) -> bool:
        """True when the correct solution carries into the leading column (what sloppy solutions forget)."""
        n = self.digits - 1
        return (self.a % 10**n) + (self.b % 10**n) >= 10**n

    def is_held_out(self) -> bool:
        h = hashlib.blake2b(f"{self.a}+{self.b}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") % 100 < HELD_OUT_PERCENT

    def solution(self, flawed: bool = False) -> str:
        """The worked column additions and the answer; `flawed` forgets the carry into the leading column."""
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        width = max(len(da), len(db))
        steps, digits, carry = [], [], 0
        for i in range(width):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            carry_in = 0 if (flawed and i == width - 1) else carry
            s = x + y + carry_in
            steps.append(f"{x}+{y}+{carry_in}={s:02d}")
            digits.append(s % 10)
            carry = s // 10
        if carry:
            digits.append(carry)
        answer = int("".join(map(str, digits[::-1])))
        return f"<think>{' '.join(steps)}</think><answer>{answer}</answer>"


def sample_problem(rng: np.random.Generator, digits: int = 3) -> Problem:
    """Two operands of exactly `digits` digits."""
    lo, hi = 10 ** (digits - 1), 10 ** digits
    return Problem(int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))


def problems(seed: int, count: int, held_out: bool) -> list[Problem]:
    """`count` distinct problems of one split, deterministic in (seed, split)."""
    rng = np.random.default_rng([seed, 1 if held_out else 0])
    out, seen = [], set()
    while len(out) < count:
        p = sample_problem(rng)
        if p.is_held_out() == held_out and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def parse_answer(completion: str) -> int | None:
    m = ANSWER_RE.search(completion)
    return int(m.group(1)) if m else None


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return tok


class BuiltinCorpus:
    def __init__(self, seed: int = 0, num_problems: int = 20000, flawed_fraction: float = 0.3,
                 work_dir: str | None = None):
        self.seed, self.flawed_fraction = seed, flawed_fraction
        self.tokenizer = build_tokenizer()
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.pad_id = self.tokenizer.token_to_id(PAD)
        work_dir = work_dir or tempfile.mkdtemp(prefix="seekstack-corpus-")
        os.makedirs(work_dir, exist_ok=True)
        self.tokenizer_path = os.path.join(work_dir, "tokenizer.json")
        self.tokenizer.save(self.tokenizer_path)
        self.train_problems = problems(seed, num_problems, held_out=False)
        self.val_problems = problems(seed, max(64, num_problems // 20), held_out=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def document(self, p: Problem, rng: np.random.Generator) -> str:
        flawed = rng.random() < self.flawed_fraction
        return f"{p.question}\n{p.solution(flawed)}{EOS}"

    def _tokens(self, plist: list[Problem], salt: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, salt])
        docs = [self.document(p, rng) for p in plist]
        ids = [i for enc in self.tokenizer.encode_batch(docs) for i in enc.ids]
        return np.asarray(ids, dtype=np.uint16)

    def train_tokens(self) -> np.ndarray:
        return self._tokens(self.train_problems, 2)

    def val_tokens(self) -> np.ndarray:
        return self._tokens(self.val_problems, 3)

    def accuracy_hook(self, num_problems: int, max_new_tokens: int = 64):
        """A trainer eval hook: greedy pass@1 on the first `num_problems` held-out problems."""
        held_out = self.val_problems[:num_problems]

        def hook(model, step: int) -> dict:
            return {"accuracy": greedy_accuracy(model, self.tokenizer, held_out, max_new_tokens, self.eos_id)}
        return hook


@torch.no_grad()
def greedy_accuracy(model, tokenizer, plist: list[Problem], max_new_tokens: int, eos_id: int,
                    batch_size: int = 64) -> float:
    from model.generate import generate

    correct = 0
    for i in range(0, len(plist), batch_size):
        chunk = plist[i:i + batch_size]
        prompts = [tokenizer.encode(p.prompt).ids for p in chunk]
        out = generate(model, prompts, max_new_tokens, greedy=True, eos_token_id=eos_id)
        for p, ids in zip(chunk, out.completions()):
            text = "<think>" + tokenizer.decode(ids, skip_special_tokens=False)
            correct += parse_answer(text) == p.answer
    return correct / max(1, len(plist))
