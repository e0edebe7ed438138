"""A decode token's RoPE and K/V cache writes in one launch, before SDPA."""
from __future__ import annotations

import torch

from .common import _pdl_kwargs, _rope_args, _row_strides, _unit_stride, triton

if triton is not None:
    import triton.language as tl

    from .common import _new_row

# ----------------------------------------------------------------------------------------------------
# A decode token's RoPE and K/V cache writes in one launch, for attention that runs outside our kernels (SDPA past the
# dense decode kernel's range). As inductor kernels these are three launches per layer whose tuning varied from one
# compile to the next (docs/performance.md, "dense decode").

if triton is not None:

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr,
                           sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, s_pos, s_rope,
                           H: tl.constexpr, N_K: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                           BLOCK_D: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
        # one program per (head h, sequence b): q's row h rotated into qo, and K / V rows h (if any) into the caches
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr + b * s_pos)
        cos_ptr += b * s_rope  # row b's RoPE (s_rope 0: every row at one position)
        sin_ptr += b * s_rope
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        if PDL:
            tl.extra.cuda.gdc_wait()
        qr = _new_row(q_ptr + b * sq_b + h * sq_h, d, d_ok, cos_ptr, sin_ptr, D, ROPE)
        tl.store(qo_ptr + (b * H + h) * D + d, qr, mask=d_ok)
        if h < N_K:
            kr = _new_row(k_ptr + b * sk_b + h * sk_h, d, d_ok, cos_ptr, sin_ptr, D, ROPE)
            tl.store(kc_ptr + b * skc_b + h * skc_h + pos * skc_t + d, kr, mask=d_ok)
        if h < HKV:
            vr = tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=d_ok, other=0.0)
            tl.store(vc_ptr + b * svc_b + h * svc_h + pos * svc_t + d, vr, mask=d_ok)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()


@torch.library.custom_op("chai_models::rope_and_cache", mutates_args=("k_cache", "v_cache"))
def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                   sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
    """One decode token: q [B, H, D], k [B, n_k, D], v [B, Hkv, D] as projected; RoPE (cos, sin [D] at pos, or None)
    on q and k, RoPE(k) and v written into k_cache [B_max, n_k, T, D] / v_cache [B_max, Hkv, T, D] at pos [1] or [B, 1]
    -> RoPE(q) [B, H, D]. Equal to llama.apply_rope and KVCache.update, in one launch."""
    B, H, D = q.shape
    n_k, Hkv = k.shape[1], v.shape[1]
    assert H >= max(n_k, Hkv), "one program per query head writes the K and V rows of the same index"
    q, k, v = _unit_stride(q, k, v)
    rope = cos is not None
    pos, s_pos, s_rope = _row_strides(pos, cos)
    cos, sin = _rope_args(cos, sin, q)
    q_out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(H, B)](q, k, v, cos, sin, k_cache, v_cache, pos, q_out, q.stride(0), q.stride(1),
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
                               k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                               v_cache.stride(2), s_pos, s_rope, H=H, N_K=n_k, HKV=Hkv, D=D, BLOCK_D=triton.next_power_of_2(D),
                               ROPE=rope, num_warps=1, **_pdl_kwargs(q.device))
    return q_out


@rope_and_cache.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
