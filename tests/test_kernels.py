"""The Triton kernels (chai_models.fast.kernels) against their torch references, in-process: each kernel alone, then
whole tiny models on the "triton" backend against "torch". fp32, relative error < 1e-5 (TOL).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so every launcher runs its kernel
interpreted on CPU tensors; with one, the same tests run the compiled kernels on CUDA. The sm90 compile tests at the
end build every kernel for Hopper without a GPU: the interpreter runs kernels as NumPy and misses what only the
compiler rejects. Shapes are small: the interpreter runs each program of a grid in Python.

STALE: what a cache holds at and past pos before a decode token: any read of a stale row shows as a huge error, and
the row at pos must be the new token's (written by the kernel).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from conftest import rel_err  # noqa: E402

from chai_models import ChaiConfig, chai, set_backend, set_chai  # noqa: E402
from chai_models.chai import ChaiAttention  # noqa: E402
from chai_models.fast import attention as fast_attention  # noqa: E402
from chai_models.fast import kernels  # noqa: E402
from chai_models.fast.attention import cluster_lists  # noqa: E402
from chai_models.fast.kernels import decode, gemv, membership, probs, rope_cache, silu_mul, window  # noqa: E402
from chai_models.models.llama import Llama, LlamaConfig, RMSNorm, apply_rope  # noqa: E402
from chai_models.models.opt import OPT, OPTConfig  # noqa: E402
from chai_models.models.shared import KVCache, attention  # noqa: E402

STALE = 1e4
TOL = 1e-5

# interpreted on CPU tensors, or (a GPU and no TRITON_INTERPRET) compiled on CUDA tensors
DEVICE = "cpu" if kernels.interpreted() or not torch.cuda.is_available() else "cuda"
needs_kernels = pytest.mark.skipif(not kernels.available(torch.zeros(1, device=DEVICE)),
                                   reason="the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1")


def ids(table):
    return pytest.mark.parametrize("name", list(table))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


# ----------------------------------------------------------------------------------------------------
# Decode inputs: a membership, a token's projections, caches with stale rows


def random_membership(gen, B, H, Hkv, k, dense=False):
    """Per row: head_to_cluster [B, H] with exactly k (uneven) clusters, slot_of_rep [B, k], n_slots. dense: every
    head its own cluster, reading its KV head."""
    G = H // Hkv
    if dense:
        return torch.arange(H).expand(B, H), (torch.arange(H) // G).expand(B, H), Hkv
    rows = []
    for _ in range(B):
        labels = torch.cat([torch.arange(k), torch.randint(0, k, (H - k,), generator=gen)])
        rows.append(labels[torch.randperm(H, generator=gen)])
    h2c = chai.canonical_labels(torch.stack(rows), k)
    n_slots = chai.n_k_slots(k, H, Hkv)
    if n_slots == k:  # slot c holds representative c's K (ChaiAttention's rule), here in a shuffled order
        slot_of_rep = torch.stack([torch.randperm(k, generator=gen) for _ in range(B)])
    else:  # K whole: representative c reads its KV head
        slot_of_rep = torch.randint(0, Hkv, (B, k), generator=gen)
    return h2c, slot_of_rep, n_slots


def token_inputs(B, H, Hkv, k, D, T, pos, dense=False, strided=False, rope=True, seed=0, device=DEVICE,
                 dtype=torch.float32):
    """A decode token at pos: q [B, k, D], its K rows [B, n_slots, D] and V rows [B, Hkv, D] before RoPE; caches
    with one more sequence than B (it must stay untouched) and STALE rows at and past pos of the first B; cos, sin
    [D] at pos (None without RoPE); the caches as they must be after the token (k_ref, v_ref)."""
    gen = torch.Generator().manual_seed(seed)
    h2c, slot_of_rep, n_slots = random_membership(gen, B, H, Hkv, k, dense)
    members, start = cluster_lists(h2c, k)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if strided:  # views with other strides, as slices of larger tensors and a transposed cache give
        q, k_new, v_new = rand(B, k, 2 * D)[..., :D], rand(B, n_slots, 2 * D)[..., D:], rand(B, Hkv, 3 * D)[..., :D]
        k_cache = rand(B + 2, n_slots, T, D)[1:]
        v_cache = rand(B + 1, T, Hkv, D).transpose(1, 2)
    else:
        q, k_new, v_new = rand(B, k, D), rand(B, n_slots, D), rand(B, Hkv, D)
        k_cache, v_cache = rand(B + 1, n_slots, T, D), rand(B + 1, Hkv, T, D)
    k_cache[:B, :, pos:] = STALE
    v_cache[:B, :, pos:] = STALE
    if rope:
        ang = (pos * 10000.0 ** (-torch.arange(0, D, 2) / D)).repeat(2)
        cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    else:
        cos = sin = None

    def rot(t):
        return t if cos is None else apply_rope(t, cos, sin)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:B, :, pos], v_ref[:B, :, pos] = rot(k_new), v_new
    idx = {n: t.to(device) for n, t in dict(h2c=h2c, slot_of_rep=slot_of_rep, members=members, start=start).items()}
    return SimpleNamespace(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, cos=cos, sin=sin,
                           rot=rot, k_ref=k_ref, v_ref=v_ref, pos=torch.tensor([pos], device=device),
                           mask=torch.arange(T, device=device)[None, :] <= pos, **idx)


def check_cache_writes(x, B, pos):
    """The largest relative error of the written K and V rows at pos; fails if anything else was written."""
    errs = (rel_err(x.k_cache[:B, :, pos], x.k_ref[:B, :, pos]), rel_err(x.v_cache[:B, :, pos], x.v_ref[:B, :, pos]))
    x.k_cache[:B, :, pos], x.v_cache[:B, :, pos] = x.k_ref[:B, :, pos], x.v_ref[:B, :, pos]
    assert torch.equal(x.k_cache, x.k_ref) and torch.equal(x.v_cache, x.v_ref), "a kernel wrote outside the rows at pos"
    return max(errs)


def restore_stale(x, B, pos):
    """After opcheck ran an op that writes the caches: the caches as before it."""
    x.k_cache.copy_(x.k_ref), x.v_cache.copy_(x.v_ref)
    x.k_cache[:B, :, pos], x.v_cache[:B, :, pos] = STALE, STALE


def opcheck(op, args):
    r = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in r.values()), r


# ----------------------------------------------------------------------------------------------------
# decode.py: new_token_decode / decode_launch vs chai.clustered_attention's one-token branch

DECODE_CASES = {
    # name: (B, H, Hkv, k, D, T, pos, extra); extra: dense, strided, rope (default on), op (True: the custom op,
    # "opcheck"), combine ("kernel": a second launch combines the splits, "fused": the last split of a chunk does),
    # and decode_launch's overrides hpb, block_t, split. T = 80 with decode_config: two splits of 64 positions
    "mha_k3": (2, 8, 8, 3, 16, 80, 70, {}),
    "gqa_k1_d24_split_end": (1, 8, 2, 1, 24, 80, 63, {}),  # the second split past pos
    "gqa_k_lt_hkv_slots": (2, 12, 4, 3, 16, 80, 64, {}),  # pos alone in its split
    "gqa_k_ge_hkv_whole_pos_last": (1, 12, 4, 7, 24, 80, 79, {}),
    "dense_gqa_d24": (2, 8, 2, 8, 24, 80, 66, dict(dense=True)),
    "pos0": (1, 8, 8, 3, 16, 80, 0, {}),
    # several tiles per split, splits past pos, a partial last tile, pos at a split's start
    "tiles_splits_hpb2": (1, 8, 4, 3, 24, 40, 29, dict(split=16, block_t=8, hpb=2)),
    "tiles_splits_hpb1": (1, 8, 8, 2, 16, 40, 21, dict(split=16, block_t=16, hpb=1)),
    "tiles_splits_hpb4": (1, 12, 12, 2, 16, 40, 37, dict(split=32, block_t=16, hpb=4)),
    "dense_splits_pos_mid_tile": (1, 8, 2, 8, 24, 40, 27, dict(dense=True, split=16, block_t=8)),
    "dense_pos0_splits": (1, 8, 2, 8, 16, 40, 0, dict(dense=True, split=16, block_t=8)),
    "combine_kernel": (2, 8, 4, 3, 24, 40, 29, dict(split=16, block_t=8, hpb=2, combine="kernel")),
    "combine_kernel_dense_pos_last": (1, 8, 2, 8, 24, 40, 39, dict(dense=True, split=16, block_t=8,
                                                                   combine="kernel")),
    "combine_kernel_many_writers": (1, 16, 16, 3, 16, 40, 23, dict(split=16, block_t=8, combine="kernel")),
    "combine_fused_many": (1, 12, 12, 2, 16, 40, 37, dict(split=8, block_t=8, hpb=8, combine="fused")),
    "one_split": (1, 8, 4, 3, 16, 40, 25, dict(split=64, block_t=16)),
    "one_split_dense": (1, 8, 8, 8, 24, 40, 25, dict(split=64, dense=True)),
    "strided_views": (2, 8, 2, 3, 24, 40, 33, dict(strided=True, split=32)),
    "strided_views_dense": (1, 8, 2, 8, 16, 40, 30, dict(strided=True, dense=True, split=16, block_t=16)),
    "no_rope": (1, 8, 2, 3, 16, 40, 30, dict(rope=False, split=16)),
    "no_rope_dense": (1, 8, 4, 8, 16, 40, 30, dict(rope=False, dense=True, split=16)),
    "op": (1, 8, 2, 3, 24, 80, 57, dict(op=True)),
    "opcheck": (1, 8, 2, 3, 24, 40, 33, dict(op="opcheck")),
    "opcheck_dense": (1, 8, 2, 8, 16, 40, 39, dict(op="opcheck", dense=True)),
}


def decode_error(B, H, Hkv, k, D, T, pos, dense=False, strided=False, rope=True, op=False, device=DEVICE,
                 dtype=torch.float32, **launch):
    """The decode kernel for one token -> the largest relative error of its output (vs an fp64
    chai.clustered_attention over the caches the token must leave) and of the K and V rows it writes."""
    x = token_inputs(B, H, Hkv, k, D, T, pos, dense, strided, rope, device=device, dtype=dtype)
    scale = D ** -0.5
    ref = chai.clustered_attention(x.rot(x.q)[:, :, None].double(), x.k_ref[:B].double(), x.v_ref[:B].double(),
                                   x.h2c, x.slot_of_rep, x.mask, scale)[:, :, 0]
    if dense:  # the reference is dense attention
        sdpa = attention(x.rot(x.q)[:, :, None].double(), x.k_ref[:B].double(), x.v_ref[:B].double(), x.mask,
                         scale)[:, :, 0]
        assert rel_err(sdpa, ref) < 1e-12
    lists = (None, None, None) if dense else (x.members, x.start, x.slot_of_rep)
    args = (x.q, x.k_new, x.v_new, x.cos, x.sin, x.k_cache, x.v_cache, x.pos, scale, *lists)
    if op == "opcheck":  # schema and fake tensor (torch.compile) checks of the custom op
        opcheck(torch.ops.chai_models.new_token_decode.default, args)
        restore_stale(x, B, pos)
    if op:
        out = torch.ops.chai_models.new_token_decode(*args)
    else:
        out = decode.decode_launch(x.q, x.k_cache, x.v_cache, x.k_new, x.v_new, x.cos, x.sin, *lists, x.pos, scale,
                                   **launch)
    assert out.shape == (B, H, D) and out.dtype == dtype
    return max(rel_err(out, ref), check_cache_writes(x, B, pos))


@needs_kernels
@ids(DECODE_CASES)
def test_decode(name, monkeypatch):
    B, H, Hkv, k, D, T, pos, extra = DECODE_CASES[name]
    extra = dict(extra)
    combine = extra.pop("combine", None)
    if combine is not None:  # fused while hpb x n_splits <= FUSED_COMBINE_MAX_PARTIALS
        monkeypatch.setattr(decode, "FUSED_COMBINE_MAX_PARTIALS", 10**6 if combine == "fused" else 0)
    assert decode_error(B, H, Hkv, k, D, T, pos, **extra) < TOL


# ----------------------------------------------------------------------------------------------------
# probs.py: clustered_probs (RoPE, the cache writes, the probabilities), then probs_times_v

PROBS_CASES = {
    # name: (B, H, Hkv, k, D, T, pos, extra); split: CLUSTER_SCORES_SPLIT (128)
    "mha_k3": (2, 8, 8, 3, 16, 160, 150, {}),
    "pos_split_start": (1, 8, 8, 3, 16, 160, 128, dict(split=64)),  # pos alone in its split
    "pos0": (1, 8, 8, 3, 16, 64, 0, dict(split=32)),
    "pos_last_many_splits": (1, 8, 8, 3, 24, 64, 63, dict(split=16)),
    "k_lt_hkv_slots": (2, 12, 4, 3, 16, 64, 40, dict(split=32)),
    "k_ge_hkv_whole": (1, 12, 4, 7, 24, 64, 50, {}),
    "mha_k5_many_writers": (2, 16, 16, 5, 16, 100, 80, dict(split=32)),
    "no_rope": (1, 8, 2, 3, 16, 64, 57, dict(rope=False)),
    "opcheck": (1, 8, 8, 3, 16, 64, 57, dict(op="opcheck")),
}


def probs_error(B, H, Hkv, k, D, T, pos, rope=True, op=False, device=DEVICE, dtype=torch.float32):
    """clustered_probs then probs_times_v, as FastChaiAttention runs them past the decode kernel's range, vs fp64
    -> the largest relative error of the probabilities, the output and the written K and V rows. The probabilities
    must be exactly 0 past pos."""
    x = token_inputs(B, H, Hkv, k, D, T, pos, rope=rope, seed=2, device=device, dtype=dtype)
    scale = D ** -0.5
    q64 = x.rot(x.q).double()  # [B, k, D]
    k_rep = chai.batched_index(x.k_ref[:B].double(), x.slot_of_rep)  # [B, k, T, D]
    scores = torch.einsum("bcd,bctd->bct", q64, k_rep) * scale
    p_ref = chai.batched_index(torch.softmax(scores.masked_fill(~x.mask, float("-inf")), -1), x.h2c)  # [B, H, T]
    ref = chai.clustered_attention(q64[:, :, None], x.k_ref[:B].double(), x.v_ref[:B].double(), x.h2c,
                                   x.slot_of_rep, x.mask, scale)[:, :, 0]
    args = (x.q, x.k_new, x.v_new, x.cos, x.sin, x.k_cache, x.v_cache, x.pos, scale, x.h2c, x.slot_of_rep)
    if op == "opcheck":
        opcheck(torch.ops.chai_models.clustered_probs.default, args)
        restore_stale(x, B, pos)
    p = probs.clustered_probs(*args)
    assert p.shape == (B, H, T) and p.dtype == dtype
    assert not p[:, :, pos + 1:].any(), "probabilities past pos"
    out = probs.probs_times_v(p.view(B * Hkv, H // Hkv, T), x.v_cache[:B].reshape(B * Hkv, T, D)).view(B, H, D)
    return max(rel_err(p, p_ref), rel_err(out, ref), check_cache_writes(x, B, pos))


@needs_kernels
@ids(PROBS_CASES)
def test_clustered_probs(name, monkeypatch):
    B, H, Hkv, k, D, T, pos, extra = PROBS_CASES[name]
    extra = dict(extra)
    if "split" in extra:
        monkeypatch.setattr(probs, "CLUSTER_SCORES_SPLIT", extra.pop("split"))
    assert probs_error(B, H, Hkv, k, D, T, pos, **extra) < TOL


def test_probs_times_v_opcheck():
    gen = torch.Generator().manual_seed(0)
    opcheck(torch.ops.chai_models.probs_times_v.default,
            (torch.rand(4, 2, 7, generator=gen).to(DEVICE), randn(gen, 4, 7, 16)))


# ----------------------------------------------------------------------------------------------------
# rope_cache.py: rope_and_cache vs llama.apply_rope and KVCache.update

ROPE_CACHE_CASES = {  # name: (B, H, n_k, Hkv, D, T, pos, extra)
    "mha": (2, 8, 8, 8, 16, 20, 7, {}),
    "gqa_d24": (3, 8, 2, 2, 24, 20, 19, {}),
    "no_rope": (2, 4, 4, 4, 16, 20, 0, dict(rope=False)),
    "opcheck": (2, 8, 4, 4, 16, 20, 5, dict(op="opcheck")),
}


@needs_kernels
@ids(ROPE_CACHE_CASES)
def test_rope_and_cache(name):
    B, H, n_k, Hkv, D, T, pos, extra = ROPE_CACHE_CASES[name]
    rope, op = extra.get("rope", True), extra.get("op")
    gen = torch.Generator().manual_seed(3)
    q = randn(gen, B, 1, H, D).transpose(1, 2)  # [B, H, 1, D] as projected (strided)
    k = randn(gen, B, 1, n_k, D).transpose(1, 2)
    v = randn(gen, B, 1, Hkv, D).transpose(1, 2)
    k_cache, v_cache = randn(gen, B + 1, n_k, T, D), randn(gen, B + 1, Hkv, T, D)
    ang = (pos * 10000.0 ** (-torch.arange(0, D, 2) / D)).repeat(2).to(DEVICE)
    cos, sin = (ang.cos(), ang.sin()) if rope else (None, None)
    ref_cache = KVCache(B + 1, T, n_k, Hkv, D, torch.float32, DEVICE)  # the model's cache: the torch path
    ref_cache.k.copy_(k_cache), ref_cache.v.copy_(v_cache)
    rot = (lambda t: apply_rope(t, cos, sin)) if rope else (lambda t: t)
    pos_t = torch.tensor([pos], device=DEVICE)
    ref_cache.update(pos_t, rot(k), v)
    q_ref = rot(q)[:, :, 0]
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, k_cache, v_cache, pos_t)
    if op == "opcheck":
        opcheck(torch.ops.chai_models.rope_and_cache.default, args)
    q_out = rope_cache.rope_and_cache(*args)
    assert torch.equal(k_cache, ref_cache.k) and torch.equal(v_cache, ref_cache.v)
    assert rel_err(q_out, q_ref) < TOL


# ----------------------------------------------------------------------------------------------------
# Per-row positions (continuous batching): pos [B, 1] and RoPE rows [B, D] give each row what a launch for that row
# alone at its own position gives (each single-position path is checked against torch above)

PER_ROW_CASES = {  # name: (kernel, B, H, Hkv, k, D, T, positions, dense)
    "decode_clustered": ("decode", 3, 8, 4, 3, 16, 40, [0, 29, 17], False),
    "decode_dense": ("decode", 3, 8, 2, 8, 16, 40, [39, 4, 16], True),
    "probs": ("probs", 3, 8, 8, 3, 16, 64, [63, 0, 33], False),
    "rope_cache": ("rope_cache", 3, 8, 8, 8, 16, 20, [19, 2, 7], True),
}


def run_kernel(kernel, q, k_new, v_new, cos, sin, k_cache, v_cache, pos, scale, h2c, slot_of_rep, members, start):
    if kernel == "decode":
        lists = (None, None, None) if members is None else (members, start, slot_of_rep)
        return decode.decode_launch(q, k_cache, v_cache, k_new, v_new, cos, sin, *lists, pos, scale, split=16,
                                    block_t=8)
    if kernel == "probs":
        return probs.clustered_probs(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, scale, h2c, slot_of_rep)
    return rope_cache.rope_and_cache(q, k_new, v_new, cos, sin, k_cache, v_cache, pos)


@needs_kernels
@ids(PER_ROW_CASES)
def test_per_row_positions(name, monkeypatch):
    kernel, B, H, Hkv, k, D, T, positions, dense = PER_ROW_CASES[name]
    monkeypatch.setattr(probs, "CLUSTER_SCORES_SPLIT", 16)
    gen = torch.Generator().manual_seed(5)
    h2c, slot_of_rep, n_slots = random_membership(gen, B, H, Hkv, k, dense)
    members, start = cluster_lists(h2c, k)
    idx = [t.to(DEVICE).contiguous() for t in (h2c, slot_of_rep, members, start)]
    if dense:
        idx[2] = idx[3] = None
    n_q = H if kernel == "rope_cache" else k
    q, k_new, v_new = randn(gen, B, n_q, D), randn(gen, B, n_slots, D), randn(gen, B, Hkv, D)
    k_cache, v_cache = randn(gen, B, n_slots, T, D), randn(gen, B, Hkv, T, D)
    pos = torch.tensor(positions, device=DEVICE)[:, None]  # [B, 1]
    cfg = LlamaConfig(vocab_size=8, hidden_size=D, intermediate_size=8, n_layers=1, n_heads=1, n_kv_heads=1,
                      head_dim=D)
    from chai_models.models.llama import rope_cos_sin, rope_inv_freq
    cos, sin = (t.reshape(B, D) for t in rope_cos_sin(rope_inv_freq(cfg).to(DEVICE), pos, torch.float32))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = run_kernel(kernel, q, k_new, v_new, cos, sin, kc, vc, pos, D ** -0.5, *idx)
    for b in range(B):
        r = slice(b, b + 1)
        kb, vb = k_cache[r].clone(), v_cache[r].clone()
        one = run_kernel(kernel, q[r], k_new[r], v_new[r], cos[r], sin[r], kb, vb, pos[b], D ** -0.5,
                         *(None if t is None else t[r] for t in idx))
        assert rel_err(out[r], one) < TOL, b
        assert torch.equal(kc[r], kb) and torch.equal(vc[r], vb), b


# ----------------------------------------------------------------------------------------------------
# silu_mul.py

SILU_CASES = {  # name: (shape, extra)
    "one_block": ((2, 1, 96), {}),
    "partial_block": ((3, 5, 1111), {}),  # 16665 elements: a partial last block
    "strided": ((2, 40, 30), dict(strided=True)),  # transposed views: the op makes them contiguous
    "halves": ((2, 3, 100), dict(halves=True)),  # the two halves of one packed projection: read in place
    "opcheck": ((2, 3, 64), dict(op="opcheck")),
    "grad": ((2, 3, 64), dict(op="grad")),  # a gradient is needed: silu_mul takes the torch path
}


@needs_kernels
@ids(SILU_CASES)
def test_silu_mul(name, monkeypatch):
    shape, extra = SILU_CASES[name]
    gen = torch.Generator().manual_seed(0)
    gate, up = (randn(gen, *shape) * 4 for _ in range(2))
    if extra.get("op") == "grad":
        g = gate.clone().requires_grad_()
        silu_mul.silu_mul(g, up).sum().backward()
        g_ref = gate.clone().requires_grad_()
        (torch.nn.functional.silu(g_ref) * up).sum().backward()
        assert rel_err(g.grad, g_ref.grad) < TOL
        return
    if extra.get("strided"):
        gate, up = gate.transpose(-1, -2), up.transpose(-1, -2)
    if extra.get("halves"):
        gate, up = torch.cat([gate, up], -1).split(shape[-1], -1)
        assert gate.stride(1) == 2 * shape[-1]
    if extra.get("op") == "opcheck":
        r = torch.library.opcheck(torch.ops.chai_models.silu_mul.default, (gate.bfloat16(), up.bfloat16()))
        assert all(x == "SUCCESS" for x in r.values()), r
    ref = torch.nn.functional.silu(gate) * up
    out = silu_mul.silu_mul_op(gate, up)
    assert out.shape == ref.shape and out.is_contiguous()
    assert rel_err(out, ref) < TOL
    assert rel_err(silu_mul.silu_mul(gate, up), ref) < TOL  # eager: the torch ops
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside a compiled graph: the op
    assert rel_err(silu_mul.silu_mul(gate, up), ref) < TOL


# ----------------------------------------------------------------------------------------------------
# gemv.py: linear's one-row GEMV and small-M GEMM (inside torch.compile only; here torch.compiler.is_compiling is
# patched)

GEMV_CASES = {
    # name: (rows per weight, K, extra); BLOCK_K = 512 at K = 333..512: a partial tile; rows not a multiple of BLOCK_N
    "qkv_gqa_norm_bias": ((40, 10, 10), 333, dict(norm=True, bias=True)),
    "qkv_fp16": ((64, 32, 32), 96, dict(norm=True, dtype=torch.float16)),
    "one_residual_bias": ((77,), 130, dict(residual=True, bias=True)),
    "swiglu_norm": ((50, 50), 200, dict(norm=True, swiglu=True)),
    "swiglu_bias": ((24, 24), 64, dict(swiglu=True, bias=True)),
    "long_k": ((9,), 9000, dict(residual=True)),  # K >= 8192: several K tiles
    "qkv_layer_norm_bias": ((40, 40, 40), 333, dict(norm="layer", bias=True)),  # OPT's attention input
    "fc1_layer_norm_relu": ((130,), 200, dict(norm="layer", bias=True, relu=True)),  # OPT's fc1
    "relu_fp16": ((64,), 96, dict(relu=True, dtype=torch.float16)),
    "opcheck": ((24, 8), 64, dict(norm=True, op="opcheck")),
    "opcheck_layer_norm_relu": ((24,), 64, dict(norm="layer", bias=True, relu=True, op="opcheck")),
    "grad": ((24,), 64, dict(op="grad")),  # a weight that needs a gradient: the torch path, and it flows
    "max_rows_swiglu_norm": ((40, 40), 200, dict(norm=True, swiglu=True, rows=gemv.MAX_ROWS)),  # BLOCK_M = 32
    "max_rows_layer_norm": ((40, 40, 40), 333, dict(norm="layer", bias=True, rows=gemv.MAX_ROWS)),
}


@pytest.fixture
def compiling(monkeypatch):
    """torch.compiler.is_compiling as `linear` sees it: state["on"] (True at first)."""
    state = {"on": True}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: state["on"])
    return state


# each case with one token (the GEMV kernel) and three (the small-M GEMM), or the token count the case names
GEMV_TOKENS = [(name, n) for name, (_, _, extra) in GEMV_CASES.items() for n in ([extra["rows"]] if "rows" in extra
                                                                                 else [1, 3])]


@needs_kernels
@pytest.mark.parametrize("name, n_tokens", GEMV_TOKENS, ids=[f"{name}-{n}" for name, n in GEMV_TOKENS])
def test_gemv(name, n_tokens, compiling):
    rows, K, extra = GEMV_CASES[name]
    dt, op = extra.get("dtype", torch.float32), extra.get("op")
    gen = torch.Generator().manual_seed(0)
    x = randn(gen, n_tokens, 1, K).to(dt)
    linears = [((randn(gen, n, K) / K**0.5).to(dt), randn(gen, n).to(dt) if extra.get("bias") else None)
               for n in rows]
    nrm = None
    if extra.get("norm"):
        nrm = (torch.nn.LayerNorm(K) if extra["norm"] == "layer" else RMSNorm(K, 1e-5)).to(DEVICE, dt)
        nrm.weight.data = (torch.rand(K, generator=gen) + 0.5).to(DEVICE, dt)
        if extra["norm"] == "layer":
            nrm.bias.data = randn(gen, K).to(dt)
            x = x + 3.0  # a mean far from 0: the kernel must subtract it
    res = randn(gen, n_tokens, 1, rows[0]).to(dt) if extra.get("residual") else None
    args = dict(norm=nrm, residual=res, swiglu=extra.get("swiglu", False), relu=extra.get("relu", False))
    weights = [w for w, _ in linears]
    biases = [b for _, b in linears] if extra.get("bias") else []
    assert gemv.gemv_applies(x, weights, biases, **args)
    many = x[:1].expand(gemv.MAX_ROWS + 1, 1, K)
    assert not gemv.gemv_applies(many, weights, biases, **{**args, "residual": None})  # too many rows: cuBLAS
    if op == "opcheck":
        compiling["on"] = False
        layer = isinstance(nrm, torch.nn.LayerNorm)
        norm_args = (nrm.weight, nrm.bias if layer else None, nrm.eps)
        if n_tokens > 1:  # the norm is folded in for one row only: several rows come normalized
            with pytest.raises(ValueError, match="normalize several rows first"):
                gemv.gemv(x, weights, biases, *norm_args, res, args["swiglu"], args["relu"])
            norm_args = (None, None, 0.0)
        x_in = x if n_tokens == 1 else nrm(x).detach()
        opcheck(torch.ops.chai_models.gemv.default, (x_in, weights, biases, *norm_args, res, args["swiglu"],
                                                     args["relu"]))
        compiling["on"] = True
    if op == "grad":
        w = weights[0].clone().requires_grad_()
        assert not gemv.gemv_applies(x, [w] + weights[1:], biases, **args)
        y = gemv.linear(x, [w] + linears[1:], **args)
        (y if torch.is_tensor(y) else y[0]).sum().backward()
        assert w.grad is not None
    with torch.no_grad():
        fast = gemv.linear(x, linears, **args)
        compiling["on"] = False
        assert not gemv.gemv_applies(x, weights, biases, **args)  # eager: always the torch path
        ref = gemv.linear(x, linears, **args)
    fast, ref = (torch.cat(t, -1) if isinstance(t, tuple) else t for t in (fast, ref))
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    assert rel_err(fast, ref) < TOL
    if args["relu"]:
        assert (ref == 0).any() and (ref > 0).any()  # the activation had something to do


def test_gemv_refuses_what_it_lacks(compiling):
    """linear keeps the torch path for a norm whose math the kernel lacks, and rejects contradictory asks."""
    K = 16
    x, w = torch.randn(1, 1, K, device=DEVICE), torch.randn(8, K, device=DEVICE)
    assert gemv.gemv_applies(x, [w], norm=torch.nn.LayerNorm(K).to(DEVICE))
    assert not gemv.gemv_applies(x, [w], norm=torch.nn.LayerNorm(K, elementwise_affine=False).to(DEVICE))
    assert not gemv.gemv_applies(x, [w], norm=torch.nn.LayerNorm(K, bias=False).to(DEVICE))
    assert not gemv.gemv_applies(x, [w], norm=torch.nn.GroupNorm(1, K).to(DEVICE))
    with pytest.raises(ValueError, match="two different activations"):
        gemv.linear(x, [w, w], swiglu=True, relu=True)
    with pytest.raises(ValueError, match="residual"):
        gemv.linear(x, [w], residual=x[..., :8], relu=True)


# ----------------------------------------------------------------------------------------------------
# membership.py vs ChaiAttention.membership's torch steps and fast.attention.cluster_lists

MEMBERSHIP_CASES = {  # name: (B, H, Hkv, k, extra)
    "llama7b": (1, 32, 32, 4, {}),
    "first": (1, 32, 32, 4, dict(rule="first")),
    "gqa_slots": (1, 32, 8, 3, {}),
    "gqa_whole_k": (2, 12, 4, 5, {}),
    "k_eq_hkv": (2, 12, 4, 4, {}),
    "h9_no_out": (3, 9, 3, 2, dict(out=False)),
    "k1": (2, 8, 8, 1, {}),
    "k_h_minus_1": (2, 8, 8, 7, {}),
    # exact ties between merge distances; rule "first", since the medoids of duplicate heads tie on costs that are
    # equal only up to the order of their sums
    "duplicates": (2, 12, 12, 5, dict(duplicates=True, rule="first")),
    "wide_features": (1, 16, 16, 6, dict(F=100)),
    "k_eq_h": (2, 8, 8, 8, {}),  # no merge
    "h64": (1, 64, 8, 5, {}),
}


@needs_kernels
@ids(MEMBERSHIP_CASES)
def test_membership(name):
    B, H, Hkv, k, extra = MEMBERSHIP_CASES[name]
    rule, F, out = extra.get("rule", "medoid"), extra.get("F", 25), extra.get("out", True)
    gen = torch.Generator().manual_seed(0)
    feats = (torch.rand(B, H, F, generator=gen) ** 3).to(DEVICE)  # skewed, like attention probabilities
    if extra.get("duplicates"):  # heads with the same features: equal distances must break to the lowest pair
        feats[:, 1::3] = feats[:, 0::3][:, : feats[:, 1::3].shape[1]]
    n_slots = chai.n_k_slots(k, H, Hkv)
    layer = SimpleNamespace(n_clusters=k, group_counts=[k], static=None, algorithm="agglomerative",
                            representative=rule, n_kv_heads=Hkv, n_k_slots=n_slots, slots_are_reps=n_slots < Hkv)
    ref = ChaiAttention.membership(layer, feats.view(B, H, 5, 5) if F == 25 else feats)
    ref = (*ref, *cluster_lists(ref[1], k))
    bufs = tuple(torch.full_like(t.contiguous(), -7) for t in ref) if out else None
    got = membership.membership(feats, k, rule == "medoid", H // Hkv, layer.n_k_slots, bufs)
    assert not out or all(g is o for g, o in zip(got, bufs))
    names = ("rep_idx", "head_to_cluster", "kv_of_slot", "slot_of_rep", "members", "cluster_start")
    bad = [n for n, g, r in zip(names, got, ref) if not torch.equal(g, r)]
    assert not bad, (bad, [(g.tolist(), r.tolist()) for g, r in zip(got, ref)])


# ----------------------------------------------------------------------------------------------------
# window.py vs ChaiAttention.attend_window

WINDOW_CASES = {  # name: (B, H, Hkv, D, p0, n, extra)
    "mha": (2, 4, 4, 16, 0, 5, {}),
    "gqa_chunk_inside": (2, 8, 2, 16, 2, 3, {}),  # rows 2..4: earlier rows already in the window
    "d24_one_row": (1, 6, 3, 24, 4, 1, {}),
    "no_rope": (1, 4, 4, 16, 0, 5, dict(rope=False)),
    "no_rope_gqa_chunk": (1, 8, 4, 16, 1, 2, dict(rope=False)),
    "w20": (1, 4, 2, 16, 3, 11, dict(W=20)),
}


@needs_kernels
@ids(WINDOW_CASES)
def test_window(name):
    B, H, Hkv, D, p0, n, extra = WINDOW_CASES[name]
    W, rope = extra.get("W", 5), extra.get("rope", True)
    gen = torch.Generator().manual_seed(0)
    scale, T = D ** -0.5, 3 * W
    # buffers of a larger batch than used (slices); rows < p0 of k_win: an earlier chunk's; rows past p0+n: stale
    k_win = randn(gen, B + 1, Hkv, W, D)
    p_win = torch.rand(B + 1, H, W, W, generator=gen).to(DEVICE)
    v_cache = randn(gen, B + 1, Hkv, T, D)
    q = randn(gen, B, n, H, D).transpose(1, 2)  # [B, H, n, D] as projected (strided)
    k = randn(gen, B, n, Hkv, D).transpose(1, 2)
    v = randn(gen, B, Hkv, n, D)
    if rope:
        angles = randn(gen, n, D // 2)
        cos, sin = (torch.cat([f(angles)] * 2, -1) for f in (torch.cos, torch.sin))
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    else:
        cos = sin = None
        q_rot, k_rot = q, k
    ref = SimpleNamespace(k_win=k_win.clone(), p_win=p_win.clone(), kv_cache=SimpleNamespace(v=v_cache.clone()),
                          window=W, n_heads=H, scale=scale)
    ref.window_k = lambda rows: ref.k_win[rows]  # ChaiAttention.window_k of a layer that keeps a window K buffer
    y_ref = ChaiAttention.attend_window(ref, q_rot, k_rot, v, p0)
    v_cache[:B, :, p0:p0 + n] = v  # FastChaiAttention.attend_window's order: V into the cache, then the kernel
    y = window.window_attention(q, k, cos, sin, k_win[:B], p_win[:B], v_cache[:B], p0, scale)
    assert torch.equal(k_win[B], ref.k_win[B]) and torch.equal(p_win[B], ref.p_win[B])  # sequence B untouched
    err = max(rel_err(y, y_ref), rel_err(k_win, ref.k_win), rel_err(p_win[:, :, p0:p0 + n], ref.p_win[:, :, p0:p0 + n]))
    assert err < TOL
    assert torch.equal(p_win[:, :, :p0], ref.p_win[:, :, :p0]) and torch.equal(p_win[:, :, p0 + n:],
                                                                                 ref.p_win[:, :, p0 + n:])


# ----------------------------------------------------------------------------------------------------
# Whole models: the "triton" backend against "torch" (prefill, then one-token decode steps)

MODEL_CASES = {
    # name: (family, n_kv_heads, CHAI spec or "dense", T, batch, extra); 4 heads of 16 in 3 layers. CHAI's prefill is
    # W + 1 tokens, so its last row is already clustered; each row of a batch has its own membership; spec "4,1,3":
    # layer 0 dense, then one cluster and three (with 2 KV heads: K slots, then K whole). extra: gemv (the
    # projections through gemv's kernels, as inside torch.compile: the GEMV at batch 1, else the small-M GEMM); long
    # (both decode-position limits at 0: CHAI layers take clustered_probs + probs_times_v, dense layers
    # rope_and_cache + SDPA)
    "llama_dense_gqa": ("llama", 2, "dense", 128, 2, {}),  # two splits, the second past pos
    "llama_chai_gqa": ("llama", 2, "4,1,3", 128, 2, {}),
    "llama_chai_mha_b1_gemv": ("llama", 4, "4,1,3", 64, 1, dict(gemv=True)),  # the representatives' Q/K rows
    "opt_dense": ("opt", None, "dense", 64, 2, {}),  # OPT: the new token's row without RoPE; one split
    "opt_chai": ("opt", None, "4,1,3", 64, 2, {}),
    "llama_chai_gqa_long": ("llama", 2, "4,1,3", 64, 2, dict(long=True)),
    "llama_chai_mha_b1_long": ("llama", 4, "4,1,3", 64, 1, dict(long=True)),
    "opt_chai_b1": ("opt", None, "4,1,3", 64, 1, {}),
    "opt_chai_b1_gemv": ("opt", None, "4,1,3", 64, 1, dict(gemv=True)),  # LayerNorm and ReLU in the GEMV
    "llama_chai_gqa_gemv": ("llama", 2, "4,1,3", 64, 2, dict(gemv=True)),  # batch 2: the small-M GEMM
    "opt_dense_gemv": ("opt", None, "dense", 64, 2, dict(gemv=True)),
    # per_row: row 1's prompt length (row 0's is n0; generation.prefill's calls), then each row decodes at its own
    # position; 2 < W: row 1 finishes its window while decoding (those steps eager, through the window kernel)
    "llama_dense_per_row": ("llama", 2, "dense", 128, 2, dict(per_row=3)),
    "llama_chai_gqa_per_row": ("llama", 2, "4,1,3", 128, 2, dict(per_row=5)),
    "opt_chai_per_row_long": ("opt", None, "4,1,3", 64, 2, dict(per_row=5, long=True)),
    "llama_chai_per_row_in_window": ("llama", 2, "4,1,3", 64, 2, dict(per_row=2)),
    # membership from the prompt: the prompt's call runs dense (no window kernel), then the membership kernel on the
    # prompt's rows
    "llama_chai_gqa_prompt": ("llama", 2, "4,1,3", 128, 2, dict(prompt=True)),
    "llama_chai_mha_b1_gemv_prompt": ("llama", 4, "4,1,3", 64, 1, dict(gemv=True, prompt=True)),
}
# FastChaiAttention.attend_unrotated takes a batch-1 decode token's q and k as projected by the representatives' rows
# whenever the layer has rows, but FastOPTAttention.forward projects every head (it never asks qk_weights): wrong
# logits (rel. error ~0.13), and out-of-bounds reads (a segfault under the interpreter on the clustered_probs path)


def tiny_model(family, n_kv_heads, spec, T, seed=0, membership="window"):
    torch.manual_seed(seed)
    if family == "opt":  # no RoPE, q scaled in its projection
        model = OPT(OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, n_layers=3, n_heads=4, max_seq_len=T))
    else:
        model = Llama(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4,
                                  n_kv_heads=n_kv_heads, head_dim=16, max_seq_len=T))
    model.to(DEVICE).eval()
    if spec != "dense":
        with torch.no_grad():  # sharper attention, so heads differ and clusters are uneven
            for attn in model.attention_layers:
                attn.wq.weight.mul_(4)
                attn.wk.weight.mul_(4)
        set_chai(model, ChaiConfig.from_spec(spec, 3, model.config.n_heads, membership=membership, prompt_rows=3))
    return model


@needs_kernels
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_backends_agree(name, monkeypatch):
    family, n_kv_heads, spec, T, batch, extra = MODEL_CASES[name]
    model = tiny_model(family, n_kv_heads, spec, T, membership="prompt" if extra.get("prompt") else "window")
    if extra.get("long"):
        monkeypatch.setattr(fast_attention, "CLUSTERED_DECODE_MAX_POSITIONS", 0)
        monkeypatch.setattr(fast_attention, "DENSE_DECODE_MAX_POSITIONS", 0)
    n0 = 4 if spec == "dense" else model.chai_config.window + 1
    n_steps = 4 if extra.get("per_row", n0) < n0 - 1 else 2  # a row inside its window: on past it
    tokens = torch.randint(0, 96, (batch, n0 + n_steps), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if extra.get("gemv"):  # wider row blocks than gemv_config's: fewer interpreted programs (test_gemv checks those)
        config = gemv.gemv_config
        monkeypatch.setattr(gemv, "gemv_config", lambda *a: {**config(*a), "BLOCK_N": 32})
        count_gemv = []
        real_gemv = gemv.gemv
        monkeypatch.setattr(gemv, "gemv", lambda *a: count_gemv.append(1) or real_gemv(*a))
    compiling = {"on": False}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling["on"])
    calls = {}

    def count(op):
        real = getattr(fast_attention, op)

        def wrapped(*args, **kwargs):
            calls[op] = calls.get(op, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(fast_attention, op, wrapped)

    for op in ("new_token_decode", "clustered_probs", "rope_and_cache", "window_attention", "membership_kernel"):
        count(op)

    def logits(backend):
        assert set_backend(model, backend) == backend
        model.setup_caches(batch, T)
        chai.reset(model)
        compiling["on"] = backend == "triton" and extra.get("gemv", False)
        try:
            if extra.get("per_row"):  # generation.prefill's calls for lengths n0 and n1, then [B, 1] positions
                n1 = extra["per_row"]
                ends = torch.tensor([n0, n1], device=DEVICE)  # each row's length
                out = [model(tokens[:, :n1], torch.arange(n1, device=DEVICE)).flatten(),
                       model(tokens[:1, n1:n0], torch.arange(n1, n0, device=DEVICE)).flatten()]
                chai.open_windows(model, ends.tolist())
                out += [model(tokens[:, p:p + 1], (ends + p - n0)[:, None]).flatten()
                        for p in range(n0, tokens.shape[1])]
            else:
                out = [model(tokens[:, :n0], torch.arange(n0, device=DEVICE))]
                out += [model(tokens[:, p:p + 1], torch.tensor([p], device=DEVICE))
                        for p in range(n0, tokens.shape[1])]
        finally:
            compiling["on"] = False
        return torch.cat(out, 1) if out[0].dim() > 1 else torch.cat(out)

    with torch.no_grad():
        ref = logits("torch")
        assert not calls
        fast = logits("triton")
    # the kernels that must have served this case
    n_chai = 0 if spec == "dense" else sum(c < model.config.n_heads for c in model.chai_config.clusters)
    n_dense = 3 - n_chai
    if extra.get("per_row", n0) < n0 - 1:  # row 1 inside its window: those steps are eager (counts not checked)
        assert rel_err(fast, ref) < TOL
        return
    steps = tokens.shape[1] - n0 + bool(extra.get("per_row"))  # per_row: the long row's last prompt token is one too
    per_row_steps = tokens.shape[1] - n0 if extra.get("per_row") else 0  # [B, 1] positions: always the decode kernel
    shared = steps - per_row_steps  # every row at one position: the size rule (long: both limits at 0)
    long = extra.get("long", False)
    want = {"new_token_decode": 3 * per_row_steps + (0 if long else 3 * shared),
            "clustered_probs": n_chai * shared if long else 0, "rope_and_cache": n_dense * shared if long else 0,
            "window_attention": 0 if extra.get("prompt") else n_chai,
            "membership_kernel": n_chai}
    assert {op: calls.get(op, 0) for op in want} == want
    if extra.get("gemv"):  # per call (the prompt's n0 rows, then each decode step) and layer: Q/K/V, wo, gate/up,
        # down; and at batch 1 with window membership, each clustered layer's prompt row past the window (its
        # representatives' Q/K rows)
        past_window = n_chai if batch == 1 and spec != "dense" and not extra.get("prompt") else 0
        assert len(count_gemv) == 4 * 3 * (steps + 1) + past_window
    assert rel_err(fast, ref) < TOL


@needs_kernels
@pytest.mark.parametrize("family,n_kv_heads", [("llama", 4), ("llama", 2), ("opt", None)])
def test_chai_prefill_rows_past_the_window(family, n_kv_heads, monkeypatch):
    """At batch 1 the triton backend projects a prompt's rows past CHAI's window with the representatives' Q rows and
    the slots' K rows only (FastChaiAttention.attend_projected): the same logits as the plain path, which projects
    every head, for chunks that end inside the window, cross it, and start past it."""
    model = tiny_model(family, n_kv_heads, "4,1,3", 64)
    W = model.chai_config.window
    bounds = [0, W - 2, W + 3, W + 8]  # inside the window; 2 window rows and 3 past it; 5 rows past it
    tokens = torch.randint(0, 96, (1, W + 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seen = []
    real = fast_attention.FastChaiAttention.prefill_window_rows

    def spy(self, *args):
        seen.append(real(self, *args))
        return seen[-1]

    monkeypatch.setattr(fast_attention.FastChaiAttention, "prefill_window_rows", spy)

    def logits(backend):
        set_backend(model, backend)
        model.setup_caches(1, 64)
        chai.reset(model)
        with torch.no_grad():
            out = [model(tokens[:, a:b], torch.arange(a, b, device=DEVICE)) for a, b in zip(bounds, bounds[1:])]
            out += [model(tokens[:, p:p + 1], torch.tensor([p], device=DEVICE)) for p in range(bounds[-1], W + 10)]
        return torch.cat(out, 1)

    ref = logits("torch")
    fast = logits("triton")
    assert rel_err(fast, ref) < TOL
    # the two clustered layers (1 and 3 clusters) in each call: the first chunk and the decode tokens project whole
    assert seen == [None, None, 2, 2, 0, 0] + [None, None] * 2


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_packed_projections(family, monkeypatch):
    """The triton backend packs Q/K/V (and LLaMA's gate/up) into one tensor per block: the state dict stays the plain
    model's, several rows multiply by each group in one GEMM, weights loaded in place write through, and parameters
    replaced behind its back are re-packed before use."""
    model = tiny_model(family, 2 if family == "llama" else None, "dense", 64)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    set_backend(model, "triton")
    state = model.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    blk = model.layers[1]
    groups = blk.packed_groups()
    assert set(groups) == ({"qkv", "gate_up"} if family == "llama" else {"qkv"})
    for group, linears in groups.items():
        w = getattr(blk, f"{group}_weight")
        assert w.shape[0] == sum(lin.weight.shape[0] for lin in linears)
        assert linears[1].weight.data_ptr() == w[linears[0].weight.shape[0]:].data_ptr()
    tokens = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def logits(backend):
        set_backend(model, backend)
        model.setup_caches(2, 64)
        with torch.no_grad():
            out = [model(tokens[:, :4], torch.arange(4, device=DEVICE))]
            out += [model(tokens[:, p:p + 1], torch.tensor([p], device=DEVICE)) for p in (4, 5)]
        return torch.cat(out, 1)

    n_linear = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: n_linear.append(1) or real_linear(*a))
    ref = logits("torch")
    per_plain = len(n_linear)
    n_linear.clear()
    fast = logits("triton")
    saved = 3 * (3 - 1 + (2 - 1 if family == "llama" else 0))  # per call: 3 layers, Q/K/V (and gate/up) as one
    assert len(n_linear) == per_plain - saved * 3  # prefill + 2 decode steps
    assert rel_err(fast, ref) < TOL
    # in-place loading writes through the views; parameters replaced (assign=True) get packed again before use
    doubled = {k: v * 2 if k.endswith("wk.weight") else v for k, v in plain.items()}
    model.load_state_dict(doubled)
    n_q = blk.attention.wq.weight.shape[0]
    assert torch.equal(blk.qkv_weight[n_q:n_q + 4], doubled["layers.1.attention.wk.weight"][:4])
    model.load_state_dict(plain, assign=True)
    assert blk.attention.wq.weight.data_ptr() != blk.qkv_weight.data_ptr()
    again = logits("triton")
    assert blk.attention.wq.weight.data_ptr() == blk.qkv_weight.data_ptr()
    assert rel_err(again, ref) < TOL


# ----------------------------------------------------------------------------------------------------
# Unit tests: cluster_lists, decode_config, the decode rule, the inductor fallbacks


def test_cluster_lists():
    h2c = torch.tensor([[0, 1, 0, 2, 1, 0], [2, 2, 1, 0, 0, 0]])
    members, start = cluster_lists(h2c, 3)
    assert members.tolist() == [[0, 2, 5, 1, 4, 3], [3, 4, 5, 2, 0, 1]]
    assert start.tolist() == [[0, 3, 5, 6], [0, 3, 4, 6]]
    gen = torch.Generator().manual_seed(0)
    for H, k in ((32, 4), (9, 3), (8, 8), (5, 1)):
        h2c = chai.canonical_labels(torch.randint(0, k, (4, H), generator=gen), k)
        k = int(h2c.max()) + 1
        members, start = cluster_lists(h2c, k)
        for b in range(4):
            for c in range(k):
                heads = members[b, start[b, c]:start[b, c + 1]].tolist()
                assert heads == [h for h in range(H) if h2c[b, h] == c]  # ascending inside a cluster


def test_decode_config():
    # LLaMA-7B layer, 4 clusters: a whole mean-size cluster (8 heads) per program, the fewest splits that keep
    # ~1.5 programs per SM, within the limits; the two benchmark targets get the sweep's winners (H200)
    assert decode.decode_config(1, 32, 4, 128, 8192)["split"] == 256
    assert decode.decode_config(8, 32, 4, 128, 2048)["split"] == 512
    for B, T in ((1, 512), (1, 8192), (8, 2048), (8, 8192), (64, 8192)):
        for k in (4, 32):
            cfg = decode.decode_config(B, 32, k, 128, T)
            n_splits = -(-T // cfg["split"])
            assert cfg["hpb"] == (8 if k == 4 else 1)
            assert cfg["split"] % cfg["block_t"] == 0 and cfg["split"] >= decode.DECODE_MIN_SPLIT
            assert n_splits <= decode.DECODE_MAX_SPLITS
            n_chunks = decode.decode_chunks(32, k, cfg["hpb"])
            if cfg["split"] > decode.DECODE_MIN_SPLIT:  # lengthened only while programs stay >= 1.5 per SM
                assert B * n_chunks * n_splits >= 1.5 * 132


def test_decode_rule(monkeypatch):
    """A cached one-token call that the kernels can serve: not prefill, not uncached, not fp64, not where the kernels
    cannot run."""
    q1, q_prefill, pos = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 5, 8), torch.tensor([3])
    monkeypatch.setattr(fast_attention, "available", lambda t: t.dtype != torch.float64)
    assert fast_attention.is_decode(q1, pos)
    assert not fast_attention.is_decode(q_prefill, pos) and not fast_attention.is_decode(q1, None)
    assert not fast_attention.is_decode(q1.double(), pos)
    monkeypatch.setattr(fast_attention, "available", lambda t: False)
    assert not fast_attention.is_decode(q1, pos)
    assert not kernels.available(torch.zeros(1, dtype=torch.float64))  # fp64 keeps the torch path


@needs_kernels
def test_inductor_fallbacks(monkeypatch):
    """register_inductor_fallbacks: compiling a graph with the custom ops takes none of inductor's implicit fallback
    paths (torch 2.11 formats the op's IR arguments there, which took minutes on the CHAI step), and the compiled
    result equals eager."""
    import torch._inductor.config as inductor_config
    import torch._inductor.graph as graph
    from torch._inductor import lowering

    seen = []
    info = graph.log.info

    def spy(msg, *args, **kwargs):
        if "implicit fallback" in str(msg):
            seen.append(args)
        return info(msg, *args, **kwargs)

    def f(x, w, g, u, p, v):  # the ops alone: no pointwise kernel for inductor to build with a C++ compiler
        return (gemv.gemv(x, [w], [], None, None, 0.0, None, False, False), silu_mul.silu_mul_op(g, u),
                probs.probs_times_v(p, v))

    args = tuple(t.to(DEVICE) for t in (torch.randn(1, 1, 16), torch.randn(8, 16), torch.randn(4), torch.randn(4),
                                        torch.rand(2, 1, 5), torch.randn(2, 5, 3)))
    kernels.register_inductor_fallbacks()
    for op in ("new_token_decode", "silu_mul", "gemv", "probs_times_v", "clustered_probs", "rope_and_cache"):
        assert getattr(torch.ops.chai_models, op).default in lowering.lowerings, op
    monkeypatch.setattr(graph.log, "info", spy)
    torch._dynamo.reset()
    # a cached graph would skip lowering; config.patch restores the option (monkeypatch's undo deletes it from
    # inductor's config module, and later compiles then fail on the missing option)
    with inductor_config.patch(force_disable_caches=True):
        out = torch.compile(f, fullgraph=True)(*args)
    assert not seen, f"implicit fallbacks: {len(seen)}"
    for o, r in zip(out, f(*args)):
        assert rel_err(o, r) < TOL


# ----------------------------------------------------------------------------------------------------
# Every Triton kernel compiles for sm90 (H100/H200) without a GPU, in the variants the launchers use


BF16, I32 = "*bf16", "i32"
DECODE_STRIDES = ("sq_b", "sq_c", "sk_b", "sk_s", "sk_t", "sv_b", "sv_h", "sv_t", "skn_b", "skn_s", "svn_b", "svn_h")


def decode_split_variant(dense, one_split, fused, pdl, rope):
    return (decode, "_decode_split_kernel",
            dict(members_ptr="*i64", start_ptr="*i64", slot_ptr="*i64", pos_ptr="*i64", acc_ptr="*fp32",
                 m_ptr="*fp32", l_ptr="*fp32", count_ptr="*i32", qk_scale="fp32"),
            dict(H=32, K=32 if dense else 4, G=2, D=128, N_SLOTS=16 if dense else 4, HKV=16, HPB=1 if dense else 8,
                 BLOCK_T=64 if dense else 32, BLOCK_D=128, BLOCK_K=32 if dense else 4, BLOCK_S=8,
                 ONE_SPLIT=one_split, STAGES=2, DENSE=dense, ROPE=rope, FUSED_COMBINE=fused, PDL=pdl))


def gemv_variant(norm, swiglu, bias, res, pdl, layer_norm=False, relu=False):
    cfg = {n: v for n, v in gemv.gemv_config(4096, swiglu).items() if n != "num_warps"}
    return (gemv, "_gemv_kernel", dict(eps="fp32"),
            dict(K=4096, NORM=norm, LAYER_NORM=layer_norm, SWIGLU=swiglu, RELU=relu, HAS_BIAS=bias, HAS_RES=res,
                 PDL=pdl, **cfg))


def rows_variant(M, n_rows, K, swiglu, bias, res, fp32=False):
    cfg = {n: v for n, v in gemv.rows_config(n_rows, K, M, swiglu, 4 if fp32 else 2).items()
           if n not in ("num_warps", "num_stages")}
    ptrs = {n: "*fp32" for n in gemv._rows_kernel.arg_names if n.endswith("_ptr")} if fp32 else {}
    return (gemv, "_rows_kernel", ptrs, dict(K=K, SWIGLU=swiglu, RELU=False, HAS_BIAS=bias, HAS_RES=res, IEEE=fp32,
                                             PDL=True, **cfg))


def membership_variant(H, K, group, slots_are_reps, medoid):
    return (membership, "_membership_kernel",
            dict(feat_ptr="*fp32", **{n: "*i64" for n in ("rep_ptr", "h2c_ptr", "kv_of_slot_ptr", "slot_of_rep_ptr",
                                                          "members_ptr", "start_ptr")}),
            dict(H=H, K=K, GROUP=group, HKV=H // group, SLOTS_ARE_REPS=slots_are_reps, MEDOID=medoid,
                 BH=max(16, 1 << (H - 1).bit_length())))


SCORES_PTRS = dict(slot_ptr="*i64", pos_ptr="*i64", s_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", qk_scale="fp32")
COMPILE_CASES = {
    # name: (module, kernel, argument types other than *bf16 pointers and i32 scalars, constexprs)
    # decode: (dense, one split, fused combine, PDL, RoPE): every constexpr branch in three variants
    "decode_dense_fused_pdl_rope": decode_split_variant(True, False, True, True, True),
    "decode_clustered_two_launch_no_pdl": decode_split_variant(False, False, False, False, False),
    "decode_clustered_one_split_rope": decode_split_variant(False, True, False, True, True),
    "decode_combine": (decode, "_decode_combine_kernel",
                       dict(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", pos_ptr="*i64"),
                       dict(H=32, D=128, BLOCK_S=8, BLOCK_D=128, PDL=True)),
    "gemv_qkv_norm_pdl": gemv_variant(True, False, False, False, True),
    "gemv_swiglu_norm_bias": gemv_variant(True, True, True, False, True),
    "gemv_bias_residual": gemv_variant(False, False, True, True, False),
    "gemv_layer_norm_relu_pdl": gemv_variant(True, False, True, False, True, layer_norm=True, relu=True),
    "rows_qkv_m8": rows_variant(8, 3 * 4096, 4096, False, False, False),
    "rows_swiglu_m32": rows_variant(32, 2 * 11008, 4096, True, False, False),
    "rows_down_residual_bias_m8": rows_variant(8, 4096, 11008, False, True, True),
    "rows_fp32_ieee": rows_variant(8, 4096, 4096, False, False, True, fp32=True),
    "silu_mul": (silu_mul, "_silu_mul_kernel", {}, dict(BLOCK=1024, PDL=True)),
    "membership_medoid_slots": membership_variant(32, 4, 1, True, True),
    "membership_first_gqa": membership_variant(32, 3, 4, True, False),
    "membership_whole_k": membership_variant(12, 5, 3, False, True),
    "window_mha_rope": (window, "_window_kernel", dict(pwin_ptr="*fp32", scale="fp32"),
                        dict(H=32, G=1, W=5, D=128, BW=16, BLOCK_D=128, ROPE=True)),
    "window_gqa_no_rope": (window, "_window_kernel", dict(pwin_ptr="*fp32", scale="fp32"),
                           dict(H=32, G=4, W=5, D=128, BW=16, BLOCK_D=128, ROPE=False)),
    "cluster_scores_rope_pdl": (probs, "_cluster_scores_kernel", SCORES_PTRS,
                                dict(K=4, D=128, N_SLOTS=4, HKV=32, BLOCK_T=64, BLOCK_D=128, STAGES=2, ROPE=True,
                                     PDL=True)),
    "cluster_probs": (probs, "_cluster_probs_kernel",
                      dict(s_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", h2c_ptr="*i64", pos_ptr="*i64"),
                      dict(H=32, K=4, BLOCK_T=1024, BLOCK_S=16, PDL=True)),
    "rope_cache_pdl": (rope_cache, "_rope_cache_kernel", dict(pos_ptr="*i64"),
                       dict(H=32, N_K=8, HKV=8, D=128, BLOCK_D=128, ROPE=True, PDL=True)),
    "rope_cache_no_rope": (rope_cache, "_rope_cache_kernel", dict(pos_ptr="*i64"),
                           dict(H=32, N_K=8, HKV=8, D=128, BLOCK_D=128, ROPE=False, PDL=False)),
}
KERNEL_MODULES = (kernels.common, decode, gemv, membership, probs, rope_cache, silu_mul, window)


def _language_objects():
    """What the interpreter patches while it runs a kernel (triton.runtime.interpreter._patch_lang)."""
    import triton.language as tl

    return (tl, tl.core, tl.math, tl.core.tensor, tl.core.condition, tl.core.dtype, tl.core.tensor_descriptor_base)


# triton.language as imported, before any interpreted run: the interpreter patches it for each kernel it runs and
# restores it after, except what a device function's call patches (`_patch_lang` from InterpretedFunction.__call__
# is never undone), which would turn the compiler's tensor.to into the interpreter's
_LANGUAGE = [(obj, dict(vars(obj))) for obj in _language_objects()] if kernels.interpreted() else []


@pytest.fixture
def compilable(monkeypatch):
    """The kernels as triton.compile takes them. Without the interpreter: as they are. Under TRITON_INTERPRET=1, for
    this test only: every @triton.jit function (the kernels, the device functions they call, and triton.language's
    own, such as tl.sum) is an InterpretedFunction, so each is wrapped again as a JITFunction of the same Python
    function wherever it is looked up (module globals); and triton.language is put back as it was imported."""
    if not kernels.interpreted():
        return
    import sys
    import types

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for obj, attrs in _LANGUAGE:
        if any(isinstance(v, types.FunctionType) and v.__module__ == "triton.runtime.interpreter"
               for v in attrs.values()):
            pytest.skip("triton.language was already patched by the interpreter when this module was imported")
        for name in set(vars(obj)) | set(attrs):
            now = vars(obj).get(name, attrs)  # attrs: a sentinel for "absent"
            if name not in attrs:
                monkeypatch.delattr(obj, name)
            elif now is not attrs[name]:
                monkeypatch.setattr(obj, name, attrs[name])
    wrapped = {}
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("triton.language") and m is not None]
    for mod in (*mods, *KERNEL_MODULES):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, InterpretedFunction):
                if id(obj) not in wrapped:
                    wrapped[id(obj)] = JITFunction(obj.fn, **obj.kwargs)
                monkeypatch.setattr(mod, name, wrapped[id(obj)])


@ids(COMPILE_CASES)
def test_compiles_for_hopper(name, compilable, tmp_path, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from an earlier run's cache
    mod, kernel, types, constexprs = COMPILE_CASES[name]
    fn = getattr(mod, kernel)
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        else:
            sig[arg] = types.get(arg, BF16 if arg.endswith("_ptr") else I32)
    assert set(constexprs) <= set(sig), set(constexprs) - set(sig)
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), "no sm90 binary"
