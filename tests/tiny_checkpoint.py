"""A tiny seekstack checkpoint with the built-in tokenizer, as the trainers' tests start from one."""

from __future__ import annotations

import os

import torch

from model import Transformer, preset, save_model
from train.corpus import build_tokenizer


def save_tiny_checkpoint(path: str | os.PathLike) -> str:
    """Random `tiny` model (seed 0) sized to the built-in tokenizer, saved at `path` with tokenizer.json."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny", vocab_size=tok.get_vocab_size())), path)
    tok.save(os.path.join(path, "tokenizer.json"))
    return str(path)
