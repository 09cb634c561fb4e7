"""Pretraining: `python -m train.pretrain [--config configs/x.toml] [--section.key=value ...]`, or under
`torchrun --nproc_per_node=N -m train.pretrain [--parallelism.tp T] [--parallelism.ep E] ...` for data, tensor and
expert parallelism (gloo on CPU, nccl on GPU): dp = N / T replicas, each reading its own `micro_batch` rows of the
global batch (the T ranks of a replica read the same rows); E must divide dp. Sharded runs checkpoint per rank and
export RUN_DIR/final consolidated (train/checkpoint.py).

With no arguments it trains the small built-in model on the built-in procedurally generated corpus of arithmetic
reasoning traces (`<think>...</think><answer>...</answer>`), evaluates greedy answer accuracy on held-out problems,
and leaves RUN_DIR/checkpoints/step_*/model (with tokenizer.json) for the GRPO stage. With `--data.source DIR` it
trains on shards written by `python -m train.data prepare`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from model import ModelConfig, Transformer, preset
from model.parallel import ParallelConfigError, load_parallel, parallelize

from .checkpoint import export_final as export_final_model
from .config import CheckpointConfig, JobConfigError, MetricsConfig, OptimizerConfig, ParallelismConfig
from .data import DataError, PackedDataset, load_split
from .distributed import DistInfo
from .entry import run_job
from .trainer import Trainer, TrainingStopped


@dataclass
class ModelSection:
    preset: str = "small"  # built-in size (tiny, small, ...) when `config` is empty
    config: str = ""  # a config.json (seekstack, DeepSeek or transformers) instead of the preset
    init_from: str = ""  # start from the weights of a seekstack checkpoint directory
    num_nextn_predict_layers: int = -1  # MTP depth D; -1 keeps the preset's / config's
    mtp_loss_lambda: float = 0.3  # lambda of the MTP loss (V3: 0.3, then 0.1)
    aux_loss_alpha: float = 0.0001  # alpha of the sequence-wise balance loss
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update; 0 disables


@dataclass
class DataSection:
    source: str = "builtin"  # builtin, or a directory written by `python -m train.data prepare`
    seq_len: int = 128
    # built-in corpus
    num_problems: int = 20000  # training problems generated (held-out problems are disjoint)
    eval_problems: int = 64  # held-out problems for greedy accuracy at each eval
    flawed_fraction: float = 0.6  # share of worked solutions that forget the carry into the hundreds (train/corpus.py)


@dataclass
class TrainingSection:
    steps: int = 1000
    micro_batch: int = 16  # sequences per data-parallel replica per micro-step
    grad_accum: int = 1
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    max_skipped_steps: int = 5  # non-finite steps tolerated before the run stops
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_seconds: float = 0.0  # stop after the step that crosses this wall time (0 = run all steps)


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = 0
    resume: str = ""  # "auto" (latest valid checkpoint in run_dir, if any) or a checkpoint path
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)

    def validate(self) -> None:
        t = self.training
        for key, value in (("training.steps", t.steps), ("training.micro_batch", t.micro_batch),
                           ("training.grad_accum", t.grad_accum), ("data.seq_len", self.data.seq_len)):
            if value < 1:
                raise JobConfigError(f"`{key}` must be >= 1, got {value}")
        if t.dtype not in ("fp32", "bf16"):
            raise JobConfigError(f"`training.dtype` is {t.dtype!r}; use fp32 or bf16")
        if self.optimizer.schedule not in ("cosine", "wsd", "constant"):
            raise JobConfigError(f"`optimizer.schedule` is {self.optimizer.schedule!r}; use cosine, wsd or constant")
        validate_parallelism(self.parallelism)


def validate_parallelism(p: ParallelismConfig) -> None:
    """Degrees must be positive; whether they fit the world size and the model is checked at launch."""
    for key in ("tp", "ep"):
        if getattr(p, key) < 1:
            raise JobConfigError(f"`parallelism.{key}` must be >= 1, got {getattr(p, key)}; the data-parallel "
                                 f"degree is not set but derived: dp = processes / tp")


def parallel_model(build, dist: DistInfo) -> Transformer:
    """`build()` a model and shard it for the run's layout; a model that does not split is a JobConfigError."""
    try:
        return build()
    except ParallelConfigError as e:
        raise JobConfigError(f"--parallelism.tp {dist.tp} --parallelism.ep {dist.ep}: {e}") from None


def load_for_layout(path: str, dist: DistInfo) -> Transformer:
    """This rank's shards of checkpoint `path` (single-process or sharded, from any layout), on the run's device."""
    return parallel_model(lambda: load_parallel(path, dist.layout), dist).to(dist.device)


def build_model(cfg: PretrainConfig, vocab_size: int | None, dist: DistInfo | None = None) -> Transformer:
    """The model to train, already parallelised for `dist.layout` (single process: unchanged)."""
    m = cfg.model
    dist = dist or DistInfo()
    if m.init_from:
        model = load_for_layout(m.init_from, dist)
        config = model.config
    else:
        base = ModelConfig.from_json(m.config).to_dict() if m.config else preset(m.preset).to_dict()
        if vocab_size is not None and not m.config:
            base["vocab_size"] = vocab_size
        if m.num_nextn_predict_layers >= 0:
            base["num_nextn_predict_layers"] = m.num_nextn_predict_layers
        base.update(mtp_loss_lambda=m.mtp_loss_lambda, aux_loss_alpha=m.aux_loss_alpha,
                    bias_update_speed=m.bias_update_speed)
        torch.manual_seed(cfg.seed)  # every rank builds the same full model, then keeps its shards
        model = Transformer(ModelConfig.from_dict(base, source="[model]"))
        config = model.config
        model = parallel_model(lambda: parallelize(model, dist.layout), dist).to(dist.device)
    config.mtp_loss_lambda, config.aux_loss_alpha = m.mtp_loss_lambda, m.aux_loss_alpha
    config.bias_update_speed = m.bias_update_speed
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise JobConfigError(f"tokenizer has {vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; raise model vocab_size")
    return model


def window_batches(dataset: PackedDataset, micro_batch: int, grad_accum: int):
    def batches(step: int, micro: int, rank: int, world: int) -> dict:
        windows = torch.from_numpy(dataset.batch(step, micro, rank, world, micro_batch, grad_accum))
        return {"input_ids": windows, "labels": windows}
    return batches


def main(argv: list[str] | None = None) -> int:
    return run_job(PretrainConfig, argv, "python -m train.pretrain", __doc__, run,
                   threads=lambda cfg: cfg.training.threads, errors=(DataError, TrainingStopped))


def run(cfg: PretrainConfig, dist) -> int:
    on_eval, tokenizer_file = None, None
    if cfg.data.source == "builtin":
        from .corpus import BuiltinCorpus

        corpus = BuiltinCorpus(seed=cfg.seed, num_problems=cfg.data.num_problems,
                               flawed_fraction=cfg.data.flawed_fraction)
        model = build_model(cfg, corpus.vocab_size, dist)
        train_tokens, val_tokens = corpus.train_tokens(), corpus.val_tokens()
        tokenizer_file = corpus.tokenizer_path
        on_eval = corpus.accuracy_hook(cfg.data.eval_problems)
    else:
        manifest_vocab = None
        model = build_model(cfg, manifest_vocab, dist)
        train_tokens = load_split(cfg.data.source, "train", model.config.vocab_size)
        val_tokens = load_split(cfg.data.source, "val", model.config.vocab_size)
        tokenizer_file = os.path.join(cfg.data.source, "tokenizer.json")
    train_set = PackedDataset(train_tokens, cfg.data.seq_len, cfg.seed)
    val_set = PackedDataset(val_tokens, cfg.data.seq_len, cfg.seed + 1)
    t = cfg.training

    def eval_batches(i: int) -> dict:
        windows = torch.from_numpy(val_set.batch(0, i, dist.dp_rank, dist.dp, t.micro_batch,
                                                 cfg.metrics.eval_batches))
        return {"input_ids": windows, "labels": windows}

    trainer = Trainer(job=cfg, model=model, batches=window_batches(train_set, t.micro_batch, t.grad_accum),
                      eval_batches=eval_batches, steps=t.steps, grad_accum=t.grad_accum,
                      optimizer_cfg=cfg.optimizer, checkpoint_cfg=cfg.checkpoint, metrics_cfg=cfg.metrics,
                      dist=dist, dtype=t.dtype, compile=t.compile, max_skipped_steps=t.max_skipped_steps,
                      on_eval=on_eval, model_files=[tokenizer_file] if tokenizer_file else None,
                      max_seconds=t.max_seconds)
    trainer.maybe_resume(cfg.resume)
    if dist.is_main:
        n = sum(p.numel() for p in model.parameters())
        trainer.log(f"model: {n / 1e6:.2f}M parameters{' on rank 0' if dist.sharded else ''}; {len(train_tokens)} "
                    f"train tokens, {len(val_tokens)} held-out; global batch {t.micro_batch * t.grad_accum * dist.dp} "
                    f"x {cfg.data.seq_len}; {dist.describe()}; run dir {cfg.run_dir}")
    final = trainer.run()
    export_final(cfg, model, tokenizer_file, dist)
    if dist.is_main:
        summary = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        trainer.log("final: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    return 0


def export_final(cfg: PretrainConfig, model: Transformer, tokenizer_file: str | None,
                 dist: DistInfo | None = None) -> None:
    """Write RUN_DIR/final: the last model (consolidated to one single-process checkpoint when sharded) with its
    tokenizer, what the GRPO stage starts from. Collective under torchrun."""
    export_final_model(model, os.path.join(cfg.run_dir, "final"), dist, [tokenizer_file] if tokenizer_file else [])


if __name__ == "__main__":
    sys.exit(main())
