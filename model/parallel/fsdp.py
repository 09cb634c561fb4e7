"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the non-expert parameters: the memory option of data parallelism.

With `ParallelDims(fsdp=True)` every parameter that is replicated over the data-parallel ranks (attention, norms,
dense and shared MLPs, router, embedding, head: each TP rank's slice of them under tensor parallelism) is split
in dim-0 chunks over the DP group: one FSDP unit per decoder block (the MTP modules' blocks included), plus the
root (embedding, final norm, head, the MTP projections and norms, which the root's forward uses directly). FSDP
all-gathers a unit's parameters for its forward and backward and reduce-scatters (averages) their gradients over
the DP group. Routed experts are left out (`ignored_params`): expert parallelism already
splits them, and their gradients keep the EDP rule of plan.py. The model's math is untouched.

What changes for the rest of model/parallel, all through the helpers below:
  * FSDP parameters (and their gradients and optimizer states) are `DTensor`s sharded over the "dp" mesh dimension;
    `local(t)` is this rank's chunk and `unshard(t)` the rank's whole tensor (its TP/EP slice), gathered over DP;
  * gradients arrive already averaged over DP; sync_gradients only adds the TP sum for "dp+tp" parameters;
  * every DP rank joins every forward (the all-gathers), so generation runs on the same prompts everywhere
    (ParallelDims.mp_ranks spans the DP group).
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import Layout


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for FSDP-managed tensors (DTensors), False for plain ones."""
    return isinstance(t, _dtensor_type())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of an FSDP tensor (a view that in-place ops write through); plain tensors unchanged."""
    return t.to_local() if is_sharded(t) else t


def unshard(t: torch.Tensor) -> torch.Tensor:
    """The rank's whole tensor (gathered over the DP group: collective); plain tensors unchanged."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of `full` (shaped like the unsharded `target`), cut locally: no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()


def wrap_like(local_chunk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A DTensor with `target`'s mesh and placements around this rank's `local_chunk` (optimizer state on load)."""
    DTensor = _dtensor_type()
    return DTensor.from_local(local_chunk, target.device_mesh, target.placements, shape=target.shape,
                              stride=target.stride(), run_check=False)


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    from ..experts import GroupedExperts

    return {p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def apply_fsdp(model: nn.Module, layout: Layout, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder block (MTP blocks too), then the root, over the layout's "dp" mesh; experts
    excluded."""
    if layout.dp == 1 or layout.dense_mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    mesh = layout.dense_mesh["dp"]
    experts = expert_parameters(model)
    for unit in list(model.layers) + [m.block for m in model.mtp]:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=experts & set(unit.parameters()))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=experts)
    return model
