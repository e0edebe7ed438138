"""Writing our checkpoint format from any reader: names and shapes checked against config.json, shards streamed.

Every reader (hf.py, meta.py, gguf.py) hands over a `Source`: our config, a stream of (our name, tensor) and
what goes beside the weights. Tensors are checked against the shapes that the config implies before anything is
renamed into place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..checkpoint import CheckpointError, ShardedWriter, atomic_output_dir, config_from_dict, write_config
from ..models import model_class
from ..progress import progress


@dataclass
class Source:
    """What a reader found: our config, the (our name, tensor) stream and how to write the files beside them."""
    cfg: dict
    tensors: Iterable[tuple[str, torch.Tensor]]
    dtype: torch.dtype | None = None  # the output dtype (None: the source's)
    n_tensors: int | None = None  # for the progress bar (None: as many as the config implies)
    extra_files: Callable[[Path], object] | None = None  # called with the output folder (tokenizer files)
    desc: str = "converting"


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


def write_source(dst: Path, source: Source, force: bool, max_shard_bytes: int) -> Path:
    """write_checkpoint for what a reader returned."""
    return write_checkpoint(dst, source.cfg, source.tensors, source.n_tensors, source.dtype, force, max_shard_bytes,
                            extra_files=source.extra_files, desc=source.desc)
