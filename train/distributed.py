"""Process groups for `torchrun` and the parallel layout every trainer runs under (model/parallel).

    dist = init_distributed(tp, ep)      # from torchrun's environment; WORLD_SIZE unset or 1 initialises nothing
    model = parallelize(model, dist.layout)

world = dp * tp (TP innermost: the ranks of one TP group are consecutive, so a TP group stays inside a node);
ep borrows data-parallel ranks (ep | dp), or TP ranks first with ep_borrows_tp (model/parallel/layout.py; the
trainers pass `parallelism.ep_borrows_tp` once the job config has that field). Under torchrun the backend is nccl
on GPU (gloo beside it for CPU tensors) and gloo on CPU.

DATA ASSIGNMENT (what makes 1 process == N processes, and resume exact). The trainers' batch functions take
(step, micro, dp_rank, dp) with dp_rank = layout.dp_rank and dp = layout.dp, never the process rank: the TP ranks
of one data-parallel replica read the same rows, and replica d of a step reads global sample indices
step * B + (micro * dp + d) * micro_batch ... (train/data.py global_indices), so the global batch is a pure function
of (seed, step) whatever the layout, and `micro_batch` counts sequences per data-parallel replica.

GRPO generates per model-parallel group (`mp_index`, `mp`: the ranks joined by TP or EP collectives, which must
run the same prompts and decode steps) and trains per data-parallel replica (rl/grpo.py).

The helpers below reduce metrics with plain torch.distributed calls, outside model/parallel's `comm_stats`, so the
logged communication bytes are the model's (forward, backward, gradient sync, expert loads) only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from model.parallel import Layout, ParallelConfigError, ParallelDims
from model.parallel import init_distributed as _init_layout

from .config import JobConfigError


def _single() -> Layout:
    return Layout(ParallelDims(1))


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    layout: Layout = field(default_factory=_single)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        """Data-parallel replicas (world / tp)."""
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel replica: what selects its rows of the global batch."""
        return self.layout.dp_rank

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def sharded(self) -> bool:
        """Parameters split over ranks (tp or ep > 1): sharded checkpoints, consolidated final export."""
        return self.layout.sharded

    @property
    def mp(self) -> int:
        """Ranks per model-parallel group (they generate together)."""
        return self.layout.mp

    @property
    def mp_index(self) -> int:
        return self.layout.mp_index

    @property
    def mp_groups(self) -> int:
        """Model-parallel groups in the job (independent generators)."""
        return self.world // self.layout.mp

    def describe(self) -> str:
        return (f"world {self.world} = dp {self.dp} x tp {self.tp}, ep {self.ep}"
                + (", fsdp" if self.layout.dims.fsdp else "")
                + (f" ({self.mp_groups} model-parallel groups of {self.mp})" if self.sharded else ""))


def init_distributed(tp: int = 1, ep: int = 1, ep_borrows_tp: bool = False, timeout_s: float = 600.0,
                     fsdp: bool = False) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (nothing for a single process) and build the layout.

    Raises JobConfigError naming the fix when tp/ep do not fit the world size (before touching the network)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        layout = _init_layout(tp, ep, ep_borrows_tp, timeout_s=timeout_s, fsdp=fsdp)
    except ParallelConfigError as e:
        raise JobConfigError(f"--parallelism.tp {tp} --parallelism.ep {ep}{' --parallelism.fsdp true' if fsdp else ''} "
                             f"with {world} process"
                             f"{'es' if world != 1 else ''}: {e}") from None
    if layout.world_size == 1:
        return DistInfo(layout=layout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if layout.device_type == "cuda" else torch.device("cpu")
    return DistInfo(layout.rank, layout.world_size, local_rank, device, layout)


def _reduce(t: torch.Tensor, group, op) -> torch.Tensor:
    tdist.all_reduce(t, op=op, group=group)
    return t


def dp_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """SUM over the data-parallel group, in place (each replica's value once; TP ranks of a replica agree)."""
    return _reduce(t, dist.layout.dp_group, tdist.ReduceOp.SUM) if dist.dp > 1 else t


def dp_max(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    return _reduce(t, dist.layout.dp_group, tdist.ReduceOp.MAX) if dist.dp > 1 else t


def world_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    return _reduce(t, None, tdist.ReduceOp.SUM) if dist.world > 1 else t


def world_gather(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """[world, *t.shape]: every rank's `t` (same shape on all ranks) in rank order."""
    if dist.world == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(dist.world)]
    tdist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def broadcast_object(obj, dist: DistInfo):
    """Rank 0's `obj` on every rank (a decision only rank 0 makes, e.g. which checkpoint to resume)."""
    if dist.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist_or_world) -> None:
    world = dist_or_world if isinstance(dist_or_world, int) else dist_or_world.world
    if world > 1:
        tdist.barrier()


def shutdown(dist_or_world) -> None:
    world = dist_or_world if isinstance(dist_or_world, int) else dist_or_world.world
    if world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()
