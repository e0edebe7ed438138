"""Fused GPU kernels (Triton) for CHAI. Optional: used on CUDA when triton is importable.

- window_attention: CHAI's window rows (RoPE, the window's K, the probabilities that are the clustering features,
  the rows' output) in one launch per clustered layer.
- membership: CHAI's per-request step (cosine distances, average-linkage clustering, representatives, the decode
  kernel's lists; reference: chai.ChaiLayer.membership) in one kernel launch per layer instead of ~50 small ones
  plus ~15 per merge, which is what keeps CHAI's prefill from being slower than dense attention. One program
  clusters one sequence: the H x H distance matrix lives in registers.
- clustered_decode: one-token clustered attention (reference: the S == 1 branch of chai.clustered_attention),
  split over the cache length like flash-decoding, so the K slots and every head's V are streamed once;
  dense_decode is its one-head-per-cluster special case. new_token_decode is the same kernel taking the token's
  q/k/v as projected: it applies RoPE and writes the new K/V rows itself. chai.CLUSTERED_DECODE_KERNEL and
  chai.DENSE_DECODE_KERNEL choose them (by default: for small caches); docs/performance.md has the numbers.
- rope_and_cache: a decode token's RoPE and K/V cache writes alone, in one launch, before SDPA.
- clustered_probs: the same token's probabilities alone (one row per query head), for caches past the decode
  kernel's range, where cuBLAS' batched GEMM over V (chai.probs_times_v) streams faster than a Triton loop.
- silu_mul: SwiGLU's silu(gate) * up, one launch, and a boundary torch.compile does not fuse across.
- gemv (behind kernels.linear): the projections of one token (batch-1 decode), up to three weights per launch,
  with the RMSNorm before them and SwiGLU or the residual add after them folded in.
- On sm90+ every kernel here that reads another kernel's output is launched with programmatic dependent launch
  (PDL) and waits on the device (gdc_wait) before that read, like inductor's kernels in the decode graph. What does
  not depend on the previous kernel (weights, cache rows other than the one being written) is read before the
  wait, so it streams while that kernel drains.

The launchers also run on CPU tensors under TRITON_INTERPRET=1 (how the tests check them without a GPU).
"""
from __future__ import annotations

import functools
import math
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: chai.py uses its torch implementation
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def decode_available(t: torch.Tensor) -> bool:
    """Whether the decode kernels can serve t's dtype and device: they sum in fp32, so fp64 keeps the torch path."""
    return available(t) and t.dtype != torch.float64


def _unit_stride(*ts: torch.Tensor) -> tuple:
    """The tensors with a unit last stride (how the kernels index a row), copied only where they lack it."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _rope_args(cos, sin, placeholder: torch.Tensor) -> tuple:
    """cos, sin as a kernel reads them; without RoPE (None) a placeholder pointer the kernel never reads."""
    return (cos.contiguous(), sin.contiguous()) if cos is not None else (placeholder, placeholder)


if triton is not None:

    @triton.jit
    def _membership_kernel(feat_ptr, rep_ptr, h2c_ptr, kv_of_slot_ptr, slot_of_rep_ptr, members_ptr, start_ptr, F,
                           H: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, HKV: tl.constexpr,
                           SLOTS_ARE_REPS: tl.constexpr, MEDOID: tl.constexpr, BH: tl.constexpr):
        b = tl.program_id(0)
        r = tl.arange(0, BH)
        rows, cols = r[:, None], r[None, :]
        inside = (rows < H) & (cols < H)
        # cosine distances of the heads' features [H, F], summed column by column
        f_row = feat_ptr + b * H * F + r * F
        sq = tl.zeros([BH], tl.float32)
        for c in range(F):
            x = tl.load(f_row + c, mask=r < H, other=0.0).to(tl.float32)
            sq += x * x
        norm = tl.maximum(tl.sqrt(sq), 1e-12)
        sim = tl.zeros([BH, BH], tl.float32)
        for c in range(F):
            x = tl.load(f_row + c, mask=r < H, other=0.0).to(tl.float32) / norm
            sim += x[:, None] * x[None, :]
        dist = tl.maximum(1.0 - sim, 0.0)
        # exactly symmetric whatever the compiler contracts or reorders (the merges rely on it: i < j), and equal
        # costs tie exactly, as in chai.cosine_distance
        dist = (dist + tl.trans(dist)) * 0.5
        dist = tl.where(inside & (rows != cols), dist, 0.0)  # [BH, BH]

        # average-linkage merges (reference: chai.agglomerative_average); labels: lowest member of each cluster
        d = tl.where(inside & (rows != cols), dist, float("inf"))  # inf: no pair
        size = tl.where(r < H, 1.0, 0.0)
        labels = r
        for _ in range(H - K):
            # the closest pair, first in row-major order: i is the first row holding the minimum, j the first
            # column of row i holding it; d is symmetric, so i < j
            i = tl.argmin(tl.min(d, axis=1), axis=0, tie_break_left=True)
            j = tl.argmin(tl.sum(tl.where(rows == i, d, 0.0), axis=0), axis=0, tie_break_left=True)
            ni = tl.sum(tl.where(r == i, size, 0.0), axis=0)
            nj = tl.sum(tl.where(r == j, size, 0.0), axis=0)
            # row i and row j of d as vectors over columns, and as vectors over rows (same values)
            di_c = tl.sum(tl.where(rows == i, d, 0.0), axis=0)
            dj_c = tl.sum(tl.where(rows == j, d, 0.0), axis=0)
            di_r = tl.sum(tl.where(cols == i, d, 0.0), axis=1)
            dj_r = tl.sum(tl.where(cols == j, d, 0.0), axis=1)
            merged_c = (ni * di_c + nj * dj_c) / (ni + nj)  # Lance-Williams, average linkage
            merged_r = (ni * di_r + nj * dj_r) / (ni + nj)
            d = tl.where(rows == i, merged_c[None, :], d)
            d = tl.where(cols == i, merged_r[:, None], d)
            d = tl.where((rows == j) | (cols == j) | ((rows == i) & (cols == i)), float("inf"), d)
            size = tl.where(r == i, ni + nj, tl.where(r == j, 0.0, size))
            labels = tl.where(labels == j, i, labels)

        # canonical ids (reference: chai.canonical_labels): clusters numbered by their lowest member
        rank = tl.cumsum(((labels == r) & (r < H)).to(tl.int32), axis=0) - 1  # [BH] rank of each root
        h2c = tl.sum(tl.where(labels[:, None] == cols, rank[None, :], 0), axis=1)  # [BH]
        h2c = tl.where(r < H, h2c, BH)  # padding sorts after every cluster
        tl.store(h2c_ptr + b * H + r, h2c.to(tl.int64), mask=r < H)

        # representatives (reference: chai.representatives): least cost in each cluster, lowest index on ties
        if MEDOID:
            cost = tl.sum(tl.where(h2c[:, None] == h2c[None, :], dist, 0.0), axis=1)  # [BH]
        else:
            cost = r.to(tl.float32)
        rep = tl.argmin(tl.where(h2c[None, :] == rows, cost[None, :], float("inf")), axis=1,
                        tie_break_left=True)  # [BH]: rep of cluster c at row c < K
        tl.store(rep_ptr + b * K + r, rep.to(tl.int64), mask=r < K)

        # the decode kernel's lists (reference: chai.cluster_lists): heads sorted by (cluster, index)
        before = (h2c[None, :] < h2c[:, None]) | ((h2c[None, :] == h2c[:, None]) & (cols < rows))
        slot = tl.sum(tl.where(before & (cols < H), 1, 0), axis=1)  # [BH] place of head h in members
        tl.store(members_ptr + b * H + slot, r.to(tl.int64), mask=r < H)
        first = tl.sum(tl.where((h2c[None, :] < rows) & (cols < H), 1, 0), axis=1)  # [BH] first entry of cluster c
        tl.store(start_ptr + b * (K + 1) + r, first.to(tl.int64), mask=r < K)
        tl.store(start_ptr + b * (K + 1) + K, H)

        # K slots (reference: ChaiLayer.membership): one per representative, or every KV head
        rep_kv = rep // GROUP
        if SLOTS_ARE_REPS:
            tl.store(kv_of_slot_ptr + b * K + r, rep_kv.to(tl.int64), mask=r < K)
            tl.store(slot_of_rep_ptr + b * K + r, r.to(tl.int64), mask=r < K)
        else:
            tl.store(kv_of_slot_ptr + b * HKV + r, r.to(tl.int64), mask=r < HKV)
            tl.store(slot_of_rep_ptr + b * K + r, rep_kv.to(tl.int64), mask=r < K)


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
    """CHAI's window rows in one launch (reference: the torch branch of chai.ChaiLayer._window): RoPE on q and k,
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


def membership(features: torch.Tensor, k: int, medoid: bool = True, group: int = 1, n_slots: int | None = None,
               out: tuple | None = None) -> tuple:
    """CHAI's whole per-request membership step in one launch per layer (one program per sequence): cosine
    distances, average-linkage clustering, canonical cluster ids, representatives, the decode kernel's lists and
    the K slots. In torch this is ~50 small launches per layer (chai.ChaiLayer.membership, chai.cluster_lists),
    enough to make CHAI's prefill host-bound.

    features [B, H, F] -> (rep_idx [B, k], head_to_cluster [B, H], kv_of_slot [B, n_slots], slot_of_rep [B, k],
    members [B, H], cluster_start [B, k+1]), all int64, written into out (contiguous tensors) when given.
    n_slots: None or k for one K slot per representative, else n_kv_heads = H // group (K whole).
    """
    B, H, F = features.shape
    n_slots = k if n_slots is None else n_slots
    if out is None:
        z = dict(dtype=torch.long, device=features.device)
        out = tuple(torch.empty(B, n, **z) for n in (k, H, n_slots, k, H, k + 1))
    assert all(t.is_contiguous() and t.dtype == torch.long for t in out), "membership: out must be contiguous int64"
    BH = max(16, triton.next_power_of_2(H))
    _membership_kernel[(B,)](features.float().contiguous(), *out, F, H, k, group, H // group, n_slots == k, medoid,
                             BH=BH, num_warps=4 if BH <= 32 else 8)
    return out


# ----------------------------------------------------------------------------------------------------
# One-token clustered attention (decode), split over the cache length
#
# Stage 1, grid (chunk j, split s, row b): a chunk is up to HPB heads of ONE cluster (consecutive entries of
# members); chunks are numbered per row in cluster order, so chunks of a cluster are adjacent programs and
# share their representative's K block through L2. A program walks its split's positions <= pos in tiles of
# BLOCK_T: scores of the representative (fp32, log2 domain), running max m and sum l, and for its heads
# acc_h += p @ V_h (all its heads' V tiles in one [HPB, BLOCK_T, D] load). The row at pos (the token being
# decoded) starts the online softmax of the split that holds it, from the cache or, in new_token_decode, from the
# token's projections (which that split's first chunks also write into the cache). It stores unnormalised acc [D]
# and (m, l) per (b, head, split). Splits past pos exit at once and stage 2 never reads them.
# Stage 2, grid (head, row): combines the valid splits (log-sum-exp rescaling), normalises, writes v.dtype.
# With one split stage 1 normalises and writes the output itself (no stage 2).
# pos is read from device memory by both stages, so the grid depends on T only (CUDA graphs, no host sync).

DECODE_MAX_SPLITS = 128  # stage 2 combines at most this many partials per head
DECODE_MIN_SPLIT = 64  # fewer positions per split: the partials (8 D bytes per head) cost > 6% of V's bytes

if triton is not None:

    @triton.jit
    def _chunk_heads(members_ptr, start_ptr, slot_ptr, b, j, H: tl.constexpr, K: tl.constexpr, HPB: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """Chunk j of row b -> (cluster c, its heads [HPB], which of them exist, c's K slot); c == K: a spare chunk.

        Chunks are numbered per row in cluster order, ceil(size / HPB) per cluster.
        """
        cs = tl.arange(0, BLOCK_K)
        c_lo = tl.load(start_ptr + b * (K + 1) + cs, mask=cs < K, other=0)  # [BLOCK_K] first entry of cluster
        c_hi = tl.load(start_ptr + b * (K + 1) + cs + 1, mask=cs < K, other=0)
        n_chunks = (c_hi - c_lo + HPB - 1) // HPB
        chunk_end = tl.cumsum(n_chunks, axis=0)  # chunks of clusters 0..c
        c = tl.sum((chunk_end <= j).to(tl.int32), axis=0)
        first = tl.sum(tl.where(cs == c, chunk_end - n_chunks, 0), axis=0)
        lo = tl.sum(tl.where(cs == c, c_lo, 0), axis=0) + (j - first) * HPB
        hi = tl.minimum(tl.sum(tl.where(cs == c, c_hi, 0), axis=0), lo + HPB)
        e = lo + tl.arange(0, HPB)
        e_ok = e < hi
        heads = tl.load(members_ptr + b * H + e, mask=e_ok, other=0)  # [HPB] query heads
        slot = tl.load(slot_ptr + b * K + c, mask=c < K, other=0)
        return c, heads, e_ok, slot

    @triton.jit
    def _attend_tile(kt, vt, t_ok, q, m, l, acc, qk_scale):
        """Online softmax over one tile: kt [BLOCK_T, BLOCK_D], vt [HPB, BLOCK_T, BLOCK_D] -> (m, l, acc)."""
        sc = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * qk_scale  # [BLOCK_T]
        sc = tl.where(t_ok, sc, -float("inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))  # finite: the row at pos or this split's first tile is valid
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new)  # [BLOCK_T], 0 where masked
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[None, :, None] * vt.to(tl.float32), axis=1)  # [HPB, BLOCK_D]
        return m_new, l, acc

    @triton.jit
    def _combine_splits(acc_ptr, m_ptr, l_ptr, base, n_valid, d, d_ok, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Partials of splits 0..n_valid-1 of one head (index base + s) -> its normalised output [BLOCK_D].

        .cg loads: the partials were written by other SMs during this launch (L1 is not coherent)."""
        ss = tl.arange(0, BLOCK_S)
        m_all = tl.full([BLOCK_S], -float("inf"), dtype=tl.float32)
        for s0 in range(0, n_valid, BLOCK_S):  # the global max first, then the rescaled sums
            m_all = tl.maximum(m_all, tl.load(m_ptr + base + s0 + ss, mask=s0 + ss < n_valid, other=-float("inf"),
                                              cache_modifier=".cg"))
        m_max = tl.max(m_all, axis=0)
        l_sum = 0.0
        o = tl.zeros_like(d).to(tl.float32)
        for s0 in range(0, n_valid, BLOCK_S):
            s_ok = s0 + ss < n_valid
            w = tl.exp2(tl.load(m_ptr + base + s0 + ss, mask=s_ok, other=-float("inf"), cache_modifier=".cg")
                        - m_max)  # 0 where invalid
            l_sum += tl.sum(w * tl.load(l_ptr + base + s0 + ss, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=0)
            a = tl.load(acc_ptr + (base + s0 + ss)[:, None] * D + d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            o += tl.sum(w[:, None] * a, axis=0)
        return o / l_sum

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

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr,
                             members_ptr, start_ptr, slot_ptr, pos_ptr,
                             acc_ptr, m_ptr, l_ptr, count_ptr, out_ptr,
                             sq_b, sq_c, sk_b, sk_s, sk_t, sv_b, sv_h, sv_t, skn_b, skn_s, svn_b, svn_h, so_b, so_h,
                             qk_scale, SPLIT, N_SPLITS, N_CHUNKS,
                             H: tl.constexpr, K: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                             N_SLOTS: tl.constexpr, HKV: tl.constexpr,
                             HPB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ONE_SPLIT: tl.constexpr,
                             STAGES: tl.constexpr, DENSE: tl.constexpr, NEW: tl.constexpr, ROPE: tl.constexpr,
                             FUSED_COMBINE: tl.constexpr, PDL: tl.constexpr):
        j, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: cache offsets
        pos = tl.load(pos_ptr)  # written before the graph (or launch) began: safe to read before the wait
        t_lo = s * SPLIT
        if t_lo > pos:  # the whole split is past the current position
            return
        holds_pos = pos < t_lo + SPLIT  # the split whose last position is pos (the token being decoded)
        t_end = tl.minimum(t_lo + SPLIT, pos)  # cache rows [t_lo, t_end): all final before this launch began
        if DENSE:  # dense attention: cluster j is query head j alone (HPB == 1), its K is its KV head's
            c = j
            heads = j + tl.arange(0, HPB)
            e_ok = heads < H
            slot = j // G
        else:
            c, heads, e_ok, slot = _chunk_heads(members_ptr, start_ptr, slot_ptr, b, j, H, K, HPB, BLOCK_K)
            if c >= K:  # the grid is sized for the worst case: spare chunks exit
                return
        kv = heads // G  # [HPB] their KV heads (GQA)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        new_ok = d < tl.where(holds_pos, D, 0)  # [BLOCK_D]: d_ok in the split holding pos, else all False
        k_base = k_ptr + b * sk_b + slot * sk_s
        v_base = v_ptr + b * sv_b + kv[:, None, None] * sv_h + d[None, None, :]  # [HPB, 1, BLOCK_D]
        v_ok = e_ok[:, None, None] & d_ok[None, None, :]

        # The first tile is read before the wait: rows < pos are final, so the read overlaps the previous kernel's
        # tail. The row at pos is the token being decoded; it is attended to separately, after the wait.
        t = t_lo + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        kt = tl.load(k_base + t[:, None] * sk_t + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        vt = tl.load(v_base + t[None, :, None] * sv_t, mask=v_ok & t_ok[None, :, None], other=0.0)
        if PDL:  # launched early (programmatic dependent launch): q and the new K/V come from the kernels before
            tl.extra.cuda.gdc_wait()
        if NEW:
            # q, K and V of the new token arrive as projected (kn_ptr, vn_ptr): RoPE is applied here, and chunks
            # 0..K-1 (never spare) of the split holding pos write its K and V rows into the cache for later steps.
            # No program of this launch reads those rows back from the cache.
            q = _new_row(q_ptr + b * sq_b + c * sq_c, d, d_ok, cos_ptr, sin_ptr, D, ROPE).to(tl.float32)
            if holds_pos & (j < K):
                _write_token_rows(k_ptr + b * sk_b + pos * sk_t, v_ptr + b * sv_b + pos * sv_t, kn_ptr + b * skn_b,
                                  vn_ptr + b * svn_b, cos_ptr, sin_ptr, j, sk_s, sv_h, skn_s, svn_h, d, d_ok,
                                  K, N_SLOTS, HKV, D, ROPE)
            k_new = _new_row(kn_ptr + b * skn_b + slot * skn_s, d, new_ok, cos_ptr, sin_ptr, D, ROPE)
            v_new = tl.load(vn_ptr + b * svn_b + kv[:, None] * svn_h + d[None, :],
                            mask=e_ok[:, None] & new_ok[None, :], other=0.0)  # [HPB, BLOCK_D]
        else:  # q has RoPE applied and the cache already holds the row at pos (written by the kernels before)
            q = tl.load(q_ptr + b * sq_b + c * sq_c + d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
            k_new = tl.load(k_base + pos * sk_t + d, mask=new_ok, other=0.0)
            v_new = tl.sum(tl.load(v_base + pos * sv_t, mask=v_ok & new_ok[None, None, :], other=0.0),
                           axis=1)  # [HPB, BLOCK_D]
        # the row at pos starts the online softmax of the split that holds it (-inf / 0 / 0 elsewhere)
        m = tl.where(holds_pos, tl.sum(k_new.to(tl.float32) * q, axis=0) * qk_scale, -float("inf"))
        l = tl.where(holds_pos, 1.0, 0.0)
        acc = v_new.to(tl.float32)
        m, l, acc = _attend_tile(kt, vt, t_ok, q, m, l, acc, qk_scale)
        for t0 in tl.range(t_lo + BLOCK_T, t_end, BLOCK_T, num_stages=STAGES):  # STAGES > 1: cp.async prefetch
            tt = t0 + tl.arange(0, BLOCK_T)
            tt_ok = tt < t_end
            kn = tl.load(k_base + tt[:, None] * sk_t + d[None, :], mask=tt_ok[:, None] & d_ok[None, :], other=0.0)
            vn = tl.load(v_base + tt[None, :, None] * sv_t, mask=v_ok & tt_ok[None, :, None], other=0.0)
            m, l, acc = _attend_tile(kn, vn, tt_ok, q, m, l, acc, qk_scale)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

        o_ptrs = out_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
        o_ok = e_ok[:, None] & d_ok[None, :]
        if ONE_SPLIT:
            tl.store(o_ptrs, (acc / l).to(out_ptr.dtype.element_ty), mask=o_ok)
        else:
            row = (b * H + heads) * N_SPLITS + s  # [HPB] partial index (b, head, s)
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=o_ok)
            tl.store(m_ptr + row, tl.zeros([HPB], dtype=tl.float32) + m, mask=e_ok)
            tl.store(l_ptr + row, tl.zeros([HPB], dtype=tl.float32) + l, mask=e_ok)
            if FUSED_COMBINE:
                # The last split of this chunk to finish combines the chunk's heads (no second launch). The
                # barrier orders every thread's partial stores before the counter's release; the counter is put
                # back to 0 for the next call (the next layer's launch starts after this one has finished).
                n_valid = tl.minimum(pos // SPLIT + 1, N_SPLITS)
                tl.debug_barrier()
                done = tl.atomic_add(count_ptr + b * N_CHUNKS + j, 1, sem="acq_rel", scope="gpu")
                if done == n_valid - 1:
                    tl.store(count_ptr + b * N_CHUNKS + j, 0)
                    for i in tl.static_range(HPB):
                        sel = tl.arange(0, HPB) == i
                        h = tl.sum(tl.where(sel, heads, 0), axis=0)  # the chunk's i-th head, if it has one
                        if tl.sum((sel & e_ok).to(tl.int32), axis=0) > 0:
                            o = _combine_splits(acc_ptr, m_ptr, l_ptr, (b * H + h) * N_SPLITS, n_valid, d, d_ok,
                                                D, BLOCK_S)
                            tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _decode_combine_kernel(acc_ptr, m_ptr, l_ptr, pos_ptr, out_ptr, so_b, so_h, SPLIT, N_SPLITS,
                               H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                               PDL: tl.constexpr):
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        n_valid = tl.minimum(tl.load(pos_ptr) // SPLIT + 1, N_SPLITS)  # splits holding positions <= pos
        if PDL:
            tl.extra.cuda.gdc_wait()
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        o = _combine_splits(acc_ptr, m_ptr, l_ptr, (b * H + h) * N_SPLITS, n_valid, d, d_ok, D, BLOCK_S)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_chunks(H: int, k: int, hpb: int) -> int:
    """Programs per (split, row) of clustered_decode: an upper bound of the sum over clusters of ceil(size / hpb)."""
    return min(H, (H + k * (hpb - 1)) // hpb)


PDL = True  # programmatic dependent launch on sm90+ (see generation.PDL_DECODE); off under the interpreter


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and os.environ.get("TRITON_INTERPRET") != "1")


def _pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords of the decode and silu_mul kernels: their PDL constexpr, and launch_pdl where PDL applies."""
    return dict(PDL=True, launch_pdl=True) if PDL and _pdl_capable(device) else dict(PDL=False)


@functools.lru_cache(maxsize=None)
def _n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_config(B: int, H: int, k: int, D: int, T: int, n_sms: int = 132) -> dict:
    """Block sizes and split length of clustered_decode for a shape (a pure function of the shapes).

    Set from a launch-config sweep on an H200 (LLaMA-7B layer, k = 4; docs/performance.md): the best configs
    put a whole mean-size cluster in one program (HPB = H / k, up to 8), read 32 positions per tile and use the
    fewest splits that still launch ~1.5 programs per SM (B=1, T=8192: 34.1 us vs 47.4 us for 4 heads x 16
    positions and ~4 programs per SM). HPB is 1 in the dense special case, so no lane is padding there.
    """
    hpb = min(8, triton.next_power_of_2(max(1, round(H / k))))
    block_t = 64 if hpb == 1 else 32
    n_chunks = decode_chunks(H, k, hpb)
    split = max(block_t, DECODE_MIN_SPLIT)
    while split < T and (B * n_chunks * triton.cdiv(T, 2 * split) >= 1.5 * n_sms
                         or triton.cdiv(T, split) > DECODE_MAX_SPLITS):
        split *= 2
    return dict(hpb=hpb, block_t=block_t, split=split, num_warps=4, num_stages=2)


def clustered_decode_launch(q_rep, k_slots, v, members, cluster_start, slot_of_rep, pos, scale, k_new=None,
                            v_new=None, cos=None, sin=None, *, hpb=None, block_t=None, split=None, num_warps=None,
                            num_stages=None):
    """The launcher behind clustered_decode, dense_decode and new_token_decode (members None: dense, k == H, no lists
    read). k_new None: the cache already holds the row at pos and q_rep has RoPE applied. Else k_new [B, n_slots, D]
    and v_new [B, Hkv, D] are the new token's rows, which the kernel writes into k_slots / v at pos, and cos/sin [D]
    (None: no RoPE) rotate q_rep and k_new first.

    Keyword overrides are for tests and tuning; see decode_config."""
    B, k, D = q_rep.shape
    dense = members is None
    H, Hkv, T = k if dense else members.shape[1], v.shape[1], v.shape[2]
    cfg = decode_config(B, H, k, D, T, _n_sms(q_rep.device))
    hpb, block_t = 1 if dense else hpb or cfg["hpb"], block_t or cfg["block_t"]
    split, num_warps, num_stages = split or cfg["split"], num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    n_splits = triton.cdiv(T, split)
    n_chunks = decode_chunks(H, k, hpb)
    new, rope = k_new is not None, cos is not None
    if not new:
        k_new = v_new = q_rep  # unused pointers
    q_rep, k_slots, v, k_new, v_new = _unit_stride(q_rep, k_slots, v, k_new, v_new)
    cos, sin = _rope_args(cos, sin, q_rep)
    if dense:
        members = cluster_start = slot_of_rep = pos  # unused pointers
    else:
        members, cluster_start, slot_of_rep = members.contiguous(), cluster_start.contiguous(), slot_of_rep.contiguous()
    out = torch.empty(B, H, D, dtype=v.dtype, device=v.device)
    if n_splits == 1:
        acc = m = l = out  # unused
    else:
        acc = torch.empty(B, H, n_splits, D, dtype=torch.float32, device=v.device)
        m = torch.empty(B, H, n_splits, dtype=torch.float32, device=v.device)
        l = torch.empty_like(m)
    block_d = triton.next_power_of_2(D)
    block_s = min(32, triton.next_power_of_2(n_splits))
    pdl = _pdl_kwargs(v.device)
    # the last split of a chunk combines all of its heads in turn: worth a launch only while that tail is short
    fused = FUSED_COMBINE and n_splits > 1 and hpb * n_splits <= FUSED_COMBINE_MAX_PARTIALS
    counts = _split_counters(v.device, B * n_chunks) if fused else None
    _decode_split_kernel[(n_chunks, n_splits, B)](
        q_rep, k_slots, v, k_new, v_new, cos, sin, members, cluster_start, slot_of_rep, pos,
        acc, m, l, counts if counts is not None else pos, out,
        q_rep.stride(0), q_rep.stride(1), k_slots.stride(0), k_slots.stride(1), k_slots.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1), scale * math.log2(math.e), split, n_splits, n_chunks,
        H=H, K=k, G=H // Hkv, D=D, N_SLOTS=k_slots.shape[1], HKV=Hkv, HPB=hpb, BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_S=block_s, ONE_SPLIT=n_splits == 1, STAGES=num_stages, DENSE=dense,
        NEW=new, ROPE=rope, FUSED_COMBINE=counts is not None, num_warps=num_warps, **pdl)
    if n_splits > 1 and counts is None:
        _decode_combine_kernel[(H, B)](acc, m, l, pos, out, out.stride(0), out.stride(1), split, n_splits,
                                       H=H, D=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4, **pdl)
    return out


# The last split of a chunk to finish combines the partials of the chunk's heads (one launch instead of two), while
# a program combines at most this many (heads x splits). H200, dense B=1 T=512 (1 head x 8 splits): 82.2% vs 80.8%
# of copy bandwidth with the second kernel. CHAI at T=8192 (8 heads x 16 splits) serialises too much: two launches.
FUSED_COMBINE = True
FUSED_COMBINE_MAX_PARTIALS = 16
_COUNTERS: dict = {}  # device -> int32 arrival counters of the fused combine, all 0 between launches


def _split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """At least n zeroed counters, kept for the process: each launch leaves them at 0 again.

    None (the two-launch combine) if they would have to be allocated during a CUDA-graph capture. They are
    allocated from a helper thread: torch.compile's CUDA graphs route the allocations of the thread that warms a
    graph up to that graph's private memory pool, and a buffer that outlives the graph must not live there.
    """
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        box = []

        def alloc():
            box.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # zeroed before any stream of the caller's uses it

        worker = threading.Thread(target=alloc)
        worker.start()
        worker.join()
        if not box:
            raise RuntimeError(f"could not allocate the decode kernel's {n} split counters on {device}")
        have = _COUNTERS[device] = box[0]
    return have


@torch.library.custom_op("chai_models::clustered_decode", mutates_args=())
def clustered_decode(q_rep: torch.Tensor, k_slots: torch.Tensor, v: torch.Tensor, members: torch.Tensor,
                     cluster_start: torch.Tensor, slot_of_rep: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One-token clustered attention -> out [B, H, D] (v.dtype).

    q_rep [B, k, D] (representatives' queries, RoPE applied), k_slots [B, n_slots, T, D], v [B, Hkv, T, D],
    members [B, H] (query heads sorted by cluster, see chai.cluster_lists), cluster_start [B, k+1],
    slot_of_rep [B, k], pos [1] int64 on the device (keys 0..pos are valid; the rest of the cache is ignored).
    out[b, h] = softmax(q_rep[b, c] . K[b, slot_of_rep[b, c], :pos+1]^T * scale) @ V[b, h // G, :pos+1] for h's
    cluster c, softmax and sums in fp32. Dense attention is k == H with members = arange(H). An opaque op, so
    torch.compile keeps it one node and CUDA graphs capture its two launches.
    """
    return clustered_decode_launch(q_rep, k_slots, v, members, cluster_start, slot_of_rep, pos, scale)


@clustered_decode.register_fake
def _(q_rep, k_slots, v, members, cluster_start, slot_of_rep, pos, scale):
    return v.new_empty(q_rep.shape[0], members.shape[1], q_rep.shape[2])


@torch.library.custom_op("chai_models::dense_decode", mutates_args=())
def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """One-token dense attention with the same kernel: q [B, H, D], k/v [B, Hkv, T, D], pos [1] -> [B, H, D].

    Every head is its own cluster, so no membership lists are read; GQA maps head h to KV head h // (H / Hkv).
    """
    return clustered_decode_launch(q, k, v, None, None, None, pos, scale)


@dense_decode.register_fake
def _(q, k, v, pos, scale):
    return v.new_empty(q.shape)


@torch.library.custom_op("chai_models::new_token_decode", mutates_args=("k_cache", "v_cache"))
def new_token_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, members: torch.Tensor | None, cluster_start: torch.Tensor | None,
                     slot_of_rep: torch.Tensor | None) -> torch.Tensor:
    """One decode token's RoPE, its cache write and its attention, in one launch -> out [B, H, D].

    q [B, k, D], k [B, n_slots, D], v [B, Hkv, D]: the token's projections (q of the representatives, k of the K
    slots), without RoPE; cos, sin [D]: RoPE at pos (rotate-half, HF layout), or None; k_cache [B_max, n_slots, T, D],
    v_cache [B_max, Hkv, T, D] with B <= B_max: RoPE(k) and v are written at pos, rows 0..pos-1 are read. members,
    cluster_start, slot_of_rep as in clustered_decode, or all None: dense attention (k == H, slot = KV head).
    Equal to rotating q and k, writing both rows and calling clustered_decode / dense_decode, without the launches
    in between (docs/performance.md).
    """
    return clustered_decode_launch(q, k_cache, v_cache, members, cluster_start, slot_of_rep, pos, scale, k, v, cos,
                                   sin)


@new_token_decode.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, scale, members, cluster_start, slot_of_rep):
    return v.new_empty(q.shape[0], q.shape[1] if members is None else members.shape[1], q.shape[2])


# ----------------------------------------------------------------------------------------------------
# A decode token's RoPE and K/V cache writes in one launch, for attention that runs outside our kernels (SDPA past
# the dense decode kernel's range). As inductor kernels these were three launches per layer, and the tuned V write
# alone measured 1.9 us in one process and 11.2 us in another (H100, 7B, B=8): most of the spread between runs.

if triton is not None:

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, qo_ptr,
                           sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
                           H: tl.constexpr, N_K: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                           BLOCK_D: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr):
        # one program per (head h, sequence b): q's row h rotated into qo, and K / V rows h (if any) into the caches
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr)
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
    on q and k, RoPE(k) and v written into k_cache [B_max, n_k, T, D] / v_cache [B_max, Hkv, T, D] at pos [1]
    -> RoPE(q) [B, H, D]. Equal to chai.rotate_and_cache, in one launch."""
    B, H, D = q.shape
    n_k, Hkv = k.shape[1], v.shape[1]
    assert H >= max(n_k, Hkv), "one program per query head writes the K and V rows of the same index"
    q, k, v = _unit_stride(q, k, v)
    rope = cos is not None
    cos, sin = _rope_args(cos, sin, q)
    q_out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(H, B)](q, k, v, cos, sin, k_cache, v_cache, pos, q_out, q.stride(0), q.stride(1),
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
                               k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                               v_cache.stride(2), H=H, N_K=n_k, HKV=Hkv, D=D, BLOCK_D=triton.next_power_of_2(D),
                               ROPE=rope, num_warps=1, **_pdl_kwargs(q.device))
    return q_out


@rope_and_cache.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------
# CHAI's decode probabilities for long caches and batches (B x T past chai.CLUSTERED_DECODE_MAX_POSITIONS), where
# cuBLAS' batched GEMM streams V at least as fast as the decode kernel's loop (one 7B layer, B=8, T=16384, H100:
# 431 vs 435 us): one launch splits the representatives' scores over T (RoPE and the new K/V rows in it too), a
# second turns them into one bf16 row of probabilities per query head, and chai.probs_times_v multiplies by V.
# Before V, inductor's torch ops took ~27 us per 7B layer at B=8, T=2048 (H100), these two launches ~13 us, for K
# slots whose bytes need ~6 us.

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
                               qk_scale, T, SPLIT, N_SPLITS,
                               K: tl.constexpr, D: tl.constexpr, N_SLOTS: tl.constexpr, HKV: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
                               ROPE: tl.constexpr, PDL: tl.constexpr):
        # one program per (cluster c, split s of the positions, sequence b)
        c, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        pos = tl.load(pos_ptr)  # written before the graph (or launch) began
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
    def _cluster_probs_kernel(s_ptr, m_ptr, l_ptr, h2c_ptr, pos_ptr, p_ptr, T, SPLIT, N_SPLITS,
                              H: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                              PDL: tl.constexpr):
        # one program per (query head h, sequence b): its cluster's probabilities as one row of p [B, H, T]
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr)
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
    and v are written at pos). Reference: chai.rotate_and_cache, then the S == 1 branch of chai.clustered_attention
    up to its probabilities.
    """
    B, k_, D = q.shape
    H, (Hkv, T) = head_to_cluster.shape[1], v_cache.shape[1:3]
    split = CLUSTER_SCORES_SPLIT
    n_splits = triton.cdiv(T, split)
    rope = cos is not None
    q, k, v = _unit_stride(q, k, v)
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
        scale * math.log2(math.e), T, split, n_splits,
        K=k_, D=D, N_SLOTS=k_cache.shape[1], HKV=Hkv, BLOCK_T=min(CLUSTER_SCORES_BLOCK_T, split),
        BLOCK_D=triton.next_power_of_2(D), STAGES=2,
        ROPE=rope, num_warps=4, **pdl)
    _cluster_probs_kernel[(H, B)](scores, m, l, head_to_cluster.contiguous(), pos, probs, T, split, n_splits,
                                  H=H, K=k_, BLOCK_T=min(1024, triton.next_power_of_2(T)),
                                  BLOCK_S=min(32, triton.next_power_of_2(n_splits)), num_warps=4, **pdl)
    return probs


@clustered_probs.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, scale, head_to_cluster, slot_of_rep):
    return v_cache.new_empty(q.shape[0], head_to_cluster.shape[1], v_cache.shape[2])


# ----------------------------------------------------------------------------------------------------
# SwiGLU's silu(gate) * up as one kernel. Besides saving a launch in eager mode, being an opaque op keeps
# torch.compile from inlining it into the next GEMV (w2), where inductor recomputes it in every program: that
# made the down projection's tuned speed swing between 25 and 43 us per 7B layer from one compile to the next.

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        if PDL:
            tl.extra.cuda.gdc_wait()
        g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        s = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # rounded to the input dtype, as F.silu's output is
        tl.store(out_ptr + i, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("chai_models::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for two tensors of one shape and dtype (CUDA, or CPU under TRITON_INTERPRET=1)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4, **_pdl_kwargs(gate.device))
    return out


@silu_mul_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the Triton op on CUDA for fp16/bf16/fp32 inference, torch elsewhere (and wherever a
    gradient is needed: the op has no backward)."""
    if (decode_available(gate) and gate.shape == up.shape and gate.dtype == up.dtype
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return silu_mul_op(gate, up)
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------------------------------
# One-row GEMV: y = W x for a single token (B = S = 1 decode), the bulk of a decode step's bytes.
#
# One launch serves up to three weights of one K (Q, K and V; or SwiGLU's gate and up), and folds in what sits
# around a projection in a LLaMA block, so that none of it is a launch of its own:
#   - an RMSNorm prologue (llama.RMSNorm's math and roundings; each program recomputes the 8 KB of x it needs);
#   - SwiGLU: a program reads the same rows of gate and up and writes silu(gate x) * (up x);
#   - a bias, and a residual add.
# Each program owns BLOCK_N rows and walks K in BLOCK_K tiles, one tile loaded ahead. The weights do not depend on
# the previous kernel, so under PDL the first tile is requested before gdc_wait: the weight stream starts while
# the previous kernel drains. H200, 8 LLaMA-2-7B layers, B=1, T=512: 83.1-83.7% of copy bandwidth vs 78.5-79.5%
# with inductor's tuned reductions (docs/performance.md).

if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, g_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, N0, N1, N2,
                     eps, K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # programs 0..nb0-1 take weight 0, then weight 1, then weight 2; outputs are concatenated in that order
        pid = tl.program_id(0)
        nb0 = tl.cdiv(N0, BLOCK_N)
        nb1 = tl.cdiv(N1, BLOCK_N)
        if pid < nb0:
            w_ptr, b_ptr, n_rows, row0, out0 = w0_ptr, b0_ptr, N0, pid * BLOCK_N, 0
        elif pid < nb0 + nb1:
            w_ptr, b_ptr, n_rows, row0, out0 = w1_ptr, b1_ptr, N1, (pid - nb0) * BLOCK_N, N0
        else:
            w_ptr, b_ptr, n_rows, row0, out0 = w2_ptr, b2_ptr, N2, (pid - nb0 - nb1) * BLOCK_N, N0 + N1
        rows = row0 + tl.arange(0, BLOCK_N)
        r_ok = rows < n_rows
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_N, BLOCK_K]
        u_ptrs = w1_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # SWIGLU: the same rows of up
        w_next = tl.load(w_ptrs, mask=r_ok[:, None] & (ks[None, :] < K), other=0.0)  # before the wait
        if SWIGLU:
            u_next = tl.load(u_ptrs, mask=r_ok[:, None] & (ks[None, :] < K), other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x and the residual are the previous kernel's output
            tl.extra.cuda.gdc_launch_dependents()
        if NORM:
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
                sq += xk * xk
            inv_rms = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            xk = tl.load(x_ptr + k0 + ks, mask=k_ok, other=0.0)  # [BLOCK_K]
            if NORM:  # weight * (x * inv_rms).to(dtype), rounded as llama.RMSNorm rounds it
                gk = tl.load(g_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
                xk = (gk * (xk.to(tl.float32) * inv_rms).to(xk.dtype).to(tl.float32)).to(xk.dtype)
            xk = xk.to(tl.float32)[None, :]
            w = w_next
            ahead = r_ok[:, None] & (k0 + BLOCK_K + ks[None, :] < K)  # the next tile, loaded ahead
            w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=ahead, other=0.0)
            acc += w.to(tl.float32) * xk
            if SWIGLU:
                u = u_next
                u_next = tl.load(u_ptrs + k0 + BLOCK_K, mask=ahead, other=0.0)
                acc_u += u.to(tl.float32) * xk
        odt = out_ptr.dtype.element_ty
        y = tl.sum(acc, 1)  # [BLOCK_N], fp32
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        if SWIGLU:  # F.silu(gate x) * (up x), each product rounded to the output dtype as the torch path does
            u = tl.sum(acc_u, 1)
            if HAS_BIAS:
                u += tl.load(b1_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            g = y.to(odt).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(odt).to(tl.float32) * u.to(odt).to(tl.float32)
        if HAS_RES:  # residual + (W x).to(dtype)
            y = tl.load(res_ptr + rows, mask=r_ok, other=0.0).to(tl.float32) + y.to(odt).to(tl.float32)
        tl.store(out_ptr + out0 + rows, y.to(odt), mask=r_ok)


def gemv_config(n_rows: int, K: int, swiglu: bool) -> dict:
    """BLOCK_N, BLOCK_K, num_warps of _gemv_kernel for weights of n_rows (all segments) x K.

    The winners of an H200 sweep over 11 configs on the LLaMA-2-7B projections (docs/performance.md): Q/K/V
    12288 x 4096 and the 32000-row head 4x2048/8 warps (91%, 100% of copy bandwidth alone), wo 4096 x 4096 2x2048/4
    (85%), gate+up 2 x 11008 x 4096 4x1024/4 (95%), down 4096 x 11008 16x512/8 (92%).
    """
    if swiglu:
        bn, bk, warps = 4, 1024, 4
    elif K >= 8192:
        bn, bk, warps = 16, 512, 8
    elif n_rows <= 4096:
        bn, bk, warps = 2, 2048, 4
    else:
        bn, bk, warps = 4, 2048, 8
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


def gemv_launch(x, weights, biases, norm_weight, eps, residual, swiglu):
    K = x.shape[-1]
    x = x.contiguous()
    ns = [w.shape[0] for w in weights]
    if swiglu:
        ns = [ns[0]]
    n_out = sum(ns)
    out = x.new_empty(*x.shape[:-1], n_out)
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    bs = list(biases) + [ws[0]] * (3 - len(biases))  # unused pointers where there is no bias
    ns = ns + [0] * (3 - len(ns))
    cfg = gemv_config(n_out, K, swiglu)
    grid = (sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns),)
    _gemv_kernel[grid](x, norm_weight if norm_weight is not None else x, *ws, *bs,
                       residual.contiguous() if residual is not None else x, out, ns[0], ns[1], ns[2], eps, K=K,
                       NORM=norm_weight is not None, SWIGLU=swiglu, HAS_BIAS=bool(biases),
                       HAS_RES=residual is not None, **cfg, **_pdl_kwargs(x.device))
    return out


@torch.library.custom_op("chai_models::gemv", mutates_args=())
def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], norm_weight: torch.Tensor | None,
         eps: float, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    """One row x [..., K] (one element in the leading dims) through up to three weights [N_i, K] -> [..., sum N_i].

    biases: one per weight, or empty. norm_weight: RMSNorm x first (llama.RMSNorm, eps). swiglu: two weights of one
    shape, out = silu(W0 x) * (W1 x) [..., N_0]. residual [..., N]: out = residual + W x. An opaque op, so
    torch.compile keeps it one launch. The contract and the checks live in kernels.linear.
    """
    return gemv_launch(x, weights, biases, norm_weight, eps, residual, swiglu)


@gemv.register_fake
def _(x, weights, biases, norm_weight, eps, residual, swiglu):
    n = weights[0].shape[0] if swiglu else sum(w.shape[0] for w in weights)
    return x.new_empty(*x.shape[:-1], n)


# Where kernels.linear uses the one-row GEMV: "compiled" (inside torch.compile, where CUDA graphs make its launches
# free; eager decode stays on cuBLAS, whose launches cost less host time than a Triton launch), "always", "never".
GEMV = "compiled"


def _weight_bias(m):  # an nn.Linear, a (weight, bias) pair, or a bare weight
    if isinstance(m, torch.nn.Module):
        return m.weight, m.bias
    return tuple(m) if isinstance(m, (tuple, list)) else (m, None)


def gemv_applies(x: torch.Tensor, weights, biases=(), norm=None, residual=None, swiglu=False) -> bool:
    """Whether kernels.linear can run this call as one _gemv_kernel launch."""
    if GEMV not in ("compiled", "always"):
        if GEMV != "never":
            raise ValueError(f'kernels.GEMV must be "compiled", "always" or "never", got {GEMV!r}')
        return False
    if GEMV == "compiled" and not torch.compiler.is_compiling():
        return False
    if not decode_available(x) or x.numel() != x.shape[-1] or not 1 <= len(weights) <= 3:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *weights, *biases)):
        return False  # no backward
    K, dt = x.shape[-1], x.dtype
    if any(w.dim() != 2 or w.shape[1] != K or w.dtype != dt or not w.is_contiguous() for w in weights):
        return False
    if biases and any(b is None or b.dtype != dt or b.shape != (w.shape[0],) for w, b in zip(weights, biases)):
        return False
    if norm is not None and not (getattr(norm, "gemv_fusable", False) and norm.weight.shape == (K,)):
        return False
    if swiglu and (len(weights) != 2 or weights[0].shape != weights[1].shape):
        return False
    return residual is None or (residual.numel() == weights[0].shape[0] and residual.dtype == dt)


def linear(x: torch.Tensor, linears, norm=None, residual=None, swiglu=False):
    """The projections of a block, with what surrounds them, in one call.

    linears: nn.Linear modules, (weight, bias) pairs or bare weights, sharing an input; norm: an RMSNorm module
    applied to x first; swiglu: out = silu(l0(x)) * l1(x); residual: out = residual + l0(x). Returns one tensor,
    or with several linears and no swiglu a tuple, one per linear. One token on CUDA (decode at batch 1) in a
    compiled graph: one _gemv_kernel launch (GEMV, gemv_applies); otherwise the plain torch ops, which are also
    the reference.
    """
    if residual is not None and (swiglu or len(linears) != 1):
        raise ValueError("kernels.linear: a residual goes with exactly one linear and no swiglu")
    wb = [_weight_bias(m) for m in linears]
    weights = [w for w, _ in wb]
    biases = [b for _, b in wb] if any(b is not None for _, b in wb) else []
    if gemv_applies(x, weights, biases, norm, residual, swiglu):
        out = gemv(x, weights, biases, norm.weight if norm is not None else None,
                   float(norm.eps) if norm is not None else 0.0, residual, swiglu)
        if len(weights) == 1 or swiglu:
            return out
        return out.split([w.shape[0] for w in weights], dim=-1)
    h = norm(x) if norm is not None else x
    ys = [torch.nn.functional.linear(h, w, b) for w, b in wb]
    if swiglu:
        return silu_mul(ys[0], ys[1])
    if residual is not None:
        return residual + ys[0]
    return ys[0] if len(ys) == 1 else tuple(ys)


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
    ops = [torch.ops.chai_models.clustered_decode.default, torch.ops.chai_models.dense_decode.default,
           torch.ops.chai_models.new_token_decode.default, torch.ops.chai_models.silu_mul.default,
           torch.ops.chai_models.gemv.default, torch.ops.chai_models.probs_times_v.default,
           torch.ops.chai_models.clustered_probs.default, torch.ops.chai_models.rope_and_cache.default]
    for op in ops:
        if op not in lowering.lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag), warn=False)
