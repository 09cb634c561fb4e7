"""The sharding plan: for every state-dict entry, how it is split over the layout and how its gradient is reduced.

One `ShardSpec` per key drives gradient sync, gradient-norm clipping, gathering full tensors and checkpoint
resharding, so the rules live in one place:

    axis None  replicated on every rank
    axis "tp"  even split of `dim` over the TP group (slice t of tp)
    axis "ep"  even split of `dim` (0, the expert dim) over the EP group (slice e of ep)

    grad "dp"      complete gradient per rank: SUM over the DP group, / dp
    grad "dp+tp"   replicated inside a TP region, partial over TP: SUM over DP and TP, / dp
    grad "edp"     routed experts: SUM over every rank holding the same experts (the EDP group: each token was
                   computed by exactly one of them), / dp

The divisor is always dp because the loss is a mean over each DP replica's batch: the single-process loss on the
global batch is the mean of the dp replica losses (equal token counts per replica assumed, as with DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layout import ParallelDims

GRAD_RULES = ("dp", "dp+tp", "edp")


@dataclass(frozen=True)
class ShardSpec:
    axis: str | None = None
    dim: int = 0
    grad: str = "dp"


class ParallelPlan:
    def __init__(self, model: nn.Module, dims: ParallelDims, rank: int = 0):
        self.dims, self.rank = dims, rank
        self.coords = dims.coords(rank)
        self.global_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.specs: dict[str, ShardSpec] = {}

    # ---- recording (tensor_parallel.py / expert_parallel.py) ------------------------------------------------
    def shard(self, name: str, axis: str, dim: int, grad: str = "dp") -> None:
        self._check(name)
        self.specs[name] = ShardSpec(axis, dim, grad)

    def partial_over_tp(self, name: str) -> None:
        self._check(name)
        self.specs[name] = ShardSpec(None, 0, "dp+tp")

    def _check(self, name: str) -> None:
        if name not in self.global_shapes:
            raise KeyError(f"sharding plan: {name!r} is not a state-dict key of the model")

    # ---- queries ----------------------------------------------------------------------------------------------
    def spec(self, name: str) -> ShardSpec:
        return self.specs.get(name, ShardSpec())

    def axis_size(self, axis: str | None) -> int:
        return {None: 1, "tp": self.dims.tp, "ep": self.dims.ep}[axis]

    def axis_index(self, axis: str | None, rank: int | None = None) -> int:
        c = self.coords if rank is None else self.dims.coords(rank)
        return {None: 0, "tp": c["t"], "ep": c["e"]}[axis]

    def local_slice(self, name: str, rank: int | None = None) -> tuple[int, int, int]:
        """(dim, start, stop) of the global tensor held by `rank` (this rank by default)."""
        s = self.spec(name)
        shape = self.global_shapes[name]
        if not shape:
            return 0, 0, 1
        n = shape[s.dim] // self.axis_size(s.axis)
        i = self.axis_index(s.axis, rank)
        return s.dim, i * n, (i + 1) * n

    def owns(self, name: str, rank: int | None = None) -> bool:
        """True for exactly one holder of each distinct slice: DP replica 0 for TP slices, EP group 0 for expert
        slices, rank 0 for replicated tensors."""
        c = self.coords if rank is None else self.dims.coords(rank)
        axis = self.spec(name).axis
        if axis == "tp":
            return c["d"] == 0
        if axis == "ep":
            return c["h"] == 0
        return c["d"] == 0 and c["t"] == 0

    def owners(self, name: str) -> list[int]:
        return [r for r in range(self.dims.world_size) if self.owns(name, r)]


def full_plan(model: nn.Module) -> ParallelPlan:
    """The plan of an unsharded single-process model (everything replicated)."""
    return ParallelPlan(model, ParallelDims(1))


def plan_of(model: nn.Module) -> ParallelPlan:
    plan = getattr(model, "parallel_plan", None)
    return plan if plan is not None else full_plan(model)


def local_shape(plan: ParallelPlan, name: str) -> torch.Size:
    shape = list(plan.global_shapes[name])
    if shape:
        dim, start, stop = plan.local_slice(name)
        shape[dim] = stop - start
    return torch.Size(shape)
