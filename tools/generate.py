"""Generate a continuation from a seekstack checkpoint with the latent-cache generator.

    python -m tools.generate --ckpt DIR (--prompt TEXT | --input-ids 1,2,3) --max-new-tokens N
                             [--greedy] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]

--prompt needs a `tokenizer.json` (Hugging Face `tokenizers` format) in the checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from model import CheckpointError, ConfigError, load_model
from model.generate import generate


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--input-ids is empty")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="seekstack checkpoint directory (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in --ckpt)")
    src.add_argument("--input-ids", type=parse_ids, help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print a JSON object with token ids and log-probs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    try:
        model = load_model(args.ckpt).eval()
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    tok_path = os.path.join(args.ckpt, "tokenizer.json")
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tok_path)
    if args.prompt is not None:
        if tokenizer is None:
            print(f"error: --prompt needs {tok_path}; pass --input-ids instead", file=sys.stderr)
            return 2
        ids = tokenizer.encode(args.prompt).ids
    else:
        ids = args.input_ids
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        print(f"error: token ids {bad[:5]} are outside the vocabulary [0, {model.config.vocab_size})",
              file=sys.stderr)
        return 2
    try:  # generate refuses meaningless sampling settings (model.generate.check_sampling)
        out = generate(model, [ids], args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    completion = out.completions()[0]
    text = tokenizer.decode(completion) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": ids, "completion_ids": completion,
                          "logprobs": out.completion_logprobs()[0], "finished": bool(out.finished[0]),
                          "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, completion)))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
