"""One decode token's attention over the cache, its RoPE and its K/V row writes in one launch, for dense layers and
CHAI's clustered layers (reference: chai.clustered_attention's one-token branch, models.shared.attention)."""
from __future__ import annotations

import functools
import math
import threading

import torch

from .common import _pdl_kwargs, _rope_args, _row_strides, _unit_stride, triton

if triton is not None:
    import triton.language as tl

    from .common import _new_row, _write_token_rows

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
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr,
                             members_ptr, start_ptr, slot_ptr, pos_ptr,
                             acc_ptr, m_ptr, l_ptr, count_ptr, out_ptr,
                             sq_b, sq_c, sk_b, sk_s, sk_t, sv_b, sv_h, sv_t, skn_b, skn_s, svn_b, svn_h, so_b, so_h,
                             qk_scale, SPLIT, N_SPLITS, N_CHUNKS, s_pos, s_rope,
                             H: tl.constexpr, K: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                             N_SLOTS: tl.constexpr, HKV: tl.constexpr,
                             HPB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, ONE_SPLIT: tl.constexpr,
                             STAGES: tl.constexpr, DENSE: tl.constexpr, ROPE: tl.constexpr,
                             FUSED_COMBINE: tl.constexpr, PDL: tl.constexpr):
        j, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: cache offsets
        pos = tl.load(pos_ptr + b * s_pos)  # written before the graph (or launch) began: safe to read before the wait
        cos_ptr += b * s_rope  # row b's RoPE (s_rope 0: every row at one position)
        sin_ptr += b * s_rope
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
        # q, K and V of the new token arrive as projected (kn_ptr, vn_ptr): RoPE is applied here, and chunks 0..K-1
        # (never spare) of the split holding pos write its K and V rows into the cache for later steps. No program of
        # this launch reads those rows back from the cache.
        q = _new_row(q_ptr + b * sq_b + c * sq_c, d, d_ok, cos_ptr, sin_ptr, D, ROPE).to(tl.float32)
        if holds_pos & (j < K):
            _write_token_rows(k_ptr + b * sk_b + pos * sk_t, v_ptr + b * sv_b + pos * sv_t, kn_ptr + b * skn_b,
                              vn_ptr + b * svn_b, cos_ptr, sin_ptr, j, sk_s, sv_h, skn_s, svn_h, d, d_ok,
                              K, N_SLOTS, HKV, D, ROPE)
        k_new = _new_row(kn_ptr + b * skn_b + slot * skn_s, d, new_ok, cos_ptr, sin_ptr, D, ROPE)
        v_new = tl.load(vn_ptr + b * svn_b + kv[:, None] * svn_h + d[None, :],
                        mask=e_ok[:, None] & new_ok[None, :], other=0.0)  # [HPB, BLOCK_D]
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
    def _decode_combine_kernel(acc_ptr, m_ptr, l_ptr, pos_ptr, out_ptr, so_b, so_h, SPLIT, N_SPLITS, s_pos,
                               H: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                               PDL: tl.constexpr):
        h, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        n_valid = tl.minimum(tl.load(pos_ptr + b * s_pos) // SPLIT + 1, N_SPLITS)  # splits holding positions <= pos
        if PDL:
            tl.extra.cuda.gdc_wait()
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        o = _combine_splits(acc_ptr, m_ptr, l_ptr, (b * H + h) * N_SPLITS, n_valid, d, d_ok, D, BLOCK_S)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_chunks(H: int, k: int, hpb: int) -> int:
    """Programs per (split, row) of the decode kernel: an upper bound of the sum over clusters of ceil(size / hpb)."""
    return min(H, (H + k * (hpb - 1)) // hpb)


@functools.lru_cache(maxsize=None)
def _n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_config(B: int, H: int, k: int, D: int, T: int, n_sms: int = 132) -> dict:
    """Block sizes and split length of the decode kernel for a shape (a pure function of the shapes).

    From a launch-config sweep (docs/performance.md, "decode kernel"): a whole mean-size cluster per program (HPB =
    H / k, up to 8) so the representative's K tile is read once for its members, 32 positions per tile, and the
    fewest splits that still launch ~1.5 programs per SM. HPB is 1 in the dense special case, so no lane is padding.
    """
    hpb = min(8, triton.next_power_of_2(max(1, round(H / k))))
    block_t = 64 if hpb == 1 else 32
    n_chunks = decode_chunks(H, k, hpb)
    split = max(block_t, DECODE_MIN_SPLIT)
    while split < T and (B * n_chunks * triton.cdiv(T, 2 * split) >= 1.5 * n_sms
                         or triton.cdiv(T, split) > DECODE_MAX_SPLITS):
        split *= 2
    return dict(hpb=hpb, block_t=block_t, split=split, num_warps=4, num_stages=2)


def decode_launch(q, k_cache, v_cache, k_new, v_new, cos, sin, members, cluster_start, slot_of_rep, pos, scale, *,
                  hpb=None, block_t=None, split=None, num_warps=None, num_stages=None):
    """The launcher behind new_token_decode (members None: dense, every head its own cluster, no lists read).

    Keyword overrides are for tests and tuning; see decode_config."""
    B, k, D = q.shape
    dense = members is None
    H, Hkv, T = k if dense else members.shape[1], v_cache.shape[1], v_cache.shape[2]
    cfg = decode_config(B, H, k, D, T, _n_sms(q.device))
    hpb, block_t = 1 if dense else hpb or cfg["hpb"], block_t or cfg["block_t"]
    split, num_warps, num_stages = split or cfg["split"], num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    n_splits = triton.cdiv(T, split)
    n_chunks = decode_chunks(H, k, hpb)
    rope = cos is not None
    q, k_cache, v_cache, k_new, v_new = _unit_stride(q, k_cache, v_cache, k_new, v_new)
    pos, s_pos, s_rope = _row_strides(pos, cos)
    cos, sin = _rope_args(cos, sin, q)
    if dense:
        members = cluster_start = slot_of_rep = pos  # unused pointers
    else:
        members, cluster_start, slot_of_rep = members.contiguous(), cluster_start.contiguous(), slot_of_rep.contiguous()
    out = torch.empty(B, H, D, dtype=v_cache.dtype, device=v_cache.device)
    if n_splits == 1:
        acc = m = l = out  # unused
    else:
        acc = torch.empty(B, H, n_splits, D, dtype=torch.float32, device=out.device)
        m = torch.empty(B, H, n_splits, dtype=torch.float32, device=out.device)
        l = torch.empty_like(m)
    block_d = triton.next_power_of_2(D)
    block_s = min(32, triton.next_power_of_2(n_splits))
    pdl = _pdl_kwargs(out.device)
    # the last split of a chunk combines all of its heads in turn: worth saving a launch only while that tail is short
    fused = n_splits > 1 and hpb * n_splits <= FUSED_COMBINE_MAX_PARTIALS
    counts = _split_counters(out.device, B * n_chunks) if fused else None
    _decode_split_kernel[(n_chunks, n_splits, B)](
        q, k_cache, v_cache, k_new, v_new, cos, sin, members, cluster_start, slot_of_rep, pos,
        acc, m, l, counts if counts is not None else pos, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1), out.stride(0), out.stride(1), scale * math.log2(math.e), split, n_splits, n_chunks,
        s_pos, s_rope, H=H, K=k, G=H // Hkv, D=D, N_SLOTS=k_cache.shape[1], HKV=Hkv, HPB=hpb, BLOCK_T=block_t, BLOCK_D=block_d,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_S=block_s, ONE_SPLIT=n_splits == 1, STAGES=num_stages, DENSE=dense,
        ROPE=rope, FUSED_COMBINE=counts is not None, num_warps=num_warps, **pdl)
    if n_splits > 1 and counts is None:
        _decode_combine_kernel[(H, B)](acc, m, l, pos, out, out.stride(0), out.stride(1), split, n_splits, s_pos,
                                       H=H, D=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4, **pdl)
    return out


# The last split of a chunk to finish combines the partials of the chunk's heads (one launch instead of two), while a
# program combines at most this many (heads x splits): dense at T=512 (1 head x 8 splits) gains from it, CHAI at
# T=8192 (8 heads x 16 splits) would serialise too much in one program (docs/performance.md, "decode kernel").
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


@torch.library.custom_op("chai_models::new_token_decode", mutates_args=("k_cache", "v_cache"))
def new_token_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float, members: torch.Tensor | None, cluster_start: torch.Tensor | None,
                     slot_of_rep: torch.Tensor | None) -> torch.Tensor:
    """One decode token's RoPE, its cache write and its attention, in one launch -> out [B, H, D] (v's dtype).

    q [B, C, D], k [B, n_slots, D], v [B, Hkv, D]: the token's projections (q of the representatives, k of the K
    slots), without RoPE; cos, sin [D] or [1, D], or [B, D] per row: RoPE at pos (rotate-half, HF layout), or None;
    k_cache [B_max, n_slots, T, D], v_cache [B_max, Hkv, T, D] with B <= B_max: RoPE(k) and v are written at pos [1]
    (every row) or [B, 1] (each row its own; on the device), rows 0..pos are attended. members [B, H] (query heads sorted by cluster), cluster_start [B, C+1] (fast.attention.cluster_lists),
    slot_of_rep [B, C]; or all None: dense attention (C == H, head h reads KV head h // G).
    out[b, h] = softmax(q_rep(c) . K_slot(c)[:pos+1]^T * scale) @ V[h // G, :pos+1] for h's cluster c, sums in fp32.
    An opaque op, so torch.compile keeps it one node and CUDA graphs capture its launches.
    """
    return decode_launch(q, k_cache, v_cache, k, v, cos, sin, members, cluster_start, slot_of_rep, pos, scale)


@new_token_decode.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos, scale, members, cluster_start, slot_of_rep):
    return v.new_empty(q.shape[0], q.shape[1] if members is None else members.shape[1], q.shape[2])
