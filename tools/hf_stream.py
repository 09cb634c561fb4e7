"""Execute a conversion plan: copy source tensor pieces into planned output tensors, a slab of rows at a time.

A plan is a list of `Piece`s. Each names a source tensor (optionally one sub-tensor of it: leading indices and a
row range, e.g. expert e's up half `gate_up_proj[e, I:2I]`) and where its elements go in an output tensor (an
element offset into the flattened output, e.g. expert e's slot of a stacked [E, 2I, D]). Pieces are executed input
shard by input shard, in file order, so every shard is read once, front to back. Within a piece, dim 0 is
processed in slabs of about `chunk_bytes` (fp32-sized), so the working set is one slab, not one tensor.
FP8 pieces carry their `_scale_inv` tensor and are dequantised slab by slab (slabs aligned to the row block).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .fp8 import dequantize_rows
from .hf_io import human, log
from .hf_reader import SafetensorsDir, SourceFile, row_chunks
from .hf_writer import ShardedWriter

CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Piece:
    dst: str  # output tensor
    dst_offset: int  # element offset inside the flattened output tensor
    shape: tuple[int, ...]  # shape of the piece
    src: str | None  # source tensor; None = constant fill
    index: tuple[int, ...] = ()  # leading indices into the source tensor
    lo: int = 0  # row range [lo, lo + shape[0]) on the dim after `index`
    scale: str | None = None  # FP8: the `<name>_scale_inv` tensor
    block: tuple[int, int] = (128, 128)
    fill: float = 0.0  # value of a constant piece


def execute(reader: SafetensorsDir, writer: ShardedWriter, pieces: list[Piece], quiet: bool = False,
            chunk_bytes: int | None = None) -> None:
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    by_file: dict[str, list[Piece]] = {}
    consts = []
    for p in pieces:
        if p.src is None:
            consts.append(p)
        else:
            by_file.setdefault(reader.info[p.src].file, []).append(p)
    files = [f for f in reader.files if f in by_file]
    for i, name in enumerate(files, start=1):
        t0 = time.perf_counter()
        src = SourceFile(os.path.join(reader.path, name))
        nbytes = 0
        try:
            for p in by_file[name]:
                nbytes += _copy_piece(reader, src, writer, p, chunk_bytes)
        finally:
            src.close()
        if not quiet:
            log(f"[{i:>{len(str(len(files)))}}/{len(files)}] {name}: {len(by_file[name])} tensors, "
                f"{human(nbytes)} read in {time.perf_counter() - t0:.1f} s")
    for p in consts:
        writer.write(p.dst, p.dst_offset, torch.full(p.shape, p.fill, dtype=writer.slots[p.dst].dtype))


def _copy_piece(reader: SafetensorsDir, src: SourceFile, writer: ShardedWriter, p: Piece, chunk_bytes: int) -> int:
    out_dtype = writer.slots[p.dst].dtype
    scale = None
    if p.scale is not None:  # small; usually in the same shard as its weight
        same = os.path.join(reader.path, reader.info[p.scale].file) == src.path
        scale = src.slice(p.scale).clone() if same else reader.read(p.scale)
    row_numel = 1
    for s in p.shape[1:]:
        row_numel *= s
    nbytes = 0
    for lo, hi in row_chunks(p.shape, 4, chunk_bytes, align=p.block[0] if scale is not None else 1):
        if p.shape:
            t = src.slice(p.src, p.index, p.lo + lo, p.lo + hi)
        else:
            t = src.slice(p.src)
        nbytes += t.numel() * t.element_size()
        if scale is not None:
            t = dequantize_rows(t, scale, p.block, row0=p.lo + lo)
        writer.write(p.dst, p.dst_offset + lo * row_numel, t.to(out_dtype))
        del t
    return nbytes


# ------------------------------------------------------------------------------------------------------- planning
def expected_state(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor a seekstack checkpoint of `config` stores (tied lm_head excluded)."""
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def hf_views(key: str, shape: tuple[int, ...], config) -> dict[str, torch.Tensor]:
    """HF on-disk tensors of seekstack tensor `key`, as meta views into it (model.hf_mapping.seekstack_to_hf).

    Each view's storage_offset() and shape say where the HF tensor's elements sit inside the seekstack tensor,
    e.g. expert e's up_proj is rows [I, 2I) of `gate_up_proj[e]`. The mapping stays in one place.
    """
    from model.hf_mapping import seekstack_to_hf

    views = seekstack_to_hf(key, torch.empty(shape, device="meta"), config)
    for hf_key, v in views.items():
        if not v.is_contiguous():
            raise AssertionError(f"{key} -> {hf_key}: the mapping produced a non-contiguous view")
    return views


def subtensor(shape: tuple[int, ...], offset: int, sub: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(leading indices, first row) such that tensor[indices][row:row + sub[0]] is the contiguous block of shape
    `sub` starting at element `offset` of a tensor of shape `shape`."""
    k = len(shape) - len(sub)
    if k < 0 or tuple(shape[k + 1:]) != tuple(sub[1:]):
        raise AssertionError(f"{sub} is not a row block of {shape}")
    if k == len(shape):  # 0-d
        return (), 0
    inner = 1
    for s in shape[k + 1:]:
        inner *= s
    q, rem = divmod(offset, inner)
    if rem:
        raise AssertionError(f"offset {offset} is not row-aligned in {shape}")
    lo, prefix = q % shape[k], q // shape[k]
    index = []
    for s in reversed(shape[:k]):
        prefix, i = divmod(prefix, s)
        index.append(i)
    if lo + sub[0] > shape[k] or prefix:
        raise AssertionError(f"block {sub} at {offset} overruns {shape}")
    return tuple(reversed(index)), lo
