"""DeepSeek-V3's FP8 block format, dequantised exactly (reference notes §1.8; DeepSeek-V3 README_WEIGHTS.md).

* `config.json` carries `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [128, 128]}`.
* Each quantised weight W [M, N] is stored as `float8_e4m3fn` next to `<name>_scale_inv` (fp32) of shape
  [ceil(M/128), ceil(N/128)], one scale per 128x128 block, row blocks first. Edge blocks are partial (e.g.
  `kv_a_proj_with_mqa` [576, 7168] has 5 scale rows).
* Dequantisation is a multiply despite the name: W[i, j] = float(W_fp8[i, j]) * scale_inv[i // 128, j // 128].
  float8 -> fp32 is exact, so the fp32 result has one rounding (the product); a bf16 output rounds that once more.
* Which tensors are FP8 in the released V3: every attention / dense / expert / shared-expert projection; the
  embedding, lm_head, norms, router, `e_score_correction_bias` and the MTP `enorm/hnorm/eh_proj/shared_head` are not.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_size(quantization_config: dict | None) -> tuple[int, int]:
    """(row, column) block of a checkpoint's `quantization_config` (128x128 when absent)."""
    block = (quantization_config or {}).get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """[ceil(M/bm), ceil(N/bn)] for a weight [M, N]."""
    (m, n), (bm, bn) = shape, block
    return -(-m // bm), -(-n // bn)


def dequantize_rows(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                    row0: int = 0) -> torch.Tensor:
    """fp32 rows [row0, row0 + len(w_fp8)) of the dequantised weight; `scale_inv` is the whole [Mb, Nb] scale.

    row0 must be a multiple of the row block, so a big weight can be dequantised one slab of rows at a time.
    """
    bm, bn = block
    if row0 % bm:
        raise ValueError(f"row0={row0} is not a multiple of the {bm}-row block")
    rows, n = w_fp8.shape
    s = scale_inv[row0 // bm: -(-(row0 + rows) // bm)].float()
    s = s.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :n]
    return w_fp8.float() * s
