"""The shared entry point of every trainer: config from TOML + command line, threads, torch.distributed, errors.

Exit codes: 2 for a bad config or layout (nothing ran), 1 for a run that stopped with a clear error, 0 for success.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from .config import JobConfigError, load_job_config
from .distributed import init_distributed, shutdown


def run_job(config_cls, argv: list[str] | None, prog: str, description: str, body: Callable[[object, object], int],
            threads: Callable[[object], int] = lambda cfg: 0,
            errors: tuple[type[BaseException], ...] = (JobConfigError,)) -> int:
    """Load `config_cls` (defaults < --config TOML < overrides), then `body(cfg, dist)` under the job's layout."""
    try:
        cfg = load_job_config(config_cls, argv, prog=prog, description=description)
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if threads(cfg):
        torch.set_num_threads(threads(cfg))
    p = cfg.parallelism
    try:
        dist = init_distributed(p.tp, p.ep, p.ep_borrows_tp, fsdp=p.fsdp)
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return body(cfg, dist)
    except (JobConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(dist)
