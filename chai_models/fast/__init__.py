"""What exists only for speed, applied to a model from outside behind one switch: `apply(model, backend)`.

    backend "torch"   the plain modules (models/, chai/), as a reader sees them; compiled decode works on them too
    backend "triton"  the same modules' classes with fused forwards (blocks.py, attention.py) over the Triton
                      kernels (kernels/): same weights, same state dict, results equal to "torch" (tested)
    backend "auto"    "triton" on CUDA when triton is importable, else "torch"
compile.py builds the compiled, CUDA-graph decode step for either backend.
"""
from __future__ import annotations

import torch

from ..chai.attention import ChaiAttention, swap_class
from ..models.llama import Block as LlamaBlock
from ..models.opt import Attention as OPTAttention
from ..models.opt import Block as OPTBlock
from .attention import FastAttention, FastChaiAttention
from .blocks import FastLlamaBlock, FastOPTAttention, FastOPTBlock, repack
from .kernels import interpreted, triton

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if triton is not None and device.type == "cuda" else "torch"
    if backend == "triton" and triton is None:
        raise ValueError("backend 'triton' needs the triton package (pip install triton); use backend='torch'")
    if backend == "triton" and device.type != "cuda" and not interpreted():
        raise ValueError(f"backend 'triton' runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not "
                         f"{device.type}; use backend='torch' or 'auto'")
    return backend


def apply(model, backend: str = "auto") -> str:
    """Puts the model on a backend (re-applied after CHAI is installed: chai_models.set_chai does that). Returns the
    resolved backend, also kept as model.backend."""
    backend = resolve_backend(backend, model.tok_embeddings.weight.device)
    fast = backend == "triton"
    for blk in model.layers:
        attn = blk.attention
        chai = isinstance(attn, ChaiAttention)
        if not fast:
            swap_class(attn, *((ChaiAttention,) if chai else ()))
            swap_class(blk)
            continue
        mixins = (FastChaiAttention,) if chai else (FastAttention,)
        if isinstance(attn, OPTAttention):
            mixins = (FastOPTAttention, *mixins)
        swap_class(attn, *mixins)
        if isinstance(blk, LlamaBlock):
            swap_class(blk, FastLlamaBlock)
        elif isinstance(blk, OPTBlock):
            swap_class(blk, FastOPTBlock)
        if hasattr(blk, "packed_groups"):
            repack(blk)
    model.backend = backend
    if model.max_batch_size:  # the fast CHAI layers keep more state per sequence
        model.setup_caches(model.max_batch_size, model.max_seq_len)
    return backend


__all__ = ["BACKENDS", "apply", "resolve_backend"]
