"""Supervised fine-tuning on prompt/response pairs, with the loss on the response tokens only.

    python -m train.sft --model.init_from RUN/final --data.path pairs.jsonl [--data.template r1] [...]

Rows are `{"prompt": ..., "response": ...}` or chat `{"messages": [{"role": ..., "content": ...}, ...]}` (the
last assistant message is the response; earlier messages are rendered as "Role: content" lines). The prompt is
wrapped by the template (`plain`: as is; `r1`: the R1-Zero instruction with `<think>`/`<answer>` tags; `arithmetic`:
the built-in task's `question\\n<think>` form; or any string containing `{prompt}`), the response gets the EOS
token. Labels are -100 on prompt and padding tokens. `--data.packing true` concatenates examples into full
windows (attention then crosses example boundaries, as in most packed SFT); the default pads each example to
`seq_len` on the right (causal attention never looks at the padding, so no mask is needed).

It is the same loop as pretraining (train/trainer.py): checkpoints, exact resume, metrics, and torchrun with
`--parallelism.tp/ep` (the checkpoint, single-process or sharded, is resharded for the layout on load; `micro_batch`
counts sequences per data-parallel replica; RUN_DIR/final is consolidated).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch


from .config import CheckpointConfig, JobConfigError, MetricsConfig, OptimizerConfig, ParallelismConfig
from .checkpoint import export_final
from .data import DataError, EpochPermutation, eos_id, global_indices
from .entry import run_job
from .pretrain import load_for_layout, validate_parallelism
from .trainer import Trainer, TrainingStopped

TEMPLATES = {
    "plain": "{prompt}",
    "arithmetic": "{prompt}\n<think>",
    "r1": ("A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
           "The Assistant first thinks through the reasoning and then gives the answer; the reasoning and the "
           "answer are enclosed in <think> </think> and <answer> </answer> tags, i.e. <think> reasoning here "
           "</think> <answer> answer here </answer>. User: {prompt} Assistant: <think>"),
}


@dataclass
class SFTModel:
    init_from: str = ""  # seekstack checkpoint directory to fine-tune (required); its tokenizer.json is used


@dataclass
class SFTData:
    path: str = ""  # JSONL file of prompt/response pairs or chat messages (required)
    template: str = "plain"  # plain | arithmetic | r1 | a string containing {prompt}
    seq_len: int = 256
    packing: bool = False
    val_fraction: float = 0.05


@dataclass
class SFTTraining:
    steps: int = 100
    micro_batch: int = 8  # sequences per data-parallel replica per micro-step
    grad_accum: int = 1
    dtype: str = "fp32"
    compile: bool = False
    max_skipped_steps: int = 5
    threads: int = 0


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    seed: int = 0
    resume: str = ""
    model: SFTModel = field(default_factory=SFTModel)
    data: SFTData = field(default_factory=SFTData)
    training: SFTTraining = field(default_factory=SFTTraining)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-4, warmup_steps=5))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)

    def validate(self) -> None:
        if not self.model.init_from:
            raise JobConfigError("`model.init_from` is required: the checkpoint directory to fine-tune")
        if not self.data.path:
            raise JobConfigError("`data.path` is required: a JSONL file of prompt/response pairs")
        if self.data.template not in TEMPLATES and "{prompt}" not in self.data.template:
            raise JobConfigError(f"`data.template` is {self.data.template!r}; use {', '.join(TEMPLATES)} or a "
                                 f"string containing {{prompt}}")
        validate_parallelism(self.parallelism)


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from JSONL; malformed rows are refused with their line number."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: SFT data file not found")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                pairs.append((row["prompt"], row["response"]))
            elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"] and \
                    all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in row["messages"]) and \
                    row["messages"][-1].get("role") == "assistant":
                *context, last = row["messages"]
                prompt = "\n".join(f"{m.get('role', 'user').capitalize()}: {m['content']}" for m in context)
                pairs.append((prompt, last["content"]))
            else:
                raise DataError(f"{path}:{lineno}: expected {{\"prompt\": str, \"response\": str}} or "
                                f"{{\"messages\": [..., {{\"role\": \"assistant\", \"content\": str}}]}}")
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


def encode_pairs(pairs, tokenizer, template: str, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 on the prompt) per example, truncated to seq_len + 1 tokens."""
    fmt = TEMPLATES.get(template, template)
    eos = eos_id(tokenizer)
    out = []
    for prompt, response in pairs:
        p = tokenizer.encode(fmt.format(prompt=prompt), add_special_tokens=False).ids
        r = tokenizer.encode(response, add_special_tokens=False).ids + [eos]
        ids = (p + r)[: seq_len + 1]
        labels = ([-100] * len(p) + r)[: seq_len + 1]
        out.append((ids, labels))
    return out


class SFTDataset:
    """Deterministic, resumable batches of padded (or packed) examples; same indexing as pretraining."""

    def __init__(self, examples, seq_len: int, seed: int, pad_id: int, packing: bool):
        self.seq_len, self.pad_id = seq_len, pad_id
        if packing:
            ids = np.asarray([t for e in examples for t in e[0]], dtype=np.int64)
            labels = np.asarray([t for e in examples for t in e[1]], dtype=np.int64)
            n = (len(ids) - 1) // seq_len
            if n < 1:
                raise DataError("packed SFT data is shorter than one sequence; lower data.seq_len")
            self.rows = [(ids[i * seq_len: (i + 1) * seq_len + 1], labels[i * seq_len: (i + 1) * seq_len + 1])
                         for i in range(n)]
        else:
            self.rows = [(np.asarray(i), np.asarray(l)) for i, l in examples]
        self.order = EpochPermutation(len(self.rows), seed)

    def batch(self, step, micro=0, rank=0, world=1, micro_batch=8, accum=1) -> dict:
        rows = [self.rows[self.order(g)] for g in global_indices(step, micro, rank, world, micro_batch, accum)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r_ids, r_labels) in enumerate(rows):
            ids[i, : len(r_ids)] = torch.from_numpy(np.asarray(r_ids))
            labels[i, : len(r_labels)] = torch.from_numpy(np.asarray(r_labels))
        return {"input_ids": ids, "labels": labels}


def _held_out(prompt: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def main(argv: list[str] | None = None) -> int:
    return run_job(SFTConfig, argv, "python -m train.sft", __doc__, run,
                   threads=lambda cfg: cfg.training.threads, errors=(DataError, TrainingStopped))


def run(cfg: SFTConfig, dist) -> int:
    from tokenizers import Tokenizer

    tok_path = os.path.join(cfg.model.init_from, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise DataError(f"{tok_path}: SFT needs the checkpoint's tokenizer.json")
    tokenizer = Tokenizer.from_file(tok_path)
    model = load_for_layout(cfg.model.init_from, dist)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise DataError(f"{tok_path}: {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}")
    pairs = read_pairs(cfg.data.path)
    train_pairs = [p for p in pairs if not _held_out(p[0], cfg.data.val_fraction)] or pairs
    val_pairs = [p for p in pairs if _held_out(p[0], cfg.data.val_fraction)] or pairs[:1]
    pad = tokenizer.token_to_id("<|pad|>")
    pad = eos_id(tokenizer) if pad is None else pad
    make = lambda ps, seed: SFTDataset(encode_pairs(ps, tokenizer, cfg.data.template, cfg.data.seq_len),  # noqa: E731
                                       cfg.data.seq_len, seed, pad, cfg.data.packing)
    train_set, val_set = make(train_pairs, cfg.seed), make(val_pairs, cfg.seed + 1)
    t = cfg.training

    def batches(step, micro, dp_rank, dp):
        return train_set.batch(step, micro, dp_rank, dp, t.micro_batch, t.grad_accum)

    def eval_batches(i):
        return val_set.batch(0, i, dist.dp_rank, dist.dp, t.micro_batch, cfg.metrics.eval_batches)

    trainer = Trainer(job=cfg, model=model, batches=batches, eval_batches=eval_batches, steps=t.steps,
                      grad_accum=t.grad_accum, optimizer_cfg=cfg.optimizer, checkpoint_cfg=cfg.checkpoint,
                      metrics_cfg=cfg.metrics, dist=dist, dtype=t.dtype, compile=t.compile,
                      max_skipped_steps=t.max_skipped_steps, model_files=[tok_path])
    trainer.maybe_resume(cfg.resume)
    trainer.log(f"sft: {len(train_pairs)} train / {len(val_pairs)} held-out examples from {cfg.data.path}; "
                f"{dist.describe()}")
    trainer.run()
    export_final(model, os.path.join(cfg.run_dir, "final"), dist, [tok_path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
