"""Print the GRPO objective sample by sample, computed by the functions training uses (rl/loss.py).

    python -m rl.explain --rewards 1,0,0,1 --old 0.5,0.5,0.4,0.6 --new 0.6,0.4,0.45,0.9 --ref 0.5,0.5,0.5,0.5 \\
        --epsilon 0.2 --beta 0.04 --scale-rewards group [--epsilon-high 0.28] [--plot objective.png]

Each sample is one completion of one token; --old/--new/--ref are the probabilities of that token under the
sampling policy π_old, the current policy π_θ and the reference π_ref. Columns: the advantage A, the ratio
ρ = π_θ/π_old, clip(ρ), ρA, clip(ρ)A, their min, which clip is active ("high": A > 0 and ρ > 1+ε_high, "low":
A < 0 and ρ < 1−ε — zero gradient there), the k3 KL, the objective min(·) − β·KL, and its gradient with respect to
log π_θ (by autograd). The loss is −(mean objective) for every loss_type here (one token per sample).
--plot writes a PNG of min(ρA, clip(ρ)A) against ρ for A > 0 and A < 0 (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .loss import LOSS_TYPES, SCALE_REWARDS, group_advantages, grpo_loss, loss_normalizer

COLUMNS = ("sample", "reward", "advantage", "p_old", "p_new", "ratio", "clipped_ratio", "unclipped", "clipped",
           "min", "clip", "kl", "objective", "grad_logp")


def explain(rewards, old, new, ref=None, *, epsilon=0.2, epsilon_high=None, beta=0.0, scale_rewards="group",
            group_size=None, adv_eps=1e-4, loss_type="dapo") -> tuple[list[dict], float]:
    """(one dict per sample with the COLUMNS, the loss) for one-token completions, in float64."""
    n = len(rewards)
    group_size = group_size or n
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, scale_rewards, adv_eps)
    logp = torch.tensor(new, dtype=torch.float64).log()[:, None].requires_grad_(True)
    old_logp = torch.tensor(old, dtype=torch.float64).log()[:, None]
    ref_logp = None if ref is None else torch.tensor(ref, dtype=torch.float64).log()[:, None]
    normalizer = loss_normalizer([1] * n, loss_type, max_completion_length=1)
    out = grpo_loss(logp, old_logp, ref_logp, adv, None, loss_type=loss_type, epsilon=epsilon,
                    epsilon_high=epsilon_high, beta=beta, normalizer=normalizer)
    (grad,) = torch.autograd.grad(out.terms.objective.sum(), logp)
    t = type(out.terms)(**{k: v.detach() for k, v in vars(out.terms).items()})
    rows = []
    for i in range(n):
        clip = "high" if t.clip_high[i, 0] else "low" if t.clip_low[i, 0] else "-"
        rows.append({"sample": i, "reward": float(rewards[i]), "advantage": float(adv[i]), "p_old": float(old[i]),
                     "p_new": float(new[i]), "ratio": float(t.ratio[i, 0]),
                     "clipped_ratio": float(t.clipped_ratio[i, 0]), "unclipped": float(t.unclipped[i, 0]),
                     "clipped": float(t.clipped[i, 0]), "min": float(t.surrogate[i, 0]), "clip": clip,
                     "kl": float(t.kl[i, 0]), "objective": float(t.objective[i, 0]),
                     "grad_logp": float(grad[i, 0])})
    return rows, float(out.loss.detach())


def format_table(rows: list[dict]) -> str:
    cells = [[str(r[c]) if isinstance(r[c], (int, str)) else f"{r[c]:.4f}" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_objective(path: str, epsilon: float, epsilon_high: float | None, rows: list[dict] | None = None) -> None:
    """PNG of J(ρ) = min(ρA, clip(ρ)A) for A = +1 and A = −1, the clip bounds marked, the samples as dots (J/|A|)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .loss import clipped_surrogate

    high = epsilon if epsilon_high is None else epsilon_high
    top = max([2.0] + [r["ratio"] * 1.1 for r in rows or []])
    ratio = torch.linspace(0.0, top, 801, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, sign in zip(axes, (1.0, -1.0)):
        j = clipped_surrogate(ratio, torch.tensor(sign, dtype=torch.float64), epsilon, epsilon_high)
        ax.plot(ratio, ratio * sign, "--", color="grey", label="ρ·A (unclipped)")
        ax.plot(ratio, j, color="C0", lw=2, label="min(ρA, clip(ρ)A)")
        flat = (ratio > 1 + high) if sign > 0 else (ratio < 1 - epsilon)
        ax.fill_between(ratio, j.min().item(), j.max().item(), where=flat, color="C3", alpha=0.1,
                        label="clip active: zero gradient")
        ax.axvline(1 - epsilon, color="C1", ls=":", label=f"1−ε = {1 - epsilon:g}")
        ax.axvline(1 + epsilon, color="C2", ls=":",
                   label=f"1+ε = {1 + epsilon:g}" + (" (bound without ε_high)" if high != epsilon else ""))
        if high != epsilon:
            ax.axvline(1 + high, color="C4", ls="-.", label=f"1+ε_high = {1 + high:g}")
        pts = [r for r in rows or [] if (r["advantage"] > 0 if sign > 0 else r["advantage"] < 0)]
        if pts:
            ax.scatter([r["ratio"] for r in pts], [r["min"] / abs(r["advantage"]) for r in pts], color="k", zorder=3,
                       label="samples (J/|A|)")
        ax.set_title(f"A {'>' if sign > 0 else '<'} 0 (A = {sign:+g})")
        ax.set_xlabel("ratio ρ = π_θ / π_old")
        ax.set_ylabel("objective J")
        ax.legend(fontsize=7)
    fig.suptitle("GRPO clipped surrogate")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _number_list(kind: str, probabilities: bool):
    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{kind} is empty")
        if any(not math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"{kind} must be finite numbers, got {text!r}")
        if probabilities and any(not 0 < v <= 1 for v in values):
            raise argparse.ArgumentTypeError(f"{kind} are probabilities and must lie in (0, 1], got {text!r}")
        return values
    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default ("required" for required ones, "none" for None)."""

    def _get_help_string(self, action):
        if action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return action.help
        if action.required:
            return f"{action.help} (required)"
        return f"{action.help} (default: {'none' if action.default is None else action.default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rl.explain", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--rewards", required=True, type=_number_list("--rewards", False),
                   help="reward of each sample, comma-separated")
    p.add_argument("--old", required=True, type=_number_list("--old", True),
                   help="π_old(token) per sample (sampling policy), in (0, 1]")
    p.add_argument("--new", required=True, type=_number_list("--new", True),
                   help="π_θ(token) per sample (current policy), in (0, 1]")
    p.add_argument("--ref", type=_number_list("--ref", True), default=None,
                   help="π_ref(token) per sample (reference policy), in (0, 1]; needed when --beta > 0; none = no KL")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip ε (lower, and upper unless --epsilon-high)")
    p.add_argument("--epsilon-high", type=float, default=None,
                   help="upper clip ε_high (DAPO clip-higher: 0.28); none = ε")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient β")
    p.add_argument("--scale-rewards", choices=SCALE_REWARDS, default="group", help="advantage std scaling")
    p.add_argument("--group-size", type=int, default=None,
                   help="completions per prompt; none = all samples form one group")
    p.add_argument("--adv-eps", type=float, default=1e-4, help="eps in A = (r − mean) / (std + eps)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo", help="aggregation (all equal here)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also write a PNG of the clipped objective")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    n = len(args.rewards)
    for name in ("old", "new", "ref"):
        values = getattr(args, name)
        if values is not None and len(values) != n:
            parser.error(f"--{name} has {len(values)} values but --rewards has {n}: give one per sample")
    group_size = args.group_size or n
    if group_size < 2 or n % group_size:
        parser.error(f"--group-size must be ≥ 2 and divide the {n} samples, got {group_size}")
    if args.beta and args.ref is None:
        parser.error("--beta > 0 needs --ref (the reference policy's probabilities)")
    if args.epsilon < 0 or (args.epsilon_high is not None and args.epsilon_high < 0):
        parser.error("--epsilon and --epsilon-high must be ≥ 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
    rows, loss = explain(args.rewards, args.old, args.new, args.ref, epsilon=args.epsilon,
                         epsilon_high=args.epsilon_high, beta=args.beta, scale_rewards=args.scale_rewards,
                         group_size=group_size, adv_eps=args.adv_eps, loss_type=args.loss_type)
    if args.json:
        print(json.dumps({"rows": rows, "loss": loss}, indent=1))
    else:
        print(format_table(rows))
        print(f"loss = −mean(objective) = {loss:.6f}   ({args.loss_type}, ε={args.epsilon:g}, "
              f"ε_high={args.epsilon_high if args.epsilon_high is not None else args.epsilon:g}, β={args.beta:g}, "
              f"scale_rewards={args.scale_rewards})")
    if args.plot:
        plot_objective(args.plot, args.epsilon, args.epsilon_high, rows)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
