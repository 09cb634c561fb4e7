"""The trainers under tensor and expert parallelism (CPU, gloo, 2 ranks) against one process on the same global batch.

  * `torchrun --nproc_per_node 2 -m train.pretrain --parallelism.tp 2` (the real launcher): per-step losses and
    final weights match one process, the logged communication bytes match tools.plan, checkpoints are sharded
    (per-rank optimizer state) and RUN_DIR/final is a consolidated checkpoint that model.load_model opens;
  * in forked gloo ranks (tests/distributed_helpers.py, no interpreter start-up): pretraining at ep=2 matches one
    process; a tp=2 run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted run; one GRPO step at
    tp=2, at ep=2 and with FSDP2 over dp=2 matches the single-process step's metrics; FSDP2 pretraining over dp=2 matches
    one process and resumes bit-identically from its step-2 checkpoint (per-rank optimizer chunks); SFT at ep=2 fine-tunes a tp=2 sharded checkpoint
    (resharded on load); a resume under another layout is refused with the fix.

lr 1e-3 / eps 1e-6 as tests/test_parallel_distributed.py (Adam's step g / (|g| + eps) amplifies the ~1e-8 gradient
differences of another summation order on near-zero gradients); measured: losses within ~1e-6, weights within
~3e-6 (the defaults lr 3e-3 / eps 1e-8 give ~8e-6).

Run: PYTHONPATH=. python -m pytest -q -m distributed tests/test_parallel_trainers.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import load_model
from tests.distributed_helpers import run_distributed
from tests.tiny_checkpoint import save_tiny_checkpoint
from tests.test_grpo import COMMON as GRPO_COMMON
from tests.test_pretrain import ROOT, TINY, _env, _metrics

pytestmark = pytest.mark.distributed

TOL = 1e-5
PRE = TINY + ["--training.steps", "4", "--data.eval_problems", "1", "--optimizer.lr", "1e-3",
              "--optimizer.eps", "1e-6"]
GRPO = GRPO_COMMON + ["--grpo.steps", "1", "--optimizer.eps", "1e-6", "--optimizer.lr", "1e-3"]
GRPO_KEYS = ("reward_mean", "reward_std", "completion_length_mean", "completion_length_max", "truncation_rate",
             "frac_reward_zero_std", "advantage_abs_mean", "kl", "ratio_mean", "entropy", "clip_ratio/low_mean",
             "clip_ratio/high_mean", "clip_ratio/region_mean", "accuracy", "accuracy_mean@2")


def _weights_diff(a: str, b: str) -> float:
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _loss_diff(a: str, b: str) -> float:
    la, lb = [r["loss"] for r in _metrics(a)], [r["loss"] for r in _metrics(b)]
    assert len(la) == len(lb) == 4
    return max(abs(x - y) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("par")


@pytest.fixture(scope="module")
def single(work):
    """One process: pretraining (4 rows per step), one GRPO step, on the same data as the parallel runs."""
    from rl.grpo import main as grpo_main
    from train.pretrain import main as pretrain_main

    pre = str(work / "single")
    assert pretrain_main(PRE + ["--training.micro_batch", "4", "--checkpoint.every", "0", "--run-dir", pre]) == 0
    base = save_tiny_checkpoint(work / "base")
    rl = str(work / "grpo_single")
    assert grpo_main(GRPO + ["--model.init_from", str(base), "--run-dir", rl]) == 0
    return {"pretrain": pre, "base": str(base), "grpo": rl}


@pytest.fixture(scope="module")
def torchrun_tp2(work):
    """The real launcher: torchrun, 2 processes, tp=2 (dp=1), checkpoints at steps 2 and 4."""
    run = str(work / "tp2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.pretrain", *PRE, "--training.micro_batch", "4", "--checkpoint.every", "2",
                           "--parallelism.tp", "2", "--run-dir", run],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def _forked_worker(rank, world, work, single, tp2_resume):
    """Several trainer runs in the same 2 gloo ranks (main() would tear the group down: keep it)."""
    import rl.grpo
    import train.entry
    import train.pretrain
    import train.sft

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    train.entry.shutdown = lambda dist: None  # every trainer's main() goes through train.entry.run_job
    out = {}
    # pretraining at ep=2: dp=2 replicas of 2 rows each = the single process's 4 rows
    out["ep2"] = str(work / "ep2")
    assert train.pretrain.main(PRE + ["--training.micro_batch", "2", "--checkpoint.every", "0",
                                      "--parallelism.ep", "2", "--run-dir", out["ep2"]]) == 0
    # resume the tp=2 run from its step-2 checkpoint (step 4 and final were deleted)
    assert train.pretrain.main(PRE + ["--training.micro_batch", "4", "--checkpoint.every", "2",
                                      "--parallelism.tp", "2", "--run-dir", tp2_resume, "--resume", "auto"]) == 0
    # the same checkpoint under another layout: refused, naming the fix
    out["mismatch"] = train.pretrain.main(PRE + ["--training.micro_batch", "2", "--parallelism.ep", "2",
                                                 "--run-dir", tp2_resume, "--resume", "auto"])
    # pretraining with FSDP2 over dp=2 (checkpoints at steps 2 and 4), then the same run resumed from step 2
    out["fsdp"], out["fsdp_resume"] = str(work / "fsdp"), str(work / "fsdp_resume")
    fsdp_run = PRE + ["--training.micro_batch", "2", "--checkpoint.every", "2", "--parallelism.fsdp", "true"]
    assert train.pretrain.main(fsdp_run + ["--run-dir", out["fsdp"]]) == 0
    if rank == 0:
        shutil.copytree(out["fsdp"], out["fsdp_resume"])
        shutil.rmtree(os.path.join(out["fsdp_resume"], "checkpoints", "step_00000004"))
        shutil.rmtree(os.path.join(out["fsdp_resume"], "final"))
    torch.distributed.barrier()
    assert train.pretrain.main(fsdp_run + ["--run-dir", out["fsdp_resume"], "--resume", "auto"]) == 0
    # one GRPO step at tp=2 (one generator group, one replica), at ep=2 (one group, two replicas) and with FSDP
    # over dp=2 (FSDP's all-gathers join the two replicas into one generator group)
    for name, flags in (("grpo_tp2", ["--parallelism.tp", "2"]), ("grpo_ep2", ["--parallelism.ep", "2"]),
                        ("grpo_fsdp", ["--parallelism.fsdp", "true"])):
        out[name] = str(work / name)
        assert rl.grpo.main(GRPO + ["--model.init_from", single["base"], "--run-dir", out[name], *flags]) == 0
    # SFT at ep=2 from the tp=2 run's sharded step-2 checkpoint (resharded on load)
    data = work / "pairs.jsonl"
    if rank == 0:
        data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "response": f"<answer>{a + b}</answer>"})
                                + "\n" for a in range(6) for b in range(6)))
    torch.distributed.barrier()
    out["sft"] = str(work / "sft_ep2")
    assert train.sft.main(["--model.init_from", os.path.join(tp2_resume, "checkpoints", "step_00000002", "model"),
                           "--data.path", str(data), "--data.template", "arithmetic", "--run-dir", out["sft"],
                           "--training.steps", "2", "--training.micro_batch", "4", "--metrics.progress", "false",
                           "--metrics.eval_every", "0", "--metrics.eval_batches", "1", "--training.threads", "1",
                           "--parallelism.ep", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def forked(work, single, torchrun_tp2):
    resume = str(work / "tp2_resume")
    shutil.copytree(torchrun_tp2, resume)
    shutil.rmtree(os.path.join(resume, "checkpoints", "step_00000004"))  # as if killed between steps 2 and 4
    shutil.rmtree(os.path.join(resume, "final"))
    out = run_distributed(_forked_worker, 2, args=(work, single, resume), timeout_s=300)
    out["tp2_resume"] = resume
    return out


# ------------------------------------------------------------------------------------------------ pretraining
def test_torchrun_tp2_matches_one_process(single, torchrun_tp2):
    assert _loss_diff(single["pretrain"], torchrun_tp2) < TOL
    assert _weights_diff(os.path.join(single["pretrain"], "final"), os.path.join(torchrun_tp2, "final")) < TOL


def test_tp2_logs_the_communication_tools_plan_predicts(torchrun_tp2):
    from tools.plan import plan

    config = load_model(os.path.join(torchrun_tp2, "final")).config
    # the windows are seq_len + 1 = 49 tokens; 4 rows per step on the one replica
    predicted = plan(config, 2, 2, 1, batch_tokens=4 * 49, seq_len=49, dtype="fp32")["comm_bytes_per_step"]
    for row in _metrics(torchrun_tp2):
        assert row["comm/all_to_all_bytes"] == 0
        # + the 4-byte TP partial of the squared gradient norm (clipping), which tools.plan leaves out
        assert row["comm/all_reduce_bytes"] == predicted["all_reduce"] + 4


def test_tp2_checkpoints_are_sharded_and_final_is_consolidated(torchrun_tp2):
    step = os.path.join(torchrun_tp2, "checkpoints", "step_00000004")
    assert sorted(os.listdir(os.path.join(step, "ranks"))) == ["rank_00000", "rank_00001"]
    for r in ("rank_00000", "rank_00001"):
        assert {"optimizer.safetensors", "optimizer.json", "rng.safetensors"} <= set(
            os.listdir(os.path.join(step, "ranks", r)))
    assert {"sharded.json", "tokenizer.json", "shard-00000.safetensors", "shard-00001.safetensors"} <= set(
        os.listdir(os.path.join(step, "model")))
    state = json.load(open(os.path.join(step, "trainer_state.json")))
    assert state["layout"] == {"world_size": 2, "tp": 2, "ep": 1, "ep_borrows_tp": False}
    manifest = json.load(open(os.path.join(step, "manifest.json")))["files"]
    assert "ranks/rank_00001/optimizer.safetensors" in manifest and "model/shard-00001.safetensors" in manifest
    final = os.path.join(torchrun_tp2, "final")
    model = load_model(final)
    assert os.path.isfile(os.path.join(final, "tokenizer.json")) and not os.path.exists(final + ".shards")
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_ep2_pretraining_matches_one_process(single, forked):
    assert _loss_diff(single["pretrain"], forked["ep2"]) < TOL
    assert _weights_diff(os.path.join(single["pretrain"], "final"), os.path.join(forked["ep2"], "final")) < TOL
    from tools.plan import plan

    config = load_model(os.path.join(forked["ep2"], "final")).config
    predicted = plan(config, 2, 1, 2, batch_tokens=4 * 49, seq_len=49, dtype="fp32")["comm_bytes_per_step"]
    for row in _metrics(forked["ep2"]):
        assert row["comm/all_to_all_bytes"] == predicted["all_to_all"]
        assert row["comm/all_reduce_bytes"] == predicted["all_reduce"] + 4  # + the EP partial of the grad norm


def test_tp2_resume_is_bit_identical(torchrun_tp2, forked):
    a = load_file(os.path.join(torchrun_tp2, "final", "model.safetensors"))
    b = load_file(os.path.join(forked["tp2_resume"], "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(torchrun_tp2)] == [r["loss"] for r in _metrics(forked["tp2_resume"])]


def test_fsdp_pretraining_matches_one_process_and_resumes_exactly(single, forked):
    assert _loss_diff(single["pretrain"], forked["fsdp"]) < TOL
    assert _weights_diff(os.path.join(single["pretrain"], "final"), os.path.join(forked["fsdp"], "final")) < TOL
    step = os.path.join(forked["fsdp"], "checkpoints", "step_00000004")
    state = json.load(open(os.path.join(step, "trainer_state.json")))
    assert state["layout"] == {"world_size": 2, "tp": 1, "ep": 1, "ep_borrows_tp": False, "fsdp": True}
    assert sorted(os.listdir(os.path.join(step, "ranks"))) == ["rank_00000", "rank_00001"]  # optimizer chunks
    a = load_file(os.path.join(forked["fsdp"], "final", "model.safetensors"))
    b = load_file(os.path.join(forked["fsdp_resume"], "final", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(forked["fsdp"])] == [r["loss"] for r in _metrics(forked["fsdp_resume"])]


def test_resume_under_another_layout_is_refused(forked):
    assert forked["mismatch"] == 1


# ------------------------------------------------------------------------------------------------ GRPO, SFT
@pytest.mark.parametrize("name", ["grpo_tp2", "grpo_ep2", "grpo_fsdp"])
def test_grpo_step_matches_one_process(single, forked, name):
    ref, got = _metrics(single["grpo"]), _metrics(forked[name])
    assert [r["step"] for r in got] == [0, 1]
    assert got[0]["accuracy"] == ref[0]["accuracy"]
    for key in GRPO_KEYS:
        assert abs(got[1][key] - ref[1][key]) < TOL, (key, got[1][key], ref[1][key])
    assert got[1]["logp_diff_max"] <= TOL
    if name != "grpo_fsdp":  # FSDP's own all-gathers / reduce-scatters are not in comm_stats
        assert got[1]["comm/all_reduce_bytes"] > 0
    assert (got[1]["comm/all_to_all_bytes"] > 0) == (name == "grpo_ep2")
    assert _weights_diff(os.path.join(single["grpo"], "final"), os.path.join(forked[name], "final")) < TOL


def test_sft_reshards_a_tp2_checkpoint_at_ep2(forked):
    rows = _metrics(forked["sft"])
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    model = load_model(os.path.join(forked["sft"], "final"))
    assert os.path.isfile(os.path.join(forked["sft"], "final", "tokenizer.json"))
    assert any(r["comm/all_to_all_bytes"] > 0 for r in rows) and model.config.is_moe


def test_layout_that_does_not_fit_is_refused(capsys):
    from train.pretrain import main

    assert main(TINY + ["--parallelism.tp", "2", "--run-dir", "/nonexistent"]) == 2
    assert "tp=2 does not divide world_size=1" in capsys.readouterr().err
    assert main(TINY + ["--parallelism.ep", "0"]) == 2
    assert "parallelism.ep" in capsys.readouterr().err
