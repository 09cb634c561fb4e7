"""The only part of `model/` that touches torch.distributed: layouts and collectives applied from outside the math.

Trainer-facing API:
    layout = init_distributed(tp=2, ep=2)           # from torchrun's env; world size 1 initialises nothing
                                                    # (ep_borrows_tp=True lets EP span TP ranks, layout.py;
                                                    #  fsdp=True adds FSDP2 over DP for non-expert params, fsdp.py)
    model = parallelize(Transformer(cfg), layout)   # same seed / checkpoint on every rank first
    batch = global_batch[layout.batch_slice(B)]
    loss = model(ids, labels=labels).loss; loss.backward()
    sync_gradients(model, layout); clip_grad_norm_(model, layout, 1.0); opt.step()
    update_expert_bias(model, gamma, reduce_fn=layout.reduce_expert_load)
    save_sharded(model, path, layout) / load_sharded(model, path) / consolidate(path, out)
    model = load_parallel(path, layout)             # this rank's shards of any checkpoint, never the full model
"""

from .checkpoint import consolidate, load_parallel, load_sharded, save_sharded
from .collectives import comm_stats
from .data_parallel import clip_grad_norm_, gather_full, grad_norm, sync_gradients
from .expert_parallel import AllToAllDispatcher
from .layout import Layout, ParallelConfigError, ParallelDims, build_layout, init_distributed
from .parallelize import parallelize
from .plan import ParallelPlan, ShardSpec

__all__ = ["AllToAllDispatcher", "Layout", "ParallelConfigError", "ParallelDims", "ParallelPlan", "ShardSpec",
           "build_layout", "clip_grad_norm_", "comm_stats", "consolidate", "gather_full", "grad_norm",
           "init_distributed", "load_parallel", "load_sharded", "parallelize", "save_sharded",
           "sync_gradients"]
