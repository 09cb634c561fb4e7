"""SFT: prompt tokens are masked out of the loss, chat rows work, malformed rows are refused, the loop runs.

Run: python -m pytest -q tests/test_sft.py
"""

import json
import os

import pytest

from train.corpus import build_tokenizer
from train.data import DataError
from train.sft import SFTDataset, encode_pairs, main, read_pairs
from tests.tiny_checkpoint import save_tiny_checkpoint


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "base"
    save_tiny_checkpoint(path)
    return path, build_tokenizer()


def test_prompt_tokens_are_masked(base):
    _, tok = base
    [(ids, labels)] = encode_pairs([("What is 2 + 3?", "<think>2+3=5</think><answer>5</answer>")], tok,
                                   "arithmetic", seq_len=64)
    prompt_len = len(tok.encode("What is 2 + 3?\n<think>").ids)
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tok.token_to_id("<|endoftext|>")
    batch = SFTDataset([(ids, labels), (ids[:5], labels[:5])], 64, 0, pad_id=1, packing=False).batch(0, micro_batch=2)
    short = batch["input_ids"][(batch["labels"] != -100).sum(1) == 0]
    assert short.shape[0] == 1 and (short[0, 5:] == 1).all()  # the short row is right-padded, all labels masked


def test_chat_rows_and_refusals(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}) + "\n")
    assert read_pairs(str(f)) == [("System: be brief\nUser: hi", "hello")]
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"chat.jsonl:2: expected"):
        read_pairs(str(f))
    f.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"chat.jsonl:2: not valid JSON"):
        read_pairs(str(f))


def test_sft_run_lowers_the_response_loss(base, tmp_path):
    path, _ = base
    rows = [{"prompt": f"What is {a} + {b}?", "response": f"<answer>{a + b}</answer>"} for a in range(9) for b in range(9)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = str(tmp_path / "sft")
    assert main(["--model.init_from", str(path), "--data.path", str(data), "--data.template", "arithmetic",
                 "--run-dir", run, "--training.steps", "25", "--training.micro_batch", "8",
                 "--optimizer.lr", "0.01", "--metrics.progress", "false", "--metrics.eval_every", "0",
                 "--training.threads", "1"]) == 0
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert losses[-1] < 0.5 * losses[0]
    assert os.path.isfile(os.path.join(run, "final", "tokenizer.json"))
