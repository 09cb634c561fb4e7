"""The MLA latent cache: per layer and token only kv_a_layernorm(c^KV) and the roped shared key k^R.

Memory per token per layer = (kv_lora_rank + qk_rope_head_dim) * dtype size, the MLA minimum (576 values for V3
against H * (192 + 128) = 40960 for a per-head K/V cache). Slots are preallocated; `valid` marks which slots hold
real tokens (left padding and finished sequences stay masked), `next_position` is each sequence's next RoPE position.

Each layer's slots are a tensor of their own (`layers[i]`, [B, max_len, width]): a forward with gradients (e.g. GRPO's
shared-prompt pass, rl/grpo.py) writes every layer's slots in place after earlier layers saved views of theirs for
backward, which one tensor for all layers would forbid.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.layers = [torch.zeros(batch_size, max_len, width, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots [0, length) are filled

    @property
    def max_len(self) -> int:
        return self.layers[0].shape[1]

    @property
    def latent(self) -> torch.Tensor:
        """A stacked copy of every layer's slots, [num_layers, B, max_len, width] (for inspection)."""
        return torch.stack(self.layers)

    def bytes_per_token_per_layer(self) -> int:
        return self.layers[0].shape[-1] * self.layers[0].element_size()

    def reserve(self, attention_mask: torch.Tensor | None, num_tokens: int) -> tuple[int, torch.Tensor]:
        """Claim the next `num_tokens` slots for new tokens; returns (start slot, their position ids [B, T])."""
        start, end = self.length, self.length + num_tokens
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} tokens; {end} requested. Allocate a longer cache.")
        B = self.valid.shape[0]
        new_valid = (torch.ones(B, num_tokens, dtype=torch.bool, device=self.valid.device)
                     if attention_mask is None else attention_mask.bool())
        self.valid[:, start:end] = new_valid
        offsets = new_valid.long().cumsum(1) - 1
        position_ids = self.next_position[:, None] + offsets.clamp(min=0)
        self.next_position += new_valid.long().sum(1)
        self.length = end
        return start, position_ids

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Re-batch to the sequences `rows` (indices into the current batch): drop finished ones, or repeat a
        shared prompt's slots for each of its continuations. Differentiable (index_select)."""
        self.layers = [layer.index_select(0, rows) for layer in self.layers]
        self.valid = self.valid.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)

    def attention_mask(self, start: int, end: int) -> torch.Tensor:
        """bool [B, 1, end - start, end]: query slot q sees key slot s iff s <= q and s is valid (itself always)."""
        device = self.valid.device
        q_slots = torch.arange(start, end, device=device)[:, None]
        k_slots = torch.arange(end, device=device)[None, :]
        causal = k_slots <= q_slots
        mask = causal[None] & self.valid[:, None, :end]
        return (mask | (k_slots == q_slots)[None]).unsqueeze(1)
