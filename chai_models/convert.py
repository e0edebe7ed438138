"""`convert_weights SRC DST`: detects the source format and writes our checkpoint format to DST.

Sources: a Hugging Face folder (LLaMA or OPT; safetensors or .bin, sharded or not), a Meta consolidated folder
(params.json + consolidated.NN.pth + tokenizer.model) or a .gguf file (llama).
Writes into a temporary folder beside DST and renames it at the end; refuses to overwrite without --force.
Every tensor is checked against the shapes that config.json implies before anything is renamed into place.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from .checkpoint import (DEFAULT_SHARD_BYTES, CheckpointError, ShardedWriter, atomic_output_dir, config_from_dict,
                         dtype_from_name, write_config)
from .progress import progress

MODEL_CLASSES = {"llama": ("llama", "Llama"), "opt": ("opt", "OPT")}


def model_class(family: str):
    module, name = MODEL_CLASSES[family]
    return getattr(importlib.import_module(f"chai_models.{module}"), name)


def expected_shapes(cfg: dict) -> dict[str, tuple]:
    """Tensor name -> shape, from a model built on the meta device (nothing allocated)."""
    cls = model_class(cfg["family"])
    config = config_from_dict(cls.config_class, {k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_checkpoint(dst: Path, cfg: dict, tensors, n_tensors: int | None, dtype: torch.dtype | None,
                     force: bool, max_shard_bytes: int, extra_files=None, desc="converting") -> Path:
    """Streams (name, tensor) pairs into DST in our format, validating names and shapes against cfg."""
    shapes = expected_shapes(cfg)
    with atomic_output_dir(dst, force) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        seen, out_dtype = set(), dtype
        bar = progress(total=n_tensors or len(shapes), desc=desc, unit="tensor")
        for name, t in tensors:
            if name not in shapes:
                raise CheckpointError(f"tensor {name!r} has no place in a {cfg['family']} model of this config")
            if tuple(t.shape) != shapes[name]:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)} but the config implies "
                                      f"{shapes[name]}; the weights and config.json disagree")
            if name in seen:
                raise CheckpointError(f"tensor {name!r} appears twice in the source")
            if t.is_floating_point():
                out_dtype = out_dtype or (t.dtype if t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                                          else torch.float32)
                t = t.to(out_dtype)
            writer.add(name, t)
            seen.add(name)
            bar.update(1)
        bar.close()
        missing = sorted(set(shapes) - seen)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"the source lacks tensor(s) {missing[:5]}{more} that the config requires")
        writer.close()
        write_config(tmp, {k: v for k, v in cfg.items() if not k.startswith("_")}, out_dtype or torch.float32)
        if extra_files is not None:
            extra_files(tmp)
    return dst


def convert(src, dst, dtype: str | torch.dtype | None = None, force: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    src, dst = Path(src), Path(dst)
    dtype = dtype_from_name(dtype) if dtype is not None else None
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    if src.is_file() and src.suffix == ".gguf":
        from .convert_gguf import convert_gguf

        return convert_gguf(src, dst, dtype=dtype, force=force, max_shard_bytes=max_shard_bytes)
    from . import convert_hf

    if src.is_dir() and (src / "config.json").exists():
        if not convert_hf.hf_weight_files(src):
            raise CheckpointError(f"{src} has a config.json but no weights (model*.safetensors or "
                                  "pytorch_model*.bin)")
        cfg, to_key = convert_hf.read_hf_config(src)
        tensors = convert_hf.hf_tensors(src, cfg, to_key)
        return write_checkpoint(dst, cfg, tensors, None, dtype, force, max_shard_bytes,
                                extra_files=lambda tmp: convert_hf.copy_tokenizer_files(src, tmp))
    if src.is_dir() and (src / "params.json").exists():
        from . import convert_meta

        if not convert_meta.is_meta_folder(src):
            raise CheckpointError(f"{src} has params.json but no consolidated.*.pth shards")
        cfg, tensors = convert_meta.read_meta(src)
        return write_checkpoint(dst, cfg, tensors, None, dtype, force, max_shard_bytes,
                                extra_files=lambda tmp: convert_meta.copy_tokenizer(src, tmp))
    raise CheckpointError(f"{src}: unrecognised source; expected a Hugging Face folder (config.json + "
                          "model*.safetensors or pytorch_model*.bin), a Meta folder (params.json + "
                          "consolidated.*.pth) or a .gguf file")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="convert_weights", description=__doc__.splitlines()[0])
    p.add_argument("src", help="Hugging Face folder, Meta consolidated folder or .gguf file")
    p.add_argument("dst", help="output folder (our format)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the source's; GGUF "
                                                  "quantized weights: float32)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3,
                   help="shard size limit in GiB (default 2)")
    a = p.parse_args(argv)
    try:
        out = convert(a.src, a.dst, a.dtype, a.force, int(a.max_shard_gb * 1024**3))
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
