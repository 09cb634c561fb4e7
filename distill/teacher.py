"""The teacher side: loading a frozen teacher, the vocabulary/tokenizer compatibility check, and teacher forwards.

Token-level distillation compares two distributions over the SAME token ids, so a teacher and a student with
different tokenizers must be refused, not silently fed each other's ids (huggingface/trl #4562). `check_vocab`
compares the vocabulary sizes and the tokenizers: identical `tokenizer.json` bytes pass; different bytes with the
same token -> id map pass (formatting or normaliser-only differences); anything else is refused with the first
differing ids named. Cross-tokenizer distillation (ULD/GOLD) is out of scope.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from model import load_model
from train.checkpoint import file_sha256


class VocabMismatch(ValueError):
    """Teacher and student (or a teacher cache and a student) do not share one vocabulary."""




def tokenizer_identity(tokenizer_path: str) -> dict:
    """{"sha256": bytes hash, "vocab_sha256": hash of the sorted token -> id map, "vocab_size": n}."""
    from tokenizers import Tokenizer

    if not os.path.isfile(tokenizer_path):
        raise VocabMismatch(f"{tokenizer_path}: no tokenizer.json; distillation needs both tokenizers to compare")
    tok = Tokenizer.from_file(tokenizer_path)
    vocab = tok.get_vocab(with_added_tokens=True)
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return {"sha256": file_sha256(tokenizer_path), "vocab_sha256": hashlib.sha256(blob).hexdigest(),
            "vocab_size": tok.get_vocab_size(), "_vocab": vocab}


def public_identity(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if not k.startswith("_")}


def check_vocab(teacher: dict, student: dict, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Refuse unless the two sides share one vocabulary.

    Each side is {"model_vocab_size": int, "tokenizer": tokenizer_identity(...) or its public part}.
    """
    tv, sv = teacher["model_vocab_size"], student["model_vocab_size"]
    if tv != sv:
        raise VocabMismatch(f"{teacher_name} has vocab_size {tv} but {student_name} has {sv}: token-level "
                            f"distillation needs one vocabulary (build the student with the teacher's tokenizer and "
                            f"vocab_size)")
    tt, st = teacher["tokenizer"], student["tokenizer"]
    if tt["sha256"] == st["sha256"]:
        return
    if tt["vocab_sha256"] == st["vocab_sha256"]:
        return  # same token -> id map; the files differ only in formatting or pre/post-processing metadata
    detail = ""
    if "_vocab" in tt and "_vocab" in st:
        t_by_id = {i: s for s, i in tt["_vocab"].items()}
        s_by_id = {i: s for s, i in st["_vocab"].items()}
        diff = [i for i in sorted(set(t_by_id) | set(s_by_id)) if t_by_id.get(i) != s_by_id.get(i)]
        detail = "; first differing ids: " + ", ".join(
            f"{i}: {t_by_id.get(i)!r} vs {s_by_id.get(i)!r}" for i in diff[:3])
    raise VocabMismatch(f"{teacher_name} and {student_name} tokenizers differ (tokenizer.json SHA-256 "
                        f"{tt['sha256'][:12]} vs {st['sha256'][:12]}, vocabularies {tt['vocab_size']} vs "
                        f"{st['vocab_size']} tokens{detail}): the same id would mean different text. Use the "
                        f"teacher's tokenizer.json for the student")


def side(model_vocab_size: int, tokenizer_path: str) -> dict:
    return {"model_vocab_size": model_vocab_size, "tokenizer": tokenizer_identity(tokenizer_path)}


def load_teacher(path: str, device: torch.device | str = "cpu"):
    """(frozen model in eval mode, tokenizer.json path) of a seekstack checkpoint directory."""
    tok = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok):
        raise VocabMismatch(f"{tok}: the teacher checkpoint needs its tokenizer.json (distillation checks it "
                            f"against the student's)")
    model = load_model(path).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def weights_sha256(path: str) -> str:
    """One hash over a checkpoint's safetensors files (identifies the teacher in a cache manifest)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") or name == "config.json":
            h.update(name.encode())
            h.update(file_sha256(os.path.join(path, name)).encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_logits(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, V] fp32 logits of the frozen teacher (eval mode, no grad)."""
    teacher.eval()
    return teacher(input_ids, attention_mask=attention_mask).logits.float()
