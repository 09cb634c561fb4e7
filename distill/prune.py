"""A student cut out of the teacher: keep some layers (depth pruning) and each MoE layer's most used experts.

DistilBERT initialises its student with one teacher layer out of two; NVIDIA's Minitron prunes depth and width
and then recovers the pruned model with logit distillation. `prune_teacher` is that initialisation for a
DeepSeek-style teacher: embedding, final norm and head are copied; kept blocks are copied whole (MLA, norms, dense
MLP, shared experts); in each kept MoE block only the `keep_experts` routed experts that received the most tokens
on sample rows (`expert_usage`) stay, with their router rows and selection biases. Group-limited routing is
switched off (n_group = topk_group = 1) since the kept experts no longer fill the groups (with one expert kept,
the top-1 of 1 is plain `greedy` selection), and MTP modules are
dropped (the distillation loss uses the main head only).
"""

from __future__ import annotations

import torch

from model import ModelConfig, Transformer
from model.moe import MoE


@torch.no_grad()
def expert_usage(teacher: Transformer, batches: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert of each main MoE layer over `batches` of input ids: {layer index: [E]}."""
    was_training = teacher.training
    moe = {i: block.mlp for i, block in enumerate(teacher.layers) if isinstance(block.mlp, MoE)}
    for m in teacher.moe_layers():
        m.gate.tokens_per_expert.zero_()
    teacher.train()  # the routers count loads in training mode only (no dropout anywhere, so outputs are unchanged)
    try:
        for ids in batches:
            teacher(ids)
        usage = {i: m.gate.tokens_per_expert.clone() for i, m in moe.items()}
    finally:
        for m in teacher.moe_layers():
            m.gate.tokens_per_expert.zero_()
        teacher.train(was_training)
    return usage


@torch.no_grad()
def prune_teacher(teacher: Transformer, keep_layers: list[int], keep_experts: int = 0,
                  usage: dict[int, torch.Tensor] | None = None) -> Transformer:
    """A smaller Transformer initialised from `teacher`.

    Args:
        keep_layers: teacher block indices to keep, in order (dense blocks must come before MoE blocks).
        keep_experts: routed experts kept per MoE block (0 = all); the most used by `usage`, else the first ones.
        usage: `expert_usage` output.
    """
    tc = teacher.config
    layers = list(keep_layers)
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= tc.num_hidden_layers:
        raise ValueError(f"keep_layers must be increasing teacher layer indices in [0, {tc.num_hidden_layers}), "
                         f"got {keep_layers}")
    moe_flags = [tc.is_moe_layer(i) for i in layers]
    if moe_flags != sorted(moe_flags):
        raise ValueError(f"keep_layers {layers}: a dense block after an MoE block cannot be expressed with "
                         f"first_k_dense_replace")
    d = tc.to_dict()
    d.update(num_hidden_layers=len(layers), first_k_dense_replace=moe_flags.count(False), moe_layer_freq=1,
             num_nextn_predict_layers=0)
    E = tc.n_routed_experts or 0
    n_keep = keep_experts if 0 < keep_experts < E else E
    if tc.is_moe and n_keep != E:
        d.update(n_routed_experts=n_keep, n_group=1, topk_group=1,
                 num_experts_per_tok=min(tc.num_experts_per_tok, n_keep))
        if n_keep == 1:  # one expert is always the one chosen: no group score (it needs 2 per group) to compute
            d.update(topk_method="greedy")
    student = Transformer(ModelConfig.from_dict(d, source="pruned teacher"))
    for name in ("embed_tokens", "norm", "lm_head"):
        getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    for new, old in enumerate(layers):
        src = teacher.layers[old].state_dict()
        idx = None
        if isinstance(teacher.layers[old].mlp, MoE) and n_keep != E:
            counts = usage[old] if usage is not None and old in usage else -torch.arange(E, dtype=torch.float32)
            idx = counts.float().topk(n_keep).indices.sort().values
        state = {}
        for key, value in student.layers[new].state_dict().items():
            t = src[key]
            if t.shape != value.shape:  # a routed-expert tensor: [E, ...] -> [n_keep, ...]
                t = t.index_select(0, idx.to(t.device))
            state[key] = t
        student.layers[new].load_state_dict(state)
    return student
