"""Per-token log-probabilities of sampled completions under the policy (the training path of GRPO's ratio).

    logp_t = log softmax(logits_t / T)[token_t],   entropy_t = -sum_v p_v log p_v      for every completion token t

GRPO scores G completions of each prompt, so a batch holds every prompt G times. With `share_prompts` each distinct
prompt is run once, into a latent cache (model/cache.py) whose rows are then repeated for its completions, which
continue from it (the decode path of MLA, over many tokens at once). Repeating the rows is an index_select, so the
gradients of all G completions flow back into the one prompt pass: the same loss and gradients as running every
[prompt; completion] row whole (tests/test_grpo.py), with the prompt computed once per group instead of G times.
(MoE expert loads, and so the bias update, then count each prompt's tokens once per group.)
"""

from __future__ import annotations

import torch

from model.generate import prefill_distinct, prompt_groups


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                      share_prompts: bool = True) -> torch.Tensor:
    """Logits [B, N, vocab] at the N positions that predict the completion tokens."""
    N = completion_ids.shape[1]
    groups = prompt_groups(prompt_ids, prompt_mask) if share_prompts else None
    if groups is None or len(groups[0]) == len(prompt_ids) or N == 0:
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        # only the N positions that predict completion tokens need the output head (the last one predicts nothing)
        return model(ids, attention_mask=mask, logits_to_keep=N + 1).logits[:, :N]
    # each completion continues from its own copy of its prompt's cache slots
    cache, last = prefill_distinct(model, prompt_ids, prompt_mask, N - 1, groups)
    logits = last[:, None]  # [B, 1, V]: predicts completion token 0
    if N > 1:
        # tokens after a completion's EOS are padding at its end: causal attention keeps them out of its real tokens
        rest = model(completion_ids[:, :-1], cache=cache).logits
        logits = torch.cat([logits, rest], dim=1)
    return logits


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                        share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / T) of each completion token [B, N], per-token entropy [B, N]); fp32."""
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts)
    logp_all = (logits.float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, completion_ids[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
