"""tools.plan: per-rank parameter counts from the real sharding plan, the printed report, and clear refusals.
(Its communication model is checked against measured byte counters in tests/test_parallel_distributed.py.)

Run: PYTHONPATH=. python -m pytest -q tests/test_parallel_plan_tool.py
"""

from __future__ import annotations

import pytest

from model import Transformer, preset
from tools.plan import main, plan


def _total_params(config) -> int:
    return sum(p.numel() for p in Transformer(config).parameters())


def test_per_rank_parameters_follow_the_plan():
    cfg = preset("tiny")
    total = _total_params(cfg)
    one = plan(cfg, 1, 1, 1, batch_tokens=12, seq_len=12, dtype="fp32")
    assert one["params_per_rank"]["total"] == total
    ep = plan(cfg, 2, 1, 2, batch_tokens=24, seq_len=12, dtype="fp32")["params_per_rank"]
    experts = one["params_per_rank"]["routed_experts"]
    assert ep["routed_experts"] == experts // 2 and ep["total"] == total - experts // 2
    # tp=2, ep=2 over TP ranks: experts split over both ranks, and every TP-sharded matrix halves
    both = plan(cfg, 2, 2, 2, batch_tokens=12, seq_len=12, dtype="fp32", ep_borrows_tp=True)["params_per_rank"]
    assert both["routed_experts"] == experts // 2
    assert both["total"] < ep["total"]
    assert both["edp"] == both["routed_experts"]  # expert gradients: summed over the ranks holding them


def test_cli_prints_a_report(capsys):
    assert main(["--config", "tiny", "--gpus", "4", "--tp", "2", "--ep", "2", "--seq-len", "12",
                 "--batch-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "layout: world 4 = dp 2 x tp 2; ep 2 borrows DP ranks" in out
    assert "rank 0 groups: TP [0, 1]  DP [0, 2]  EP [0, 2]  EDP [0, 1]" in out
    for key in ("params", "optimizer_adamw", "activations_estimate", "kv cache per token", "tp_all_reduce_forward",
                "ep_all_to_all", "dp_grad_all_reduce"):
        assert key in out


@pytest.mark.parametrize("argv,message", [
    (["--config", "tiny", "--gpus", "4", "--tp", "8"], "tp=8 does not divide world_size=4"),
    (["--config", "tiny", "--gpus", "8", "--tp", "8"], "num_attention_heads = 4 is not divisible by tp=8"),
    (["--config", "tiny", "--gpus", "2", "--seq-len", "12", "--batch-tokens", "20"], "--batch-tokens 20 must be"),
    (["--config", "/nonexistent/config.json", "--gpus", "1"], "no such config file"),
])
def test_cli_refusals(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
