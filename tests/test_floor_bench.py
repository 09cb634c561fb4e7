"""bench/floor.py's GEMM inventory: the floor must time exactly the model's matmul work (no timing here).

Run: python -m pytest -q tests/test_floor_bench.py
"""

import pytest

from bench import floor
from model import preset
from model.flops import active_params_per_token


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"n_shared_experts": 0, "first_k_dense_replace": 2}])
@pytest.mark.parametrize("absorbed", [False, True])
def test_gemms_cover_every_active_matmul_weight(overrides, absorbed):
    cfg = preset("tiny", num_nextn_predict_layers=0, **overrides)
    rows = 4 * cfg.n_routed_experts  # so balanced routing gives every expert exactly rows * K / E rows
    gemms = floor.model_gemms(cfg, rows, rows, absorbed=absorbed)
    # 2 FLOPs per multiply-add per token through every active weight: model/flops.py's count, exactly
    assert sum(g.flops for g in gemms) == 2 * rows * active_params_per_token(cfg, with_mtp=False)
    names = {g.name for g in gemms}
    assert ("absorb_uk" in names) == absorbed and ("kv_b_proj" in names) != absorbed


def test_gemm_run_shapes_and_backward_flops():
    cfg = preset("tiny", num_nextn_predict_layers=0)
    gemms = floor.model_gemms(cfg, 8, 2)
    fwd, train = floor.GemmRun(gemms), floor.GemmRun(gemms, backward=True)
    assert train.flops == 3 * fwd.flops == 3 * sum(g.flops for g in gemms)
    fwd.forward()
    train.forward_backward()
    experts = [g for g in gemms if g.name == "experts_gate_up"]
    assert experts and all(g.batch == cfg.n_routed_experts and g.rows == 8 * cfg.num_experts_per_tok //
                           cfg.n_routed_experts for g in experts)
    assert gemms[-1].name == "lm_head" and gemms[-1].rows == 2
