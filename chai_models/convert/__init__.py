"""`convert_weights SRC DST`: detects the source format and writes our checkpoint format to DST.

Sources: a Hugging Face folder (LLaMA or OPT; safetensors or .bin, sharded or not), a Meta consolidated folder
(params.json + consolidated.NN.pth + tokenizer.model) or a .gguf file (llama).
Writes into a temporary folder beside DST and renames it at the end; refuses to overwrite without --force.
Every tensor is checked against the shapes that config.json implies before anything is renamed into place.

One module per source format (hf.py, meta.py, gguf.py), each with `detect(src)` and `read(src, dtype)`;
write.py writes what a reader returns, rope.py holds the Q/K row permutation that meta and gguf share.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import DEFAULT_SHARD_BYTES, CheckpointError, dtype_from_name
from ..errors import run_main
from . import gguf, hf, meta
from .write import expected_shapes, write_checkpoint, write_source

# source format -> its reader module; the first whose detect(src) is true reads the source
FORMATS = {"hf": hf, "meta": meta, "gguf": gguf}


def convert(src, dst, dtype: str | torch.dtype | None = None, force: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    src, dst = Path(src), Path(dst)
    dtype = dtype_from_name(dtype) if dtype is not None else None
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    for reader in FORMATS.values():
        if reader.detect(src):
            return write_source(dst, reader.read(src, dtype), force, max_shard_bytes)
    raise CheckpointError(f"{src}: unrecognised source; expected a Hugging Face folder (config.json + "
                          "model*.safetensors or pytorch_model*.bin), a Meta folder (params.json + "
                          "consolidated.*.pth) or a .gguf file")


def main(argv=None) -> int:
    """tools/convert_weights.py: a UserError ends in one `error:` line and exit status 2, Ctrl-C in 130."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
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


__all__ = ["FORMATS", "convert", "expected_shapes", "main", "write_checkpoint"]
