"""Read a directory of safetensors shards without loading it: headers first, then tensors slice by slice.

Accepted layouts (transformers' and seekstack's):
    model.safetensors.index.json  {"metadata": {...}, "weight_map": {tensor name: shard file}} + the shards, or
    one or more *.safetensors files and no index (the weight map is then read from the files' headers).
Opening a directory parses every shard's header (`safe_open` checks the header and that the data section covers
the file exactly, so truncated files fail here, before anything is written) and checks the index against them.

Tensors are then read through `safe_open(...).get_slice(name)[rows]`, which maps the file and copies nothing.
Mapped pages count towards the process's resident set until the file is closed, so a `SourceFile` closes and
re-opens its shard every `window_bytes` of data read: peak RSS stays about `window_bytes` + one chunk, whatever the
shard size. safetensors stores no checksums: flipped bits inside the data section cannot be detected.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from .hf_io import ConversionError

INDEX_NAME = "model.safetensors.index.json"
WINDOW_BYTES = 256 * 2**20

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu  # ue8m0 block scales (DeepSeek-V3.1)


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name, relative to the directory
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, "
                              f"download it again") from None


class SafetensorsDir:
    """Tensor name -> (shard, shape, dtype) for a checkpoint directory, validated against the shard headers."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such checkpoint directory")
        index = os.path.join(path, INDEX_NAME)
        listed: dict[str, str] | None = None
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    listed = json.load(f)["weight_map"]
                if not isinstance(listed, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: unreadable index ({e}); it must hold a `weight_map` object") from None
            files = sorted(set(listed.values()))
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    key = next(k for k, v in listed.items() if v == name)
                    raise ConversionError(f"{index}: shard {name!r} (holding e.g. `{key}`) is listed but missing "
                                          f"from {path}; download it again")
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                found = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin"))]
                hint = " (pickle *.bin checkpoints are not read, by design)" if found else ""
                raise ConversionError(f"{path}: no *.safetensors files and no {INDEX_NAME}{hint}")
        self.files = files
        self.info: dict[str, TensorInfo] = {}
        for name in files:
            with _open(os.path.join(path, name)) as f:
                for key in f.keys():
                    if listed is not None and listed.get(key) != name:
                        continue  # not the copy the index points to
                    if key in self.info:
                        raise ConversionError(f"{path}: `{key}` is stored in both {self.info[key].file} and {name}; "
                                              f"remove the stale shard or add a {INDEX_NAME}")
                    sl = f.get_slice(key)
                    dtype = sl.get_dtype()
                    if dtype not in DTYPES:
                        raise ConversionError(f"{os.path.join(path, name)}: `{key}` has unsupported dtype {dtype}")
                    self.info[key] = TensorInfo(name, tuple(sl.get_shape()), DTYPES[dtype])
        if listed is not None:
            for key, name in listed.items():
                if key not in self.info:
                    raise ConversionError(f"{os.path.join(path, name)}: `{key}` is listed in {INDEX_NAME} but not "
                                          f"stored in that shard; the shard or the index is corrupt")

    def file_path(self, key: str) -> str:
        return os.path.join(self.path, self.info[key].file)

    def read(self, key: str) -> torch.Tensor:
        """One whole (small) tensor, e.g. an FP8 scale."""
        with _open(self.file_path(key)) as f:
            return f.get_tensor(key).clone()

    def equal(self, a: str, b: str, chunk_bytes: int = 32 * 2**20) -> bool:
        """Whether two stored tensors hold the same values, compared a slab of rows at a time."""
        ia, ib = self.info[a], self.info[b]
        if ia.shape != ib.shape:
            return False
        fa, fb = SourceFile(self.file_path(a)), SourceFile(self.file_path(b))
        try:
            for lo, hi in row_chunks(ia.shape, max(ia.dtype.itemsize, ib.dtype.itemsize), chunk_bytes):
                if not torch.equal(fa.slice(a, (), lo, hi).float(), fb.slice(b, (), lo, hi).float()):
                    return False
            return True
        finally:
            fa.close()
            fb.close()


def row_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int, align: int = 1):
    """(lo, hi) ranges over dim 0 of `shape`, each about chunk_bytes, lo a multiple of `align`."""
    if not shape:
        yield 0, 0
        return
    row = itemsize
    for s in shape[1:]:
        row *= s
    step = max(align, (chunk_bytes // max(row, 1)) // align * align)
    for lo in range(0, shape[0], step):
        yield lo, min(lo + step, shape[0])


class SourceFile:
    """One shard, read slice by slice; re-opened every `window_bytes` read so mapped pages do not pile up."""

    def __init__(self, path: str, window_bytes: int | None = None):
        self.path, self.window_bytes = path, window_bytes or WINDOW_BYTES
        self._handle, self._read = None, 0

    def slice(self, key: str, index: tuple[int, ...] = (), lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """tensor[index][lo:hi] (dim 0 after the leading indices); a 0-d tensor is returned whole."""
        if self._handle is None or self._read >= self.window_bytes:
            self.close()
            self._handle = _open(self.path).__enter__()
        try:
            sl = self._handle.get_slice(key)
            if not sl.get_shape():
                t = self._handle.get_tensor(key)
            else:
                t = sl[(*index, slice(lo, hi))]
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{self.path}: reading `{key}` failed ({e}); the file is corrupt") from None
        self._read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle, self._read = None, 0
