"""Size a parallel layout before launching it: per-rank memory and per-step communication.

    python -m tools.plan --config tiny|deepseek-v3|path/config.json --gpus N --tp T --ep E [--ep-borrows-tp]
                         [--fsdp] [--batch-tokens B] [--seq-len S] [--dtype bf16] [--json]

The parameter, gradient and optimizer numbers are exact: the model is built on the "meta" device and sharded by
model/parallel's own `parallelize` (a dry-run layout without process groups), so they follow the same plan as a
real run. Communication is the payload each rank hands to its collectives for one forward+backward on
B / dp tokens per data-parallel replica, plus the gradient sync and the expert-load reduction; it follows the
collectives model/parallel issues call by call (tests/test_parallel_distributed.py checks it against the byte
counters of real runs). Wire traffic depends on the algorithm (a ring all-reduce moves ~2(p-1)/p of its payload).

Activation memory is an estimate (no recomputation, fused attention: no T x T scores kept); the KV cache is the
MLA latent cache, replicated on every TP rank.

--fsdp (FSDP2 over the DP ranks for the non-expert parameters, model/parallel/fsdp.py): parameters, gradients and
optimizer states of those are counted as this rank's dim-0 chunk; the largest block's gathered parameters are
added as the transient peak; their gradient all-reduce becomes a reduce-scatter (payload: the full gradient) and
each step all-gathers them twice (forward, and again for backward after resharding; payload: the gathered size).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from model.config import PRESETS, ConfigError, ModelConfig, preset
from model.parallel.layout import Layout, ParallelConfigError, ParallelDims
from model.parallel.parallelize import parallelize
from model.parallel.plan import GRAD_RULES
from model.transformer import Transformer

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def load_config(name: str) -> ModelConfig:
    if name in PRESETS:
        return preset(name)
    return ModelConfig.from_json(name)


def shard_on_meta(config: ModelConfig, dims: ParallelDims) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    return parallelize(model, Layout(dims, rank=0, init_groups=False))


def _chunk(p: torch.Tensor, dp: int) -> int:
    """Elements of rank 0's FSDP chunk of p (dim-0 chunks of ceil(rows / dp), as torch.chunk)."""
    if p.dim() == 0:
        return 1
    return -(-p.shape[0] // dp) * (p.numel() // p.shape[0])


def parameter_counts(model: Transformer, fsdp_dp: int = 1) -> dict[str, int]:
    """Local elements per rank: total, routed experts, and per gradient-reduction rule. With fsdp_dp > 1 the
    non-expert parameters count as their FSDP chunk, and "fsdp_gathered" is their whole (unsharded) size."""
    counts = {"total": 0, "routed_experts": 0, **{rule: 0 for rule in GRAD_RULES}}
    if fsdp_dp > 1:
        counts.update(fsdp_gathered=0, fsdp_largest_unit=max(
            sum(p.numel() for n, p in block.named_parameters() if ".experts." not in f".{n}")
            for block in list(model.layers) + [m.block for m in model.mtp]))
    seen = set()
    plan = model.parallel_plan
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        held = p.numel()
        if ".experts." in name:
            counts["routed_experts"] += p.numel()
        elif fsdp_dp > 1:
            counts["fsdp_gathered"] += p.numel()
            held = _chunk(p, fsdp_dp)
        counts["total"] += held
        counts[plan.spec(name).grad] += held
    return counts


def block_kinds(config: ModelConfig) -> tuple[int, int]:
    """(dense blocks, MoE blocks), MTP blocks included."""
    n = config.num_hidden_layers + config.num_nextn_predict_layers
    moe = sum(config.is_moe_layer(i) for i in range(n))
    return n - moe, moe


def step_communication(config: ModelConfig, dims: ParallelDims, params: dict[str, int], seq_len: int,
                       seqs_per_replica: int, act_bytes: int, grad_bytes: int) -> dict[str, int]:
    """Payload bytes per rank (TP rank 0) for one training step, by collective kind and purpose."""
    D, K, E = config.hidden_size, config.num_experts_per_tok or 0, config.n_routed_experts or 0
    T, b = seq_len, seqs_per_replica
    N = b * T
    dense, moe = block_kinds(config)
    blocks, heads = dense + moe, 1 + config.num_nextn_predict_layers
    out = {}
    if dims.tp > 1:
        act = N * D * act_bytes
        ce_rows = sum(b * (T - shift) for shift in range(1, heads + 1))  # main head shift 1, MTP k shift k + 1
        out["tp_all_reduce_forward"] = heads * act + 2 * blocks * act + 3 * ce_rows * 4
        shared = 1 if config.n_shared_experts else 0
        out["tp_all_reduce_backward"] = (blocks * act + dense * act + moe * ((1 + shared) * act + N * K * 4)
                                         + heads * act)
    if dims.ep > 1 and moe:
        rows = -(-N // dims.tp) * K  # TP rank 0's chunk of the replica's tokens, K rows each
        out["ep_all_to_all"] = moe * (E * 8 + 4 * rows * D * act_bytes)  # counts; dispatch+combine, fwd+bwd
    grads = 0
    fsdp = dims.fsdp and dims.dp > 1
    rules = (("dp+tp", (dims.tp,)), ("edp", (dims.edp,))) if fsdp else (
        ("dp", (dims.dp,)), ("dp+tp", (dims.dp, dims.tp)), ("edp", (dims.edp,)))
    for rule, groups in rules:
        grads += sum(params[rule] * grad_bytes for size in groups if size > 1)
    if grads:
        out["dp_grad_all_reduce"] = grads
    if fsdp:
        out["fsdp_all_gather"] = 2 * params["fsdp_gathered"] * act_bytes
        out["fsdp_reduce_scatter"] = params["fsdp_gathered"] * grad_bytes
    if dims.dp > 1 and moe:
        out["expert_load_all_reduce"] = moe * E * 4
    out["all_reduce"] = sum(v for k, v in out.items() if "all_reduce" in k)
    out["all_to_all"] = out.get("ep_all_to_all", 0)
    return out


def activation_bytes(config: ModelConfig, dims: ParallelDims, tokens: int, act_bytes: int) -> int:
    """Rough activations kept for backward on one rank (tokens = the replica's tokens of one micro-batch)."""
    c, tp = config, dims.tp
    H = c.num_attention_heads // tp
    q_in = c.q_lora_rank * 2 if c.q_lora_rank else 0
    attn = (2 * c.hidden_size + q_in + H * c.qk_head_dim + 2 * (c.kv_lora_rank + c.qk_rope_head_dim)
            + H * (c.qk_nope_head_dim + c.v_head_dim) + 2 * H * c.v_head_dim)
    dense_ffn = c.hidden_size + 3 * c.intermediate_size // tp
    moe_ffn = c.hidden_size
    if c.is_moe:
        moe_ffn += c.n_routed_experts * 2  # router logits / scores (fp32 ~ 2 activation elements)
        moe_ffn += c.num_experts_per_tok * (c.hidden_size + 3 * c.moe_intermediate_size) // tp
        if c.n_shared_experts:
            moe_ffn += 3 * c.n_shared_experts * c.moe_intermediate_size // tp
    dense, moe = block_kinds(c)
    per_token = dense * (attn + dense_ffn) + moe * (attn + moe_ffn)
    heads = 1 + c.num_nextn_predict_layers
    logits = heads * c.vocab_size // tp * (act_bytes + 4)  # logits + fp32 exp in the CE
    return tokens * (per_token * act_bytes + logits)


def plan(config: ModelConfig, gpus: int, tp: int, ep: int, batch_tokens: int, seq_len: int,
         dtype: str = "bf16", ep_borrows_tp: bool = False, fsdp: bool = False) -> dict:
    dims = ParallelDims(gpus, tp, ep, ep_borrows_tp, fsdp)
    dims.validate(config)
    if batch_tokens % (dims.dp * seq_len):
        raise ParallelConfigError(f"--batch-tokens {batch_tokens} must be a multiple of dp * seq_len = "
                                  f"{dims.dp} * {seq_len}")
    nbytes = DTYPE_BYTES[dtype]
    model = shard_on_meta(config, dims)
    params = parameter_counts(model, dims.dp if fsdp else 1)
    tokens = batch_tokens // dims.dp
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    layers = config.num_hidden_layers
    return {
        "layout": {"world": gpus, "dp": dims.dp, "tp": tp, "ep": ep, "edp": dims.edp, "ep_borrows_tp": ep_borrows_tp,
                   "fsdp": fsdp,
                   "rank0_groups": {"tp": dims.tp_ranks(0), "dp": dims.dp_ranks(0), "ep": dims.ep_ranks(0),
                                    "edp": dims.edp_ranks(0)}},
        "tokens_per_replica": tokens,
        "params_per_rank": params,
        "memory_bytes": {
            "params": params["total"] * nbytes,
            "grads": params["total"] * nbytes,
            "optimizer_adamw": 2 * params["total"] * nbytes,  # torch AdamW keeps exp_avg/exp_avg_sq in param dtype
            "activations_estimate": activation_bytes(config, dims, tokens, nbytes),
            **({"fsdp_gathered_block": params["fsdp_largest_unit"] * nbytes} if "fsdp_largest_unit" in params else {}),
            "kv_cache_per_token": latent * layers * nbytes,
            "kv_cache_for_batch_tokens": latent * layers * nbytes * tokens,
        },
        "comm_bytes_per_step": step_communication(config, dims, params, seq_len, tokens // seq_len, nbytes, nbytes),
    }


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render(p: dict, dtype: str) -> str:
    lay, params, mem, comm = p["layout"], p["params_per_rank"], p["memory_bytes"], p["comm_bytes_per_step"]
    g = lay["rank0_groups"]
    borrows = "TP then DP ranks" if lay["ep_borrows_tp"] else "DP ranks"
    lines = [(f"layout: world {lay['world']} = dp {lay['dp']} x tp {lay['tp']}; ep {lay['ep']} borrows {borrows} "
              f"(each expert held by {lay['edp']} ranks)"
              + ("; FSDP2 chunks the non-expert parameters over DP" if lay.get("fsdp") else "")),
             f"  rank 0 groups: TP {g['tp']}  DP {g['dp']}  EP {g['ep']}  EDP {g['edp']}",
             (f"parameters per rank: {params['total'] / 1e6:,.2f} M ({params['routed_experts'] / 1e6:,.2f} M in "
              f"routed experts)"),
             f"memory per rank ({dtype} weights, grads and AdamW states):"]
    total = 0
    for key in ("params", "grads", "optimizer_adamw", "activations_estimate", "fsdp_gathered_block"):
        if key in mem:
            lines.append(f"  {key:<28}{_fmt(mem[key]):>14}")
            total += mem[key]
    lines.append(f"  {'total (training)':<28}{_fmt(total):>14}")
    lines.append(f"  {'kv cache per token':<28}{_fmt(mem['kv_cache_per_token']):>14}   "
                 f"({_fmt(mem['kv_cache_for_batch_tokens'])} for {p['tokens_per_replica']} tokens)")
    lines.append(f"communication per rank per step ({p['tokens_per_replica']} tokens per replica; payload):")
    for key, value in comm.items():
        if key not in ("all_reduce", "all_to_all"):
            lines.append(f"  {key:<28}{_fmt(value):>14}")
    lines.append(f"  {'all-reduce total':<28}{_fmt(comm['all_reduce']):>14}")
    lines.append(f"  {'all-to-all total':<28}{_fmt(comm['all_to_all']):>14}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help=f"a preset ({', '.join(PRESETS)}) or a config.json path")
    p.add_argument("--gpus", type=int, required=True, help="world size")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides gpus / tp)")
    p.add_argument("--ep-borrows-tp", action="store_true",
                   help="let the EP group span TP ranks (ep | tp or tp | ep): experts split over TP as well")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2-shard the non-expert parameters over the data-parallel ranks")
    p.add_argument("--batch-tokens", type=int, default=None, help="global tokens per step (default: dp * seq-len)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="weight/activation dtype")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        dp = ParallelDims(args.gpus, args.tp, args.ep, args.ep_borrows_tp, args.fsdp).dp
        batch = args.batch_tokens if args.batch_tokens is not None else dp * args.seq_len
        result = plan(config, args.gpus, args.tp, args.ep, batch, args.seq_len, args.dtype, args.ep_borrows_tp,
                      args.fsdp)
    except (ConfigError, ParallelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
