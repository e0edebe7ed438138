"""CHAI's per-request membership step in one launch per layer (reference: chai.ChaiAttention.membership)."""
from __future__ import annotations

import torch

from .common import triton

if triton is not None:
    import triton.language as tl

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

        # the decode kernel's lists (reference: fast.attention.cluster_lists): heads sorted by (cluster, index)
        before = (h2c[None, :] < h2c[:, None]) | ((h2c[None, :] == h2c[:, None]) & (cols < rows))
        slot = tl.sum(tl.where(before & (cols < H), 1, 0), axis=1)  # [BH] place of head h in members
        tl.store(members_ptr + b * H + slot, r.to(tl.int64), mask=r < H)
        first = tl.sum(tl.where((h2c[None, :] < rows) & (cols < H), 1, 0), axis=1)  # [BH] first entry of cluster c
        tl.store(start_ptr + b * (K + 1) + r, first.to(tl.int64), mask=r < K)
        tl.store(start_ptr + b * (K + 1) + K, H)

        # K slots (reference: ChaiAttention.membership): one per representative, or every KV head
        rep_kv = rep // GROUP
        if SLOTS_ARE_REPS:
            tl.store(kv_of_slot_ptr + b * K + r, rep_kv.to(tl.int64), mask=r < K)
            tl.store(slot_of_rep_ptr + b * K + r, r.to(tl.int64), mask=r < K)
        else:
            tl.store(kv_of_slot_ptr + b * HKV + r, r.to(tl.int64), mask=r < HKV)
            tl.store(slot_of_rep_ptr + b * K + r, rep_kv.to(tl.int64), mask=r < K)


def membership(features: torch.Tensor, k: int, medoid: bool = True, group: int = 1, n_slots: int | None = None,
               out: tuple | None = None) -> tuple:
    """CHAI's whole per-request membership step in one launch per layer (one program per sequence): cosine
    distances, average-linkage clustering, canonical cluster ids, representatives, the decode kernel's lists and
    the K slots. In torch this is ~50 small launches per layer (chai.ChaiAttention.membership, fast.attention.cluster_lists),
    enough to make CHAI's prefill host-bound.

    features [B, H, F] -> (rep_idx [B, k], head_to_cluster [B, H], kv_of_slot [B, n_slots], slot_of_rep [B, k],
    members [B, H], cluster_start [B, k+1]), all int64, written into out (contiguous tensors) when given.
    n_slots: None or k for one K slot per representative (k < n_kv_heads), else n_kv_heads = H // group (K whole,
    slot i holding KV head i, also when k == n_kv_heads).
    """
    B, H, F = features.shape
    n_slots = k if n_slots is None else n_slots
    if out is None:
        z = dict(dtype=torch.long, device=features.device)
        out = tuple(torch.empty(B, n, **z) for n in (k, H, n_slots, k, H, k + 1))
    assert all(t.is_contiguous() and t.dtype == torch.long for t in out), "membership: out must be contiguous int64"
    BH = max(16, triton.next_power_of_2(H))
    _membership_kernel[(B,)](features.float().contiguous(), *out, F, H, k, group, H // group,
                             n_slots == k and k < H // group, medoid,
                             BH=BH, num_warps=4 if BH <= 32 else 8)
    return out
