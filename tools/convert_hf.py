"""Convert a Hugging Face DeepSeek-V3 / DeepSeek-V2 checkpoint into a seekstack checkpoint, streaming.

    python -m tools.convert_hf --src HF_DIR --dst OUT_DIR [--dtype auto|bf16|fp32] [--no-mtp]
                               [--max-shard-size 2GB] [--overwrite] [--quiet]

Input: `config.json` (model_type deepseek_v3 or deepseek_v2) and `model.safetensors`, or shards listed in
`model.safetensors.index.json`: the hub layout, FP8 or not, and what transformers' `save_pretrained` writes.
Output: a seekstack checkpoint (model/checkpoint.py) that `model.load_model(OUT_DIR)` opens.

Per tensor (names mapped by model/hf_mapping.py, the one place for that mapping):
* per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` go straight to expert e's slot of the stacked
  `mlp.experts.gate_up_proj` [E, 2I, D] (gate rows, then up) and `mlp.experts.down_proj` [E, D, I]; transformers-v5
  stacked tensors are accepted too;
* the router weight is copied and `e_score_correction_bias` is written in fp32 whatever --dtype says; DeepSeek-V2
  stores no bias (its routing uses none): a zero fp32 bias is written, as seekstack's router always has one;
* FP8 weights (float8_e4m3fn + `<name>_scale_inv`, 128x128 blocks, partial edge blocks) are dequantised exactly
  (tools/fp8.py) and `quantization_config` is dropped from the config;
* MTP layers `model.layers.{num_hidden_layers + k}.*` become `mtp.{k}.*`; their copies of the embedding and head are
  checked against the main ones (a warning if they differ: seekstack shares one) and not stored twice. With
  --no-mtp they are dropped and num_nextn_predict_layers is set to 0; so it is, with a note, when config.json
  promises MTP layers the checkpoint lacks (transformers' save_pretrained writes none);
* `*token*` files (tokenizer.json, tokenizer_config.json, ...) are copied; `auto_map` and `*.py` are not, and nothing
  from the checkpoint is ever executed (JSON and safetensors only: no pickle, no remote code).

Memory: the plan (every output tensor's name, dtype, shape and byte offset) is made from the shard headers alone;
then each input shard is read once, a slab of rows (~32 MB as fp32) at a time, and each slab is written straight to
its final offset in the output shard (tools/hf_writer.py), so nothing is buffered: not a whole tensor, not a layer's
expert group, whichever input shards that group is spread over. Peak RSS is about the interpreter + one 256 MB read
window (tools/hf_reader.py) + a few slabs, independent of the checkpoint and shard sizes.

Refusals (exit code 2, `error: ...` on stderr naming the file and tensor, nothing left at --dst): a shard listed in
the index but missing, a truncated or corrupt shard, a tensor whose shape disagrees with config.json, unknown or
missing tensors, an unsupported model_type, an FP8 weight without its scale. Output is staged in a temp dir next
to --dst and renamed into place only when complete.

Not here: `--ep/--tp` per-rank shards. They belong to the parallelism work (model/parallel), which had no settled
per-rank file layout for a converter to target when this was written; with experts stacked, a rank's expert-parallel
share is a dim-0 range of each stacked tensor, which safetensors reads without loading the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections import Counter

import torch

from model.config import ConfigError, ModelConfig
from model.hf_mapping import hf_to_seekstack, mtp_shared_copies

from .fp8 import DEFAULT_BLOCK, FP8_DTYPES, SCALE_SUFFIX, block_size, scale_shape
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
from .hf_stream import Piece, execute, expected_state, hf_views
from .hf_writer import ShardedWriter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # derived RoPE buffers some exporters store
_DROPPED_CONFIG_KEYS = ("quantization_config", "auto_map")


@dataclasses.dataclass
class ImportPlan:
    config: ModelConfig  # what config.json of the output says
    pieces: list[Piece]
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]  # output tensors, in the order they are produced
    duplicates: list[tuple[str, str]]  # (stored copy, main tensor) pairs checked equal, then dropped
    notes: list[str]
    fp8_tensors: int = 0


def load_config(src: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(os.path.join(src, "config.json"))
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mtp_layers_kept(reader: SafetensorsDir, cfg: ModelConfig, layer_of: dict[str, int], keep_mtp: bool,
                     notes: list[str]) -> int:
    """How many MTP layers (`model.layers.{L + k}.*`, k < num_nextn_predict_layers) the output keeps."""
    cfg_path = os.path.join(reader.path, "config.json")
    L, n_cfg = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    present = sorted({i - L for i in layer_of.values() if i >= L})
    beyond = [k for k in present if k >= n_cfg]
    if beyond:
        key = min(k for k, i in layer_of.items() if i == L + beyond[0])
        raise ConversionError(f"{reader.file_path(key)}: unknown tensor `{key}`: layer {L + beyond[0]} lies beyond "
                              f"num_hidden_layers ({L}) + num_nextn_predict_layers ({n_cfg}) of {cfg_path}; set "
                              f"num_nextn_predict_layers there to the number of MTP layers stored")
    if n_cfg and not present:
        notes.append(f"{cfg_path} says num_nextn_predict_layers={n_cfg} but the checkpoint holds no MTP tensors "
                     f"(model.layers.{L}.*; transformers' save_pretrained writes none): writing "
                     f"num_nextn_predict_layers=0")
        return 0
    if n_cfg and not keep_mtp:
        notes.append(f"--no-mtp: dropping MTP layers model.layers.{L}..{L + n_cfg - 1}.*, num_nextn_predict_layers=0")
        return 0
    return n_cfg


def plan_import(reader: SafetensorsDir, cfg: ModelConfig, dtype: str = "auto", keep_mtp: bool = True) -> ImportPlan:
    """Map every stored tensor to its place in the output, checking names, shapes, dtypes and completeness."""
    cfg_path = os.path.join(reader.path, "config.json")
    notes: list[str] = []
    quant = cfg.extra.get("quantization_config")
    block = DEFAULT_BLOCK
    if quant is not None:
        if quant.get("quant_method") != "fp8":
            raise ConversionError(f"{cfg_path}: `quantization_config.quant_method` is {quant.get('quant_method')!r}; "
                                  f"only DeepSeek's block FP8 ('fp8') is dequantised here")
        try:
            block = block_size(quant)
        except ValueError as e:
            raise ConversionError(f"{cfg_path}: {e}") from None

    L = cfg.num_hidden_layers
    layer_of = {k: int(m.group(1)) for k in reader.info if (m := _LAYER.match(k))}
    n_out = _mtp_layers_kept(reader, cfg, layer_of, keep_mtp, notes)
    extra = {k: v for k, v in cfg.extra.items() if k not in _DROPPED_CONFIG_KEYS}
    out_cfg = dataclasses.replace(cfg, num_nextn_predict_layers=n_out, extra=extra)

    expected = expected_state(out_cfg)
    views_cache: dict[str, dict[str, torch.Tensor]] = {}

    def views(key: str) -> dict[str, torch.Tensor]:
        if key not in views_cache:
            views_cache[key] = hf_views(key, expected[key][0], out_cfg)
        return views_cache[key]

    def unknown(key: str, why: str = "") -> ConversionError:
        return ConversionError(f"{reader.file_path(key)}: unknown tensor `{key}`{why}: it has no place in a "
                               f"{out_cfg.model_type} model as {cfg_path} describes it (q_lora_rank="
                               f"{out_cfg.q_lora_rank}, n_routed_experts={out_cfg.n_routed_experts}, "
                               f"num_hidden_layers={L}); check that config.json belongs to these weights")

    duplicate_of = {hf: next(iter(views(key))) for hf, key in mtp_shared_copies(out_cfg).items()}
    file_rank = {name: i for i, name in enumerate(reader.files)}
    pieces: list[Piece] = []
    covered: dict[str, int] = {}
    src_dtype: dict[str, torch.dtype] = {}
    seen: set[str] = set()
    used_scales: set[str] = set()
    duplicates: list[tuple[str, str]] = []
    n_fp8 = 0
    for key in sorted(reader.info, key=lambda k: (file_rank[reader.info[k].file], k)):
        info, where = reader.info[key], reader.file_path(key)
        if key.endswith(SCALE_SUFFIX):
            continue
        if key.endswith(_IGNORED_SUFFIXES):
            notes.append(f"skipping derived buffer `{key}`")
            continue
        if key in layer_of and layer_of[key] >= L + n_out:
            continue  # MTP layer not kept (--no-mtp)
        if key in duplicate_of:
            main = duplicate_of[key]
            if main in reader.info and info.shape != reader.info[main].shape:
                raise ConversionError(f"{where}: `{key}` has shape {info.shape}, but it must duplicate `{main}` "
                                      f"{reader.info[main].shape}")
            duplicates.append((key, main))
            continue
        try:
            target = hf_to_seekstack(key, out_cfg)
        except KeyError:
            raise unknown(key) from None
        if target.key == "lm_head.weight" and out_cfg.tie_word_embeddings:
            duplicates.append((key, "model.embed_tokens.weight"))  # tied: the embedding serves as the head
            continue
        if target.key not in expected:
            raise unknown(key)
        shape, _ = expected[target.key]
        view = views(target.key).get(key)
        if view is not None:
            offset, piece_shape = view.storage_offset(), tuple(view.shape)
        elif target.expert is None:
            offset, piece_shape = 0, shape  # whole tensor (also transformers-v5 stacked experts)
        else:
            raise unknown(key, f" (expert {target.expert} of {out_cfg.n_routed_experts})")
        if info.shape != piece_shape:
            raise ConversionError(f"{where}: `{key}` has shape {list(info.shape)}, but {cfg_path} implies "
                                  f"{list(piece_shape)}; config.json does not match these weights")
        scale = None
        if info.dtype in FP8_DTYPES:
            scale = key + SCALE_SUFFIX
            if scale not in reader.info:
                raise ConversionError(f"{where}: FP8 weight `{key}` has no `{scale}` (its block scales) in the "
                                      f"checkpoint; the shard or the index is incomplete, download it again")
            want = scale_shape(info.shape, block) if len(info.shape) == 2 else None
            if reader.info[scale].shape != want:
                raise ConversionError(f"{reader.file_path(scale)}: `{scale}` has shape {list(reader.info[scale].shape)}"
                                      f", expected {list(want) if want else '2-D'} for {list(info.shape)} in "
                                      f"{block[0]}x{block[1]} blocks")
            used_scales.add(scale)
            n_fp8 += 1
        elif not info.dtype.is_floating_point:
            raise ConversionError(f"{where}: `{key}` has dtype {info.dtype}; expected a floating-point weight")
        covered[target.key] = covered.get(target.key, 0) + _numel(piece_shape)
        if covered[target.key] > _numel(shape):
            raise ConversionError(f"{where}: `{key}` stores part of `{target.key}` a second time (per-expert and "
                                  f"stacked copies of the same experts?); keep one layout")
        seen.add(key)
        src_dtype.setdefault(target.key, info.dtype)
        pieces.append(Piece(target.key, offset, piece_shape, key, scale=scale, block=block))

    for key in sorted(k for k in reader.info if k.endswith(SCALE_SUFFIX)):
        weight = key.removesuffix(SCALE_SUFFIX)
        if key not in used_scales and not (weight in layer_of and layer_of[weight] >= L + n_out):
            why = "its weight is not FP8" if weight in reader.info else "no such weight"
            raise ConversionError(f"{reader.file_path(key)}: unknown tensor `{key}` ({why}); remove it")

    missing: list[str] = []
    zero_bias = 0
    for key, (shape, _) in expected.items():
        if covered.get(key, 0) == _numel(shape):
            continue
        if key.endswith("e_score_correction_bias") and key not in covered and out_cfg.topk_method != "noaux_tc":
            pieces.append(Piece(key, 0, shape, None, fill=0.0))  # V2: routing uses no bias
            zero_bias += 1
            continue
        missing += [hf for hf in views(key) if hf not in seen] or [key]
    if missing:
        raise ConversionError(f"{reader.path}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                              f"({len(missing)} in all) that {cfg_path} calls for; the checkpoint is incomplete or "
                              f"config.json does not match it")
    if zero_bias:
        notes.append(f"no e_score_correction_bias stored ({out_cfg.model_type}, topk_method="
                     f"{out_cfg.topk_method}, which uses none): writing zero fp32 biases for {zero_bias} routers")
    if n_fp8:
        notes.append(f"dequantising {n_fp8} FP8 weights ({block[0]}x{block[1]} blocks); quantization_config dropped")

    def out_dtype(key: str) -> torch.dtype:
        if key.endswith("e_score_correction_bias"):
            return torch.float32
        if dtype != "auto":
            return DTYPES[dtype]
        d = src_dtype.get(key, torch.float32)
        return torch.bfloat16 if d in FP8_DTYPES else d

    order = list(dict.fromkeys(p.dst for p in pieces))
    tensors = [(k, out_dtype(k), expected[k][0]) for k in order]
    by_bytes = Counter()
    for k, d, s in tensors:
        by_bytes[d] += _numel(s) * d.itemsize
    out_cfg.torch_dtype = str(by_bytes.most_common(1)[0][0]).removeprefix("torch.")
    return ImportPlan(out_cfg, pieces, tensors, duplicates, notes, n_fp8)


def convert(src: str, dst: str, dtype: str = "auto", keep_mtp: bool = True, max_shard_bytes: int = 2 * 10**9,
            overwrite: bool = False, quiet: bool = False) -> ImportPlan:
    """Plan from the headers (refusing bad input before anything is written), then stream into a staged --dst."""
    t0 = time.perf_counter()
    cfg = load_config(src)
    check_destination(src, dst, overwrite)
    reader = SafetensorsDir(src)
    plan = plan_import(reader, cfg, dtype, keep_mtp)
    for note in plan.notes:
        log(f"note: {note}")
    with staged_dir(dst) as tmp:
        writer = ShardedWriter(tmp, plan.tensors, max_shard_bytes)
        try:
            execute(reader, writer, plan.pieces, quiet=quiet)
        finally:
            writer.close()
        for copy, main in plan.duplicates:
            if main in reader.info and not reader.equal(copy, main):
                log(f"warning: `{copy}` differs from `{main}`; seekstack shares one tensor, the main one is kept")
        writer.finish()
        plan.config.to_json(os.path.join(tmp, "config.json"))
        copied = copy_tokenizer_files(src, tmp)
    log(f"wrote {dst}: {len(plan.tensors)} tensors, {human(writer.total_bytes)} in {len(writer.names)} shard(s)"
        f"{', copied ' + ', '.join(copied) if copied else ''}; {time.perf_counter() - t0:.1f} s, "
        f"peak RSS {human(peak_rss_bytes())}")
    return plan


def shard_for_layout(args) -> None:
    """--tp/--ep: convert to a single-process checkpoint beside --dst, then write the layout's per-rank shards and
    manifest (model/parallel/checkpoint.py's format, loaded directly by the parallel runtime) with the same code
    path the runtime reshards with; the intermediate checkpoint is removed."""
    import shutil
    import tempfile

    from model.parallel.checkpoint import shard_offline
    from model.parallel.layout import ParallelConfigError

    check_destination(args.src, args.dst, args.overwrite)
    parent = os.path.dirname(os.path.abspath(args.dst))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".tmp-single-", dir=parent)
    try:
        single = os.path.join(scratch, "single")
        convert(args.src, single, args.dtype, not args.no_mtp, args.max_shard_size, False, args.quiet)
        try:
            shard_offline(single, args.dst, tp=args.tp, ep=args.ep)
        except ParallelConfigError as e:
            raise ConversionError(f"{args.src}: cannot shard for tp={args.tp}, ep={args.ep}: {e}") from None
        copy_tokenizer_files(args.src, args.dst)
        log(f"wrote {args.dst}: sharded for tp={args.tp}, ep={args.ep}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert_hf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--dst", required=True, help="seekstack checkpoint directory to write")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="output dtype; auto keeps each tensor's stored dtype and turns FP8 into bf16 "
                        "(e_score_correction_bias is fp32 always)")
    p.add_argument("--no-mtp", action="store_true", help="drop the MTP layers and set num_nextn_predict_layers=0")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB",
                   help="start a new output shard past this size (GB = 1e9 bytes, GiB = 2^30)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    p.add_argument("--quiet", action="store_true", help="no per-shard progress lines")
    p.add_argument("--tp", type=int, default=1, help="write the sharded layout of a tensor-parallel degree")
    p.add_argument("--ep", type=int, default=1, help="write the sharded layout of an expert-parallel degree")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tp == 1 and args.ep == 1:
            convert(args.src, args.dst, args.dtype, not args.no_mtp, args.max_shard_size, args.overwrite, args.quiet)
        else:
            shard_for_layout(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
