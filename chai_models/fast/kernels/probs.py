"""CHAI's decode probabilities past the decode kernel's range, and the batched GEMM over V that follows them."""
from __future__ import annotations

import math

import torch

from .common import _pdl_kwargs, _rope_args, _row_strides, _unit_stride, triton

if triton is not None:
    import triton.language as tl

    from .common import _new_row, _write_token_rows

# ----------------------------------------------------------------------------------------------------
# CHAI's decode past the decode kernel's range (B x T above fast.attention.CLUSTERED_DECODE_MAX_POSITIONS), where
# cuBLAS' batched GEMM streams V at least as fast as the decode kernel's loop: one launch splits the representatives'
# scores over T (RoPE and the new K/V rows in it too), a second turns them into one row of probabilities per query
# head, and probs_times_v multiplies them by V. The two launches replace ~6 inductor kernels before that GEMM, which
# took twice their time (docs/performance.md, "CHAI decode").

if triton is not None:

    @triton.jit
    def _score_tile(kt, t, t_ok, q, m, l, qk_scale, s_row):
        """Scores of one tile (log2 units) into s_row[t], and the split's running max m and sum l of exp2."""
        sc = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * qk_scale  # [BLOCK_T]
        tl.store(s_row + t, sc, mask=t_ok)
        sc = tl.where(t_ok, sc, -float("inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))  # finite: the split's first position is pos or a cache row
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(sc - m_new), axis=0)
        return m_new, l

    @triton.jit
    def _cluster_scores_kernel(q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, slot_ptr, pos_ptr,
                               s_ptr, m_ptr, l_ptr,
                               sq_b, sq_c, sk_b, sk_s, sk_t, sv_b, sv_h, sv_t, skn_b, skn_s, svn_b, svn_h,
                               qk_scale, T, SPLIT, N_SPLITS, s_pos, s_rope,
                               K: tl.constexpr, D: tl.constexpr, N_SLOTS: tl.constexpr, HKV: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
                               ROPE: tl.constexpr, PDL: tl.constexpr):
        # one program per (cluster c, split s of the positions, sequence b)
        c, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        pos = tl.load(pos_ptr + b * s_pos)  # written before the graph (or launch) began
        cos_ptr += b * s_rope  # row b's RoPE (s_rope 0: every row at one position)
        sin_ptr += b * s_rope
        t_lo = s * SPLIT
        if t_lo > pos:
            return
        holds_pos = pos < t_lo + SPLIT
        t_end = tl.minimum(t_lo + SPLIT, pos)  # cache rows [t_lo, t_end): final before this launch
        slot = tl.load(slot_ptr + b * K + c)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        k_base = k_ptr + b * sk_b + slot * sk_s
        s_row = s_ptr + (b * K + c) * T
        t = t_lo + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        kt = tl.load(k_base + t[:, None] * sk_t + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if PDL:  # the first tile above streams while the projections' kernel drains
            tl.extra.cuda.gdc_wait()
        q = _new_row(q_ptr + b * sq_b + c * sq_c, d, d_ok, cos_ptr, sin_ptr, D, ROPE).to(tl.float32)
        if holds_pos:  # the split holding pos writes the token's K rows (slots c, c+K, ...) and V rows
            _write_token_rows(k_ptr + b * sk_b + pos * sk_t, v_ptr + b * sv_b + pos * sv_t, kn_ptr + b * skn_b,
                              vn_ptr + b * svn_b, cos_ptr, sin_ptr, c, sk_s, sv_h, skn_s, svn_h, d, d_ok,
                              K, N_SLOTS, HKV, D, ROPE)
        # the row at pos from registers (no program reads it back from the cache), as in _decode_split_kernel
        new_ok = d < tl.where(holds_pos, D, 0)
        k_new = _new_row(kn_ptr + b * skn_b + slot * skn_s, d, new_ok, cos_ptr, sin_ptr, D, ROPE)
        s_new = tl.sum(k_new.to(tl.float32) * q, axis=0) * qk_scale
        tl.store(s_row + pos + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32) + s_new,
                 mask=tl.arange(0, 1) < tl.where(holds_pos, 1, 0))
        m = tl.where(holds_pos, s_new, -float("inf"))
        l = tl.where(holds_pos, 1.0, 0.0)
        m, l = _score_tile(kt, t, t_ok, q, m, l, qk_scale, s_row)
        for t0 in tl.range(t_lo + BLOCK_T, t_end, BLOCK_T, num_stages=STAGES):
            tt = t0 + tl.arange(0, BLOCK_T)
            tt_ok = tt < t_end
            kn = tl.load(k_base + tt[:, None] * sk_t + d[None, :], mask=tt_ok[:, None] & d_ok[None, :], other=0.0)
            m, l = _score_tile(kn, tt, tt_ok, q, m, l, qk_scale, s_row)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(m_ptr + (b * K + c) * N_SPLITS + s, m)
        tl.store(l_ptr + (b * K + c) * N_SPLITS + s, l)

    @triton.jit
    def _cluster_probs_kernel(s_ptr, m_ptr, l_ptr, h2c_ptr, pos_ptr, p_ptr, T, SPLIT, N_SPLITS, s_pos,
                              H: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                              PDL: tl.constexpr):
        # one program per (query head h, sequence b): its cluster's probabilities as one row of p [B, H, T]
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr + b * s_pos)
        c = tl.load(h2c_ptr + b * H + h)
        n_valid = tl.minimum(pos // SPLIT + 1, N_SPLITS)  # splits holding positions <= pos
        if PDL:
            tl.extra.cuda.gdc_wait()
        row = (b * K + c) * N_SPLITS
        ss = tl.arange(0, BLOCK_S)
        m_all = tl.full([BLOCK_S], -float("inf"), dtype=tl.float32)
        for s0 in range(0, n_valid, BLOCK_S):
            m_all = tl.maximum(m_all, tl.load(m_ptr + row + s0 + ss, mask=s0 + ss < n_valid, other=-float("inf")))
        m_max = tl.max(m_all, axis=0)
        l_sum = 0.0
        for s0 in range(0, n_valid, BLOCK_S):
            s_ok = s0 + ss < n_valid
            w = tl.exp2(tl.load(m_ptr + row + s0 + ss, mask=s_ok, other=-float("inf")) - m_max)
            l_sum += tl.sum(w * tl.load(l_ptr + row + s0 + ss, mask=s_ok, other=0.0), axis=0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        s_row = s_ptr + (b * K + c) * T
        p_row = p_ptr + (b * H + h) * T
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            sc = tl.load(s_row + t, mask=t <= pos, other=-float("inf"))  # rows past pos: probability 0
            tl.store(p_row + t, (tl.exp2(sc - m_max) / l_sum).to(p_ptr.dtype.element_ty), mask=t < T)


CLUSTER_SCORES_SPLIT = 128  # positions per program of the scores kernel (B=8, T=2048: 512 programs)
CLUSTER_SCORES_BLOCK_T = 64  # positions per tile


@torch.library.custom_op("chai_models::clustered_probs", mutates_args=("k_cache", "v_cache"))
def clustered_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                    scale: float, head_to_cluster: torch.Tensor, slot_of_rep: torch.Tensor) -> torch.Tensor:
    """One decode token's clustered attention probabilities, RoPE and cache writes included -> p [B, H, T] (the
    cache's dtype), p[b, h] = softmax(q[b, c] . K[b, slot_of_rep[b, c], :pos+1]^T * scale) for h's cluster c
    (head_to_cluster [B, H]), zero past pos; sums in fp32.

    q [B, k, D], k [B, n_slots, D], v [B, Hkv, D], cos, sin, k_cache, v_cache, pos as in new_token_decode (RoPE(k)
    and v are written at pos). Reference: RoPE, the cache writes, then the one-token branch of
    chai.clustered_attention up to its probabilities.
    """
    B, k_, D = q.shape
    H, (Hkv, T) = head_to_cluster.shape[1], v_cache.shape[1:3]
    split = CLUSTER_SCORES_SPLIT
    n_splits = triton.cdiv(T, split)
    rope = cos is not None
    q, k, v = _unit_stride(q, k, v)
    pos, s_pos, s_rope = _row_strides(pos, cos)
    cos, sin = _rope_args(cos, sin, q)
    scores = torch.empty(B, k_, T, dtype=torch.float32, device=q.device)  # log2 units; rows past pos unwritten
    m = torch.empty(B, k_, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    probs = torch.empty(B, H, T, dtype=v_cache.dtype, device=q.device)
    pdl = _pdl_kwargs(q.device)
    _cluster_scores_kernel[(k_, n_splits, B)](
        q, k_cache, v_cache, k, v, cos, sin, slot_of_rep.contiguous(), pos, scores, m, l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        scale * math.log2(math.e), T, split, n_splits, s_pos, s_rope,
        K=k_, D=D, N_SLOTS=k_cache.shape[1], HKV=Hkv, BLOCK_T=min(CLUSTER_SCORES_BLOCK_T, split),
        BLOCK_D=triton.next_power_of_2(D), STAGES=2,
        ROPE=rope, num_warps=4, **pdl)
    _cluster_probs_kernel[(H, B)](scores, m, l, head_to_cluster.contiguous(), pos, probs, T, split, n_splits,
                                  s_pos, H=H, K=k_, BLOCK_T=min(1024, triton.next_power_of_2(T)),
                                  BLOCK_S=min(32, triton.next_power_of_2(n_splits)), num_warps=4, **pdl)
    return probs


@clustered_probs.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, scale, head_to_cluster, slot_of_rep):
    return v_cache.new_empty(q.shape[0], head_to_cluster.shape[1], v_cache.shape[2])


@torch.library.custom_op("chai_models::probs_times_v", mutates_args=())
def probs_times_v(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, G, T] @ [N, T, D] -> [N, G, D]: one batched GEMM that streams V once.

    An opaque op on purpose: torch.compile with coordinate-descent tuning rewrites a one-row matmul into a reduction
    over T that reads V at under half the bandwidth of cuBLAS' batched GEMM (docs/performance.md, "CHAI decode").
    """
    return torch.bmm(probs, v)


@probs_times_v.register_fake
def _(probs, v):
    return probs.new_empty(probs.shape[0], probs.shape[1], v.shape[2])
