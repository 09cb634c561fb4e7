"""Command-line tools and project rules: tools.generate, tools.demo, and no torch.distributed in the model math.

Run: python -m pytest -q tests/test_tools.py
"""

import json
import pathlib
import re

import pytest
import torch

from model import Transformer, load_model, preset, save_model
from model.generate import generate
from tools import demo
from tools import generate as generate_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_model(Transformer(preset("tiny")), path)
    return path


def test_generate_cli_json_matches_python_api(ckpt, capsys):
    assert generate_cli.main(["--ckpt", str(ckpt), "--input-ids", "5,6,7", "--max-new-tokens", "6", "--greedy",
                              "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = generate(load_model(ckpt), [[5, 6, 7]], 6, greedy=True)
    assert out["prompt_ids"] == [5, 6, 7]
    assert out["completion_ids"] == ref.completions()[0]
    assert len(out["logprobs"]) == len(out["completion_ids"])


def test_generate_cli_seeded_sampling_repeats(ckpt, capsys):
    args = ["--ckpt", str(ckpt), "--input-ids", "9,3", "--max-new-tokens", "8", "--seed", "7", "--json"]
    generate_cli.main(args)
    first = json.loads(capsys.readouterr().out)["completion_ids"]
    generate_cli.main(args)
    assert json.loads(capsys.readouterr().out)["completion_ids"] == first


def test_generate_cli_refusals(ckpt, tmp_path, capsys):
    assert generate_cli.main(["--ckpt", str(tmp_path / "missing"), "--input-ids", "1"]) == 2
    assert "not found" in capsys.readouterr().err
    assert generate_cli.main(["--ckpt", str(ckpt), "--prompt", "hello"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert generate_cli.main(["--ckpt", str(ckpt), "--input-ids", "1,100000"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", str(ckpt), "--input-ids", "a,b"])


def test_generate_cli_with_tokenizer(ckpt, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i for i in range(26)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    local = tmp_path / "withtok"
    save_model(load_model(ckpt), local)
    tok.save(str(local / "tokenizer.json"))
    assert generate_cli.main(["--ckpt", str(local), "--prompt", "abc", "--max-new-tokens", "4", "--greedy",
                              "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == [0, 1, 2] and isinstance(out["text"], str)


def test_demo_quick_runs_every_stage(tmp_path):
    summary = demo.main(["--run-dir", str(tmp_path / "demo"), "--quick"])
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "accuracy_baseline", "wall_seconds", "accuracy_teacher",
                "accuracy_student_ce", "accuracy_student_seqkd", "accuracy_student_kd", "accuracy_student_onpolicy",
                "distill_target_met"):
        assert key in saved and saved[key] == summary[key]
    for stage in ("pretrain", "grpo", "baseline"):
        assert (tmp_path / "demo" / stage / "final" / "config.json").is_file()
        assert (tmp_path / "demo" / stage / "loss.png").is_file() or stage == "grpo"


def test_model_math_never_imports_torch_distributed():
    offenders = []
    for path in (ROOT / "model").rglob("*.py"):
        if "parallel" in path.relative_to(ROOT / "model").parts:
            continue
        if re.search(r"^\s*(import torch\.distributed|from torch(\.distributed)? import distributed|"
                     r"from torch\.distributed)", path.read_text(), re.M):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_plot_draws_sampled_heldout_accuracy(tmp_path):
    import json

    from tools.plot import _expand, plot_run

    rows = [{"step": 0, "accuracy": 0.2, "accuracy_mean@8": 0.1}, {"step": 5, "accuracy": 0.6, "accuracy_mean@8": 0.5,
                                                                  "reward_mean": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _expand(["accuracy", "accuracy_mean@*"], rows) == ["accuracy", "accuracy_mean@8"]
    written = {p.rsplit("/", 1)[-1] for p in plot_run(str(tmp_path))}
    assert {"accuracy.png", "reward.png"} <= written
