"""`parallelize(model, layout)`: apply tensor and expert parallelism to a single-device Transformer, in place.

Order (torchtitan's): tensor parallel first, then expert parallel, then (with `layout.dims.fsdp`) FSDP2 over the
data-parallel ranks for the non-expert parameters (fsdp.py). Plain data parallelism needs no model change: the
trainer feeds each DP replica its rows of the global batch (`layout.batch_slice`) and calls
`sync_gradients(model, layout)` after backward. A layout of world size 1 returns the model untouched (with a plan
that says "everything replicated"), so single-process code paths stay exactly the same.

Every rank must build the same initial model (same seed, or load the same checkpoint) before calling this.
"""

from __future__ import annotations

from ..transformer import Transformer
from .expert_parallel import apply_ep
from .fsdp import apply_fsdp
from .layout import Layout
from .plan import ParallelPlan
from .tensor_parallel import apply_tp


def parallelize(model: Transformer, layout: Layout, fsdp: bool = True) -> Transformer:
    """fsdp=False leaves FSDP out even when the layout asks for it (load_parallel applies it after loading)."""
    if getattr(model, "parallel_plan", None) is not None:
        raise ValueError("parallelize: this model is already parallelised; build a fresh one per layout")
    layout.dims.validate(model.config)
    plan = ParallelPlan(model, layout.dims, layout.rank)
    if layout.tp > 1:
        apply_tp(model, layout, plan)
    if model.config.is_moe and (layout.ep > 1 or layout.tp > 1):
        apply_ep(model, layout, plan)
    model.parallel_plan = plan
    if fsdp and layout.dims.fsdp:
        apply_fsdp(model, layout)
    return model
