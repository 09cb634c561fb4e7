"""Turn a run's metrics.jsonl into PNG curves.

    python -m tools.plot RUN_DIR [--out DIR]

Writes, for whatever the run logged: loss.png (training loss, its parts, held-out loss), lr.png, accuracy.png,
grad_norm.png, throughput.png, expert_load.png (a heat map per MoE layer: each expert's share of the routed tokens
over the steps) and, for GRPO runs, reward.png, kl.png and length.png. Prints the files written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CURVES = {
    "loss": ["loss", "ce_loss", "val_loss", "mtp_loss_1", "mtp_loss_2", "balance_loss", "kd_loss", "val_kd"],
    "agreement": ["top1_agreement", "val_top1_agreement"],  # distillation: student argmax == teacher top-1
    "lr": ["lr"],
    "accuracy": ["accuracy", "accuracy_mean@*", "accuracy_train_sampled", "accuracy_sampled", "val_accuracy"],
    "grad_norm": ["grad_norm"],
    "throughput": ["tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s"],
    "reward": ["reward_mean", "reward_std"],
    "kl": ["kl"],
    "length": ["completion_length_mean", "completion_length_max", "truncation_rate"],
}


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl; pass a run directory")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: {path}:{lineno}: skipping a malformed line", file=sys.stderr)
    return rows


def _expand(keys: list[str], rows: list[dict]) -> list[str]:
    """Curve keys with "prefix*" patterns replaced by the logged keys that start with the prefix (e.g. mean@8)."""
    logged = sorted({k for r in rows for k in r})
    out = []
    for key in keys:
        out += [k for k in logged if k.startswith(key[:-1])] if key.endswith("*") else [key]
    return out


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(run_dir)
    out_dir = out_dir or (run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, keys in CURVES.items():
        present = [k for k in _expand(keys, rows) if any(isinstance(r.get(k), (int, float)) for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in present:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]
            ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    loads = [(r["step"], r["expert_load"]) for r in rows if r.get("expert_load")]
    if loads:
        steps = [s for s, _ in loads]
        arr = np.asarray([l for _, l in loads], dtype=float)  # [steps, layers, experts]
        arr = arr / arr.sum(-1, keepdims=True).clip(min=1e-9)
        n_layers = arr.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.6 * n_layers + 1), squeeze=False)
        for i in range(n_layers):
            ax = axes[i, 0]
            im = ax.imshow(arr[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                           extent=(steps[0], steps[-1], -0.5, arr.shape[2] - 0.5))
            ax.set_ylabel(f"router {i}\nexpert")
            fig.colorbar(im, ax=ax, label="share")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("expert load share per MoE layer")
        fig.tight_layout()
        path = os.path.join(out_dir, "expert_load.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory holding metrics.jsonl (or the file itself)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the run directory)")
    args = p.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
