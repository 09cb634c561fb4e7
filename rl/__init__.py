"""GRPO post-training pieces: the pure objective (`rl.loss`), rewards and the reward runner (`rl.rewards`),
built-in verifiable tasks and datasets (`rl.tasks`), and `python -m rl.explain` to print the objective by hand."""
