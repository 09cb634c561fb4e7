"""Job configuration: nested dataclasses, TOML files, and `--section.key=value` command-line overrides.

Precedence is command line > TOML (`--config FILE`) > dataclass defaults (the torchtitan v0.2.2 scheme). Every
field becomes an option (`--training.steps`, `--optimizer.lr`, ...); a few run-level fields are top-level options
(`--run-dir`, `--seed`, `--resume`). `--help` lists them all with their defaults. Unknown keys, wrong types and bad
values are refused with the file (or flag), the key and the fix.

The sections shared by every trainer of the project (optimizer, checkpoint, metrics, parallelism) live here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class JobConfigError(ValueError):
    """A job config value is unknown, mistyped or inconsistent; the message names the source, key and fix."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = False  # weight decay on the embedding / output head (norms and biases never decay)
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between checkpoints; 0 = only at the end
    keep: int = 3  # most recent checkpoints kept


@dataclass
class MetricsConfig:
    progress: bool = True  # progress bar on stderr
    eval_every: int = 200  # steps between held-out evaluations; 0 = only at the end
    eval_batches: int = 4  # held-out batches per evaluation


@dataclass
class ParallelismConfig:
    tp: int = 1  # tensor-parallel degree
    ep: int = 1  # expert-parallel degree (borrowed from the data-parallel ranks)
    ep_borrows_tp: bool = False  # let the EP group span TP ranks too (experts split over TP as well)
    fsdp: bool = False  # FSDP2-shard the non-expert parameters over the data-parallel ranks (memory, not speed)


TOP_LEVEL = ("run_dir", "seed", "resume")


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tuple(args)  # `str | bool`: each type tried in order
    return tp


def _convert(value: Any, tp, where: str) -> Any:
    """Coerce a TOML or command-line value to the field's type, or explain what is wrong."""
    if isinstance(tp, tuple):
        for option in tp:
            try:
                return _convert(value, option, where)
            except JobConfigError:
                continue
        raise JobConfigError(f"{where}: expected {' or '.join(t.__name__ for t in tp)}, got {value!r}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if typing.get_origin(tp) is list or tp is list:
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise ValueError
            inner = (typing.get_args(tp) or (str,))[0]
            return [_convert(v, inner, where) for v in value]
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise JobConfigError(f"{where}: expected {name}, got {value!r}")


def _sections(cls) -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else typing.get_type_hints(cls)[f.name]
            for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}


def apply_dict(cfg, values: dict[str, Any], source: str) -> None:
    """Set nested fields of `cfg` from a {section: {key: value}} / {key: value} dict, refusing unknown keys."""
    sections = _sections(type(cfg))
    for key, value in values.items():
        if key in sections:
            if not isinstance(value, dict):
                raise JobConfigError(f"{source}: [{key}] must be a table")
            section = getattr(cfg, key)
            names = {f.name: f for f in dataclasses.fields(section)}
            for sub, sub_value in value.items():
                if sub not in names:
                    raise JobConfigError(f"{source}: unknown key `{key}.{sub}`; valid keys in [{key}]: "
                                         f"{', '.join(names)}")
                tp = _field_type(type(section), names[sub])
                setattr(section, sub, _convert(sub_value, tp, f"{source}: `{key}.{sub}`"))
        else:
            names = {f.name: f for f in dataclasses.fields(cfg) if f.name not in sections}
            if key not in names:
                raise JobConfigError(f"{source}: unknown key `{key}`; valid sections: {', '.join(sections)}; "
                                     f"valid top-level keys: {', '.join(names)}")
            setattr(cfg, key, _convert(value, _field_type(type(cfg), names[key]), f"{source}: `{key}`"))


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    defaults = cls()
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML job config (values below override it)")
    sections = _sections(cls)
    for f in dataclasses.fields(cls):
        if f.name in sections:
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, metavar=f.name.upper(),
                       help=f"(default: {getattr(defaults, f.name)!r})")
    for name in sections:
        group = p.add_argument_group(f"[{name}]")
        section = getattr(defaults, name)
        for f in dataclasses.fields(section):
            group.add_argument(f"--{name}.{f.name}", dest=f"{name}.{f.name}", metavar="V",
                               help=f"(default: {getattr(section, f.name)!r})")
    return p


def load_job_config(cls, argv: list[str] | None = None, prog: str = "", description: str = ""):
    """Defaults, then the TOML file, then command-line overrides; returns a validated `cls` instance."""
    parser = build_parser(cls, prog or f"python -m {cls.__module__}", description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    cfg = cls()
    path = args.pop("config", None)
    if path:
        if not os.path.isfile(path):
            raise JobConfigError(f"{path}: config file not found")
        try:
            with open(path, "rb") as f:
                apply_dict(cfg, tomllib.load(f), path)
        except tomllib.TOMLDecodeError as e:
            raise JobConfigError(f"{path}: not valid TOML ({e})") from None
    nested: dict[str, Any] = {}
    for key, value in args.items():
        if "." in key:
            section, sub = key.split(".", 1)
            nested.setdefault(section, {})[sub] = value
        else:
            nested[key] = value
    apply_dict(cfg, nested, "command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_toml(cfg) -> str:
    """Render a resolved config as TOML (top-level keys, then one table per section)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(str(v))

    sections = _sections(type(cfg))
    lines = [f"{f.name} = {fmt(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg) if f.name not in sections]
    for name in sections:
        lines.append(f"\n[{name}]")
        section = getattr(cfg, name)
        lines += [f"{f.name} = {fmt(getattr(section, f.name))}" for f in dataclasses.fields(section)]
    return "\n".join(lines) + "\n"


def asdict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["CheckpointConfig", "JobConfigError", "MetricsConfig", "OptimizerConfig", "ParallelismConfig",
           "apply_dict", "asdict", "build_parser", "field", "dataclass", "load_job_config", "to_toml"]
