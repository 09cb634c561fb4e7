"""seekstack vs transformers' DeepseekV3ForCausalLM: same config, same weights, same inputs, same threads, fp32.

    PYTHONPATH=. python -m bench.model_bench [--preset small|tiny] [--threads 2] [--repeats N] [--out bench/results]

Measures, for both models (and the ratio seekstack / transformers):
  1. training step tokens/s: forward + backward + torch.optim.AdamW step on a B x T batch, labels = input ids;
  2. prefill tokens/s: eval-mode forward under no_grad over a B x T batch (all positions' logits, no cache);
  3. batched sampled decode tokens/s: N prompts of P tokens, G new tokens each by plain sampling from the softmax
     (temperature 1, no top-k/top-p), EOS disabled; generated tokens (N * G) over the wall time of the whole
     generate call, prefill included;
  4. KV-cache bytes per token per layer (seekstack: its latent cache; transformers: measured on the
     `past_key_values` a forward with use_cache=True returns);
  5. training MFU against a measured fp32 matmul peak at the same thread count.

transformers is raced at its best: grouped_mm experts (checked to dispatch to torch's grouped GEMM on this CPU), and
for every task whichever of the "sdpa" / "eager" attention implementations is faster here (measured first).
seekstack is built with num_nextn_predict_layers=0 and aux_loss_alpha=0 so that its training loss is the main-head
cross-entropy only, the same work transformers does. Results go to <out>/model_bench_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from bench.timing import Gate, interleaved, load_average, machine_info, matmul_peak_gflops, write_results

# Architectures (transformers DeepseekV3Config field names) and workloads. `small` is the reference benchmark;
# `tiny` is a smoke test that finishes in seconds.
PRESETS: dict[str, dict] = {
    "small": dict(
        model=dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
                   num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=64,
                   q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        train=(8, 256), prefill=(8, 256), decode=(16, 16, 128), peak_n=2048,
        repeats=dict(train=8, prefill=8, decode=4, select=2, peak=5), budget_s=240),
    "tiny": dict(
        model=dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
                   num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
                   q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        train=(2, 32), prefill=(2, 32), decode=(4, 4, 8), peak_n=512,
        repeats=dict(train=2, prefill=2, decode=2, select=1, peak=3), budget_s=5),
}
ATTN_IMPLS = ("sdpa", "eager")
SEED = 0


@dataclass
class Pair:
    ours: object  # seekstack Transformer
    hf: object  # transformers DeepseekV3ForCausalLM
    hf_config: object
    config: object  # seekstack ModelConfig


# ------------------------------------------------------------------------------------------------------------------
# Models


def build_models(model_kw: dict, seed: int = SEED) -> Pair:
    """A random-init transformers model (router bias made non-zero) and seekstack loaded from its state dict."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model import ModelConfig, Transformer
    from model.hf_mapping import hf_state_dict_to_seekstack

    hc = DeepseekV3Config(**model_kw, num_key_value_heads=model_kw["num_attention_heads"], num_mtp_layers=0,
                          tie_word_embeddings=False, max_position_embeddings=1024, initializer_range=0.02,
                          pad_token_id=None, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM._from_config(hc, attn_implementation="sdpa", experts_implementation="grouped_mm",
                                            dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.01)
    cfg = ModelConfig.from_dict({**hc.to_dict(), "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.0},
                                source="bench")
    ours = Transformer(cfg)
    ours.load_state_dict(hf_state_dict_to_seekstack(hf.state_dict(), cfg), strict=True)
    hf.generation_config.eos_token_id = None  # never stop early: every sequence generates all its tokens
    return Pair(ours, hf, hc, cfg)


def parity(pair: Pair, input_ids: torch.Tensor) -> dict:
    """Max |logit difference| and the loss difference on the benchmark batch (eval mode)."""
    pair.ours.eval()
    pair.hf.eval()
    with torch.no_grad():
        a = pair.ours(input_ids, labels=input_ids)
        b = pair.hf(input_ids=input_ids, labels=input_ids, use_cache=False)
    return {"max_abs_logit_diff": (a.logits - b.logits).abs().max().item(),
            "max_abs_logit": b.logits.abs().max().item(),
            "loss_seekstack": a.loss.item(), "loss_transformers": b.loss.item(),
            "abs_loss_diff": abs(a.loss.item() - b.loss.item())}


def grouped_mm_check(hf) -> dict:
    """Does transformers' grouped_mm experts path dispatch to torch's grouped GEMM (not its loop fallback) here?"""
    from transformers.integrations import moe as hf_moe

    experts = next(m for m in hf.modules() if type(m).__name__.endswith("Experts"))
    w = experts.gate_up_proj.transpose(-2, -1)
    x = torch.zeros(4 * w.shape[0], w.shape[1])
    offs = torch.arange(1, w.shape[0] + 1, dtype=torch.int32) * 4
    native = bool(hf_moe._can_use_grouped_mm(x, w, offs))
    return {"experts_implementation": hf.config._experts_implementation, "torch_grouped_gemm": native,
            "kernel": ("torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm")
                       else "torch._grouped_mm") if native else "transformers loop fallback"}


# ------------------------------------------------------------------------------------------------------------------
# Workloads


def _backward_lm_loss(model, input_ids: torch.Tensor, is_hf: bool) -> None:
    """Forward + backward of the next-token loss with labels = inputs, in each model's own calling convention."""
    if is_hf:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    else:
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()


def make_train_step(model, input_ids: torch.Tensor, is_hf: bool, optim_kw: dict):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **optim_kw)
    model.train()

    def step():
        _backward_lm_loss(model, input_ids, is_hf)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_fwd_bwd(model, input_ids: torch.Tensor, is_hf: bool):
    """Forward + backward without an optimizer step (weights unchanged): for choosing the attention backend."""
    model.train()

    def run():
        _backward_lm_loss(model, input_ids, is_hf)
        model.zero_grad(set_to_none=True)

    return run


def make_prefill(model, input_ids: torch.Tensor, is_hf: bool):
    model.eval()

    @torch.no_grad()
    def run():
        if is_hf:
            return model(input_ids=input_ids, use_cache=False).logits
        return model(input_ids).logits

    return run


def make_decode(model, prompts: torch.Tensor, new_tokens: int, is_hf: bool):
    from model.generate import generate

    model.eval()
    prompt_list = prompts.tolist()

    def run():
        if is_hf:
            torch.manual_seed(SEED)
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=0, eos_token_id=None)
            generated = out.shape[1] - prompts.shape[1]
        else:
            out = generate(model, prompt_list, max_new_tokens=new_tokens, temperature=1.0, eos_token_id=[],
                           seed=SEED)
            generated = int(out.completion_mask.sum(1).min())
        if generated != new_tokens:
            raise RuntimeError(f"decode generated {generated} tokens per sequence, expected {new_tokens}")
        return out

    return run


def pick_attention(hf, make_fn, repeats: int, gate: Gate, make_warmup=None) -> tuple[str, dict]:
    """Time every transformers attention implementation on one task; returns the fastest and the timings."""
    timings = {}
    for impl in ATTN_IMPLS:
        hf.set_attn_implementation(impl)
        fn = make_fn()
        (make_warmup or make_fn)()()
        timings[impl] = min(gate.time(fn)[0] for _ in range(1 if gate.expired else repeats))
    best = min(timings, key=timings.get)
    hf.set_attn_implementation(best)
    return best, {k: round(v, 6) for k, v in timings.items()}


def pick_adamw(params: list[torch.nn.Parameter], gate: Gate, repeats: int = 5) -> tuple[dict, dict]:
    """Fastest torch.optim.AdamW variant (fused / foreach) for these parameter shapes; used for both models."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    timings = {}
    for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **kw)
            opt.step()
        except (RuntimeError, TypeError) as e:  # variant not available on this device / build
            timings[name] = f"unavailable: {e}"
            continue
        timings[name] = statistics.median(gate.time(opt.step)[0] for _ in range(repeats))
    ok = {k: v for k, v in timings.items() if isinstance(v, float)}
    best = min(ok, key=ok.get)
    return {best: True}, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in timings.items()}


def hf_kv_bytes_per_token_per_layer(hf, prompts: torch.Tensor) -> dict:
    """Measured from the cache object transformers returns: bytes of layer 0's key + value tensors / (B * S)."""
    hf.eval()
    with torch.no_grad():
        pkv = hf(input_ids=prompts, use_cache=True).past_key_values
    layer = pkv.layers[0]
    tensors = {"keys": layer.keys, "values": layer.values}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    B, S = prompts.shape
    return {"bytes_per_token_per_layer": total / (B * S), "cache_class": type(pkv).__name__,
            "layer_tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype)} for k, t in tensors.items()}}


# ------------------------------------------------------------------------------------------------------------------
# FLOPs


def active_matmul_params(c) -> dict:
    """Weights each token multiplies through (embedding lookup excluded, LM head included), per component."""
    D, H, L = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = D * H * qk if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * H * qk
    attn = q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) \
        + H * c.v_head_dim * D
    n_moe = sum(c.is_moe_layer(i) for i in range(L))
    dense = 3 * D * c.intermediate_size
    moe = D * c.n_routed_experts + (c.num_experts_per_tok + (c.n_shared_experts or 0)) * 3 * D * c.moe_intermediate_size
    head = D * c.vocab_size
    total = L * attn + (L - n_moe) * dense + n_moe * moe + head
    return {"attention_per_layer": attn, "dense_ffn_per_layer": dense, "moe_ffn_per_layer": moe,
            "moe_layers": n_moe, "lm_head": head, "total": total}


def flops_per_token(c, seq_len: int) -> dict:
    n = active_matmul_params(c)["total"]
    attn_fwd = 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim
                                                                  + c.v_head_dim) * seq_len
    return {"active_params_N": n, "attention_fwd_flops_per_token": attn_fwd,
            "train": 6 * n + 3 * attn_fwd, "forward": 2 * n + attn_fwd,
            "formula": ("train = 6 N + 6 L H (d_qk + d_v) T; forward = 2 N + 2 L H (d_qk + d_v) T, with N the "
                        "active matmul weights per token (MLA projections, dense/shared FFN, top-k routed experts, "
                        "router, LM head; embedding lookup excluded), d_qk = qk_nope + qk_rope, T the sequence length "
                        "(PaLM convention: the causal mask is not discounted)")}


# ------------------------------------------------------------------------------------------------------------------
# Main


def run(preset_name: str, threads: int, repeats: int | None, out_dir: str, budget_s: float | None = None) -> dict:
    t_start = time.perf_counter()
    preset = PRESETS[preset_name]
    reps = dict(preset["repeats"])
    if repeats is not None:
        reps.update(train=repeats, prefill=repeats, decode=repeats)
    torch.set_num_threads(threads)
    gate = Gate(preset["budget_s"] if budget_s is None else budget_s)
    result = {"preset": preset_name, "machine": machine_info(threads), "load_average_start": load_average()}
    peak = matmul_peak_gflops(preset["peak_n"], reps["peak"], gate=gate)

    pair = build_models(preset["model"])
    ours, hf, cfg = pair.ours, pair.hf, pair.config
    g = torch.Generator().manual_seed(SEED + 2)
    B, T = preset["train"]
    train_ids = torch.randint(2, cfg.vocab_size, (B, T), generator=g)
    Bp, Tp = preset["prefill"]
    prefill_ids = train_ids if (Bp, Tp) == (B, T) else torch.randint(2, cfg.vocab_size, (Bp, Tp), generator=g)
    N, P, G = preset["decode"]
    prompts = torch.randint(2, cfg.vocab_size, (N, P), generator=g)
    result["config"] = {k: v for k, v in cfg.to_dict().items() if k not in ("extra",)}
    result["workload"] = {"train_batch": [B, T], "prefill_batch": [Bp, Tp],
                          "decode": {"sequences": N, "prompt_tokens": P, "new_tokens": G, "temperature": 1.0,
                                     "top_k": 0, "top_p": 1.0, "eos": "disabled"},
                          "repeats": reps, "warmup": 1, "dtype": "float32"}
    result["parity"] = parity(pair, train_ids)
    print(f"[{preset_name}] parity: max |dlogit| = {result['parity']['max_abs_logit_diff']:.2e}", file=sys.stderr)

    settings = {"transformers_experts": grouped_mm_check(hf), "transformers_cache": "DynamicCache (default)",
                "seekstack_config_overrides": {"num_nextn_predict_layers": 0, "aux_loss_alpha": 0.0}}

    # Pick transformers' best attention backend per task, and the fastest AdamW for both.
    attn, attn_timings = {}, {}
    attn["prefill"], attn_timings["prefill"] = pick_attention(
        hf, lambda: make_prefill(hf, prefill_ids, True), reps["select"], gate)
    attn["decode"], attn_timings["decode"] = pick_attention(
        hf, lambda: make_decode(hf, prompts, G, True), reps["select"], gate,
        make_warmup=lambda: make_decode(hf, prompts, min(G, 8), True))
    attn["train"], attn_timings["train"] = pick_attention(
        hf, lambda: make_fwd_bwd(hf, train_ids, True), reps["select"], gate)
    optim_kw, optim_timings = pick_adamw(list(hf.parameters()), gate)
    settings.update(transformers_attn_implementation=attn, attn_selection_min_s=attn_timings,
                    optimizer=f"torch.optim.AdamW({next(iter(optim_kw))}=True, lr=1e-4, weight_decay=0.1)",
                    optimizer_selection_median_s=optim_timings)
    result["settings"] = settings
    print(f"[{preset_name}] transformers attention {attn}, AdamW {optim_kw}", file=sys.stderr)

    timings = {}
    # KV cache (seekstack from its cache object, transformers measured on the returned past_key_values).
    from model.cache import LatentCache

    kv_hf = hf_kv_bytes_per_token_per_layer(hf, prompts)
    kv_ours = LatentCache(cfg, 1, 1).bytes_per_token_per_layer()
    timings["kv_cache"] = {"seekstack": {"bytes_per_token_per_layer": kv_ours, "cache_class": "LatentCache"},
                           "transformers": kv_hf}

    # Training first: it matters most, so it gets the shared-machine budget first. On copies, so the
    # steps do not move the weights the other tasks use.
    hf.set_attn_implementation(attn["train"])
    ours_t, hf_t = copy.deepcopy(ours), copy.deepcopy(hf)
    timings["train"] = interleaved({"seekstack": make_train_step(ours_t, train_ids, False, optim_kw),
                                    "transformers": make_train_step(hf_t, train_ids, True, optim_kw)},
                                   warmup=1, repeats=reps["train"], gate=gate)
    del ours_t, hf_t
    print(f"[{preset_name}] train done", file=sys.stderr)

    # Prefill.
    hf.set_attn_implementation(attn["prefill"])
    timings["prefill"] = interleaved({"seekstack": make_prefill(ours, prefill_ids, False),
                                      "transformers": make_prefill(hf, prefill_ids, True)},
                                     warmup=1, repeats=reps["prefill"], gate=gate)
    print(f"[{preset_name}] prefill done", file=sys.stderr)

    # Decode.
    hf.set_attn_implementation(attn["decode"])
    timings["decode"] = interleaved({"seekstack": make_decode(ours, prompts, G, False),
                                     "transformers": make_decode(hf, prompts, G, True)},
                                    warmup=1, repeats=reps["decode"], gate=gate,
                                    warmup_fns={"seekstack": make_decode(ours, prompts, min(G, 8), False),
                                                "transformers": make_decode(hf, prompts, min(G, 8), True)})
    print(f"[{preset_name}] decode done", file=sys.stderr)


    fl_train = flops_per_token(cfg, T)
    fl_prefill = flops_per_token(cfg, Tp)

    metrics = {}

    def add(name, ours_v, hf_v, unit, higher_is_better=True):
        metrics[name] = {"seekstack": ours_v, "transformers": hf_v, "ratio": ours_v / hf_v if hf_v else None,
                         "unit": unit, "higher_is_better": higher_is_better}

    tps = {task: {who: n_tok / timings[task][who]["median_s"] for who in ("seekstack", "transformers")}
           for task, n_tok in (("train", B * T), ("prefill", Bp * Tp), ("decode", N * G))}
    add("train_tokens_per_s", tps["train"]["seekstack"], tps["train"]["transformers"], "tokens/s")
    add("prefill_tokens_per_s", tps["prefill"]["seekstack"], tps["prefill"]["transformers"], "tokens/s")
    add("decode_tokens_per_s", tps["decode"]["seekstack"], tps["decode"]["transformers"], "tokens/s")
    add("kv_cache_bytes_per_token_per_layer", kv_ours, kv_hf["bytes_per_token_per_layer"], "bytes", False)
    peak_flops = peak["median_gflops"] * 1e9
    add("train_mfu", tps["train"]["seekstack"] * fl_train["train"] / peak_flops,
        tps["train"]["transformers"] * fl_train["train"] / peak_flops, "fraction of peak")
    add("prefill_mfu", tps["prefill"]["seekstack"] * fl_prefill["forward"] / peak_flops,
        tps["prefill"]["transformers"] * fl_prefill["forward"] / peak_flops, "fraction of peak")
    # Per-round ratio t_transformers / t_seekstack of adjacent runs: robust to slow drifts of background load.
    paired = {task: statistics.median(h / o for h, o in zip(timings[task]["transformers"]["samples_s"],
                                                              timings[task]["seekstack"]["samples_s"]))
              for task in ("train", "prefill", "decode")}
    result.update(metrics=metrics, paired_ratios=paired, timings=timings, matmul_peak=peak,
                  flops={"train_seq_len": T, "per_token": fl_train, "prefill_seq_len": Tp,
                         "prefill_per_token": fl_prefill, "active_params": active_matmul_params(cfg)})
    result["load_average_end"] = load_average()
    result["contention"] = gate.report()
    result["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    result["notes"] = notes(result)

    write_results(os.path.join(out_dir, f"model_bench_{preset_name}"), result, markdown(result))
    return result


def notes(r: dict) -> list[str]:
    s, w = r["settings"], r["workload"]
    d = w["decode"]
    fl = r["flops"]["per_token"]
    c = r["contention"]
    kv = r["timings"]["kv_cache"]["transformers"]
    kv_shapes = {k: f"{v['shape']} {v['dtype'].removeprefix('torch.')}" for k, v in kv["layer_tensors"].items()}

    def n_runs(task: str) -> int:
        return len(r["timings"][task]["seekstack"]["samples_s"])

    return [
        f"Same weights in both models (transformers random init, router bias ~ N(0, 0.01)); max |Δlogit| on the "
        f"training batch = {r['parity']['max_abs_logit_diff']:.1e}.",
        "seekstack runs with num_nextn_predict_layers=0 and aux_loss_alpha=0.0, so both training losses are the "
        "main-head cross-entropy only (no MTP, no balance loss).",
        f"Training step: forward + backward + {s['optimizer']} on {w['train_batch'][0]} x {w['train_batch'][1]} tokens.",
        f"Prefill: eval-mode forward under no_grad, {w['prefill_batch'][0]} x {w['prefill_batch'][1]} tokens, logits "
        "for every position, no cache (transformers with use_cache=False).",
        f"Decode: {d['sequences']} sequences x {d['prompt_tokens']} prompt tokens, {d['new_tokens']} sampled tokens "
        "each (temperature 1, top_k 0, top_p 1, EOS disabled); tokens/s = generated tokens / wall time of the whole "
        "generate call (prefill included). transformers uses its default DynamicCache (static cache was far slower "
        "on CPU without torch.compile).",
        f"transformers: experts_implementation={s['transformers_experts']['experts_implementation']} "
        f"({s['transformers_experts']['kernel']}); attention per task {s['transformers_attn_implementation']} "
        "(the faster of sdpa / eager, measured here).",
        "KV cache: seekstack = LatentCache.bytes_per_token_per_layer(); transformers = bytes of layer 0's cached "
        f"tensors in the returned {kv['cache_class']} / (batch x length), measured: keys {kv_shapes['keys']}, values "
        f"{kv_shapes['values']} (transformers also caches MLA's compressed latent and the roped shared key, and "
        "re-expands them with kv_b_proj at every step).",
        f"MFU = tokens/s x FLOPs/token / measured peak ({r['matmul_peak']['median_gflops']:.1f} GFLOP/s, median of an "
        f"fp32 {r['matmul_peak']['n']}^2 matmul at {r['machine']['threads']} threads). {fl['formula']}. "
        f"N = {fl['active_params_N']:,}; train FLOPs/token = {fl['train']:,}.",
        f"Timings: medians of {n_runs('train')} (train), {n_runs('prefill')} (prefill), {n_runs('decode')} (decode) "
        f"runs per model after 1 warmup (for decode, a generate of {min(d['new_tokens'], 8)} tokens), the two models "
        "interleaved (A B, B A, ...).",
        f"Shared-machine guard: each timed run waits for other processes to use < {c['quiet_threshold_cores']} "
        f"cores and is retaken if they used more during it; waited {c['waited_s']} s, retook "
        f"{c['rejected_runs']} runs, kept {c['contended_runs_kept']} runs that were still contended after the "
        f"retries or the wait budget. Load average start/end: {r['load_average_start']} / "
        f"{r['load_average_end']}.",
    ]


def _fmt(v: float, unit: str) -> str:
    if unit == "fraction of peak":
        return f"{100 * v:.1f}%"
    if unit == "bytes":
        return f"{v:,.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(r: dict) -> str:
    m = r["machine"]
    labels = {"train_tokens_per_s": "training step tokens/s (fwd+bwd+AdamW)",
              "prefill_tokens_per_s": "prefill tokens/s (no_grad forward)",
              "decode_tokens_per_s": "sampled decode tokens/s (incl. prefill)",
              "kv_cache_bytes_per_token_per_layer": "KV-cache bytes/token/layer (lower is better)",
              "train_mfu": "training MFU", "prefill_mfu": "prefill MFU"}
    lines = [f"# model_bench `{r['preset']}`: seekstack vs transformers DeepseekV3ForCausalLM", "",
             f"Machine: {m['cpu']} ({', '.join(m.get('cpu_simd', [])) or 'no AVX2'}), {m['threads']} threads (of {m['logical_cpus']} logical CPUs), torch {m['torch']}, "
             f"transformers {m['transformers']}, Python {m['python']}, fp32.", "",
             "| metric | seekstack | transformers | ratio |", "|---|---:|---:|---:|"]
    for key, label in labels.items():
        x = r["metrics"][key]
        ratio = f"{x['ratio']:.2f}x" if x["ratio"] is not None else "n/a"
        lines.append(f"| {label} | {_fmt(x['seekstack'], x['unit'])} | {_fmt(x['transformers'], x['unit'])} | {ratio} |")
    t = r["timings"]
    best = ", ".join(f"{task} {t[task]['transformers']['min_s'] / t[task]['seekstack']['min_s']:.2f}x"
                     for task in ("train", "prefill", "decode"))
    paired = ", ".join(f"{task} {r['paired_ratios'][task]:.2f}x" for task in ("train", "prefill", "decode"))
    lines += ["", "ratio = seekstack / transformers (of the medians). Cross-checks: on the fastest run of each "
              f"side: {best}; median over rounds of the per-round ratio (the two runs of a round are adjacent in "
              f"time): {paired}."]
    c = r["contention"]
    if c["contended_runs_kept"]:
        lines += ["", f"**Warning:** {c['contended_runs_kept']} timed runs overlapped other processes' CPU load "
                  "(shared machine); treat the numbers as noisy."]
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per task (default: per preset)")
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds during which timed runs wait for / retake around foreign CPU load (default: per preset)")
    args = ap.parse_args(argv)
    run(args.preset, args.threads, args.repeats, args.out, args.budget)


if __name__ == "__main__":
    main()
