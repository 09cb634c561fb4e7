"""Held-out accuracy of a checkpoint on a GRPO task: greedy pass@1 and sampled mean@k, with the accuracy reward.

    python -m rl.evaluate --ckpt DIR [--task addition] [--problems 256] [--samples 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from model import load_model
from model.generate import generate

from .rewards import accuracy_reward
from .sources import build_source


@torch.no_grad()
def heldout_accuracy(model, codec, rows, max_new_tokens: int, samples: int = 0, temperature: float = 1.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 256) -> dict:
    """{"accuracy": greedy pass@1, "accuracy_mean@k": mean accuracy of k samples per problem} over `rows`."""
    prompts = [codec.encode(r.prompt) for r in rows]
    answers = [r.fields["answer"] for r in rows]

    def score(prompt_ids, reps, **kw) -> float:
        correct = 0.0
        for i in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[i:i + batch_size]
            out = generate(model, chunk, max_new_tokens, eos_token_id=codec.eos, pad_token_id=codec.pad or 0, **kw)
            texts = [codec.decode(ids) for ids in out.completions()]
            idx = range(i, i + len(chunk))
            correct += sum(accuracy_reward([rows[j // reps].prompt for j in idx], texts,
                                           answer=[answers[j // reps] for j in idx]))
        return correct

    result = {"accuracy": score(prompts, 1, greedy=True) / max(1, len(rows))}
    if samples:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 12345)
        repeated = [p for p in prompts for _ in range(samples)]
        result[f"accuracy_mean@{samples}"] = score(repeated, samples, temperature=temperature, top_p=top_p,
                                                   top_k=top_k, generator=gen) / max(1, len(repeated))
    return result


def main(argv: list[str] | None = None) -> int:
    from .grpo import TextCodec

    p = argparse.ArgumentParser(prog="python -m rl.evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="seekstack checkpoint directory with tokenizer.json")
    p.add_argument("--task", default="addition", help="addition | arithmetic | countdown | PATH.jsonl")
    p.add_argument("--template", default="", help="prompt template with {question} ('' = the task's default)")
    p.add_argument("--problems", type=int, default=256, help="held-out problems")
    p.add_argument("--samples", type=int, default=8, help="k of sampled mean@k (0 = greedy only)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = load_model(args.ckpt).eval()
    rows = build_source(args.task, args.seed, args.template).heldout_rows(args.problems)
    res = heldout_accuracy(model, TextCodec(args.ckpt), rows, args.max_new_tokens, args.samples, args.temperature,
                           seed=args.seed)
    print(json.dumps({"problems": len(rows), **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
