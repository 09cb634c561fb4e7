"""Generation over the latent cache: batched left-padded greedy == per-prompt full-forward greedy, per-sequence EOS
stop, returned log-probs, seeded sampling reproducibility, top-k / top-p.

Run: python -m pytest -q tests/test_generate.py
"""

import pytest
import torch

from model import Transformer, preset
from model.generate import generate, sample_next

PROMPTS = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]


def _model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def _greedy_reference(model, prompt, n):
    seq = list(prompt)
    logps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            tok = int(logits.argmax())
            logps.append(float(logits.log_softmax(-1)[tok]))
            seq.append(tok)
    return seq[len(prompt):], logps


def test_batched_greedy_equals_unbatched_full_forward():
    model = _model()
    out = generate(model, PROMPTS, 12, greedy=True, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        tokens, logps = _greedy_reference(model, prompt, 12)
        assert out.completions()[i] == tokens
        assert torch.allclose(torch.tensor(out.completion_logprobs()[i]), torch.tensor(logps), atol=1e-5)


def test_per_sequence_eos_stop():
    model = _model()
    free = generate(model, PROMPTS, 12, greedy=True, eos_token_id=[])
    eos = free.completions()[1][3]  # sequence 1 emits this token at step 3 (maybe earlier too)
    first = free.completions()[1].index(eos)
    out = generate(model, PROMPTS, 12, greedy=True, eos_token_id=eos, pad_token_id=0)
    assert out.completions()[1] == free.completions()[1][: first + 1]
    assert bool(out.finished[1])
    assert not out.completion_mask[1, first + 1:].any()
    assert (out.completion_ids[1, first + 1:] == 0).all()
    assert (out.logprobs[1, first + 1:] == 0).all()
    for i in (0, 2):  # the others continue as before until their own EOS (if any)
        c = free.completions()[i]
        expected = c[: c.index(eos) + 1] if eos in c else c
        assert out.completions()[i] == expected


def test_sampling_is_reproducible_with_a_seed():
    model = _model()
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, eos_token_id=[])
    a = generate(model, PROMPTS, 10, seed=3, **kw)
    b = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(3), **kw)
    c = generate(model, PROMPTS, 10, seed=4, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_sampled_logprobs_are_temperature_scaled_model_logprobs():
    model = _model()
    out = generate(model, [PROMPTS[0]], 6, seed=1, temperature=0.7, eos_token_id=[])
    seq = torch.tensor([PROMPTS[0] + out.completions()[0]])
    with torch.no_grad():
        logits = model(seq).logits[0, len(PROMPTS[0]) - 1:-1]
    ref = (logits / 0.7).log_softmax(-1).gather(1, seq[0, len(PROMPTS[0]):, None]).squeeze(1)
    assert torch.allclose(out.logprobs[0], ref, atol=1e-5)


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    greedy = logits.argmax(-1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, top_k=1, generator=gen)[0], greedy)
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=gen)[0], greedy)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, top_p=0.8, generator=gen)[0]) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    seen = {int(sample_next(logits, top_k=3, generator=gen)[0]) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_gumbel_argmax_draws_from_the_softmax_and_never_a_masked_token():
    from model.generate import gumbel_argmax

    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, float("-inf")])
    n = 200_000
    draws = gumbel_argmax(logits.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[5] == 0
    # 200K draws: the standard error of each frequency is below 0.0012
    torch.testing.assert_close(freq, logits.double().softmax(-1), rtol=0, atol=0.005)
    again = gumbel_argmax(logits.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_dropping_finished_sequences_changes_nothing(monkeypatch):
    """Finished sequences leave the decode batch (and the latent cache); the others' tokens and log-probs are those
    of a run that keeps every sequence to the end."""
    import model.generate as gen

    model = _model()
    prompts = [[3, 4, 5], [9, 10, 11, 12], [7], [20, 21], [5, 6, 7, 8, 9], [30]]
    free = generate(model, prompts, 10, greedy=True, eos_token_id=[])
    # EOS = tokens that stop several sequences at different steps
    eos = sorted({c[k] for c, k in zip(free.completions(), (1, 2, 4))})
    calls = []
    real_keep = gen.LatentCache.keep_rows
    monkeypatch.setattr(gen.LatentCache, "keep_rows", lambda self, rows: calls.append(len(rows)) or
                        real_keep(self, rows))
    compacted = generate(model, prompts, 10, greedy=True, eos_token_id=eos)
    monkeypatch.setattr(gen, "COMPACT_AT", 0.0)  # never compact
    full = generate(model, prompts, 10, greedy=True, eos_token_id=eos)
    assert calls, "no sequence left the batch: pick other EOS tokens"
    assert compacted.completions() == full.completions()
    assert torch.equal(compacted.completion_mask, full.completion_mask)
    assert torch.equal(compacted.finished, full.finished)
    torch.testing.assert_close(compacted.logprobs, full.logprobs, rtol=0, atol=1e-5)


def test_repeated_prompts_are_prefilled_once():
    """G copies of a prompt share one prefill (the cache rows are repeated): same tokens and log-probs as prompts
    that are all different, and the prefill batch holds each distinct prompt once."""
    from model.generate import prompt_groups

    ids, mask = torch.tensor([[5, 6], [0, 7], [5, 6]]), torch.tensor([[True, True], [False, True], [True, True]])
    assert [t.tolist() for t in prompt_groups(ids, mask)] == [[0, 1], [0, 1, 0]]
    model = _model()
    prompts = [[3, 4, 5], [9, 10], [3, 4, 5], [9, 10], [3, 4, 5]]
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2]))
    out = generate(model, prompts, 6, greedy=True, eos_token_id=[])
    hook.remove()
    assert tuple(seen[0]) == (2, 3)  # the prefill: 2 distinct prompts, padded to 3 tokens
    assert all(tuple(s) == (5, 1) for s in seen[1:])  # then every sequence decodes
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 6, greedy=True, eos_token_id=[])
        assert out.completions()[i] == alone.completions()[0]
        torch.testing.assert_close(out.logprobs[i], alone.logprobs[0], rtol=0, atol=1e-5)


def test_top_p_zero_keeps_the_most_likely_token_and_bad_settings_are_refused():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", initializer_range=0.2)).eval()
    greedy = generate(model, [[5, 6, 7]], 8, greedy=True, eos_token_id=[]).completions()
    assert generate(model, [[5, 6, 7]], 8, top_p=0.0, seed=0, eos_token_id=[]).completions() == greedy
    for kw, word in ((dict(top_k=-1), "top_k"), (dict(temperature=-0.5), "temperature"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=word):
            generate(model, [[5, 6, 7]], 2, eos_token_id=[], **kw)
