"""Write a planned set of tensors into safetensors shards, piece by piece, without holding any tensor whole.

safetensors layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces to
a multiple of 8, then the raw little-endian data, tensors back to back.

Because every output tensor's name, dtype and shape are known before any data is read (the converters plan from
the input headers), each shard's header can be written first and every piece of data written straight to its final
byte offset (`os.pwrite`). A stacked expert tensor [E, 2I, D] is thus filled one expert matrix at a time, in any
order and from any input shard: nothing is buffered, whatever the input's grouping. `finish()` checks that every
byte of every tensor was written exactly once, writes `model.safetensors.index.json` when there is more than one
shard, and re-opens each shard with `safe_open` to validate it.

Shards are filled in plan order up to `max_shard_bytes` (a bigger tensor gets a shard of its own), named
`model.safetensors` when there is one and `model-0000i-of-0000N.safetensors` otherwise. Inside a shard tensors are
laid out by decreasing item size, so every tensor starts at an offset aligned to its dtype.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from .hf_io import ConversionError
from .hf_reader import DTYPES, INDEX_NAME

_ST_NAME = {v: k for k, v in DTYPES.items()}
_MAX_OPEN = 8


@dataclass
class _Slot:
    shard: int
    start: int  # absolute byte offset of the tensor's data in its shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardedWriter:
    def __init__(self, directory: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise ConversionError("safetensors data is little-endian; this writer needs a little-endian machine")
        self.directory = directory
        groups: list[list[tuple[int, str, torch.dtype, tuple]]] = [[]]
        size = 0
        for order, (key, dtype, shape) in enumerate(tensors):
            nbytes = _numel(shape) * dtype.itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((order, key, dtype, tuple(shape)))
            size += nbytes
        n = len(groups)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                          for i in range(1, n + 1)]
        self.slots: dict[str, _Slot] = {}
        self.written: dict[str, list[tuple[int, int]]] = {}
        self.total_bytes = 0
        for shard, group in enumerate(groups):
            group.sort(key=lambda t: (-t[2].itemsize, t[0]))
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for _, key, dtype, shape in group:
                nbytes = _numel(shape) * dtype.itemsize
                header[key] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.slots[key] = _Slot(shard, offset, nbytes, dtype, shape)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            for key in header:
                if key != "__metadata__":
                    self.slots[key].start += data_start
            path = os.path.join(directory, self.names[shard])
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(data_start + offset)  # sparse until written
            self.total_bytes += offset
        self._fds: OrderedDict[int, int] = OrderedDict()

    def _fd(self, shard: int) -> int:
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        if len(self._fds) >= _MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(os.path.join(self.directory, self.names[shard]), os.O_WRONLY)
        self._fds[shard] = fd
        return fd

    def write(self, key: str, elem_offset: int, tensor: torch.Tensor) -> None:
        """Store `tensor` (already in the planned dtype) at element `elem_offset` of the flattened output `key`."""
        slot = self.slots[key]
        if tensor.dtype != slot.dtype:
            raise AssertionError(f"{key}: got {tensor.dtype}, planned {slot.dtype}")
        begin = elem_offset * slot.dtype.itemsize
        nbytes = tensor.numel() * tensor.element_size()
        if begin < 0 or begin + nbytes > slot.nbytes:
            raise AssertionError(f"{key}: bytes [{begin}, {begin + nbytes}) outside the tensor's {slot.nbytes}")
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        fd, pos = self._fd(slot.shard), slot.start + begin
        try:
            while data:
                n = os.pwrite(fd, data, pos)
                data, pos = data[n:], pos + n
        except OSError as e:
            raise ConversionError(f"{os.path.join(self.directory, self.names[slot.shard])}: writing `{key}` "
                                  f"failed ({e})") from None
        self.written.setdefault(key, []).append((begin, begin + nbytes))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def finish(self) -> dict[str, str]:
        """Check full coverage, write the index, validate every shard; returns the weight map."""
        self.close()
        for key, slot in self.slots.items():
            end = 0
            for lo, hi in sorted(self.written.get(key, [])):
                if lo != end:
                    raise AssertionError(f"{key}: bytes [{end}, {lo}) {'written twice' if lo < end else 'missing'}")
                end = hi
            if end != slot.nbytes:
                raise AssertionError(f"{key}: only {end} of {slot.nbytes} bytes written")
        weight_map = {key: self.names[slot.shard] for key, slot in sorted(self.slots.items())}
        if len(self.names) > 1:
            with open(os.path.join(self.directory, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
        for name in self.names:
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # data on disk before the staged directory is renamed into place
            finally:
                os.close(fd)
            try:
                with safe_open(path, "pt") as f:
                    f.keys()
            except SafetensorError as e:
                raise AssertionError(f"{path}: written shard does not validate ({e})") from None
        return weight_map
