"""Parallel layout: which ranks form the tensor-, data- and expert-parallel groups.

    world = dp * tp      TP innermost: a TP group is a block of consecutive ranks (typically inside one node)
    rank  = d * tp + t   (d: data-parallel index, t: tensor-parallel index)

    TP group   ranks with the same d     {d*tp + t'}    heads, FFN columns and vocabulary are split over it
    DP group   ranks with the same t     {d'*tp + t}    each DP replica (a whole TP group) gets its own rows

Expert parallelism borrows ranks (torchtitan's "dp2ep"). Each EP group of `ep` ranks holds all experts between
them (rank e of the group holds experts e*E/ep .. (e+1)*E/ep - 1); the EDP group of a rank is every rank that holds
the same experts. With h the index of a rank's EP group, rank = R(h, e):

    default         EP borrows DP ranks only (ep | dp):   d = f*ep + e,  h = f*tp + t,  R = (f*ep + e)*tp + t
                    EP group {same f, same t}; experts are replicated over the TP ranks of a replica
    ep_borrows_tp   EP borrows TP ranks first, then DP ranks (torchtitan etp=1; ep | tp or tp | ep):
                    R = h*ep + e: EP groups are blocks of ep consecutive ranks; experts split over TP as well

Example world=8, tp=2, ep=2 (dp=4): TP {0,1} {2,3} {4,5} {6,7}; DP {0,2,4,6} {1,3,5,7}.
    default:        EP {0,2} {1,3} {4,6} {5,7}; EDP {0,1,4,5} {2,3,6,7}: rank 2 (d=1, t=0) holds experts E/2..E-1
    ep_borrows_tp:  EP {0,1} {2,3} {4,5} {6,7}; EDP {0,2,4,6} {1,3,5,7}: rank 1 holds experts E/2..E-1

In both, every TP rank routes its own contiguous 1/tp of the replica's tokens through its EP group (see
expert_parallel.py), so each token is computed by exactly one holder of its expert and the expert gradients are
summed over the EDP group.

`ParallelDims` is pure arithmetic (testable without processes). `Layout` adds this rank's process groups, built
from two named `DeviceMesh`es: ("dp", "tp") and ("edp", "ep") (the latter's rank tensor is R above). A world of
size 1 never touches torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ModelConfig
from .collectives import comm_stats, is_distributed


class ParallelConfigError(ValueError):
    """The requested tp/ep degrees do not fit the world size or the model; the message names the fix."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    ep: int = 1
    ep_borrows_tp: bool = False
    fsdp: bool = False  # FSDP2-shard the non-expert parameters over the DP group (model/parallel/fsdp.py)

    def __post_init__(self):
        W, tp, ep = self.world_size, self.tp, self.ep
        for name, v in (("world_size", W), ("tp", tp), ("ep", ep)):
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
        if W % tp:
            raise ParallelConfigError(f"tp={tp} does not divide world_size={W}; dp = world_size / tp must be whole")
        dp = W // tp
        if not self.ep_borrows_tp and dp % ep:
            raise ParallelConfigError(
                f"ep={ep} does not divide dp={dp} (world_size {W} / tp {tp}): expert parallelism borrows "
                f"data-parallel ranks, so the EP group must fit inside them; use an ep that divides {dp}, "
                f"or ep_borrows_tp=True to let the EP group span TP ranks too")
        if self.ep_borrows_tp and (W % ep or (tp % ep and ep % tp)):
            raise ParallelConfigError(
                f"ep={ep} with ep_borrows_tp needs ep to divide world_size={W} and to divide or be a multiple "
                f"of tp={tp}, so EP groups line up with TP groups")
        if self.fsdp and W > 1 and dp == 1:
            raise ParallelConfigError(
                f"fsdp shards parameters over the data-parallel ranks, but dp = world_size {W} / tp {tp} = 1; "
                f"use fewer TP ranks (tp < {W}) or turn fsdp off")

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def edp(self) -> int:
        """Ranks holding each expert shard (world / ep): the EDP group size."""
        return self.world_size // self.ep

    # ---- rank arithmetic (pure) -----------------------------------------------------------------------------
    def coords(self, rank: int) -> dict[str, int]:
        """{"d", "t", "e", "h"}: DP index, TP index, index in the EP group, index of the EP group."""
        d, t = divmod(rank, self.tp)
        if self.ep_borrows_tp:
            h, e = divmod(rank, self.ep)
        else:
            f, e = divmod(d, self.ep)
            h = f * self.tp + t
        return {"d": d, "t": t, "e": e, "h": h}

    def expert_rank(self, h: int, e: int) -> int:
        """R(h, e): the rank at position e of EP group h."""
        if self.ep_borrows_tp:
            return h * self.ep + e
        f, t = divmod(h, self.tp)
        return (f * self.ep + e) * self.tp + t

    def tp_ranks(self, rank: int) -> list[int]:
        d = self.coords(rank)["d"]
        return [d * self.tp + t for t in range(self.tp)]

    def dp_ranks(self, rank: int) -> list[int]:
        t = self.coords(rank)["t"]
        return [d * self.tp + t for d in range(self.dp)]

    def ep_ranks(self, rank: int) -> list[int]:
        h = self.coords(rank)["h"]
        return [self.expert_rank(h, e) for e in range(self.ep)]

    def edp_ranks(self, rank: int) -> list[int]:
        e = self.coords(rank)["e"]
        return sorted(self.expert_rank(h, e) for h in range(self.edp))

    def mp_ranks(self, rank: int) -> list[int]:
        """The model-parallel group of `rank`: every rank joined to it by TP or EP collectives (the closure of both
        groups). Its ranks must run the same forward passes, in the same number; a generator must give them the same
        prompts and sampling seed. It is a block of consecutive ranks holding whole DP replicas: tp * ep ranks by
        default (DP replicas f*ep .. f*ep + ep - 1), max(tp, ep) with ep_borrows_tp; the whole world with fsdp
        (FSDP's all-gathers join the DP ranks too)."""
        seen, todo = {rank}, [rank]
        while todo:
            r = todo.pop()
            for q in self.tp_ranks(r) + self.ep_ranks(r) + (self.dp_ranks(r) if self.fsdp else []):
                if q not in seen:
                    seen.add(q)
                    todo.append(q)
        return sorted(seen)

    @property
    def mp(self) -> int:
        """Ranks per model-parallel group (see mp_ranks)."""
        return len(self.mp_ranks(0))

    def validate(self, config: ModelConfig) -> None:
        """Raise ParallelConfigError if the model's heads, FFN widths, vocabulary or experts do not split evenly."""
        tp, ep = self.tp, self.ep
        checks = [("num_attention_heads", config.num_attention_heads, tp, "tp"),
                  ("vocab_size", config.vocab_size, tp, "tp")]
        has_dense = any(not config.is_moe_layer(i)
                        for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
        if has_dense:
            checks.append(("intermediate_size", config.intermediate_size, tp, "tp"))
        if config.is_moe:
            checks.append(("n_routed_experts", config.n_routed_experts, ep, "ep"))
            if config.n_shared_experts:
                checks.append(("n_shared_experts * moe_intermediate_size",
                               config.n_shared_experts * config.moe_intermediate_size, tp, "tp"))
        elif ep > 1:
            raise ParallelConfigError(f"ep={ep} needs an MoE model; this config has no routed experts (use ep=1)")
        for key, value, degree, axis in checks:
            if value % degree:
                raise ParallelConfigError(f"{key} = {value} is not divisible by {axis}={degree}; "
                                          f"pick a {axis} that divides {value}")


class Layout:
    """`ParallelDims` + this rank's coordinates and process groups. Build with `build_layout` / `init_distributed`.

    Groups are None for a world of size 1 (every collective in model/parallel is then a no-op), and with
    `init_groups=False`: a dry-run layout that only shapes the shards (tools/plan.py sizes a model on "meta").
    """

    def __init__(self, dims: ParallelDims, rank: int = 0, device_type: str = "cpu", init_groups: bool = True):
        self.dims = dims
        self.rank = rank
        self.device_type = device_type
        c = dims.coords(rank)
        self.tp_rank, self.dp_rank, self.ep_rank = c["t"], c["d"], c["e"]
        self.dense_mesh = self.expert_mesh = None
        self.tp_group = self.dp_group = self.ep_group = self.edp_group = None
        if dims.world_size > 1 and init_groups:
            from torch.distributed.device_mesh import DeviceMesh

            dense = torch.arange(dims.world_size).view(dims.dp, dims.tp)
            expert = torch.tensor([[dims.expert_rank(h, e) for e in range(dims.ep)] for h in range(dims.edp)])
            self.dense_mesh = DeviceMesh(device_type, dense, mesh_dim_names=("dp", "tp"))
            self.expert_mesh = DeviceMesh(device_type, expert, mesh_dim_names=("edp", "ep"))
            self.tp_group = self.dense_mesh.get_group("tp")
            self.dp_group = self.dense_mesh.get_group("dp")
            self.ep_group = self.expert_mesh.get_group("ep")
            self.edp_group = self.expert_mesh.get_group("edp")
            # the dispatcher sends experts j*E/ep.. to EP group rank j: group order must be our e order
            assert dist.get_rank(self.ep_group) == self.ep_rank and dist.get_rank(self.tp_group) == self.tp_rank

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def ep(self) -> int:
        return self.dims.ep

    @property
    def mp(self) -> int:
        """Ranks per model-parallel group: the ranks that must run identical generation (ParallelDims.mp_ranks)."""
        return self.dims.mp

    @property
    def mp_index(self) -> int:
        """Index of this rank's model-parallel group (groups are consecutive blocks of `mp` ranks)."""
        return self.rank // self.mp

    @property
    def sharded(self) -> bool:
        """True when parameters are split over ranks (tp > 1, ep > 1 or fsdp over dp > 1): checkpoints are then
        sharded (per-rank optimizer states)."""
        return self.tp > 1 or self.ep > 1 or (self.dims.fsdp and self.dp > 1)

    def batch_slice(self, global_batch_size: int) -> slice:
        """The rows of a global batch this rank trains on (TP ranks of one DP replica share rows)."""
        if global_batch_size % self.dp:
            raise ParallelConfigError(f"global batch {global_batch_size} is not divisible by dp={self.dp}")
        n = global_batch_size // self.dp
        return slice(self.dp_rank * n, (self.dp_rank + 1) * n)

    def reduce_expert_load(self, loads: torch.Tensor) -> torch.Tensor:
        """`reduce_fn` for model.balance.update_expert_bias: SUM the per-expert token counts over the DP group.

        Every TP rank of a replica routes all of the replica's tokens through the (replicated) router, so the DP
        sum is the global count; all ranks then apply the same bias update.
        """
        if self.dp_group is not None and self.dp > 1:
            comm_stats.add("all_reduce", loads)
            dist.all_reduce(loads, op=dist.ReduceOp.SUM, group=self.dp_group)
        return loads

    def __repr__(self) -> str:
        return (f"Layout(world={self.world_size}, dp={self.dp}, tp={self.tp}, ep={self.ep}"
                f"{', ep_borrows_tp' if self.dims.ep_borrows_tp else ''}{', fsdp' if self.dims.fsdp else ''}, "
                f"rank={self.rank}, d={self.dp_rank}, "
                f"t={self.tp_rank}, e={self.ep_rank})")


def build_layout(tp: int = 1, ep: int = 1, ep_borrows_tp: bool = False, device_type: str = "cpu",
                 fsdp: bool = False) -> Layout:
    """Layout over the already-initialised default process group (or a single process if there is none).
    Collective when the world is larger than 1: every rank calls it with the same arguments."""
    if is_distributed():
        dims = ParallelDims(dist.get_world_size(), tp, ep, ep_borrows_tp, fsdp)
        return Layout(dims, dist.get_rank(), device_type)
    return Layout(ParallelDims(1, tp, ep, ep_borrows_tp, fsdp))


def init_distributed(tp: int = 1, ep: int = 1, ep_borrows_tp: bool = False, backend: str | None = None,
                     timeout_s: float = 600.0, fsdp: bool = False) -> Layout:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR/PORT) and build the
    layout. With WORLD_SIZE unset or 1 nothing is initialised and the layout is single-process.

    backend: None picks nccl on CUDA machines (gloo for CPU tensors beside it) and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ParallelDims(world, tp, ep, ep_borrows_tp, fsdp)  # validate before touching the network
    if world == 1:
        return build_layout(tp, ep, ep_borrows_tp, fsdp=fsdp)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if not is_distributed():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return build_layout(tp, ep, ep_borrows_tp, device_type, fsdp)
