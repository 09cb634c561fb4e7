"""Job configs: defaults < TOML < command line, every option in --help, clear refusals.

Run: python -m pytest -q tests/test_train_config.py
"""

import pytest

from train.config import JobConfigError, load_job_config, to_toml
from train.pretrain import PretrainConfig


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text('seed = 5\n[training]\nsteps = 40\nmicro_batch = 3\n[optimizer]\nlr = 0.01\n')
    cfg = load_job_config(PretrainConfig, ["--config", str(toml), "--training.steps=7", "--run-dir", "x"])
    assert cfg.training.steps == 7 and cfg.training.micro_batch == 3 and cfg.optimizer.lr == 0.01
    assert cfg.seed == 5 and cfg.run_dir == "x"
    assert cfg.training.grad_accum == PretrainConfig().training.grad_accum


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_job_config(PretrainConfig, ["--training.steps", "9", "--metrics.progress", "false", "--seed", "3"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    again = load_job_config(PretrainConfig, ["--config", str(path)])
    assert again == cfg


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        load_job_config(PretrainConfig, ["--help"])
    out = capsys.readouterr().out
    for flag in ("--run-dir", "--seed", "--resume", "--training.steps", "--checkpoint.every", "--optimizer.lr",
                 "--data.source", "--parallelism.tp", "--parallelism.ep"):
        assert flag in out
    assert "(default: 1000)" in out  # training.steps


@pytest.mark.parametrize("argv, message", [
    (["--training.steps", "ten"], "`training.steps`: expected int"),
    (["--training.nope", "1"], "unrecognized arguments"),
    (["--training.steps", "0"], "`training.steps` must be >= 1"),
    (["--training.dtype", "fp8"], "`training.dtype`"),
    (["--metrics.progress", "maybe"], "expected bool"),
])
def test_bad_values_are_refused(argv, message, capsys):
    try:
        load_job_config(PretrainConfig, argv)
    except JobConfigError as e:
        assert message in str(e)
    except SystemExit:
        assert message in capsys.readouterr().err
    else:
        raise AssertionError("expected a refusal")


def test_bad_toml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nstepz = 3\n")
    with pytest.raises(JobConfigError, match=r"bad.toml: unknown key `training.stepz`; valid keys"):
        load_job_config(PretrainConfig, ["--config", str(bad)])
    bad.write_text("[training\n")
    with pytest.raises(JobConfigError, match="not valid TOML"):
        load_job_config(PretrainConfig, ["--config", str(bad)])
    with pytest.raises(JobConfigError, match="config file not found"):
        load_job_config(PretrainConfig, ["--config", str(tmp_path / "missing.toml")])
