"""Triton kernels, one job per file, each behind a launcher that also runs on CPU tensors under TRITON_INTERPRET=1.

    membership.py  CHAI's per-request clustering step, one launch per layer
    window.py      CHAI's window rows (their output and the clustering features), one launch per layer
    decode.py      one decode token: RoPE, the K/V row writes and split-T attention (dense or clustered), one launch
    rope_cache.py  one decode token's RoPE and K/V row writes alone, before SDPA
    probs.py       CHAI's decode probabilities for long caches, then cuBLAS over V
    silu_mul.py    SwiGLU's silu(gate) * up
    gemv.py        projections of 1..32 decode rows with the norm (one row), SwiGLU and the residual add folded in;
                   `linear`
The launchers that sit inside a compiled graph are torch custom ops (opaque to inductor, captured by CUDA graphs).
"""
import torch

from . import decode, gemv, membership, probs, rope_cache, silu_mul, window  # noqa: F401 (defines the custom ops)
from .common import available, interpreted, triton



def register_inductor_fallbacks() -> None:
    """Registers this package's custom ops with inductor as fallback kernels before a compile, as inductor would on
    first sight of each, with the same layout constraint (the custom-op default: eager's strides).

    Why up front: on first sight, torch 2.11's inductor formats the op's arguments as IR text for an INFO log line
    whether or not INFO is logged, and IR printing expands a DAG into a tree. In the compiled CHAI step at T=8192
    the first new_token_decode comes after 18 dense layers, and that formatting ran for minutes (vLLM hit the same
    bug: vllm-project/vllm#43111); newer torch formats the line lazily.
    """
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # another torch layout: inductor's own first-sight path still works
        return
    ops = [torch.ops.chai_models.new_token_decode.default, torch.ops.chai_models.silu_mul.default,
           torch.ops.chai_models.gemv.default, torch.ops.chai_models.probs_times_v.default,
           torch.ops.chai_models.clustered_probs.default, torch.ops.chai_models.rope_and_cache.default]
    for op in ops:
        if op not in lowering.lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag), warn=False)


__all__ = ["available", "interpreted", "register_inductor_fallbacks", "triton"]
