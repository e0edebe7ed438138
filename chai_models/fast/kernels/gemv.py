"""Projections of a few rows (decode tokens): a one-row GEMV with the norm before it (LLaMA's RMSNorm, OPT's
LayerNorm) and SwiGLU, ReLU or the residual add after it folded in (batch 1); a small-M GEMM for 2..32 rows with the
same epilogues, its norm left to inductor's kernel before it (batched decode); and `linear`, which uses them inside
torch.compile."""
from __future__ import annotations

import torch

from ...models.llama import RMSNorm
from .common import _pdl_kwargs, available, triton
from .silu_mul import silu_mul

if triton is not None:
    import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# One-row GEMV: y = W x for a single token (B = S = 1 decode), the bulk of a decode step's bytes.
#
# One launch serves up to three weights of one K (Q, K and V; or SwiGLU's gate and up), and folds in what sits
# around a projection in a LLaMA block, so that none of it is a launch of its own:
#   - a norm prologue: llama.RMSNorm's math and roundings, or nn.LayerNorm's (mean and variance in fp32, one
#     rounding of the output); each program recomputes the statistics of the 8 KB of x it needs, in one pass
#     (two passes, mean then variance, ran OPT-6.7B's decode 2.4% slower: docs/performance.md, "OPT decode");
#   - SwiGLU: a program reads the same rows of gate and up and writes silu(gate x) * (up x);
#   - a bias, ReLU, and a residual add.
# Each program owns BLOCK_N rows and walks K in BLOCK_K tiles, one tile loaded ahead. The weights do not depend on
# the previous kernel, so under PDL the first tile is requested before gdc_wait: the weight stream starts while
# the previous kernel drains. It reads the weights faster than inductor's tuned reductions of the same products
# (docs/performance.md, "dense decode").

if triton is not None:

    @triton.jit
    def _segment(w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, N0, N1, N2, BLOCK_N: tl.constexpr):
        # programs 0..nb0-1 take weight 0, then weight 1, then weight 2; outputs are concatenated in that order:
        # this program's weight and bias, their row count, its first row and its first output column
        pid = tl.program_id(0)
        nb0 = tl.cdiv(N0, BLOCK_N)
        nb1 = tl.cdiv(N1, BLOCK_N)
        if pid < nb0:
            w_ptr, b_ptr, n_rows, row0, out0 = w0_ptr, b0_ptr, N0, pid * BLOCK_N, 0
        elif pid < nb0 + nb1:
            w_ptr, b_ptr, n_rows, row0, out0 = w1_ptr, b1_ptr, N1, (pid - nb0) * BLOCK_N, N0
        else:
            w_ptr, b_ptr, n_rows, row0, out0 = w2_ptr, b2_ptr, N2, (pid - nb0 - nb1) * BLOCK_N, N0 + N1
        return w_ptr, b_ptr, n_rows, row0, out0

    @triton.jit
    def _gemv_kernel(x_ptr, g_ptr, gb_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, N0, N1,
                     N2, eps, K: tl.constexpr, NORM: tl.constexpr, LAYER_NORM: tl.constexpr, SWIGLU: tl.constexpr,
                     RELU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        w_ptr, b_ptr, n_rows, row0, out0 = _segment(w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, N0, N1, N2, BLOCK_N)
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
        mean = 0.0
        if NORM and LAYER_NORM:  # one pass over x for both moments, shifted by x[0] against cancellation
            shift = tl.load(x_ptr).to(tl.float32)
            sx = tl.zeros([BLOCK_K], dtype=tl.float32)
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)
                xk = tl.where(k0 + ks < K, xk - shift, 0.0)
                sx += xk
                sq += xk * xk
            m = tl.sum(sx, 0) / K
            mean = m + shift
            # 1/std(x), the biased variance as nn.LayerNorm takes it
            inv_rms = 1.0 / tl.sqrt(tl.maximum(tl.sum(sq, 0) / K - m * m, 0.0) + eps)
        elif NORM:  # 1/rms(x)
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
            if NORM and LAYER_NORM:  # (x - mean) / std * weight + bias in fp32, one rounding, as nn.LayerNorm
                gk = tl.load(g_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
                bk = tl.load(gb_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
                xk = ((xk.to(tl.float32) - mean) * inv_rms * gk + bk).to(xk.dtype)
            elif NORM:  # weight * (x * inv_rms).to(dtype), rounded as llama.RMSNorm rounds it
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
        if RELU:  # F.relu(W x + b): the rounding commutes with it
            y = tl.maximum(y, 0.0)
        if HAS_RES:  # residual + (W x).to(dtype)
            y = tl.load(res_ptr + rows, mask=r_ok, other=0.0).to(tl.float32) + y.to(odt).to(tl.float32)
        tl.store(out_ptr + out0 + rows, y.to(odt), mask=r_ok)


# ----------------------------------------------------------------------------------------------------
# Small-M GEMM: Y = X W^T for 2..MAX_ROWS rows (batched decode), with the one-row GEMV's epilogues.
#
# At 8 rows cuBLAS reads LLaMA-2-7B's weights at 2.4-4.0 TB/s (wo and down the slowest); this kernel reads them at
# 2.9-4.2 TB/s (docs/performance.md, "small-M GEMM"). Each program owns BLOCK_N weight rows and walks all of K: a
# tile of W [BLOCK_N, BLOCK_K] times the rows' tile of x, transposed [BLOCK_K, BLOCK_M], on the tensor cores (the
# rows padded to BLOCK_M >= 16, masked), so every weight byte is read once and the accumulator stays [BLOCK_N,
# BLOCK_M]. No split over K: the epilogue (SwiGLU, ReLU) needs whole sums. The norm before it is not folded in
# (`linear` applies it first): its per-row statistics would be a serial pass over x in every program, which cost
# more than the separate norm kernel saves (docs/performance.md, "small-M GEMM").

if triton is not None:

    @triton.jit
    def _rows_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, M, N0, N1, N2,
                     K: tl.constexpr, SWIGLU: tl.constexpr, RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RES: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        w_ptr, b_ptr, n_rows, row0, out0 = _segment(w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, N0, N1, N2, BLOCK_N)
        n_out = N0 + N1 + N2
        rows = row0 + tl.arange(0, BLOCK_N)  # weight rows = output columns
        r_ok = rows < n_rows
        ms = tl.arange(0, BLOCK_M)  # the token rows
        m_ok = ms < M
        ks = tl.arange(0, BLOCK_K)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x and the residual are the previous kernel's output
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_N, BLOCK_K]
        u_ptrs = w1_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # SWIGLU: the same rows of up
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            xt = tl.load(x_ptr + ms[None, :] * K + k0 + ks[:, None], mask=m_ok[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_M]
            w = tl.load(w_ptrs + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:  # fp32 weights: full-precision products, not TF32
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
            if SWIGLU:
                u = tl.load(u_ptrs + k0, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                if IEEE:
                    acc_u = tl.dot(u, xt, acc_u, input_precision="ieee")
                else:
                    acc_u = tl.dot(u, xt, acc_u)
        odt = out_ptr.dtype.element_ty
        y = acc  # [BLOCK_N, BLOCK_M], fp32
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
        if SWIGLU:  # F.silu(gate x) * (up x), each product rounded to the output dtype as the torch path does
            u = acc_u
            if HAS_BIAS:
                u += tl.load(b1_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
            g = y.to(odt).to(tl.float32)
            y = (g / (1.0 + tl.exp(-g))).to(odt).to(tl.float32) * u.to(odt).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        ok = r_ok[:, None] & m_ok[None, :]
        if HAS_RES:  # residual + (W x).to(dtype)
            res = tl.load(res_ptr + ms[None, :] * n_out + rows[:, None], mask=ok, other=0.0)
            y = res.to(tl.float32) + y.to(odt).to(tl.float32)
        tl.store(out_ptr + ms[None, :] * n_out + out0 + rows[:, None], y.to(odt), mask=ok)


def gemv_config(K: int, swiglu: bool, layer_norm: bool = False) -> dict:
    """BLOCK_N, BLOCK_K, num_warps of _gemv_kernel for weights of K columns (the row count never decides it).

    The winners of launch-config sweeps over the projections of LLaMA-2-7B (docs/performance.md, "dense decode")
    and of OPT-6.7B ("OPT decode"): LLaMA's fused Q/K/V, wo and the output head share one, gate+up and down each
    get their own; OPT's LayerNorm prologue (Q/K/V, fc1) wants more rows per program and shorter tiles, and its
    16384-wide fc2 two rows and long tiles. The K rules reach shapes neither sweep timed: K >= 16384 also takes
    the down projections of LLaMA-33B and larger (intermediate sizes 17920-28672), 8192 <= K < 16384 those of
    LLaMA-13B (13824).
    """
    if swiglu:
        bn, bk, warps = 4, 1024, 4
    elif layer_norm:
        bn, bk, warps = 16, 512, 4
    elif K >= 16384:
        bn, bk, warps = 2, 2048, 4
    elif K >= 8192:
        bn, bk, warps = 1, 1024, 8
    else:
        bn, bk, warps = 4, 2048, 8
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


MAX_ROWS = 32  # rows up to which `linear` takes the kernels inside torch.compile; more go to cuBLAS


def rows_config(n_rows: int, K: int, M: int, swiglu: bool, itemsize: int) -> dict:
    """BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages of _rows_kernel for M rows through weights of n_rows
    x K: the winners of sweeps over LLaMA-2-7B's and OPT-6.7B's projections at M = 8 and 32 (docs/performance.md,
    "small-M GEMM").
    Stages are cut to what fits in shared memory for wider dtypes (fp32)."""
    bm = max(16, triton.next_power_of_2(M))
    if swiglu:  # 32 gate rows and the 32 matching up rows per program: the bytes of the 64-row winner
        bn, bk, stages = 32, 128, 3
    elif K >= 16384:  # OPT-6.7B's fc2 (and the down projections of LLaMA-33B and larger)
        bn, bk, stages = (32, 512, 4) if bm <= 16 else (32, 512, 3)
    elif K >= 8192:  # down
        bn, bk, stages = (64, 256, 5) if bm <= 16 else (32, 256, 5)
    elif n_rows <= 4096:  # wo
        bn, bk, stages = 32, 512, 3
    else:  # Q/K/V; with 16384 rows or more (OPT's fc1, the output heads) a stage deeper
        bn, bk, stages = 64, 128, 3 if n_rows < 16384 else 4
    bk = min(bk, max(16, triton.next_power_of_2(K)))
    stages = max(1, min(stages, ROWS_SHARED_BYTES // rows_stage_bytes(bm, bn, bk, swiglu, itemsize)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=stages)


ROWS_SHARED_BYTES = 200 * 1024  # the shared memory _rows_kernel's pipeline stages may take (an H100/H200 SM: 227 KB)


def rows_stage_bytes(bm: int, bn: int, bk: int, swiglu: bool, itemsize: int) -> int:
    """Shared memory of one pipeline stage of _rows_kernel: a tile of x and one (SwiGLU: two) tile of weight rows."""
    return (bn * (2 if swiglu else 1) + bm) * bk * itemsize


def gemv_launch(x, weights, biases, norm_weight, norm_bias, eps, residual, swiglu, relu, config=None):
    """The op's launch (the contract is gemv's). config: a launch config in place of gemv_config's or rows_config's,
    for the sweeps of tools/bench_projections.py."""
    K = x.shape[-1]
    M = x.numel() // K
    x = x.contiguous()
    ns = [w.shape[0] for w in weights]
    if swiglu:
        ns = [ns[0]]
    n_out = sum(ns)
    out = x.new_empty(*x.shape[:-1], n_out)
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    bs = list(biases) + [ws[0]] * (3 - len(biases))  # unused pointers where there is no bias
    ns = ns + [0] * (3 - len(ns))
    res = residual.contiguous() if residual is not None else x
    if M == 1:
        cfg = config or gemv_config(K, swiglu, norm_bias is not None)
        grid = (sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns),)
        _gemv_kernel[grid](x, norm_weight if norm_weight is not None else x,
                           norm_bias if norm_bias is not None else x, *ws, *bs, res, out, ns[0], ns[1], ns[2], eps,
                           K=K, NORM=norm_weight is not None, LAYER_NORM=norm_bias is not None, SWIGLU=swiglu,
                           RELU=relu, HAS_BIAS=bool(biases), HAS_RES=residual is not None, **cfg,
                           **_pdl_kwargs(x.device))
    else:
        if norm_weight is not None:
            raise ValueError("gemv: the norm is folded in for one row only; normalize several rows first")
        cfg = config or rows_config(n_out, K, M, swiglu, x.element_size())
        grid = (sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns),)
        _rows_kernel[grid](x, *ws, *bs, res, out, M, ns[0], ns[1], ns[2], K=K, SWIGLU=swiglu, RELU=relu,
                           HAS_BIAS=bool(biases), HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, **cfg,
                           **_pdl_kwargs(x.device))
    return out


@torch.library.custom_op("chai_models::gemv", mutates_args=())
def gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], norm_weight: torch.Tensor | None,
         norm_bias: torch.Tensor | None, eps: float, residual: torch.Tensor | None, swiglu: bool,
         relu: bool) -> torch.Tensor:
    """x [..., K] (1..MAX_ROWS rows in the leading dims) through up to three weights [N_i, K] -> [..., sum N_i]: one
    row by the GEMV kernel, more by the small-M GEMM.

    biases: one per weight, or empty. norm_weight alone: RMSNorm x first (llama.RMSNorm, eps); with norm_bias:
    LayerNorm (nn.LayerNorm, eps); one row only. swiglu: two weights of one shape, out = silu(W0 x) * (W1 x)
    [..., N_0]. relu: out = relu(W x + b). residual [..., N]: out = residual + W x. An opaque op, so torch.compile
    keeps it one launch. The contract and the checks live in kernels.linear.
    """
    return gemv_launch(x, weights, biases, norm_weight, norm_bias, eps, residual, swiglu, relu)


@gemv.register_fake
def _(x, weights, biases, norm_weight, norm_bias, eps, residual, swiglu, relu):
    n = weights[0].shape[0] if swiglu else sum(w.shape[0] for w in weights)
    return x.new_empty(*x.shape[:-1], n)


def _weight_bias(m):  # an nn.Linear, a (weight, bias) pair, or a bare weight
    if isinstance(m, torch.nn.Module):
        return m.weight, m.bias
    return tuple(m) if isinstance(m, (tuple, list)) else (m, None)


def norm_in_kernel(norm, K: int) -> bool:
    """Whether the kernel has this norm module's math: llama.RMSNorm, or an affine nn.LayerNorm over the last dim."""
    if type(norm) is RMSNorm:
        return norm.weight.shape == (K,)
    return (type(norm) is torch.nn.LayerNorm and norm.normalized_shape == (K,) and norm.weight is not None
            and norm.bias is not None)


def fold_norm(x: torch.Tensor, norm):
    """(x, norm_weight, norm_bias, eps) as the kernels take a norm module: folded into the GEMV for one row; applied
    first for several (inductor's kernel inside a compiled graph), which the small-M GEMM then reads normalized."""
    if norm is not None and x.numel() != x.shape[-1]:
        x, norm = norm(x), None
    if norm is None:
        return x, None, None, 0.0
    return x, norm.weight, norm.bias if isinstance(norm, torch.nn.LayerNorm) else None, float(norm.eps)


def gemv_applies(x: torch.Tensor, weights, biases=(), norm=None, residual=None, swiglu=False, relu=False) -> bool:
    """Whether `linear` runs this call as one kernel launch (_gemv_kernel for one row, _rows_kernel for up to
    MAX_ROWS): inside torch.compile (where CUDA graphs make its launch free; in eager decode cuBLAS's launches cost
    less host time than a Triton launch)."""
    if not torch.compiler.is_compiling():
        return False
    if not available(x) or not 1 <= x.numel() // max(x.shape[-1], 1) <= MAX_ROWS or not 1 <= len(weights) <= 3:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *weights, *biases)):
        return False  # no backward
    K, dt = x.shape[-1], x.dtype
    if any(w.dim() != 2 or w.shape[1] != K or w.dtype != dt or not w.is_contiguous() for w in weights):
        return False
    if biases and any(b is None or b.dtype != dt or b.shape != (w.shape[0],) for w, b in zip(weights, biases)):
        return False
    if norm is not None and not (norm_in_kernel(norm, K) and all(t.dtype == dt for t in norm.parameters())):
        return False
    if swiglu and (relu or len(weights) != 2 or weights[0].shape != weights[1].shape):
        return False
    return residual is None or (residual.shape == (*x.shape[:-1], weights[0].shape[0]) and residual.dtype == dt)


def linear(x: torch.Tensor, linears, norm=None, residual=None, swiglu=False, relu=False, packed=None):
    """The projections of a block, with what surrounds them, in one call.

    linears: nn.Linear modules, (weight, bias) pairs or bare weights, sharing an input; norm: an RMSNorm or LayerNorm
    module applied to x first; swiglu: out = silu(l0(x)) * l1(x); relu: out = relu(l(x)) for each linear; residual:
    out = residual + l0(x); packed: (weight, bias or None) holding the linears' weights (and biases) stacked in
    order, which the torch path multiplies by as one GEMM (fast.blocks.pack). Returns one tensor,
    or with several linears and no swiglu a tuple, one per linear. Up to MAX_ROWS tokens on CUDA (decode) in a
    compiled graph: one kernel launch (gemv_applies), the norm folded in for one token and applied first for more;
    otherwise the plain torch ops, which are also the reference.
    """
    if residual is not None and (swiglu or relu or len(linears) != 1):
        raise ValueError("linear: a residual goes with exactly one linear and no swiglu or relu")
    if swiglu and relu:
        raise ValueError("linear: swiglu and relu are two different activations; pass one")
    wb = [_weight_bias(m) for m in linears]
    weights = [w for w, _ in wb]
    biases = [b for _, b in wb] if any(b is not None for _, b in wb) else []
    if gemv_applies(x, weights, biases, norm, residual, swiglu, relu):
        x, norm_weight, norm_bias, eps = fold_norm(x, norm)
        out = gemv(x, weights, biases, norm_weight, norm_bias, eps, residual, swiglu, relu)
        if len(weights) == 1 or swiglu:
            return out
        return out.split([w.shape[0] for w in weights], dim=-1)
    h = norm(x) if norm is not None else x
    if packed is not None:  # views of one product: [..., sum N_i] -> [..., N_i] each
        ys = torch.nn.functional.linear(h, *packed).split([w.shape[0] for w in weights], dim=-1)
    else:
        ys = [torch.nn.functional.linear(h, w, b) for w, b in wb]
    if swiglu:
        return silu_mul(ys[0], ys[1])
    if relu:
        ys = [torch.relu(y) for y in ys]
    if residual is not None:
        return residual + ys[0]
    return ys[0] if len(ys) == 1 else tuple(ys)
