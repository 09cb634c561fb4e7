"""The miniature R1-Zero: pretrain on the built-in corpus, then GRPO with a verifier reward, on 2 CPU cores.

    python -m tools.demo [--run-dir runs/demo] [--seed 0] [--quick]

Stages (each is the project's own CLI, run in this process; every stage writes its own run directory):
  1. pretrain   `train.pretrain` on the built-in addition corpus, whose worked solutions for 4-digit problems are
                usually sloppy (carries dropped: `--data.flawed_fraction`), as real data is imperfect;
  2. grpo       `rl.grpo` from the pretrained checkpoint, rewarded by answer correctness (+ format);
  3. baseline   the honest control: the same pretrained checkpoint trained for the same wall time as GRPO by
                continued pretraining on the same corpus;
  4. distill    `distill.demo`: the GRPO model as the teacher of ~4x smaller students trained at the same
                budget and seed — CE only on the corpus rows, and on the teacher's own verified completions:
                hard labels (sequence-level KD), logit KD from their cached top-k, and on-policy KD
                (`--no-distill` skips it);
then held-out accuracy (greedy pass@1, and sampled mean@8) of the pretrained, GRPO and baseline models on the same
held-out problems, PNG curves per stage, and RUN_DIR/summary.json with `accuracy_before`, `accuracy_after`,
`accuracy_baseline`, `wall_seconds`, `accuracy_teacher`, `accuracy_student_ce`, `accuracy_student_seqkd`,
`accuracy_student_kd`, `accuracy_student_onpolicy`, `distill_target_met` (and the mean@8 figures, cache bytes per
token, stage times and seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def stage_args(run_dir: str, seed: int, quick: bool) -> dict[str, list[str]]:
    """Command lines of the three stages (the defaults are the measured demo settings; --quick is a smoke run)."""
    pre = os.path.join(run_dir, "pretrain")
    common = ["--seed", str(seed), "--metrics.progress", "true"]
    pretrain = ["--run-dir", pre, "--data.flawed_fraction", "0.6", "--checkpoint.every", "0",
                "--metrics.eval_every", "0", "--data.eval_problems", "32", *common]
    grpo = ["--run-dir", os.path.join(run_dir, "grpo"), "--model.init_from", os.path.join(pre, "final"),
            "--metrics.eval_every", "0", "--metrics.eval_samples", "0", "--metrics.eval_problems", "64",
            "--checkpoint.every", "0", "--grpo.steps", "20", "--grpo.max_completion_length", "48", *common]
    baseline = ["--run-dir", os.path.join(run_dir, "baseline"), "--model.init_from", os.path.join(pre, "final"),
                "--data.flawed_fraction", "0.6", "--checkpoint.every", "0", "--metrics.eval_every", "0",
                "--data.eval_problems", "32", "--optimizer.schedule", "constant", "--optimizer.warmup_steps", "0",
                "--optimizer.lr", "3e-4", "--training.steps", "1000000", *common]
    if quick:
        pretrain += ["--model.preset", "tiny", "--training.steps", "20", "--data.num_problems", "500",
                     "--data.seq_len", "64", "--training.micro_batch", "8"]
        grpo += ["--grpo.steps", "2", "--grpo.prompts_per_step", "4", "--grpo.num_generations", "4",
                 "--grpo.max_completion_length", "24", "--metrics.eval_problems", "8"]
        baseline += ["--data.num_problems", "500", "--data.seq_len", "64", "--training.micro_batch", "8"]
    return {"pretrain": pretrain, "grpo": grpo, "baseline": baseline}


def evaluate(ckpt: str, seed: int, problems: int, samples: int, max_new_tokens: int) -> dict:
    from rl.evaluate import heldout_accuracy
    from rl.grpo import TextCodec
    from rl.sources import build_source

    from model import load_model

    model = load_model(ckpt).eval()
    rows = build_source("addition", seed).heldout_rows(problems)
    return heldout_accuracy(model, TextCodec(ckpt), rows, max_new_tokens, samples, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="where every stage's run directory and summary.json go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-problems", type=int, default=256, help="held-out problems for the final comparison")
    p.add_argument("--eval-samples", type=int, default=8, help="k of the sampled mean@k")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds), not the real demo")
    p.add_argument("--no-distill", action="store_true", help="skip the distillation stage")
    args = p.parse_args(argv)
    from rl import grpo as grpo_cli
    from tools.plot import plot_run
    from train import pretrain as pretrain_cli

    torch.manual_seed(args.seed)
    os.makedirs(args.run_dir, exist_ok=True)
    stages = stage_args(args.run_dir, args.seed, args.quick)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def run(name: str, fn, argv_stage: list[str]) -> None:
        print(f"\n[demo] stage {name}: {' '.join(argv_stage)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code = fn(argv_stage)
        times[name] = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"[demo] stage {name} failed with exit code {code}")

    run("pretrain", pretrain_cli.main, stages["pretrain"])
    run("grpo", grpo_cli.main, stages["grpo"])
    run("baseline", pretrain_cli.main, stages["baseline"] + ["--training.max_seconds", f"{times['grpo']:.1f}"])

    t_eval = time.perf_counter()
    n, k = (16, 2) if args.quick else (args.eval_problems, args.eval_samples)
    max_len = 24 if args.quick else 64
    results = {name: evaluate(os.path.join(args.run_dir, stage, "final"), args.seed, n, k, max_len)
               for name, stage in (("before", "pretrain"), ("after", "grpo"), ("baseline", "baseline"))}
    times["evaluation"] = time.perf_counter() - t_eval
    for stage in ("pretrain", "grpo", "baseline"):
        plot_run(os.path.join(args.run_dir, stage))
    distill = {}
    if not args.no_distill:
        from distill.demo import DemoSettings, run_distillation_stage

        t0 = time.perf_counter()
        settings = DemoSettings(eval_problems=n, max_new_tokens=max_len)
        if args.quick:  # the quick teacher is the 2-layer tiny preset: a scratch student, a few steps, and the
            #             teacher's completions unfiltered (it solves next to nothing)
            settings = DemoSettings(eval_problems=n, max_new_tokens=max_len, student_init="scratch",
                                    hidden_size=32, num_hidden_layers=1, intermediate_size=64, micro_batch=4,
                                    teacher_filter="none")
        distill = run_distillation_stage(os.path.join(args.run_dir, "grpo", "final"),
                                         os.path.join(args.run_dir, "distill"), seed=args.seed,
                                         budget=3 if args.quick else 60, settings=settings,
                                         log=lambda m: print(f"[demo] {m}", file=sys.stderr))
        times["distill"] = time.perf_counter() - t0

    summary = {
        "accuracy_before": results["before"]["accuracy"],
        "accuracy_after": results["after"]["accuracy"],
        "accuracy_baseline": results["baseline"]["accuracy"],
        f"accuracy_before_mean@{k}": results["before"].get(f"accuracy_mean@{k}"),
        f"accuracy_after_mean@{k}": results["after"].get(f"accuracy_mean@{k}"),
        f"accuracy_baseline_mean@{k}": results["baseline"].get(f"accuracy_mean@{k}"),
        **{k: distill[k] for k in ("accuracy_teacher", "accuracy_student_ce", "accuracy_student_seqkd",
                                   "accuracy_student_kd", "accuracy_student_onpolicy", "cache_bytes_per_token")
           if k in distill},
        **({"distill_target_met": distill["target_met"]} if "target_met" in distill else {}),
        "heldout_problems": n, "seed": args.seed, "quick": args.quick,
        "stage_seconds": {k2: round(v, 1) for k2, v in times.items()},
        "wall_seconds": time.perf_counter() - t_all,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(args.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    print(f"\n[demo] held-out accuracy (greedy pass@1, {n} problems): pretrained {summary['accuracy_before']:.3f} "
          f"-> GRPO {summary['accuracy_after']:.3f} ({gain:+.3f}); same-time continued pretraining "
          f"{summary['accuracy_baseline']:.3f}. Wall time {summary['wall_seconds'] / 60:.1f} min. "
          f"Summary: {os.path.join(args.run_dir, 'summary.json')}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
