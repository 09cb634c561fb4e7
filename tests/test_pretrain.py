"""Pretraining loop: loss falls, exact resume after SIGKILL, torchrun DDP == one process, non-finite stop,
corrupt checkpoint detection, plots.

Run: python -m pytest -q tests/test_pretrain.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, latest_valid
from train.pretrain import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model.preset", "tiny", "--data.num_problems", "300", "--data.seq_len", "48", "--data.eval_problems", "4",
        "--training.micro_batch", "4", "--metrics.progress", "false", "--metrics.eval_every", "0",
        "--metrics.eval_batches", "1", "--optimizer.warmup_steps", "2", "--training.threads", "1"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def test_loss_decreases_and_checkpoints_are_written(tmp_path):
    run = str(tmp_path / "run")
    assert main(TINY + ["--run-dir", run, "--training.steps", "30", "--checkpoint.every", "10",
                        "--checkpoint.keep", "2", "--optimizer.lr", "0.01"]) == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first
    for key in ("ce_loss", "mtp_loss_1", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "expert_load_max_over_mean", "bias_min", "bias_max"):
        assert key in rows[-1]
    assert "val_loss" in rows[-1] and "accuracy" in rows[-1]
    assert [os.path.basename(p) for p in list_checkpoints(run)] == ["step_00000020", "step_00000030"]
    assert os.path.isfile(os.path.join(run, "final", "tokenizer.json"))
    assert os.path.isfile(os.path.join(list_checkpoints(run)[-1], "model", "tokenizer.json"))
    assert "steps = 30" in open(os.path.join(run, "job.toml")).read()
    from tools.plot import plot_run

    pngs = plot_run(run)
    assert {os.path.basename(p) for p in pngs} >= {"loss.png", "lr.png", "expert_load.png"}


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = TINY + ["--training.steps", "12", "--checkpoint.every", "3", "--seed", "1"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "train.pretrain"]
    subprocess.run(cmd + args + ["--run-dir", full], check=True, env=_env(), cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(cmd + args + ["--run-dir", killed], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once step 7 is logged (checkpoint 6 exists, 7+ are lost)
        path = os.path.join(killed, "metrics.jsonl")
        if os.path.isfile(path) and len(open(path).read().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.basename(latest_valid(killed)) < "step_00000012"
    subprocess.run(cmd + args + ["--run-dir", killed, "--resume", "auto"], check=True, env=_env(), cwd=ROOT,
                   capture_output=True)
    a = load_file(os.path.join(full, "final", "model.safetensors"))
    b = load_file(os.path.join(killed, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(full)] == [r["loss"] for r in _metrics(killed)]


@pytest.mark.distributed
def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    common = TINY + ["--training.steps", "4", "--checkpoint.every", "0", "--training.micro_batch", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "train.pretrain", *common, "--training.grad_accum", "2", "--run-dir", one],
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "train.pretrain", *common, "--run-dir", two],
                   check=True, env=_env(), cwd=ROOT, capture_output=True, timeout=300)
    l1, l2 = [r["loss"] for r in _metrics(one)], [r["loss"] for r in _metrics(two)]
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    a = load_file(os.path.join(one, "final", "model.safetensors"))
    b = load_file(os.path.join(two, "final", "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(TINY + ["--run-dir", run, "--training.steps", "4", "--checkpoint.every", "2"]) == 0
    newest = list_checkpoints(run)[-1]
    with open(os.path.join(newest, "optimizer.safetensors"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert latest_valid(run, log=print).endswith("step_00000002")
    assert "optimizer.safetensors: content does not match" in capsys.readouterr().out
    assert main(TINY + ["--run-dir", run, "--training.steps", "4", "--resume", newest]) == 1
    assert "cannot resume" in capsys.readouterr().err
    assert main(TINY + ["--run-dir", run, "--training.steps", "5", "--resume", "auto"]) == 0
    assert _metrics(run)[-1]["step"] == 5 and [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from model import Transformer

    run = str(tmp_path / "run")
    original = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3 and out.loss is not None:  # from step 4 on every loss is NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    code = main(TINY + ["--run-dir", run, "--training.steps", "20", "--checkpoint.every", "2",
                        "--training.max_skipped_steps", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint" in err
    # steps 4 and 5 were skipped (weights untouched), step 6 was the third non-finite one: the run stopped there
    assert os.path.basename(latest_valid(run)) == "step_00000004"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[3].get("skipped") and rows[4].get("skipped")


def test_bf16_autocast_step_runs(tmp_path):
    run = str(tmp_path / "bf16")
    assert main(TINY + ["--run-dir", run, "--training.steps", "2", "--training.dtype", "bf16",
                        "--checkpoint.every", "0"]) == 0
    rows = _metrics(run)
    assert all(r["loss"] == r["loss"] for r in rows)  # finite
