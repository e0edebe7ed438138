"""CHAI's window rows in one launch per clustered layer (reference: chai.ChaiAttention.attend_window)."""
from __future__ import annotations

import torch

from .common import _rope_args, _unit_stride, triton

if triton is not None:
    import triton.language as tl

    from .common import _new_row

    @triton.jit
    def _window_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, kwin_ptr, pwin_ptr, v_ptr, y_ptr,
                       sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, s_rope, skw_b, skw_h, skw_t, sv_b, sv_h, sv_t,
                       p0, n, scale,
                       H: tl.constexpr, G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BW: tl.constexpr,
                       BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
        # one program per (sequence b, KV head g) and its G query heads; rows p0..p0+n-1 of the window
        b, g = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        t = tl.arange(0, BW)  # window positions
        kwin = kwin_ptr + b * skw_b + g * skw_h
        for i in range(n):  # the chunk's K rows, rotated, into the window's K
            kr = _new_row(k_ptr + b * sk_b + g * sk_h + i * sk_s, d, d_ok, cos_ptr + i * s_rope, sin_ptr + i * s_rope,
                          D, ROPE)
            tl.store(kwin + (p0 + i) * skw_t + d, kr, mask=d_ok)
        tl.debug_barrier()  # this program reads those rows back
        kv_ok = (t < p0 + n)[:, None] & d_ok[None, :]
        kw = tl.load(kwin + t[:, None] * skw_t + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)  # [BW, BLOCK_D]
        vw = tl.load(v_ptr + b * sv_b + g * sv_h + t[:, None] * sv_t + d[None, :], mask=kv_ok, other=0.0)
        for hh in range(G):
            h = g * G + hh
            for i in range(n):
                qr = _new_row(q_ptr + b * sq_b + h * sq_h + i * sq_s, d, d_ok, cos_ptr + i * s_rope,
                              sin_ptr + i * s_rope, D, ROPE).to(tl.float32)
                s = tl.sum(kw * qr[None, :], axis=1) * scale  # [BW] scores in fp32
                s = tl.where(t <= p0 + i, s, float("-inf"))  # causal (key 0 is always there)
                e = tl.exp(s - tl.max(s, axis=0))
                p = e / tl.sum(e, axis=0)  # [BW]
                tl.store(pwin_ptr + ((b * H + h) * W + p0 + i) * W + t, p, mask=t < W)
                # probabilities rounded to the model dtype, then p @ V summed in fp32, as dense_from_probs
                y = tl.sum(p.to(vw.dtype).to(tl.float32)[:, None] * vw.to(tl.float32), axis=0)  # [BLOCK_D]
                tl.store(y_ptr + ((b * H + h) * n + i) * D + d, y.to(vw.dtype), mask=d_ok)


def window_attention(q, k, cos, sin, k_win, p_win, v, p0: int, scale: float) -> torch.Tensor:
    """CHAI's window rows in one launch (reference: chai.ChaiAttention.attend_window): RoPE on q and k,
    k's rows written into the window's K, causal probabilities over the window written into p_win (the clustering
    features) and the rows' dense output. In torch that is ~20 small launches per clustered layer per prefill.

    q [B, H, n, D], k [B, Hkv, n, D] as projected (before RoPE), rows p0..p0+n-1 (< W); cos, sin [n, D] or None (no
    RoPE); k_win [B, Hkv, W, D] and p_win [B, H, W, W] (fp32, contiguous) are written; v [B, Hkv, >=p0+n, D] holds
    the V rows up to p0+n-1 -> [B, H, n, D].
    """
    B, H, n, D = q.shape
    Hkv, W = k.shape[1], k_win.shape[2]
    assert p_win.is_contiguous() and p_win.dtype == torch.float32 and k_win.stride(-1) == 1 and v.stride(-1) == 1
    q, k = _unit_stride(q, k)
    rope = cos is not None
    cos, sin = _rope_args(cos, sin, q)
    y = torch.empty(B, H, n, D, dtype=v.dtype, device=v.device)
    _window_kernel[(B, Hkv)](q, k, cos, sin, k_win, p_win, v, y, q.stride(0), q.stride(1), q.stride(2),
                             k.stride(0), k.stride(1), k.stride(2), cos.stride(0) if rope else 0,
                             k_win.stride(0), k_win.stride(1), k_win.stride(2), v.stride(0), v.stride(1), v.stride(2),
                             p0, n, scale, H, H // Hkv, W, D, BW=max(16, triton.next_power_of_2(W)),
                             BLOCK_D=triton.next_power_of_2(D), ROPE=rope, num_warps=4)
    return y
