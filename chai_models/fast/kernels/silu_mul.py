"""SwiGLU's silu(gate) * up in one launch."""
from __future__ import annotations

import torch

from .common import _pdl_kwargs, available, triton

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------------------------------
# SwiGLU's silu(gate) * up as one kernel. Besides saving a launch in eager mode, being an opaque op keeps
# torch.compile from inlining it into the next GEMV (w2), where inductor recomputes it in every program, and the
# down projection's tuned speed then swings from one compile to the next (docs/performance.md, "dense decode").

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, n_cols, g_row_stride, u_row_stride, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        # gate and up [rows, n_cols] with unit column stride and their own row strides (e.g. the two halves of one
        # packed projection's output); out [rows, n_cols] contiguous; N = rows * n_cols
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        row, col = i // n_cols, i % n_cols
        if PDL:
            tl.extra.cuda.gdc_wait()
        g = tl.load(g_ptr + row * g_row_stride + col, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_row_stride + col, mask=ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        s = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # rounded to the input dtype, as F.silu's output is
        tl.store(out_ptr + i, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("chai_models::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for two tensors of one shape and dtype (CUDA, or CPU under TRITON_INTERPRET=1); strided
    rows are read in place (the halves of a packed gate/up projection's output are not copied first)."""
    n_cols = gate.shape[-1]
    g2, u2 = (t.reshape(-1, n_cols) for t in (gate, up))  # [rows, n_cols]; a view wherever the rows allow one
    g2, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, u2))
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    block = 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](g2, u2, out, n, n_cols, g2.stride(0), u2.stride(0), BLOCK=block,
                                               num_warps=4, **_pdl_kwargs(gate.device))
    return out


@silu_mul_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: inside torch.compile on CUDA (fp16/bf16/fp32 inference) the Triton op, one kernel that
    inductor keeps whole; in eager the torch ops, whose two launches cost less host time than one custom-op dispatch
    (~140 us per call on the H200 host, 4.5 ms of a 7B prefill's ~20 ms of launches), and wherever a gradient is
    needed (the op has no backward)."""
    if (torch.compiler.is_compiling() and available(gate) and gate.shape == up.shape and gate.dtype == up.dtype
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return silu_mul_op(gate, up)
    return torch.nn.functional.silu(gate) * up
