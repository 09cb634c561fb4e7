"""Sequence-level distillation (the DeepSeek-R1 recipe: SFT a small model on a strong model's filtered samples).

    python -m distill.seqkd --teacher RUN/final --out pairs.jsonl --num-samples 4 [--num-prompts 2000] [--seed 0]
    python -m train.sft --model.init_from STUDENT --data.path pairs.jsonl --data.template arithmetic

The teacher samples `num_samples` completions for each of the built-in task's training prompts
("What is a + b?\\n<think>"); each is scored with rl/rewards.py's `accuracy_reward` and `format_reward`, and only
samples scoring 1 on both are kept (R1 §2.3.3 rejection sampling: correct answer, well-formed
<think>…</think><answer>…</answer>). Identical (prompt, response) pairs are written once. Rows are
{"prompt": question, "response": completion after the prefilled "<think>", "answer": gold}: with
`--data.template arithmetic` train/sft.py rebuilds exactly the prompt the teacher saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from model.generate import generate
from rl.rewards import accuracy_reward, format_reward
from train.corpus import Problem, problems

from .teacher import load_teacher


def keep(problem_list: list[Problem], completions: list[str]) -> list[bool]:
    """True where a completion (text after the prompt) is correct AND well formatted."""
    prompts = [p.prompt for p in problem_list]
    answers = [str(p.answer) for p in problem_list]
    acc = accuracy_reward(prompts, completions, answer=answers)
    fmt = format_reward(prompts, completions)
    return [a == 1.0 and f == 1.0 for a, f in zip(acc, fmt)]


@torch.no_grad()
def sample(teacher, tokenizer, problem_list: list[Problem], num_samples: int, *, max_new_tokens: int,
           temperature: float, top_p: float, seed: int, batch_size: int = 64) -> list[list[str]]:
    """`num_samples` decoded completions per problem (special tag tokens kept, EOS/padding dropped)."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    pad = tokenizer.token_to_id("<|pad|>")
    drop = {eos, pad}
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in problem_list for _ in range(num_samples)]
    texts = []
    for i in range(0, len(flat), batch_size):
        chunk = flat[i:i + batch_size]
        prompts = [tokenizer.encode(p.prompt, add_special_tokens=False).ids for p in chunk]
        out = generate(teacher, prompts, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos,
                       pad_token_id=pad, generator=gen, greedy=temperature == 0)
        texts += [tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)
                  for ids in out.completions()]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(problem_list))]


FILTERS = ("correct", "none")


def run(teacher_dir: str, out: str, num_samples: int, *, num_prompts: int = 2000, seed: int = 0,
        max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
        filter: str = "correct", sampler=None, log=print) -> dict:
    """Write the filtered pairs to `out` (atomically); returns counts. `sampler` replaces `sample` (tests).

    filter: "correct" keeps a completion only when it is correct and well formatted (rejection sampling);
    "none" keeps every completion (plain teacher outputs: a teacher with no correct sample still gives rows).
    """
    from tokenizers import Tokenizer

    if filter not in FILTERS:
        raise ValueError(f"filter is {filter!r}; use one of {', '.join(FILTERS)}")

    t0 = time.perf_counter()
    teacher, tok_path = load_teacher(teacher_dir)
    tokenizer = Tokenizer.from_file(tok_path)
    plist = problems(seed, num_prompts, held_out=False)
    completions = (sampler or sample)(teacher, tokenizer, plist, num_samples, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
    rows, seen, n_correct_fmt = [], set(), 0
    for p, texts in zip(plist, completions):
        for text, ok in zip(texts, keep([p] * len(texts), texts)):
            n_correct_fmt += ok
            if not ok and filter == "correct":
                continue
            if (p.question, text) in seen:
                continue
            seen.add((p.question, text))
            rows.append({"prompt": p.question, "response": text, "answer": str(p.answer)})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out)
    total = len(plist) * num_samples
    stats = {"prompts": len(plist), "samples": total, "kept": n_correct_fmt, "written": len(rows), "filter": filter,
             "kept_fraction": n_correct_fmt / max(total, 1),
             "prompts_covered": len({r["prompt"] for r in rows}), "seconds": time.perf_counter() - t0}
    log(f"seqkd: {total} teacher samples on {len(plist)} prompts, {n_correct_fmt} correct and well formatted "
        f"({stats['kept_fraction']:.1%}), {len(rows)} unique pairs covering {stats['prompts_covered']} prompts -> "
        f"{out} ({stats['seconds']:.1f}s)")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.seqkd", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (with tokenizer.json)")
    p.add_argument("--out", required=True, help="output JSONL of {prompt, response} pairs")
    p.add_argument("--num-samples", type=int, default=4, help="teacher samples per prompt")
    p.add_argument("--num-prompts", type=int, default=2000, help="built-in training prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (then use --num-samples 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--filter", choices=FILTERS, default="correct",
                   help="correct: keep correct, well-formatted samples only; none: keep every sample")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_samples < 1 or args.num_prompts < 1:
        print("error: --num-samples and --num-prompts must be >= 1", file=sys.stderr)
        return 2
    try:
        stats = run(args.teacher, args.out, args.num_samples, num_prompts=args.num_prompts, seed=args.seed,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    batch_size=args.batch_size, filter=args.filter, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
