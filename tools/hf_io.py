"""Shared plumbing of tools.convert_hf / tools.export_hf: the error type, staged output, tokenizer copy, logging.

Safety rules both converters follow:
* output is written into a temp dir next to the destination (`.tmp-<name>-*`) and renamed onto it only after every
  file was written and re-read, so an interrupted run never leaves a half-written checkpoint at the destination;
* nothing from a checkpoint is executed: only JSON and safetensors are read (no pickle, no remote code, and
  `*.py` files are never copied).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator

from model.checkpoint import replace_dir


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted; the message names the file, the key and, where there is one, the fix."""


# Names containing "token" (tokenizer.json, tokenizer_config.json, tokenizer.model, special_tokens_map.json, ...)
# plus the generation defaults and chat template that ship beside them.
_TOKENIZER_EXTRA = ("generation_config.json", "chat_template.jinja", "chat_template.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 (transformers' max_shard_size units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}; use e.g. 2GB, 500MB, 4GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.2f} TB"


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a destination that is the source, lies inside it, or exists without --overwrite."""
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if dst_real == src_real or dst_real.startswith(src_real + os.sep) or src_real.startswith(dst_real + os.sep):
        raise ConversionError(f"{dst}: destination overlaps the source {src}; choose another --dst")
    if os.path.lexists(dst) and not overwrite:
        raise ConversionError(f"{dst}: already exists; pass --overwrite to replace it, or choose another --dst")


@contextlib.contextmanager
def staged_dir(dst: str) -> Iterator[str]:
    """Yield a fresh temp dir next to `dst`; rename it onto `dst` if the block succeeds, delete it otherwise."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(dst)}-", dir=parent)
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_files(src: str) -> list[str]:
    """Plain files in `src` that belong to the tokenizer (never code)."""
    names = []
    for name in sorted(os.listdir(src)):
        if name.endswith(".py") or not os.path.isfile(os.path.join(src, name)):
            continue
        if "token" in name.lower() or name in _TOKENIZER_EXTRA:
            names.append(name)
    return names


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    names = tokenizer_files(src)
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))  # follows hub-cache symlinks
    return names
