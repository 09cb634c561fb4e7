"""Rejection sampling (DeepSeek-R1 §2.3.3): sample k completions per prompt, keep the correct, well-formatted ones,
dedupe, and write SFT data for `python -m train.sft`.

    python -m rl.rejection_sample --ckpt DIR --out pairs.jsonl [--task addition] [--prompts 512] [--k 8]
                                  [--temperature 1.0] [--max-new-tokens 64] [--seed 0]

A completion is kept when every reward in `--require` (default: accuracy and format) scores 1. Duplicates of the
same (prompt, completion) are written once; at most `--keep-per-prompt` distinct completions per prompt. Rows are
`{"prompt": question text as the template expects, "response": completion}`, with the prompt's template already
applied; fine-tune with `--data.template plain` so nothing is wrapped twice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from model import load_model
from model.generate import generate

from .rewards import load_reward
from .sources import build_source


@torch.no_grad()
def rejection_sample(model, codec, rows, k: int, max_new_tokens: int, temperature: float, seed: int,
                     require: list[str], keep_per_prompt: int, batch_size: int = 256) -> tuple[list[dict], dict]:
    """(kept rows, counts) for `rows` with k samples each."""
    funcs = [load_reward(name) for name in require]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    kept: list[dict] = []
    seen: set[tuple[str, str]] = set()
    per_prompt: dict[str, int] = {}
    counts = {"sampled": 0, "passed": 0, "duplicates": 0, "kept": 0}
    flat = [r for r in rows for _ in range(k)]
    for i in range(0, len(flat), batch_size):
        chunk = flat[i:i + batch_size]
        out = generate(model, [codec.encode(r.prompt) for r in chunk], max_new_tokens, temperature=temperature,
                       eos_token_id=codec.eos, pad_token_id=codec.pad or 0, generator=gen)
        texts = [codec.decode(ids) for ids in out.completions()]
        prompts = [r.prompt for r in chunk]
        fields = {key: [r.fields[key] for r in chunk] for key in chunk[0].fields}
        scores = [fn(prompts, texts, **fields) for fn in funcs]
        for j, (row, text) in enumerate(zip(chunk, texts)):
            counts["sampled"] += 1
            if not all(s[j] >= 1.0 for s in scores):
                continue
            counts["passed"] += 1
            key = (row.prompt, text)
            if key in seen or per_prompt.get(row.prompt, 0) >= keep_per_prompt:
                counts["duplicates"] += key in seen
                continue
            seen.add(key)
            per_prompt[row.prompt] = per_prompt.get(row.prompt, 0) + 1
            kept.append({"prompt": row.prompt, "response": text, **{f: v for f, v in row.fields.items()}})
    counts["kept"] = len(kept)
    counts["prompts_with_a_sample"] = len(per_prompt)
    return kept, counts


def main(argv: list[str] | None = None) -> int:
    from .grpo import TextCodec

    p = argparse.ArgumentParser(prog="python -m rl.rejection_sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="seekstack checkpoint directory with tokenizer.json")
    p.add_argument("--out", required=True, help="output JSONL of prompt/response rows")
    p.add_argument("--task", default="addition", help="addition | arithmetic | countdown | PATH.jsonl")
    p.add_argument("--template", default="", help="prompt template with {question} ('' = the task's default)")
    p.add_argument("--prompts", type=int, default=512, help="training prompts to sample from")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--keep-per-prompt", type=int, default=2, help="distinct kept completions per prompt at most")
    p.add_argument("--require", default="accuracy,format", help="rewards that must score 1 (comma-separated)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model = load_model(args.ckpt).eval()
        codec = TextCodec(args.ckpt)
        rows = build_source(args.task, args.seed, args.template).train_rows(0, args.prompts)
        require = [r for r in args.require.split(",") if r]
        kept, counts = rejection_sample(model, codec, rows, args.k, args.max_new_tokens, args.temperature,
                                        args.seed, require, args.keep_per_prompt)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
