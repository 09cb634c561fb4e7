"""Timing helpers shared by the benchmarks: machine description, a matmul peak, interleaved repeated timings.

Timings are wall-clock (`time.perf_counter`). Contenders are run interleaved (A B, then B A, ...) so that slow drift
hits both sides alike; medians are quoted.

Shared machines: with OpenMP threads = cores, another busy process makes every parallel region wait for a
descheduled thread, and a step can take 10-20x longer. So each timed run is *gated*: we first wait (bounded) until
the CPU time used by other processes (/proc/stat busy + steal, minus this process) is low, then measure that
foreign load during the run itself and retake the run if it exceeded `QUIET_CORES`. Rejected runs are counted and
reported; when the time budget runs out the run is kept and flagged as contended.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_simd() -> list[str]:
    """The SIMD extensions that matter for fp32/bf16 GEMMs, from /proc/cpuinfo flags."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_simd": cpu_simd(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "parallel_backend": "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "other",
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------------------
# Foreign CPU load (Linux); elsewhere every run counts as quiet.

QUIET_CORES = 0.25  # foreign load (in cores) above which a timed run is retaken
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds all processes were busy (incl. steal) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _TICK


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ForeignLoad:
    """Context manager: `.cores` = CPU cores other processes kept busy during the block, on average."""

    def __enter__(self):
        self.busy, self.own, self.t = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        busy = _busy_seconds()
        if busy is None or self.busy is None or wall <= 0:
            self.cores = 0.0
        else:
            self.cores = max(0.0, (busy - self.busy) - (_own_seconds() - self.own)) / wall
        return False


def wait_quiet(max_wait_s: float, window_s: float = 0.2) -> float:
    """Sleep until other processes use < QUIET_CORES for a window (at most max_wait_s). Returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.cores < QUIET_CORES:
            break
    return time.perf_counter() - start


class Gate:
    """Gated timing with a global deadline (after it, runs are taken as they come and flagged)."""

    def __init__(self, budget_s: float, max_wait_s: float = 10.0, max_retries: int = 3):
        self.deadline = time.perf_counter() + budget_s
        self.max_wait_s, self.max_retries = max_wait_s, max_retries
        self.waited_s, self.rejected, self.contended = 0.0, 0, 0

    def time(self, fn: Callable[[], object]) -> tuple[float, float]:
        """Returns (seconds, foreign cores during the run)."""
        for attempt in range(self.max_retries + 1):
            left = self.deadline - time.perf_counter()
            if left > 0:
                self.waited_s += wait_quiet(min(self.max_wait_s, left))
            with ForeignLoad() as load:
                secs = time_call(fn)
            if load.cores < QUIET_CORES:
                return secs, load.cores
            if attempt == self.max_retries or time.perf_counter() > self.deadline:
                self.contended += 1
                return secs, load.cores
            self.rejected += 1
        raise AssertionError("unreachable")

    @property
    def expired(self) -> bool:
        return time.perf_counter() > self.deadline

    def report(self) -> dict:
        return {"quiet_threshold_cores": QUIET_CORES, "waited_s": round(self.waited_s, 1),
                "rejected_runs": self.rejected, "contended_runs_kept": self.contended}


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                gate: Gate | None = None, min_repeats: int = 3,
                warmup_fns: dict[str, Callable[[], object]] | None = None) -> dict[str, dict]:
    """Run every fn `warmup` times (or its cheaper stand-in from `warmup_fns`), then `repeats` timed rounds,
    alternating the order each round.

    Once the gate's budget is spent, stops after `min_repeats` rounds (a loaded machine makes every run slow).
    """
    gate = gate or Gate(0.0)
    names = list(fns)
    warmup_fns = warmup_fns or fns
    for _ in range(warmup):
        for name in names:
            warmup_fns[name]()
    secs: dict[str, list[float]] = {name: [] for name in names}
    loads: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        if r >= min_repeats and gate.expired:
            break
        for name in (names if r % 2 == 0 else names[::-1]):
            s, load = gate.time(fns[name])
            secs[name].append(s)
            loads[name].append(load)
    return {name: summary(secs[name], loads[name]) for name in names}


def summary(seconds: list[float], foreign_cores: list[float] | None = None) -> dict:
    out = {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
           "samples_s": [round(s, 6) for s in seconds]}
    if foreign_cores is not None:
        out["foreign_cores"] = [round(c, 2) for c in foreign_cores]
    return out


def matmul_peak_gflops(n: int, repeats: int, warmup: int = 2, gate: Gate | None = None) -> dict:
    """Median GFLOP/s of an fp32 [n, n] @ [n, n] matmul (2 n^3 FLOPs) at the current thread count."""
    gate = gate or Gate(0.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    runs = [gate.time(lambda: torch.mm(a, b, out=out)) for _ in range(repeats)]
    secs = [s for s, _ in runs]
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": "float32", "median_gflops": flops / statistics.median(secs) / 1e9,
            "best_gflops": flops / min(secs) / 1e9, **summary(secs, [c for _, c in runs])}


def write_results(stem: str, result: dict, md: str) -> None:
    """STEM.json (every raw figure) and STEM.md (the table), then print the table."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
