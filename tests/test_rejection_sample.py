"""Rejection sampling keeps only correct, well-formatted, distinct completions and writes SFT rows.

Run: python -m pytest -q tests/test_rejection_sample.py
"""

import json

import torch

from model import preset
from rl.grpo import TextCodec
from rl.rejection_sample import main, rejection_sample
from rl.sources import Row
from train.corpus import build_tokenizer
from tests.tiny_checkpoint import save_tiny_checkpoint


class ScriptedModel(torch.nn.Module):
    """Emits a fixed completion token by token (through model.generate) whatever the prompt."""

    def __init__(self, config, script):
        super().__init__()
        self.config, self.script, self.dummy = config, script, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, cache=None, logits_to_keep=0, **_):
        cache.reserve(attention_mask, ids.shape[1])
        logits = torch.full((ids.shape[0], 1, self.config.vocab_size), -30.0)
        pos = int(cache.next_position.max()) - self.prompt_len  # tokens generated so far
        logits[:, 0, self.script[min(pos, len(self.script) - 1)]] = 30.0
        return type("Out", (), {"logits": logits})()


def test_keeps_only_correct_formatted_and_dedupes(tmp_path):
    save_tiny_checkpoint(tmp_path / "m")
    codec = TextCodec(str(tmp_path / "m"))
    prompt = "What is 12 + 34?\n<think>"
    good = codec.encode("1+2+0=03</think><answer>46</answer>") + codec.eos
    model = ScriptedModel(preset("tiny", vocab_size=build_tokenizer().get_vocab_size()), good)
    model.prompt_len = len(codec.encode(prompt))
    rows = [Row(prompt, {"answer": "46"}), Row(prompt.replace("34", "35"), {"answer": "47"})]
    kept, counts = rejection_sample(model, codec, rows, k=3, max_new_tokens=40, temperature=1.0, seed=0,
                                    require=["accuracy", "format"], keep_per_prompt=2)
    assert counts["sampled"] == 6 and counts["passed"] == 3 and counts["kept"] == 1
    assert kept == [{"prompt": prompt, "response": "1+2+0=03</think><answer>46</answer>", "answer": "46"}]


def test_cli_writes_jsonl(tmp_path):
    save_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "rs.jsonl"
    assert main(["--ckpt", str(tmp_path / "m"), "--out", str(out), "--prompts", "4", "--k", "2",
                 "--max-new-tokens", "8", "--require", "format"]) == 0
    assert out.exists()
    assert all({"prompt", "response"} <= json.loads(line).keys() for line in out.read_text().splitlines())
