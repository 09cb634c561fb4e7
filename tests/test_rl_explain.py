"""`python -m rl.explain` (rl/explain.py): the per-sample table equals direct computation, the PNG is written, and
bad input exits with code 2 and a message.

Run: PYTHONPATH=. python -m pytest -q tests/test_rl_explain.py
"""

import json
import math

import pytest

from rl import explain as explain_cli

ARGS = ["--rewards", "1,0,0,1", "--old", "0.5,0.5,0.4,0.6", "--new", "0.6,0.4,0.45,0.9", "--ref", "0.5,0.5,0.5,0.5",
        "--epsilon", "0.2", "--beta", "0.04", "--scale-rewards", "group"]


def test_table_matches_direct_computation(capsys):
    assert explain_cli.main(ARGS + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # unbiased std of (1, 0, 0, 1)
    beta, eps = 0.04, 0.2
    objectives = []
    for row, r, old, new, ref in zip(out["rows"], [1, 0, 0, 1], [0.5, 0.5, 0.4, 0.6], [0.6, 0.4, 0.45, 0.9],
                                     [0.5] * 4):
        a = (r - 0.5) / (std + 1e-4)
        ratio = new / old
        clipped = min(max(ratio, 1 - eps), 1 + eps)
        kl = ref / new - math.log(ref / new) - 1
        objective = min(ratio * a, clipped * a) - beta * kl
        active = ratio * a > clipped * a  # the min picked the clipped constant
        grad = (0.0 if active else ratio * a) + beta * (ref / new - 1)  # d objective / d log π_θ
        expected = {"advantage": a, "ratio": ratio, "clipped_ratio": clipped, "unclipped": ratio * a,
                    "clipped": clipped * a, "min": min(ratio * a, clipped * a), "kl": kl, "objective": objective,
                    "grad_logp": grad}
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-12), key
        objectives.append(objective)
    assert [row["clip"] for row in out["rows"]] == ["-", "-", "-", "high"]  # ρ = 1.5 > 1.2 with A > 0
    assert out["loss"] == pytest.approx(-sum(objectives) / 4, abs=1e-12)


def test_text_table_and_epsilon_high(capsys):
    assert explain_cli.main(ARGS + ["--epsilon-high", "0.6"]) == 0
    text = capsys.readouterr().out
    header, *rows = text.splitlines()[:5]
    assert header.split()[:3] == ["sample", "reward", "advantage"] and "objective" in header
    assert rows[3].split()[header.split().index("clipped_ratio")] == "1.5000"  # 1.5 < 1 + 0.6: not clipped
    assert "loss = " in text


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "objective.png"
    assert explain_cli.main(ARGS + ["--epsilon-high", "0.28", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--rewards", "1,0,1", "--old", "0.5,0.5", "--new", "0.5,0.5,0.5"], "--old has 2 values but --rewards has 3"),
    (["--rewards", "1,0", "--old", "0.5,1.5", "--new", "0.5,0.5"], "(0, 1]"),
    (["--rewards", "1,0", "--old", "0.5,0", "--new", "0.5,0.5"], "(0, 1]"),
    (["--rewards", "1,x", "--old", "0.5,0.5", "--new", "0.5,0.5"], "comma-separated numbers"),
    (["--rewards", "1,0", "--old", "0.5,0.5", "--new", "0.5,0.5", "--beta", "0.1"], "needs --ref"),
    (["--rewards", "1,0,1", "--old", "0.5,0.5,0.5", "--new", "0.5,0.5,0.5", "--group-size", "2"], "divide"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        explain_cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        explain_cli.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ["--rewards", "--old", "--new", "--ref", "--epsilon", "--epsilon-high", "--beta", "--scale-rewards",
                   "--group-size", "--adv-eps", "--loss-type", "--plot", "--json"]:
        assert option in text
    assert "(default: 0.2)" in text and "(default: group)" in text and "(required)" in text
