"""Export a seekstack checkpoint to the Hugging Face (transformers) DeepSeek-V3 / V2 on-disk layout, streaming.

    python -m tools.export_hf --src CKPT_DIR --dst HF_DIR [--dtype auto|bf16|fp32] [--max-shard-size 5GB]
                              [--overwrite] [--quiet]

The result loads with `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` (DeepseekV3ForCausalLM, or
DeepseekV2ForCausalLM for model_type deepseek_v2) with no missing or unexpected weights apart from the MTP layers,
which transformers does not implement and reports as unexpected. Per tensor (model/hf_mapping.py):
* stacked experts are split back into `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, each read as
  one expert's slice of the stacked tensor;
* `e_score_correction_bias` is written in fp32 (DeepseekV2 has none, so it is left out there);
* MTP module k is written as `model.layers.{num_hidden_layers + k}.*`, including its duplicates of the embedding
  (`embed_tokens.weight`) and head (`shared_head.head.weight`) that DeepSeek's and vLLM's loaders expect;
* config.json gets transformers' key names (ModelConfig.to_dict(hf=True): `architectures`, no seekstack-only keys);
* tokenizer files are copied.
Weights are written in bf16/fp32, never FP8. Output is staged next to --dst and renamed into place when complete;
refusals exit with code 2 and an `error: ...` line naming the file and tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from model.config import ModelConfig
from model.hf_mapping import hf_has_router_bias, mtp_shared_copies

from .convert_hf import DTYPES, load_config
from .hf_io import (
    ConversionError,
    check_destination,
    copy_tokenizer_files,
    human,
    log,
    parse_size,
    peak_rss_bytes,
    staged_dir,
)
from .hf_reader import SafetensorsDir
from .hf_stream import Piece, execute, expected_state, hf_views, subtensor
from .hf_writer import ShardedWriter


@dataclasses.dataclass
class ExportPlan:
    config: ModelConfig
    pieces: list[Piece]
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]


def plan_export(reader: SafetensorsDir, cfg: ModelConfig, dtype: str = "auto") -> ExportPlan:
    """Check the checkpoint against its config, then map every stored tensor to its HF tensors."""
    cfg_path = os.path.join(reader.path, "config.json")
    expected = expected_state(cfg)
    missing = sorted(set(expected) - set(reader.info))
    if missing:
        raise ConversionError(f"{reader.path}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                              f"({len(missing)} in all) that {cfg_path} calls for; the checkpoint is incomplete")
    for key, info in reader.info.items():
        if key not in expected:
            raise ConversionError(f"{reader.file_path(key)}: unknown tensor `{key}`: a model built from {cfg_path} "
                                  f"has no such tensor; check that config.json belongs to these weights")
        if info.shape != expected[key][0]:
            raise ConversionError(f"{reader.file_path(key)}: `{key}` has shape {list(info.shape)}, but {cfg_path} "
                                  f"implies {list(expected[key][0])}")
        if not info.dtype.is_floating_point:
            raise ConversionError(f"{reader.file_path(key)}: `{key}` has dtype {info.dtype}; expected floating point")
    if not hf_has_router_bias(cfg) and cfg.topk_method == "noaux_tc" and cfg.is_moe:
        raise ConversionError(f"{cfg_path}: model_type deepseek_v2 with topk_method 'noaux_tc' cannot be written: "
                              f"transformers' DeepseekV2 has no routing bias; use model_type deepseek_v3")

    def out_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        if key.endswith("e_score_correction_bias"):
            return torch.float32
        return stored if dtype == "auto" else DTYPES[dtype]

    file_rank = {name: i for i, name in enumerate(reader.files)}
    pieces, tensors = [], []
    for key in sorted(reader.info, key=lambda k: (file_rank[reader.info[k].file], k)):
        info = reader.info[key]
        for hf_key, view in hf_views(key, info.shape, cfg).items():
            index, lo = subtensor(info.shape, view.storage_offset(), tuple(view.shape))
            pieces.append(Piece(hf_key, 0, tuple(view.shape), key, index=index, lo=lo))
            tensors.append((hf_key, out_dtype(key, info.dtype), tuple(view.shape)))
    for hf_key, key in mtp_shared_copies(cfg).items():  # MTP layers' copies of the embedding and head
        info = reader.info[key]
        pieces.append(Piece(hf_key, 0, info.shape, key))
        tensors.append((hf_key, out_dtype(key, info.dtype), info.shape))
    out_cfg = dataclasses.replace(cfg, torch_dtype=str(DTYPES[dtype] if dtype != "auto" else
                                                       reader.info["embed_tokens.weight"].dtype).removeprefix("torch."))
    return ExportPlan(out_cfg, pieces, tensors)


def export(src: str, dst: str, dtype: str = "auto", max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
           quiet: bool = False) -> ExportPlan:
    t0 = time.perf_counter()
    cfg = load_config(src)
    check_destination(src, dst, overwrite)
    reader = SafetensorsDir(src)
    plan = plan_export(reader, cfg, dtype)
    with staged_dir(dst) as tmp:
        writer = ShardedWriter(tmp, plan.tensors, max_shard_bytes)
        try:
            execute(reader, writer, plan.pieces, quiet=quiet)
        finally:
            writer.close()
        writer.finish()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plan.config.to_dict(hf=True), f, indent=2, sort_keys=True)
            f.write("\n")
        copied = copy_tokenizer_files(src, tmp)
    log(f"wrote {dst}: {len(plan.tensors)} tensors, {human(writer.total_bytes)} in {len(writer.names)} shard(s)"
        f"{', copied ' + ', '.join(copied) if copied else ''}; {time.perf_counter() - t0:.1f} s, "
        f"peak RSS {human(peak_rss_bytes())}")
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export_hf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="seekstack checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--dst", required=True, help="Hugging Face checkpoint directory to write")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="output dtype; auto keeps each tensor's stored dtype (e_score_correction_bias is fp32 always)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="start a new output shard past this size (GB = 1e9 bytes, GiB = 2^30)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    p.add_argument("--quiet", action="store_true", help="no per-shard progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite, args.quiet)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
