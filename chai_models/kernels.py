"""Fused GPU kernels (Triton) for CHAI's clustering. Optional: used on CUDA when triton is importable.

The reference math is chai.agglomerative_average; this is the same algorithm in one kernel launch per layer
instead of ~15 launches per merge (H - k merges), which is what keeps CHAI's prefill from being slower than
dense attention. One program clusters one sequence: the H x H distance matrix lives in registers.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: chai.py uses its torch implementation
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _agglomerative_kernel(dist_ptr, labels_ptr, H: tl.constexpr, n_merges: tl.constexpr, BH: tl.constexpr):
        b = tl.program_id(0)
        r = tl.arange(0, BH)
        rows, cols = r[:, None], r[None, :]
        inside = (rows < H) & (cols < H)
        d = tl.load(dist_ptr + b * H * H + rows * H + cols, mask=inside, other=float("inf"))
        d = tl.where(rows == cols, float("inf"), d)  # [BH, BH]; inf: no pair
        size = tl.where(r < H, 1.0, 0.0)
        labels = r
        for _ in range(n_merges):
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
        tl.store(labels_ptr + b * H + r, labels.to(tl.int64), mask=r < H)


def agglomerative_average(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Same contract as chai.agglomerative_average: dist [B, H, H] -> labels [B, H] (lowest member index)."""
    B, H, _ = dist.shape
    d = dist.float().contiguous()
    labels = torch.empty(B, H, dtype=torch.long, device=dist.device)
    BH = max(16, triton.next_power_of_2(H))
    _agglomerative_kernel[(B,)](d, labels, H, H - k, BH=BH, num_warps=4 if BH <= 32 else 8)
    return labels
