"""Lower bounds on this machine for the model_bench and grpo_bench workloads, and the largest speedup they allow.

    PYTHONPATH=. python -m bench.floor [--threads 2] [--repeats 5] [--out bench/results]

A workload's *floor* is the time of the work no implementation can skip, timed here with torch's own kernels:

* every matrix multiply the model's math needs, at its real shape: each linear layer's forward GEMM, and for
  training its two backward GEMMs (input and weight gradients); routed experts as perfectly balanced batched GEMMs
  (`bmm` over [E, rows/expert, ...], the cheapest way to run them: no padding, no dispatch); decoding uses MLA's
  absorbed form (two small per-head GEMMs instead of re-expanding the cache);
* for training, one fused AdamW step over the model's parameters.

Everything else is left out: attention scores and softmax, norms, RoPE, routing, token dispatch, the loss,
sampling, Python. So no implementation, seekstack's or anyone's, can run a workload faster than its floor in fp32
on this machine, and `peer time / floor` bounds the speedup over that peer that any code can reach. A target above
that bound cannot be met here, whatever the implementation.

The peer (transformers' DeepseekV3ForCausalLM, grouped_mm experts, the attention backend model_bench found fastest)
and seekstack are timed in the same process, interleaved with the floors. For GRPO the TRL step time is read from
bench/results/grpo_bench.json (TRL in-process would take minutes per step pair); seekstack's GRPO step is too.
Results: <out>/floor.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from bench.timing import Gate, interleaved, load_average, machine_info, matmul_peak_gflops, write_results

SEED = 0


@dataclass(frozen=True)
class Gemm:
    """rows x k @ k x n, `batch` times (batch > 1: batched, e.g. one per expert or per head)."""
    name: str
    rows: int
    k: int
    n: int
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.rows * self.k * self.n


def layer_gemms(cfg, layer: int, rows: int, absorbed: bool = False) -> list[Gemm]:
    """The GEMMs of decoder block `layer` on `rows` tokens (DeepSeek-V3 §2.1: MLA, then dense FFN or DeepSeekMoE)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    out = []
    if cfg.q_lora_rank is None:
        out.append(Gemm("q_proj", rows, D, H * qk))
    else:
        out += [Gemm("q_a_proj", rows, D, cfg.q_lora_rank), Gemm("q_b_proj", rows, cfg.q_lora_rank, H * qk)]
    out.append(Gemm("kv_a_proj", rows, D, cfg.kv_lora_rank + cfg.qk_rope_head_dim))
    if absorbed:  # q^C W^UK and o_latent W^UV^T, per head; the cache is never expanded
        out += [Gemm("absorb_uk", rows, cfg.qk_nope_head_dim, cfg.kv_lora_rank, batch=H),
                Gemm("absorb_uv", rows, cfg.kv_lora_rank, cfg.v_head_dim, batch=H)]
    else:
        out.append(Gemm("kv_b_proj", rows, cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)))
    out.append(Gemm("o_proj", rows, H * cfg.v_head_dim, D))
    if not cfg.is_moe_layer(layer):
        return out + [Gemm("mlp_gate_up", rows, D, 2 * cfg.intermediate_size),
                      Gemm("mlp_down", rows, cfg.intermediate_size, D)]
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    per_expert = max(1, math.ceil(rows * cfg.num_experts_per_tok / E))  # perfectly balanced routing
    out += [Gemm("router", rows, D, E), Gemm("experts_gate_up", per_expert, D, 2 * I, batch=E),
            Gemm("experts_down", per_expert, I, D, batch=E)]
    if cfg.n_shared_experts:
        Is = cfg.n_shared_experts * I
        out += [Gemm("shared_gate_up", rows, D, 2 * Is), Gemm("shared_down", rows, Is, D)]
    return out


def model_gemms(cfg, rows: int, head_rows: int, absorbed: bool = False) -> list[Gemm]:
    gemms = [g for layer in range(cfg.num_hidden_layers) for g in layer_gemms(cfg, layer, rows, absorbed)]
    return gemms + [Gemm("lm_head", head_rows, cfg.hidden_size, cfg.vocab_size)]


class GemmRun:
    """Preallocated operands for a list of GEMMs (distinct weights per layer, so weights stream as in a real
    pass); `forward()` runs the forward GEMMs, `backward()` the two gradient GEMMs of each."""

    def __init__(self, gemms: list[Gemm], backward: bool = False, seed: int = SEED):
        g = torch.Generator().manual_seed(seed)
        self.ops = []
        for m in gemms:
            x = torch.randn(m.batch, m.rows, m.k, generator=g)
            w = torch.randn(m.batch, m.k, m.n, generator=g) * m.k ** -0.5
            dy = torch.randn(m.batch, m.rows, m.n, generator=g) if backward else None
            if m.batch == 1:
                x, w, dy = x[0], w[0], (dy[0] if dy is not None else None)
            self.ops.append((x, w, dy))
        self.flops = sum(m.flops for m in gemms) * (3 if backward else 1)

    def forward(self) -> None:
        for x, w, _ in self.ops:
            torch.matmul(x, w)

    def forward_backward(self) -> None:
        for x, w, dy in self.ops:
            torch.matmul(x, w)
            torch.matmul(dy, w.transpose(-2, -1))  # dL/dx
            torch.matmul(x.transpose(-2, -1), dy)  # dL/dw


def adamw_step_fn(model: torch.nn.Module):
    """One fused AdamW step over a copy of `model`'s parameter shapes, with gradients set."""
    params = [torch.nn.Parameter(torch.randn_like(p)) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    return opt.step


def train_floor_fn(cfg, batch: int, seq: int, model):
    gemm = GemmRun(model_gemms(cfg, batch * seq, batch * seq), backward=True)
    adamw = adamw_step_fn(model)

    def run():
        gemm.forward_backward()
        adamw()

    return run, gemm.flops


def decode_floor_fn(cfg, sequences: int, prompt: int, new_tokens: int):
    """Prefill GEMMs of all prompts (logits of the last position only), then new_tokens - 1 absorbed decode
    steps of `sequences` rows."""
    prefill = GemmRun(model_gemms(cfg, sequences * prompt, sequences))
    step = GemmRun(model_gemms(cfg, sequences, sequences, absorbed=True))

    def run():
        prefill.forward()
        for _ in range(new_tokens - 1):
            step.forward()

    return run, prefill.flops + (new_tokens - 1) * step.flops


def grpo_floor_fns(cfg, prompts: int, generations: int, prompt_len: int, completion_len: int, model):
    """GRPO step floor: rollout = each distinct prompt prefilled once + completion_len - 1 decode steps of
    prompts * generations rows; update = forward + backward over the distinct prompts and every completion token
    (the shared-prompt form, the least work) + fused AdamW."""
    B = prompts * generations
    roll_prefill = GemmRun(model_gemms(cfg, prompts * prompt_len, prompts))
    roll_step = GemmRun(model_gemms(cfg, B, B, absorbed=True))
    upd_prompt = GemmRun(model_gemms(cfg, prompts * prompt_len, prompts), backward=True)
    upd_completions = GemmRun(model_gemms(cfg, B * completion_len, B * completion_len), backward=True)
    adamw = adamw_step_fn(model)

    def rollout():
        roll_prefill.forward()
        for _ in range(completion_len - 1):
            roll_step.forward()

    def update():
        upd_prompt.forward_backward()
        upd_completions.forward_backward()
        adamw()

    return rollout, update


def _median(s: dict) -> float:
    return s["median_s"]


def run(threads: int, repeats: int, out_dir: str, budget_s: float) -> dict:
    from bench.model_bench import PRESETS, build_models, make_decode, make_train_step
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    gate = Gate(budget_s)
    result = {"machine": machine_info(threads), "load_average_start": load_average()}
    spec = PRESETS["small"]
    result["matmul_peak"] = matmul_peak_gflops(spec["peak_n"], 5, gate=gate)

    pair = build_models(spec["model"])
    cfg = pair.config
    attn = _transformers_attention(out_dir)
    g = torch.Generator().manual_seed(SEED + 2)
    B, T = spec["train"]
    train_ids = torch.randint(2, cfg.vocab_size, (B, T), generator=g)
    N, P, G = spec["decode"]
    prompts = torch.randint(2, cfg.vocab_size, (N, P), generator=g)
    optim_kw = {"fused": True}

    rows = {}
    # Training step.
    floor_fn, flops = train_floor_fn(cfg, B, T, pair.ours)
    pair.hf.set_attn_implementation(attn["train"])
    ours_t, hf_t = copy.deepcopy(pair.ours), copy.deepcopy(pair.hf)  # training moves weights; decode uses the originals
    t = interleaved({"floor": floor_fn, "seekstack": make_train_step(ours_t, train_ids, False, optim_kw),
                     "transformers": make_train_step(hf_t, train_ids, True, optim_kw)},
                    warmup=1, repeats=repeats, gate=gate)
    rows["train"] = _row(t, target=1.5, floor_gemm_gflop=flops / 1e9,
                         what=f"training step, {B} x {T} tokens (fwd + bwd + AdamW)")
    print(f"train: {_brief(rows['train'])}", file=sys.stderr)

    # Sampled decode.
    floor_fn, flops = decode_floor_fn(cfg, N, P, G)
    pair.hf.set_attn_implementation(attn["decode"])
    t = interleaved({"floor": floor_fn, "seekstack": make_decode(pair.ours, prompts, G, False),
                     "transformers": make_decode(pair.hf, prompts, G, True)},
                    warmup=1, repeats=max(3, repeats // 2), gate=gate,
                    warmup_fns={"floor": floor_fn, "seekstack": make_decode(pair.ours, prompts, 8, False),
                                "transformers": make_decode(pair.hf, prompts, 8, True)})
    rows["decode"] = _row(t, target=3.0, floor_gemm_gflop=flops / 1e9,
                          what=f"sampled decode, {N} sequences x {G} new tokens after {P} prompt tokens")
    print(f"decode: {_brief(rows['decode'])}", file=sys.stderr)

    # GRPO step (grpo_bench's workload), against the step times grpo_bench measured.
    rows["grpo"] = _grpo_row(out_dir, repeats, gate)
    if rows["grpo"]:
        print(f"grpo: {_brief(rows['grpo'])}", file=sys.stderr)
    result.update(rows={k: v for k, v in rows.items() if v}, transformers_attention=attn,
                  load_average_end=load_average(), contention=gate.report(),
                  bench_wall_s=round(time.perf_counter() - t_start, 1))
    write_results(os.path.join(out_dir, "floor"), result, markdown(result))
    return result


def _grpo_row(out_dir: str, repeats: int, gate: Gate) -> dict | None:
    from bench.grpo_bench import WORKLOADS
    from model import Transformer, preset
    from train.corpus import build_tokenizer

    path = os.path.join(out_dir, "grpo_bench.json")
    if not os.path.exists(path):
        print(f"grpo: no {path}; run bench.grpo_bench first", file=sys.stderr)
        return None
    with open(path) as f:
        measured = json.load(f)
    w = WORKLOADS["reference"]
    tok = build_tokenizer()
    cfg = preset(w["preset"], vocab_size=tok.get_vocab_size(), num_nextn_predict_layers=0)
    prompt_len = len(tok.encode("What is 302 + 799?\n<think>").ids)  # the addition task's prompt length
    model = Transformer(cfg)
    rollout, update = grpo_floor_fns(cfg, w["prompts_per_step"], w["num_generations"], prompt_len,
                                     w["max_completion_length"], model)
    t = interleaved({"rollout": rollout, "update": update}, warmup=1, repeats=repeats, gate=gate)
    s = measured["summary"]
    floor_s = _median(t["rollout"]) + _median(t["update"])
    return {"what": f"GRPO step, {w['prompts_per_step']} prompts x G={w['num_generations']}, "
                    f"{w['max_completion_length']} completion tokens (grpo_bench's workload)",
            "floor_s": floor_s, "floor_rollout_s": _median(t["rollout"]), "floor_update_s": _median(t["update"]),
            "seekstack_s": s["seekstack"]["step_s"], "peer_s": s["trl"]["step_s"], "peer": "TRL",
            "peer_source": f"{path} (measured by bench.grpo_bench on this machine)",
            "max_attainable_ratio": s["trl"]["step_s"] / floor_s,
            "current_ratio": s["trl"]["step_s"] / s["seekstack"]["step_s"],
            "seekstack_over_floor": s["seekstack"]["step_s"] / floor_s, "target": 3.0,
            "timings": t}


def _row(t: dict, target: float, floor_gemm_gflop: float, what: str) -> dict:
    floor_s, ours_s, peer_s = _median(t["floor"]), _median(t["seekstack"]), _median(t["transformers"])
    return {"what": what, "floor_s": floor_s, "floor_gflop": floor_gemm_gflop,
            "floor_gflops_per_s": floor_gemm_gflop / floor_s, "seekstack_s": ours_s, "peer_s": peer_s,
            "peer": "transformers", "max_attainable_ratio": peer_s / floor_s, "current_ratio": peer_s / ours_s,
            "seekstack_over_floor": ours_s / floor_s, "target": target, "timings": t}


def _brief(r: dict) -> str:
    return (f"floor {r['floor_s']:.3f} s, seekstack {r['seekstack_s']:.3f} s, {r['peer']} {r['peer_s']:.3f} s; "
            f"max attainable {r['max_attainable_ratio']:.2f}x (target {r['target']}x), now {r['current_ratio']:.2f}x")


def _transformers_attention(out_dir: str) -> dict:
    """The attention backend model_bench measured fastest per task (sdpa when it has not run)."""
    try:
        with open(os.path.join(out_dir, "model_bench_small.json")) as f:
            chosen = json.load(f)["settings"]["transformers_attn_implementation"]
        return {"train": chosen["train"], "decode": chosen["decode"]}
    except (OSError, KeyError, ValueError):
        return {"train": "sdpa", "decode": "sdpa"}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# floor: the least time any implementation needs here, and the largest speedup it allows", "",
             f"Machine: {m['cpu']} ({', '.join(m['cpu_simd'])}), {m['threads']} threads, torch {m['torch']}, "
             f"transformers {m['transformers']}, fp32; matmul peak {r['matmul_peak']['median_gflops']:.1f} "
             "GFLOP/s (2048^2).", "",
             "| workload | floor s | seekstack s | peer s | now (peer / seekstack) | max attainable "
             "(peer / floor) | target | seekstack / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, row in r["rows"].items():
        lines.append(f"| {row['what']} | {row['floor_s']:.3f} | {row['seekstack_s']:.3f} | "
                     f"{row['peer_s']:.3f} ({row['peer']}) | {row['current_ratio']:.2f}x | "
                     f"**{row['max_attainable_ratio']:.2f}x** | {row['target']:.1f}x | "
                     f"{row['seekstack_over_floor']:.2f} |")
    lines += ["", "floor = only the GEMMs the model's math needs (forward, plus both backward GEMMs when training; "
              "routed experts as perfectly balanced bmm; MLA absorbed when decoding) and, when training, one fused "
              "AdamW step, each timed with torch's kernels at its real shape; attention, norms, routing, dispatch, "
              "loss, sampling and Python are left out. No implementation can beat it, so peer / floor bounds any "
              "speedup over the peer on this machine in fp32.", ""]
    if "grpo" in r["rows"]:
        g = r["rows"]["grpo"]
        lines += [f"GRPO: floor rollout {g['floor_rollout_s']:.3f} s + update {g['floor_update_s']:.3f} s; the TRL "
                  f"and seekstack step times are grpo_bench's medians ({g['peer_source']}).", ""]
    lines.append(f"Load average start/end: {r['load_average_start']} / {r['load_average_end']}; "
                 f"contention: {r['contention']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--budget", type=float, default=180.0, help="seconds of shared-machine gating")
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args(argv)
    run(args.threads, args.repeats, args.out, args.budget)


if __name__ == "__main__":
    main()
