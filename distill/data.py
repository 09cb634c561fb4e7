"""Distillation data: prompt/response rows as token ids with labels (−100 on the prompt), and batches of them.

Rows come from the built-in addition task (train/corpus.py: prompt "What is a + b?\\n<think>", response the worked
solution and the EOS) or from a JSONL file of {"prompt", "response"} pairs (train/sft.py's reader and templates).
Batches reuse train/sft.py's `SFTDataset`: right-padded, deterministic in (seed, step, micro-step, rank), so a
resumed run reads exactly what the uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from train.corpus import EOS, Problem, problems
from train.data import DataError, eos_id
from train.sft import TEMPLATES, encode_pairs, read_pairs


def builtin_pairs(seed: int, num_problems: int, flawed_fraction: float = 0.0) -> list[tuple[str, str]]:
    """(question, response) of the built-in task's training problems; with the "arithmetic" template the prompt is
    the corpus prompt "question\\n<think>" and the response the rest of the worked solution. A `flawed_fraction`
    share of the solutions is sloppy, drawn exactly as the pretraining corpus draws its training documents
    (train/corpus.py BuiltinCorpus with the same seed)."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for p in problems(seed, num_problems, held_out=False):
        flawed = rng.random() < flawed_fraction
        out.append((p.question, p.solution(flawed)[len("<think>"):]))
    return out


def held_out_problems(seed: int, count: int) -> list[Problem]:
    return problems(seed, count, held_out=True)


def load_examples(source: str, tokenizer, *, seed: int, num_problems: int, template: str, seq_len: int,
                  flawed_fraction: float = 0.0) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (−100 on the prompt) per row; `source` is "builtin" or a JSONL path."""
    if source == "builtin":
        pairs, template = builtin_pairs(seed, num_problems, flawed_fraction), "arithmetic"
    else:
        pairs = read_pairs(source)
    if template not in TEMPLATES and "{prompt}" not in template:
        raise DataError(f"template {template!r}: use {', '.join(TEMPLATES)} or a string containing {{prompt}}")
    return encode_pairs(pairs, tokenizer, template, seq_len)


def pad_id(tokenizer) -> int:
    pad = tokenizer.token_to_id("<|pad|>")
    return eos_id(tokenizer) if pad is None else pad


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt ids of each row of a right-padded batch (the tokens before the first label)."""
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        scored = (labels != -100).nonzero()
        n = int(scored[0]) if len(scored) else int((ids != -1).sum())
        out.append(ids[:max(n, 1)].tolist())
    return out


def shifted(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, L−1], mask [B, L−1]) of a right-padded supervised batch: position n predicts token n + 1."""
    targets = batch["labels"][:, 1:]
    return targets, targets != -100


__all__ = ["EOS", "builtin_pairs", "held_out_problems", "load_examples", "pad_id", "prompts_of", "shifted"]
