"""seekstack's main job on its embedded default (for now: the model and its latent-cache generator end to end).

    python -m tools.demo [--run-dir DIR] [--preset small] [--seed 0]

Builds the built-in model from a preset, saves it as a seekstack checkpoint, loads it back, checks that cached
decoding reproduces a full forward pass, and generates a batch of left-padded prompts, reporting decode speed and
the latent cache's size against a per-head K/V cache. Writes RUN_DIR/summary.json. (The pretraining and GRPO
stages replace this demo as they land.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from model import Transformer, load_model, preset, save_model
from model.generate import generate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="where the checkpoint and summary.json go")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="built-in model size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    model = Transformer(preset(args.preset)).eval()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] built preset {args.preset!r}: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared experts (top-{cfg.num_experts_per_tok})")
    ckpt = os.path.join(args.run_dir, "checkpoint")
    save_model(model, ckpt)
    model = load_model(ckpt).eval()
    print(f"[demo] saved and reloaded {ckpt}")

    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 13, 17)]
    greedy = generate(model, prompts, args.max_new_tokens, greedy=True, eos_token_id=[])
    with torch.no_grad():
        seq = torch.tensor([prompts[0] + greedy.completions()[0]])
        full = model(seq).logits[0, len(prompts[0]) - 1:-1].argmax(-1).tolist()
    consistent = full == greedy.completions()[0]
    print(f"[demo] cached greedy decode reproduces the full forward pass: {consistent}")

    start = time.perf_counter()
    sampled = generate(model, prompts * 4, args.max_new_tokens, temperature=0.8, top_p=0.95, seed=args.seed,
                       eos_token_id=[])
    seconds = time.perf_counter() - start
    tokens = int(sampled.completion_mask.sum())
    latent_bytes = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    per_head_bytes = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    print(f"[demo] sampled {tokens} tokens for {len(prompts) * 4} prompts in {seconds:.2f}s "
          f"({tokens / seconds:.0f} tok/s)")
    print(f"[demo] cache per token per layer: {latent_bytes} bytes (MLA latent) vs {per_head_bytes} bytes for "
          f"per-head K/V ({per_head_bytes / latent_bytes:.1f}x)")
    print(f"[demo] sample completion: {sampled.completions()[0][:16]} ...")
    summary = {"preset": args.preset, "parameters": n_params, "cached_decode_consistent": consistent,
               "decode_tokens_per_s": tokens / seconds, "cache_bytes_per_token_per_layer": latent_bytes,
               "per_head_kv_bytes_per_token_per_layer": per_head_bytes,
               "wall_seconds": time.perf_counter() - t0}
    with open(os.path.join(args.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[demo] wrote {os.path.join(args.run_dir, 'summary.json')}")
    return summary


if __name__ == "__main__":
    main()
