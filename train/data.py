"""Pre-tokenised data: `prepare` writes memmap shards + a manifest; `PackedDataset` samples fixed windows from them.

    python -m train.data prepare --input "docs/*.jsonl" --tokenizer train:8192 --out data/mine [--text-field text]
                                 [--val-fraction 0.01] [--skip-bad]

Inputs are `.txt` (one document per file) or `.jsonl` (one document per line, text under `--text-field`).
`--tokenizer train:VOCAB` trains a byte-level BPE (digits split one by one) with `tokenizers`; a path to a
`tokenizer.json` uses that tokenizer as is. Documents are joined with the EOS token and split into train / held-out
by a hash of their content, so the split does not depend on file order. Output: `tokenizer.json`, `train.bin`,
`val.bin` (uint16, or uint32 when the vocabulary needs it) and `manifest.json` (token counts, dtype, EOS id, the
tokenizer's SHA-256).

Sampling (`PackedDataset`): the stream is cut into windows of seq_len + 1 tokens (inputs and shifted targets).
Sample g of the run (g = step * global_batch + position in the global batch) reads window perm_e[g mod n] where
e = g div n and perm_e is a permutation seeded by (seed, e): within an epoch no window repeats, and since the
position is a pure function of (seed, step, rank) a resumed run reads exactly what the uninterrupted run would.
The ranks of a step read one contiguous block of global indices, so the global batch does not depend on how many
processes share it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class DataError(ValueError):
    """Input data or a prepared dataset is unusable; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------------- tokenizers
def train_bpe(texts, vocab_size: int, special_tokens: list[str] | None = None):
    """Byte-level BPE with single-digit pre-tokenisation (numbers stay digit by digit, which arithmetic needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [EOS_TOKEN, PAD_TOKEN] + [s for s in (special_tokens or []) if s not in (EOS_TOKEN, PAD_TOKEN)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_sha256(path: str) -> str:
    from .checkpoint import file_sha256

    return file_sha256(path)


def eos_id(tokenizer) -> int:
    for name in (EOS_TOKEN, "</s>", "<｜end▁of▁sentence｜>", "<|end_of_text|>"):
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx
    raise DataError(f"tokenizer has no end-of-text token (looked for {EOS_TOKEN!r}, '</s>', ...); add one")


# ------------------------------------------------------------------------------------------------- prepare
def read_documents(paths: list[str], text_field: str, skip_bad: bool, counters: dict):
    """Yield document strings; undecodable or malformed input is an error naming file and offset/line."""
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".jsonl"):
            offset = 0
            for lineno, line in enumerate(raw.split(b"\n"), start=1):
                start, offset = offset, offset + len(line) + 1
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                    text = row[text_field]
                    if not isinstance(text, str):
                        raise TypeError
                except UnicodeDecodeError as e:
                    if skip_bad:
                        counters["skipped"] += 1
                        continue
                    raise DataError(f"{path}: invalid UTF-8 at byte offset {start + e.start} (line {lineno}); "
                                    f"fix the file or pass --skip-bad") from None
                except (json.JSONDecodeError, KeyError, TypeError):
                    if skip_bad:
                        counters["skipped"] += 1
                        continue
                    raise DataError(f"{path}:{lineno}: not a JSON object with a string field {text_field!r}; "
                                    f"fix it, set --text-field, or pass --skip-bad") from None
                yield text
        else:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_bad:
                    counters["skipped"] += 1
                    continue
                raise DataError(f"{path}: invalid UTF-8 at byte offset {e.start}; fix the file or pass "
                                f"--skip-bad") from None


def is_held_out(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def prepare(inputs: list[str], tokenizer_spec: str, out: str, text_field: str = "text", val_fraction: float = 0.01,
            skip_bad: bool = False) -> dict:
    paths: list[str] = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches and os.path.isfile(pattern):
            matches = [pattern]
        paths += [m for m in matches if os.path.isfile(m)]
    if not paths:
        raise DataError(f"no input files match {inputs}; give .txt/.jsonl files or a glob")
    bad = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
    if bad:
        raise DataError(f"{bad[0]}: unsupported file type; inputs must be .txt or .jsonl")
    counters = {"skipped": 0}
    docs = [d for d in read_documents(paths, text_field, skip_bad, counters) if d.strip()]
    if not docs:
        raise DataError(f"inputs {paths[:3]} hold no text (all empty{' or skipped' if counters['skipped'] else ''})")

    from tokenizers import Tokenizer

    os.makedirs(out, exist_ok=True)
    tok_path = os.path.join(out, "tokenizer.json")
    if tokenizer_spec.startswith("train:"):
        try:
            vocab = int(tokenizer_spec.split(":", 1)[1])
        except ValueError:
            raise DataError(f"--tokenizer {tokenizer_spec!r}: use train:VOCAB_SIZE or a tokenizer.json path") from None
        tokenizer = train_bpe(docs, vocab)
        tokenizer.save(tok_path)
    else:
        src = os.path.join(tokenizer_spec, "tokenizer.json") if os.path.isdir(tokenizer_spec) else tokenizer_spec
        if not os.path.isfile(src):
            raise DataError(f"--tokenizer {tokenizer_spec}: no tokenizer.json there")
        tokenizer = Tokenizer.from_file(src)
        if os.path.abspath(src) != os.path.abspath(tok_path):
            tokenizer.save(tok_path)
    eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    splits = {"train": [], "val": []}
    for doc in docs:
        splits["val" if is_held_out(doc, val_fraction) else "train"].append(doc)
    if not splits["train"]:
        raise DataError("every document landed in the held-out split; lower --val-fraction or add data")
    manifest = {"format": "seekstack-tokens-v1", "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                "eos_id": eos, "tokenizer_sha256": tokenizer_sha256(tok_path), "inputs": paths,
                "skipped_documents": counters["skipped"], "splits": {}}
    for split, split_docs in splits.items():
        ids: list[int] = []
        for enc in tokenizer.encode_batch(split_docs, add_special_tokens=False):
            ids += enc.ids + [eos]
        arr = np.asarray(ids, dtype=dtype)
        arr.tofile(os.path.join(out, f"{split}.bin"))
        manifest["splits"][split] = {"file": f"{split}.bin", "tokens": int(arr.size), "documents": len(split_docs)}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


# ------------------------------------------------------------------------------------------------- loading
def load_split(path: str, split: str, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map one split of a prepared dataset, validating the manifest and the model's vocabulary."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise DataError(f"{path}: no manifest.json; run `python -m train.data prepare ... --out {path}` first")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise DataError(f"{manifest_path}: tokenizer vocabulary ({manifest['vocab_size']}) is larger than the "
                        f"model's vocab_size ({vocab_size}); set model vocab_size >= {manifest['vocab_size']}")
    tok = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok) and tokenizer_sha256(tok) != manifest["tokenizer_sha256"]:
        raise DataError(f"{tok}: does not match the tokenizer the shards were made with (SHA-256 differs); "
                        f"re-run prepare")
    info = manifest["splits"].get(split)
    if info is None or info["tokens"] == 0:
        raise DataError(f"{manifest_path}: split {split!r} is empty")
    file = os.path.join(path, info["file"])
    expected = info["tokens"] * np.dtype(manifest["dtype"]).itemsize
    if not os.path.isfile(file) or os.path.getsize(file) != expected:
        raise DataError(f"{file}: missing or truncated (expected {expected} bytes); re-run prepare")
    return np.memmap(file, dtype=manifest["dtype"], mode="r")


@dataclass
class Batch:
    input_ids: "np.ndarray"  # [B, T]
    labels: "np.ndarray"  # [B, T] (same tokens as inputs, shifted inside the model; here: the window itself)


class PackedDataset:
    """Deterministic, resumable sampling of seq_len + 1 windows from a 1-D token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"dataset has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.order = EpochPermutation(self.num_windows, seed)

    def window(self, g: int) -> np.ndarray:
        start = self.order(g) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1, micro_batch: int = 8,
              accum: int = 1) -> np.ndarray:
        """[micro_batch, seq_len + 1] int64 windows for this rank's micro-step of `step`."""
        return np.stack([self.window(g) for g in global_indices(step, micro, rank, world, micro_batch, accum)])


def global_indices(step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int) -> range:
    """Global sample indices of (step, micro-step, rank): one contiguous block per step, whatever the world size."""
    global_batch = micro_batch * world * accum
    first = step * global_batch + (micro * world + rank) * micro_batch
    return range(first, first + micro_batch)


class EpochPermutation:
    """Sample g -> item perm_e[g mod n], perm_e seeded by (seed, e): no repeats within an epoch, resumable."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.data", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenise text into memmap shards",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or globs")
    prep.add_argument("--tokenizer", required=True, help="train:VOCAB_SIZE, or a tokenizer.json (or its directory)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out")
    prep.add_argument("--skip-bad", action="store_true", help="skip undecodable/malformed documents and count them")
    args = p.parse_args(argv)
    try:
        m = prepare(args.input, args.tokenizer, args.out, args.text_field, args.val_fraction, args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = m["splits"]
    print(f"wrote {args.out}: {s['train']['tokens']} train tokens ({s['train']['documents']} documents), "
          f"{s['val']['tokens']} held-out tokens, vocab {m['vocab_size']}, {m['dtype']}, "
          f"{m['skipped_documents']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
