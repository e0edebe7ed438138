"""What the Triton kernels share: availability, programmatic dependent launch, argument helpers, and the new
token's row helpers (RoPE in the kernels' rounding).

The launchers also run on CPU tensors under TRITON_INTERPRET=1 (how the CPU tests check every kernel).
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # machines without triton: the torch backend only
    triton = None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on t: CUDA (or any device under the interpreter), a dtype they sum in fp32 (fp64
    keeps the torch path)."""
    return triton is not None and (t.is_cuda or interpreted()) and t.dtype != torch.float64


def _unit_stride(*ts: torch.Tensor) -> tuple:
    """The tensors with a unit last stride (how the kernels index a row), copied only where they lack it."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _rope_args(cos, sin, placeholder: torch.Tensor) -> tuple:
    """cos, sin as a kernel reads them; without RoPE (None) a placeholder pointer the kernel never reads."""
    return (cos.contiguous(), sin.contiguous()) if cos is not None else (placeholder, placeholder)


def _row_strides(pos: torch.Tensor, cos) -> tuple:
    """How a decode kernel finds row b's position and RoPE row: pos [1] or [B] / [B, 1] (per row), cos [D], [1, D]
    or [B, D] -> (pos as a flat tensor, its row stride, the RoPE row stride): stride 0 when every row shares one."""
    pos = pos.reshape(-1)
    s_rope = cos.shape[-1] if cos is not None and cos.dim() == 2 and cos.shape[0] > 1 else 0
    return pos, int(pos.numel() > 1), s_rope


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and not interpreted()


def _pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords of kernels that read the previous kernel's output: on sm90+ they are launched with
    programmatic dependent launch (PDL) and wait on the device (gdc_wait) just before that read, so what does not
    depend on it (weights, old cache rows) streams while the previous kernel drains."""
    return dict(PDL=True, launch_pdl=True) if _pdl_capable(device) else dict(PDL=False)


if triton is not None:

    @triton.jit
    def _new_row(ptr, d, ok, cos_ptr, sin_ptr, D: tl.constexpr, ROPE: tl.constexpr):
        """The new token's Q or K row of one head [BLOCK_D], in its dtype; ROPE: rotated first (rotate-half RoPE,
        HF layout: x * cos + [-x2, x1] * sin, each product rounded to the dtype as llama.apply_rope rounds it)."""
        x = tl.load(ptr + d, mask=ok, other=0.0)
        if ROPE:
            first = d < D // 2
            xr = tl.load(ptr + tl.where(first, d + D // 2, d - D // 2), mask=ok, other=0.0).to(tl.float32)
            xr = tl.where(first, -xr, xr)
            cs = tl.load(cos_ptr + d, mask=ok, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + d, mask=ok, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) * cs).to(x.dtype).to(tl.float32) + (xr * sn).to(x.dtype).to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _write_token_rows(k_row, v_row, kn_ptr, vn_ptr, cos_ptr, sin_ptr, j, sk_s, sv_h, skn_s, svn_h, d, d_ok,
                          K: tl.constexpr, N_SLOTS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                          ROPE: tl.constexpr):
        """Writer j of K writes the new token's K rows j, j+K, ... (rotated) and V rows j, j+K, ... into the caches;
        k_row / v_row point at the cache's row pos of one sequence, kn / vn at that sequence's new rows."""
        for r in range(j, N_SLOTS, K):
            kr = _new_row(kn_ptr + r * skn_s, d, d_ok, cos_ptr, sin_ptr, D, ROPE)
            tl.store(k_row + r * sk_s + d, kr, mask=d_ok)
        for r in range(j, HKV, K):
            vr = tl.load(vn_ptr + r * svn_h + d, mask=d_ok, other=0.0)
            tl.store(v_row + r * sv_h + d, vr, mask=d_ok)
