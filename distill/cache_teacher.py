"""Offline teacher signal: cache the teacher's top-k next-token distributions for a dataset, then stream them.

    python -m distill.cache_teacher --teacher RUN/final --data builtin --out cache/ --top-k 8 [--num-problems N]
    python -m distill.cache_teacher --teacher DIR --data pairs.jsonl --template arithmetic --out cache/ --top-k 16

For every row (prompt/response, as distill/data.py builds them) and every position whose next token is a response
token, it stores the teacher's k most likely ids (int32) and their log-probs (fp16) under softmax(z / T_cache):
k × (4 + 2) bytes per distilled token, e.g. 48 bytes at k = 8 against 2·V = 1,024 bytes for the dense fp16
distribution of the built-in tokenizer (and 258 KB at DeepSeek-V3's V = 129,280). The rows' own ids and labels are
stored too (int32, 8 bytes per token of the row), so the cache is the training set of an offline run.

    OUT/manifest.json           spec (teacher weights hash, tokenizer identity, k, T_cache, data), shard list
    OUT/tokenizer.json          the teacher's tokenizer (an offline run needs no teacher checkpoint)
    OUT/shard_00000.safetensors input_ids, labels [tokens] int32; row_offsets [rows + 1] int64;
                                topk_ids [positions, k] int32; topk_logprobs [positions, k] fp16;
                                pos_offsets [rows + 1] int64

Resumable at shard level: each shard is written to a temp file and renamed, then recorded in the manifest (with its
SHA-256) by an atomic rewrite; a rerun with the same arguments skips every recorded shard whose hash checks and
redoes the rest. A rerun with different arguments into the same --out is refused (the spec differs).

`TopKCache(path)` reads a complete cache for the trainer. Rows are visited shard by shard: epoch e permutes the
shards, then the rows inside each shard (both seeded by (seed, e)), so a run streams one shard at a time (two are
kept in memory) and a resumed run reads exactly the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from train.data import DataError

from .data import load_examples, pad_id
from .losses import TopK, topk_teacher
from .teacher import (VocabMismatch, file_sha256, load_teacher, public_identity, teacher_logits, tokenizer_identity,
                      weights_sha256)

FORMAT = "seekstack-teacher-topk-v1"


def bytes_per_token(top_k: int) -> int:
    """Teacher-signal bytes per distilled token: k ids (int32) + k log-probs (fp16)."""
    return top_k * (4 + 2)


def _write_json_atomic(path: str, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def _data_sha256(examples) -> str:
    import hashlib

    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(np.asarray(ids, dtype=np.int32).tobytes())
        h.update(np.asarray(labels, dtype=np.int32).tobytes())
    return h.hexdigest()


@torch.no_grad()
def teacher_topk_rows(teacher, rows, top_k: int, temperature: float, pad: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (ids [n_pos, k] int32, log-probs [n_pos, k] fp16) at the positions whose next token is scored."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    # right padding + causal attention: padding never changes the earlier positions' logits
    top = topk_teacher(teacher_logits(teacher, input_ids)[:, :-1], top_k, temperature)
    out = []
    for i, (ids, labels) in enumerate(rows):
        scored = torch.tensor(labels[1:]) != -100
        pos = scored.nonzero().flatten()
        out.append((top.ids[i, pos].to(torch.int32).numpy(), top.logprobs[i, pos].to(torch.float16).numpy()))
    return out


def build_cache(teacher_dir: str, data: str, out: str, top_k: int, *, template: str = "arithmetic", seed: int = 0,
                num_problems: int = 20000, seq_len: int = 256, temperature: float = 1.0, rows_per_shard: int = 4096,
                batch_size: int = 64, flawed_fraction: float = 0.0, log=print) -> dict:
    """Write (or finish) the cache in `out`; returns the manifest."""
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    teacher, tok_path = load_teacher(teacher_dir)
    if top_k < 1 or top_k > teacher.config.vocab_size:
        raise ValueError(f"--top-k must be in [1, {teacher.config.vocab_size}], got {top_k}")
    tokenizer = Tokenizer.from_file(tok_path)
    examples = load_examples(data, tokenizer, seed=seed, num_problems=num_problems, template=template,
                             seq_len=seq_len, flawed_fraction=flawed_fraction)
    identity = tokenizer_identity(tok_path)
    spec = {"format": FORMAT, "teacher": os.path.abspath(teacher_dir), "teacher_sha256": weights_sha256(teacher_dir),
            "model_vocab_size": teacher.config.vocab_size, "tokenizer": public_identity(identity), "top_k": top_k,
            "temperature": temperature, "rows_per_shard": rows_per_shard,
            "data": {"source": data if data == "builtin" else os.path.abspath(data), "template": template,
                     "seed": seed, "num_problems": num_problems, "seq_len": seq_len, "flawed_fraction": flawed_fraction,
                     "rows": len(examples), "sha256": _data_sha256(examples)}}
    os.makedirs(out, exist_ok=True)
    shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))  # offline runs read the tokenizer from the cache
    manifest_path = os.path.join(out, "manifest.json")
    manifest = {"spec": spec, "shards": {}, "complete": False}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("spec") != spec:
            diff = sorted(k for k in set(spec) | set(old.get("spec", {})) if spec.get(k) != old.get("spec", {}).get(k))
            raise DataError(f"{out}: holds a cache made with different settings ({', '.join(diff)}); use another "
                            f"--out or delete it")
        manifest["shards"] = old.get("shards", {})
    n_shards = (len(examples) + rows_per_shard - 1) // rows_per_shard
    pad = pad_id(tokenizer)
    done = skipped = 0
    for s in range(n_shards):
        name = f"shard_{s:05d}.safetensors"
        path = os.path.join(out, name)
        entry = manifest["shards"].get(name)
        if entry and os.path.isfile(path) and file_sha256(path) == entry["sha256"]:
            skipped += 1
            continue
        rows = examples[s * rows_per_shard:(s + 1) * rows_per_shard]
        tops = []
        for i in range(0, len(rows), batch_size):
            tops += teacher_topk_rows(teacher, rows[i:i + batch_size], top_k, temperature, pad)
        tensors = {
            "input_ids": torch.tensor([t for ids, _ in rows for t in ids], dtype=torch.int32),
            "labels": torch.tensor([t for _, labels in rows for t in labels], dtype=torch.int32),
            "row_offsets": torch.tensor(np.cumsum([0] + [len(ids) for ids, _ in rows]), dtype=torch.int64),
            "topk_ids": torch.from_numpy(np.concatenate([t[0] for t in tops]).reshape(-1, top_k)),
            "topk_logprobs": torch.from_numpy(np.concatenate([t[1] for t in tops]).reshape(-1, top_k)),
            "pos_offsets": torch.tensor(np.cumsum([0] + [len(t[0]) for t in tops]), dtype=torch.int64),
        }
        fd, tmp = tempfile.mkstemp(prefix=".tmp-shard-", dir=out)
        os.close(fd)
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        manifest["shards"][name] = {"rows": len(rows), "positions": int(tensors["topk_ids"].shape[0]),
                                    "tokens": int(tensors["input_ids"].numel()), "bytes": os.path.getsize(path),
                                    "sha256": file_sha256(path)}
        _write_json_atomic(manifest_path, manifest)
        done += 1
        log(f"cache: shard {s + 1}/{n_shards} written ({len(rows)} rows)")
    shards = [manifest["shards"][f"shard_{s:05d}.safetensors"] for s in range(n_shards)]
    positions = sum(e["positions"] for e in shards)
    manifest.update(complete=True, rows=len(examples), positions=positions,
                    bytes_per_token=bytes_per_token(top_k),
                    file_bytes_per_token=sum(e["bytes"] for e in shards) / max(positions, 1))
    _write_json_atomic(manifest_path, manifest)
    log(f"cache: {out}: {len(examples)} rows, {positions} distilled tokens, top-{top_k} = "
        f"{bytes_per_token(top_k)} B/token of teacher signal ({manifest['file_bytes_per_token']:.1f} B/token on "
        f"disk with the rows' ids and labels); {done} shards written, {skipped} already done, "
        f"{time.perf_counter() - t0:.1f}s")
    return manifest


# ------------------------------------------------------------------------------------------------ reading

class StreamOrder:
    """Global sample g -> (shard, row in shard): each epoch permutes the shards, then the rows of each shard."""

    def __init__(self, sizes: list[int], seed: int):
        self.sizes, self.seed, self.total = list(sizes), seed, sum(sizes)
        self._epoch, self._shards, self._starts, self._rows = -1, None, None, {}

    def __call__(self, g: int) -> tuple[int, int]:
        epoch, i = divmod(g, self.total)
        if epoch != self._epoch:
            self._epoch, self._rows = epoch, {}
            self._shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
            self._starts = np.cumsum([0] + [self.sizes[s] for s in self._shards])
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard = int(self._shards[k])
        if shard not in self._rows:
            self._rows[shard] = np.random.default_rng([self.seed, epoch, shard]).permutation(self.sizes[shard])
        return shard, int(self._rows[shard][i - self._starts[k]])


class TopKCache:
    """A complete teacher cache; `batch(...)` gives training batches with their top-k teacher [B, L − 1, k]."""

    def __init__(self, path: str, seed: int = 0, max_shards_in_memory: int = 2):
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise DataError(f"{path}: no manifest.json; write the cache with `python -m distill.cache_teacher` first")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("spec", {}).get("format") != FORMAT:
            raise DataError(f"{manifest_path}: not a {FORMAT} cache")
        if not self.manifest.get("complete"):
            raise DataError(f"{path}: the cache is incomplete; rerun the same `python -m distill.cache_teacher` "
                            f"command to finish it")
        self.path, self.spec = path, self.manifest["spec"]
        self.names = sorted(self.manifest["shards"])
        self.order = StreamOrder([self.manifest["shards"][n]["rows"] for n in self.names], seed)
        self.max_in_memory = max_shards_in_memory
        self._loaded: OrderedDict[int, dict] = OrderedDict()
        self._verified: set[int] = set()

    @property
    def tokenizer_path(self) -> str:
        """The teacher's tokenizer.json, copied into the cache (checked against the manifest's hash)."""
        path = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(path) or file_sha256(path) != self.spec["tokenizer"]["sha256"]:
            raise DataError(f"{path}: missing or not the tokenizer the cache was written with")
        return path

    @property
    def top_k(self) -> int:
        return self.spec["top_k"]

    @property
    def temperature(self) -> float:
        return self.spec["temperature"]

    @property
    def num_rows(self) -> int:
        return self.order.total

    def vocab_side(self) -> dict:
        return {"model_vocab_size": self.spec["model_vocab_size"], "tokenizer": self.spec["tokenizer"]}

    def _shard(self, s: int) -> dict:
        if s in self._loaded:
            self._loaded.move_to_end(s)
            return self._loaded[s]
        name = self.names[s]
        file = os.path.join(self.path, name)
        if s not in self._verified:
            if not os.path.isfile(file) or file_sha256(file) != self.manifest["shards"][name]["sha256"]:
                raise DataError(f"{file}: missing or does not match its SHA-256 in manifest.json; rerun "
                                f"`python -m distill.cache_teacher` with the same arguments to rewrite it")
            self._verified.add(s)
        with safe_open(file, "pt") as f:
            shard = {k: f.get_tensor(k) for k in f.keys()}
        self._loaded[s] = shard
        while len(self._loaded) > self.max_in_memory:
            self._loaded.popitem(last=False)
        return shard

    def row(self, shard: int, i: int):
        """(input_ids [L], labels [L], topk ids [n_pos, k], topk log-probs [n_pos, k]) of row i of a shard."""
        sh = self._shard(shard)
        a, b = int(sh["row_offsets"][i]), int(sh["row_offsets"][i + 1])
        c, d = int(sh["pos_offsets"][i]), int(sh["pos_offsets"][i + 1])
        return sh["input_ids"][a:b], sh["labels"][a:b], sh["topk_ids"][c:d], sh["topk_logprobs"][c:d]

    def rows(self):
        """Every row in storage order (for checks and tests)."""
        for s, name in enumerate(self.names):
            for i in range(self.manifest["shards"][name]["rows"]):
                yield self.row(s, i)

    def batch_of(self, rows, pad: int) -> dict:
        width = max(len(r[0]) for r in rows)
        B, k = len(rows), self.top_k
        input_ids = torch.full((B, width), pad, dtype=torch.long)
        labels = torch.full((B, width), -100, dtype=torch.long)
        ids = torch.zeros(B, width - 1, k, dtype=torch.long)
        logprobs = torch.zeros(B, width - 1, k, dtype=torch.float32)
        for b, (r_ids, r_labels, t_ids, t_lp) in enumerate(rows):
            input_ids[b, :len(r_ids)] = r_ids.long()
            labels[b, :len(r_labels)] = r_labels.long()
            pos = (labels[b, 1:] != -100).nonzero().flatten()
            if len(pos) != len(t_ids):
                raise DataError(f"{self.path}: a row has {len(pos)} scored positions but {len(t_ids)} cached; the "
                                f"cache is inconsistent, rewrite it")
            ids[b, pos] = t_ids.long()
            logprobs[b, pos] = t_lp.float()
        return {"input_ids": input_ids, "labels": labels, "topk": TopK(ids, logprobs, self.temperature)}

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int, pad: int) -> dict:
        from train.data import global_indices

        return self.batch_of([self.row(*self.order(g))
                              for g in global_indices(step, micro, rank, world, micro_batch, accum)], pad)


def check_student(cache: TopKCache, model_vocab_size: int, tokenizer_path: str) -> None:
    """Refuse a student whose vocabulary differs from the cached teacher's."""
    from .teacher import check_vocab

    check_vocab(cache.vocab_side(), {"model_vocab_size": model_vocab_size,
                                     "tokenizer": tokenizer_identity(tokenizer_path)},
                teacher_name=f"teacher cache {cache.path}", student_name="student")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.cache_teacher", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory (with tokenizer.json)")
    p.add_argument("--data", default="builtin", help="'builtin' (the addition task) or a prompt/response JSONL")
    p.add_argument("--out", required=True, help="cache directory (created; an unfinished one is resumed)")
    p.add_argument("--top-k", type=int, default=8, help="teacher ids kept per position")
    p.add_argument("--template", default="arithmetic", help="prompt template for JSONL rows (train.sft templates)")
    p.add_argument("--num-problems", type=int, default=20000, help="built-in training problems")
    p.add_argument("--seed", type=int, default=0, help="built-in problem seed")
    p.add_argument("--flawed-fraction", type=float, default=0.0, help="built-in: share of sloppy solutions")
    p.add_argument("--seq-len", type=int, default=256, help="rows are truncated to seq_len + 1 tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="T_cache of the stored log-probs")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64, help="rows per teacher forward")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        build_cache(args.teacher, args.data, args.out, args.top_k, template=args.template, seed=args.seed,
                    num_problems=args.num_problems, seq_len=args.seq_len, temperature=args.temperature,
                    rows_per_shard=args.rows_per_shard, batch_size=args.batch_size,
                    flawed_fraction=args.flawed_fraction,
                    log=lambda m: print(m, file=sys.stderr))
    except (DataError, VocabMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
