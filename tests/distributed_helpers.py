"""Spawn a few CPU processes with a gloo process group and run a worker function in each.

    results = run_distributed(worker, world_size=2, args=(...,), timeout_s=120)

`worker(rank, world_size, *args)` runs after `init_process_group("gloo")` over a temp FileStore (no ports) and
`torch.set_num_threads(1)`; what rank 0 returns comes back (it must be picklable). Processes are forked, so the
~5 s torch import is paid once by the parent (set SEEKSTACK_MP_START=spawn to use fresh interpreters instead).

Failure handling, so a broken rank never hangs the suite:
  * a rank that raises: the others are terminated and `DistributedTestError` carries the traceback of the rank
    that failed first (ranks failing after it, e.g. "connection closed by peer", are listed after it);
  * nobody finishing within `timeout_s`: every rank is killed and `DistributedTestError` names the ranks still
    running;
  * collectives themselves time out after `collective_timeout_s` (gloo's own timeout).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    pass


def _entry(rank, fn, world_size, store_file, result_dir, collective_timeout_s, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            with open(os.path.join(result_dir, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
    except BaseException as e:
        message = f"rank {rank} of {world_size} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        with open(os.path.join(result_dir, f"error-{rank}.txt"), "w") as f:
            f.write(f"{time.time()!r}\n{message}")
        raise RuntimeError(message) from None
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _first_failure(tmp: str) -> str | None:
    errors = []
    for name in os.listdir(tmp):
        if name.startswith("error-"):
            with open(os.path.join(tmp, name)) as f:
                stamp, _, message = f.read().partition("\n")
            errors.append((float(stamp), message))
    if not errors:
        return None
    errors.sort()
    later = [m.splitlines()[0] for _, m in errors[1:]]
    return errors[0][1] + "".join(f"\nthen {m}" for m in later)


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0,
                    collective_timeout_s: float = 60.0):
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return rank 0's result."""
    start_method = os.environ.get("SEEKSTACK_MP_START", "fork")
    with tempfile.TemporaryDirectory(prefix="seekstack-dist-") as tmp:
        store_file = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn, world_size, store_file, tmp, collective_timeout_s, args),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                    raise DistributedTestError(f"distributed run timed out after {timeout_s:.0f}s; ranks still "
                                               f"running (killed): {alive}")
        except mp.ProcessRaisedException as e:  # ctx.join already terminated the other ranks
            raise DistributedTestError(_first_failure(tmp) or str(e)) from None
        except mp.ProcessExitedException as e:
            raise DistributedTestError(f"rank {e.error_index} exited with code {e.exit_code}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)
