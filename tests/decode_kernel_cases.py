"""Cases for tests/test_decode_kernel.py, run in a subprocess with TRITON_INTERPRET=1 (the Triton kernel on CPU).

    TRITON_INTERPRET=1 python tests/decode_kernel_cases.py [CASE ...]

Prints one JSON object: case name -> relative error of kernels.clustered_decode vs the torch decode path of
chai.clustered_attention (fp32), of a tiny model's logits with a kernel on vs off, or of kernels.silu_mul vs
F.silu(gate) * up; or an error message.
"""
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chai_models import chai, kernels  # noqa: E402

STALE = 1e4  # what the cache holds past pos: any leak of it shows as a huge error


def _fix_interpreter_range():
    """Triton 3.6's interpreter turns a scalar into a loop bound with int() of a 1-element array, which NumPy >= 2.4
    refuses ("only 0-dimensional arrays ..."): a `for` over a range with a tensor bound fails. Patch that one
    conversion (test harness only; compiled kernels are unaffected)."""
    import numpy as np
    import triton.runtime.interpreter as interp

    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or getattr(interp, "_chai_range_fix", False):
        return
    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor, interp._chai_range_fix = patched, True


def membership(gen, B, H, Hkv, k, dense=False):
    """Per row: head_to_cluster [B, H] with exactly k (uneven) clusters, slot_of_rep [B, k], n_slots."""
    G = H // Hkv
    if dense:
        h2c = torch.arange(H).expand(B, H)
        return h2c, (torch.arange(H) // G).expand(B, H), Hkv
    rows = []
    for _ in range(B):
        labels = torch.cat([torch.arange(k), torch.randint(0, k, (H - k,), generator=gen)])
        rows.append(labels[torch.randperm(H, generator=gen)])
    h2c = chai.canonical_labels(torch.stack(rows), k)
    n_slots = chai.k_slots(k, H, Hkv)
    if n_slots == k:  # slot c holds representative c's K (ChaiLayer's rule), here in a shuffled order
        slot_of_rep = torch.stack([torch.randperm(k, generator=gen) for _ in range(B)])
    else:  # K whole: representative c reads its KV head
        slot_of_rep = torch.randint(0, Hkv, (B, k), generator=gen)
    return h2c, slot_of_rep, n_slots


def inputs(B, H, Hkv, k, D, T, pos, dense=False, strided=False, seed=0):
    """Random decode inputs (fp32, CPU), stale values past pos, and the membership in both layouts."""
    gen = torch.Generator().manual_seed(seed)
    h2c, slot_of_rep, n_slots = membership(gen, B, H, Hkv, k, dense)
    if strided:  # views with other strides, as slices of larger tensors and a transposed cache would give
        q = torch.randn(B, k, 2 * D, generator=gen)[..., :D]
        k_slots = torch.randn(B + 1, n_slots, T, D, generator=gen)[1:]
        v = torch.randn(B, T, Hkv, D, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(B, k, D, generator=gen)
        k_slots = torch.randn(B, n_slots, T, D, generator=gen)
        v = torch.randn(B, Hkv, T, D, generator=gen)
    k_slots[:, :, pos + 1:] = STALE
    v[:, :, pos + 1:] = STALE
    members, start = chai.cluster_lists(h2c, k)  # dense: every head its own cluster
    return dict(q=q, k_slots=k_slots, v=v, h2c=h2c, slot_of_rep=slot_of_rep, members=members, start=start)


def case(B, H, Hkv, k, D, T, pos, dense=False, strided=False, op=False, dense_op=False, combine=None, **launch):
    """combine: None (the launcher's rule), "kernel" (a second launch combines the splits) or "fused" (the last
    split of a chunk does, whatever the size)."""
    saved = kernels.FUSED_COMBINE, kernels.FUSED_COMBINE_MAX_PARTIALS
    if combine is not None:
        kernels.FUSED_COMBINE, kernels.FUSED_COMBINE_MAX_PARTIALS = combine == "fused", 10**6
    try:
        return _case(B, H, Hkv, k, D, T, pos, dense, strided, op, dense_op, **launch)
    finally:
        kernels.FUSED_COMBINE, kernels.FUSED_COMBINE_MAX_PARTIALS = saved


def _case(B, H, Hkv, k, D, T, pos, dense, strided, op, dense_op, **launch):
    x = inputs(B, H, Hkv, k, D, T, pos, dense, strided)
    scale = D ** -0.5
    mask = torch.arange(T)[None, :] <= pos  # [1, T], as the models build it
    ref = chai.clustered_attention(x["q"][:, :, None], x["k_slots"], x["v"], x["h2c"], x["slot_of_rep"], mask,
                                   scale)[:, :, 0]
    if dense_op:  # kernels.dense_decode: no membership lists, k_slots is the whole K [B, Hkv, T, D]
        args = (x["q"], x["k_slots"], x["v"], torch.tensor([pos]), scale)
        if op == "opcheck":
            r = torch.library.opcheck(torch.ops.chai_models.dense_decode.default, args)
            assert all(x == "SUCCESS" for x in r.values()), r
        out = torch.ops.chai_models.dense_decode(*args) if op else kernels.clustered_decode_launch(
            args[0], args[1], args[2], None, None, None, args[3], scale, **launch)
        sdpa = chai.dense_attention(x["q"][:, :, None], x["k_slots"], x["v"], mask, scale)[:, :, 0]
        assert (sdpa - ref).abs().max() < 1e-4  # the reference is dense attention
        return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    args = (x["q"], x["k_slots"], x["v"], x["members"], x["start"], x["slot_of_rep"], torch.tensor([pos]), scale)
    if op == "opcheck":  # schema, fake tensor (torch.compile) and dispatch checks of the custom op
        r = torch.library.opcheck(torch.ops.chai_models.clustered_decode.default, args)
        assert all(x == "SUCCESS" for x in r.values()), r
    out = torch.ops.chai_models.clustered_decode(*args) if op else kernels.clustered_decode_launch(*args, **launch)
    assert out.shape == (B, H, D) and out.dtype == x["v"].dtype
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def token_inputs(B, H, Hkv, k, D, T, pos, dense, rope, device, dtype, seed):
    """inputs() as a decode token's: its k/v rows (k_new, v_new), caches with one more row than B (which must stay
    untouched) and STALE rows at pos (which the kernel must write), RoPE at pos (cos, sin, rot), and the caches as
    they must be after the token (k_ref, v_ref)."""
    from chai_models.llama import apply_rope

    x = {n: t.to(device) for n, t in inputs(B, H, Hkv, k, D, T, pos, dense).items()}
    x["q"] = x["q"].to(dtype)
    gen = torch.Generator().manual_seed(seed)
    n_slots = x["k_slots"].shape[1]
    x["k_new"], x["v_new"] = (torch.randn(B, n, D, generator=gen).to(device, dtype) for n in (n_slots, Hkv))
    x["k_cache"] = torch.cat([x["k_slots"], torch.randn(1, n_slots, T, D, generator=gen).to(device)]).to(dtype)
    x["v_cache"] = torch.cat([x["v"], torch.randn(1, Hkv, T, D, generator=gen).to(device)]).to(dtype)
    x["k_cache"][:B, :, pos], x["v_cache"][:B, :, pos] = STALE, STALE
    if rope:
        ang = (pos * 10000.0 ** (-torch.arange(0, D, 2, device=device) / D)).repeat(2)
        x["cos"], x["sin"] = ang.cos().to(dtype), ang.sin().to(dtype)
        x["rot"] = lambda t: apply_rope(t, x["cos"], x["sin"])
    else:
        x["cos"] = x["sin"] = None
        x["rot"] = lambda t: t
    x["k_ref"], x["v_ref"] = x["k_cache"].clone(), x["v_cache"].clone()
    x["k_ref"][:B, :, pos], x["v_ref"][:B, :, pos] = x["rot"](x["k_new"]), x["v_new"]
    return x


def new_token_case(B, H, Hkv, k, D, T, pos, dense=False, rope=True, op=False, device="cpu", dtype=torch.float32,
                   **launch):
    """kernels.new_token_decode: the token's q/k before RoPE and its k/v rows, written into caches with one more
    row than B (which must stay untouched) -> the largest relative error of the output and of the written K and V
    rows vs rotating in torch, writing the rows and calling chai.clustered_attention."""
    x = token_inputs(B, H, Hkv, k, D, T, pos, dense, rope, device, dtype, seed=1)
    k_new, v_new, k_cache, v_cache, k_ref, v_ref, cos, sin, rot = (
        x[n] for n in ("k_new", "v_new", "k_cache", "v_cache", "k_ref", "v_ref", "cos", "sin", "rot"))
    scale = D ** -0.5
    mask = torch.arange(T, device=device)[None, :] <= pos
    ref = chai.clustered_attention(rot(x["q"])[:, :, None].double(), k_ref[:B].double(), v_ref[:B].double(), x["h2c"],
                                   x["slot_of_rep"], mask, scale)[:, :, 0]
    lists = (None, None, None) if dense else (x["members"], x["start"], x["slot_of_rep"])
    pos_t = torch.tensor([pos], device=device)
    args = (x["q"], k_new, v_new, cos, sin, k_cache, v_cache, pos_t, scale, *lists)
    if op == "opcheck":
        r = torch.library.opcheck(torch.ops.chai_models.new_token_decode.default, args,
                                  test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in r.values()), r
        k_cache.copy_(k_ref), v_cache.copy_(v_ref)  # opcheck ran the op: put back what it must write again
        k_cache[:B, :, pos], v_cache[:B, :, pos] = STALE, STALE
    if op:
        out = torch.ops.chai_models.new_token_decode(*args)
    else:
        out = kernels.clustered_decode_launch(x["q"], k_cache, v_cache, *lists, pos_t, scale, k_new, v_new, cos, sin,
                                              **launch)
    assert out.shape == (B, H, D)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    errs = rel(out, ref), rel(k_cache[:B, :, pos], k_ref[:B, :, pos]), rel(v_cache[:B, :, pos], v_ref[:B, :, pos])
    k_cache[:B, :, pos], v_cache[:B, :, pos] = k_ref[:B, :, pos], v_ref[:B, :, pos]
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "the kernel wrote outside the rows at pos"
    return max(errs)


def probs_case(B, H, Hkv, k, D, T, pos, rope=True, op=False, split=None, device="cpu", dtype=torch.float32):
    """kernels.clustered_probs (RoPE, the cache writes, the probabilities) then chai.probs_times_v, as
    chai.decode_probs_times_v runs them, vs an fp64 reference -> the largest relative error of the probabilities,
    the output and the written K and V rows. Also checks that the probabilities are exactly 0 past pos and that
    nothing outside the rows at pos of the first B sequences is written."""
    x = token_inputs(B, H, Hkv, k, D, T, pos, False, rope, device, dtype, seed=2)
    k_new, v_new, k_cache, v_cache, k_ref, v_ref, cos, sin, rot = (
        x[n] for n in ("k_new", "v_new", "k_cache", "v_cache", "k_ref", "v_ref", "cos", "sin", "rot"))
    scale = D ** -0.5
    mask = torch.arange(T, device=device)[None, :] <= pos
    q64 = rot(x["q"]).double()  # [B, k, D]
    k_rep = chai.batched_index(k_ref[:B].double(), x["slot_of_rep"])  # [B, k, T, D]
    scores = torch.einsum("bcd,bctd->bct", q64, k_rep) * scale
    p_ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)  # [B, k, T]
    p_ref = chai.batched_index(p_ref, x["h2c"])  # [B, H, T]
    ref = chai.clustered_attention(q64[:, :, None], k_ref[:B].double(), v_ref[:B].double(), x["h2c"],
                                   x["slot_of_rep"], mask, scale)[:, :, 0]
    args = (x["q"], k_new, v_new, cos, sin, k_cache, v_cache, torch.tensor([pos], device=device), scale, x["h2c"],
            x["slot_of_rep"])
    saved = kernels.CLUSTER_SCORES_SPLIT
    kernels.CLUSTER_SCORES_SPLIT = split or saved
    try:
        if op == "opcheck":
            r = torch.library.opcheck(torch.ops.chai_models.clustered_probs.default, args,
                                      test_utils=("test_schema", "test_faketensor"))
            assert all(v == "SUCCESS" for v in r.values()), r
            k_cache.copy_(k_ref), v_cache.copy_(v_ref)  # opcheck ran the op: put back what it must write again
            k_cache[:B, :, pos], v_cache[:B, :, pos] = STALE, STALE
        probs = torch.ops.chai_models.clustered_probs(*args)
    finally:
        kernels.CLUSTER_SCORES_SPLIT = saved
    assert probs.shape == (B, H, T) and probs.dtype == dtype
    assert not probs[:, :, pos + 1:].any(), "probabilities past pos"
    out = chai.probs_times_v(probs.view(B * Hkv, H // Hkv, T), v_cache[:B].reshape(B * Hkv, T, D)).view(B, H, D)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    errs = (rel(probs, p_ref), rel(out, ref), rel(k_cache[:B, :, pos], k_ref[:B, :, pos]),
            rel(v_cache[:B, :, pos], v_ref[:B, :, pos]))
    k_cache[:B, :, pos], v_cache[:B, :, pos] = k_ref[:B, :, pos], v_ref[:B, :, pos]
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "the kernel wrote outside the rows at pos"
    return max(errs)


def rope_cache_case(B, H, n_k, Hkv, D, T, pos, rope=True, op=False):
    """kernels.rope_and_cache vs chai.rotate_and_cache (fp32): the largest relative error of the rotated q and the
    written rows; checks that nothing outside the rows at pos of the first B sequences is written."""
    from types import SimpleNamespace

    from chai_models.llama import KVCache, apply_rope

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, 1, H, D, generator=gen).transpose(1, 2)  # [B, H, 1, D] as projected (strided)
    k = torch.randn(B, 1, n_k, D, generator=gen).transpose(1, 2)
    v = torch.randn(B, 1, Hkv, D, generator=gen).transpose(1, 2)
    k_cache, v_cache = torch.randn(B + 1, n_k, T, D, generator=gen), torch.randn(B + 1, Hkv, T, D, generator=gen)
    ang = (pos * 10000.0 ** (-torch.arange(0, D, 2) / D)).repeat(2)
    cos, sin = (ang.cos(), ang.sin()) if rope else (None, None)
    ref_cache = KVCache(B + 1, T, n_k, Hkv, D, torch.float32, "cpu")  # the model's cache, for the torch path
    ref_cache.k.copy_(k_cache), ref_cache.v.copy_(v_cache)
    attn = SimpleNamespace(kv_cache=ref_cache, rotate=lambda t, r: apply_rope(t, *r) if r else t)
    pos_t = torch.tensor([pos])
    q_ref = chai.rotate_and_cache(attn, q, k, v, ((cos[None], sin[None]) if rope else ()), pos_t)[0][:, :, 0]
    args = (q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, k_cache, v_cache, pos_t)
    if op == "opcheck":
        r = torch.library.opcheck(torch.ops.chai_models.rope_and_cache.default, args,
                                  test_utils=("test_schema", "test_faketensor"))
        assert all(x == "SUCCESS" for x in r.values()), r
    q_out = torch.ops.chai_models.rope_and_cache(*args)
    assert torch.equal(k_cache, ref_cache.k) and torch.equal(v_cache, ref_cache.v)
    return ((q_out - q_ref).norm() / q_ref.norm()).item()


ROPE_CACHE_CASES = {  # name: (B, H, n_k, Hkv, D, T, pos, extra)
    "rope_cache_mha": (2, 8, 8, 8, 16, 20, 7, {}),
    "rope_cache_gqa_d24": (3, 8, 2, 2, 24, 20, 19, {}),
    "rope_cache_no_rope": (2, 4, 4, 4, 16, 20, 0, dict(rope=False)),
    "rope_cache_opcheck": (2, 8, 4, 4, 16, 20, 5, dict(op="opcheck")),
}


PROBS_CASES = {
    # name: (B, H, Hkv, k, D, T, pos, extra): kernels.clustered_probs
    "probs_mha_k3": (2, 8, 8, 3, 16, 200, 150, {}),
    "probs_pos_split_start": (2, 8, 8, 3, 16, 200, 128, dict(split=64)),  # pos alone in its split
    "probs_pos0": (2, 8, 8, 3, 16, 100, 0, dict(split=32)),
    "probs_pos_last_many_splits": (2, 8, 8, 3, 24, 100, 99, dict(split=16)),
    "probs_k_lt_hkv_slots": (2, 12, 4, 3, 16, 100, 64, dict(split=32)),
    "probs_k_ge_hkv_whole": (2, 12, 4, 7, 24, 100, 70, {}),
    "probs_mha_k5_many_writers": (3, 16, 16, 5, 16, 300, 257, dict(split=64)),
    "probs_no_rope": (2, 8, 2, 3, 16, 100, 57, dict(rope=False)),
    "probs_opcheck": (2, 8, 8, 3, 16, 100, 57, dict(op="opcheck")),
}


def check_decode(B, H, Hkv, k, D, T, pos, dtype, device):
    """The op in dtype on device vs an fp64 reference -> (its relative error, that of the torch path in dtype)."""
    x = inputs(B, H, Hkv, k, D, T, pos, dense=k == H)
    q, k_slots, v = (x[n].to(device, dtype) for n in ("q", "k_slots", "v"))  # the reference: same rounded inputs
    h2c, slot_of_rep, members, start = (x[n].to(device) for n in ("h2c", "slot_of_rep", "members", "start"))
    scale = D ** -0.5
    mask = torch.arange(T, device=device)[None, :] <= pos

    def torch_path(dt):
        return chai.clustered_attention(q[:, :, None].to(dt), k_slots.to(dt), v.to(dt), h2c, slot_of_rep, mask,
                                        scale)[:, :, 0].double()

    ref = torch_path(torch.float64)
    out = kernels.clustered_decode(q, k_slots, v, members, start, slot_of_rep, torch.tensor([pos], device=device),
                                   scale)
    assert out.dtype == dtype and out.shape == (B, H, D)

    def rel(y):
        return ((y.double() - ref).norm() / ref.norm()).item()

    return rel(out), rel(torch_path(dtype))


def model_case(n_kv_heads, spec, T, batch=2, seed=0, new_in_kernel=True, probs=False):
    """A tiny Llama (spec "dense", or CHAI with that spec), prefill then one-token decode steps: logits with the
    decode kernel (chai.DENSE_DECODE_KERNEL or CLUSTERED_DECODE_KERNEL, kernels.available forced on) vs the torch
    path. CHAI's prefill is W + 1 tokens, so its last row is already clustered; B = 2, each row its own membership.
    new_in_kernel False: RoPE and the cache writes run as torch ops before the kernel (chai.NEW_TOKEN_IN_KERNEL).
    probs: the path past the decode kernel's range instead of the decode kernel: for CHAI kernels.clustered_probs
    and a batched GEMM, for dense kernels.rope_and_cache and SDPA."""
    from chai_models import ChaiConfig
    from chai_models.llama import Llama, LlamaConfig
    from chai_models.opt import OPT, OPTConfig

    torch.manual_seed(seed)
    if n_kv_heads == "opt":  # OPT: no RoPE, q scaled in its projection
        model = OPT(OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, n_layers=3, n_heads=4, max_seq_len=T)).eval()
    else:
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=8,
                          n_kv_heads=n_kv_heads, head_dim=16, max_seq_len=T)
        model = Llama(cfg).eval()
    dense = spec == "dense"
    flag = "DENSE_DECODE_KERNEL" if dense else "CLUSTERED_DECODE_KERNEL"
    if not dense:
        with torch.no_grad():  # sharper attention, so heads differ and clusters are uneven
            for attn in model.attention_layers:
                attn.wq.weight.mul_(4)
                attn.wk.weight.mul_(4)
        model.set_chai(ChaiConfig.from_spec(spec, 3, model.config.n_heads))
    tokens = torch.randint(0, 96, (batch, 14))
    n0 = 4 if dense else model.chai_config.window + 1
    available, default = kernels.available, getattr(chai, flag)

    def logits(kernel):
        kernels.available = (lambda t: True) if kernel else available
        kernels.GEMV = "always" if kernel else "never"  # batch 1: the projections through kernels.gemv too
        setattr(chai, flag, kernel and not probs)
        chai.NEW_TOKEN_IN_KERNEL = new_in_kernel
        try:
            model.setup_caches(batch, T)
            chai.reset(model)
            out = [model(tokens[:, :n0], torch.arange(n0))]
            out += [model(tokens[:, p:p + 1], torch.tensor([p])) for p in range(n0, tokens.shape[1])]
            return torch.cat(out, 1)
        finally:
            kernels.available, kernels.GEMV = available, "compiled"
            setattr(chai, flag, default)
            chai.NEW_TOKEN_IN_KERNEL = True

    with torch.no_grad():
        fast, ref = logits(True), logits(False)
    return ((fast.double() - ref.double()).norm() / ref.double().norm()).item()

def silu_case(shape, strided=False, op=False):
    """kernels.silu_mul's kernel vs F.silu(gate) * up (fp32): relative error."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(*shape, generator=gen) * 4 for _ in range(2))
    if op == "grad":  # a gradient is needed: kernels.silu_mul (kernels forced available) takes the torch path
        available, kernels.available = kernels.available, lambda t: True
        try:
            g = gate.clone().requires_grad_()
            kernels.silu_mul(g, up).sum().backward()
        finally:
            kernels.available = available
        g_ref = gate.clone().requires_grad_()
        (torch.nn.functional.silu(g_ref) * up).sum().backward()
        return ((g.grad - g_ref.grad).norm() / g_ref.grad.norm()).item()
    if strided:  # transposed views: the op makes them contiguous
        gate, up = gate.transpose(-1, -2), up.transpose(-1, -2)
    if op == "opcheck":
        r = torch.library.opcheck(torch.ops.chai_models.silu_mul.default, (gate.bfloat16(), up.bfloat16()))
        assert all(x == "SUCCESS" for x in r.values()), r
    out = kernels.silu_mul_op(gate, up)
    ref = torch.nn.functional.silu(gate) * up
    assert out.shape == ref.shape and out.is_contiguous()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def gemv_case(rows, K, dtype="float32", norm=False, residual=False, swiglu=False, bias=False, op=False):
    """kernels.linear's one-row GEMV (kernels.available forced on) vs its torch path: relative error."""
    from chai_models.llama import RMSNorm

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, K, generator=gen).to(dt)
    linears = [(torch.randn(n, K, generator=gen).to(dt) / K**0.5,
                torch.randn(n, generator=gen).to(dt) if bias else None) for n in rows]
    nrm = None
    if norm:
        nrm = RMSNorm(K, 1e-5).to(dt)
        nrm.weight.data = torch.rand(K, generator=gen).to(dt) + 0.5
    res = torch.randn(1, 1, rows[0], generator=gen).to(dt) if residual else None
    args = dict(norm=nrm, residual=res, swiglu=swiglu)
    available, kernels.available, kernels.GEMV = kernels.available, lambda t: True, "always"
    try:
        weights, biases = [w for w, _ in linears], [b for _, b in linears] if bias else []
        assert kernels.gemv_applies(x, weights, biases, **args)
        assert not kernels.gemv_applies(x.expand(2, 1, K), weights, biases, **args)  # two rows: the torch path
        if op == "opcheck":
            r = torch.library.opcheck(torch.ops.chai_models.gemv.default,
                                      (x, weights, biases, nrm.weight if norm else None, 1e-5, res, swiglu),
                                      test_utils=("test_schema", "test_faketensor"))  # no autograd: inference op
            assert all(v == "SUCCESS" for v in r.values()), r
        if op == "grad":  # a weight that needs a gradient: the torch path, and the gradient flows
            w = weights[0].clone().requires_grad_()
            assert not kernels.gemv_applies(x, [w] + weights[1:], biases, **args)
            y = kernels.linear(x, [w] + [lin for lin in linears[1:]], **args)
            (y if torch.is_tensor(y) else y[0]).sum().backward()
            assert w.grad is not None
        with torch.no_grad():
            fast = kernels.linear(x, linears, **args)
            kernels.GEMV = "never"
            ref = kernels.linear(x, linears, **args)
    finally:
        kernels.available, kernels.GEMV = available, "compiled"
    fast, ref = (torch.cat(t, -1) if isinstance(t, tuple) else t for t in (fast, ref))
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    return ((fast.double() - ref.double()).norm() / ref.double().norm()).item()


def membership_case(B, H, Hkv, k, rule="medoid", F=25, duplicates=False, out=True, seed=0):
    """kernels.membership vs ChaiLayer.membership's torch steps on window-probability-like features: 0.0 when
    every output (rep_idx, head_to_cluster, kv_of_slot, slot_of_rep, members, cluster_start) is identical."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.rand(B, H, F, generator=gen) ** 3  # skewed, like attention probabilities
    if duplicates:  # exact ties: heads with the same features, so equal distances must break to the lowest pair
        feats[:, 1::3] = feats[:, 0::3][:, : feats[:, 1::3].shape[1]]
    layer = chai.ChaiLayer(H, Hkv, 8, k, chai.ChaiConfig(clusters=[k], representative=rule), scale=1.0)
    available, kernels.decode_available = kernels.decode_available, lambda t: False
    try:
        ref = layer.membership(feats.view(B, H, 5, 5) if F == 25 else feats)
    finally:
        kernels.decode_available = available
    bufs = tuple(torch.full_like(t.contiguous(), -7) for t in ref) if out else None
    got = kernels.membership(feats, k, rule == "medoid", H // Hkv, layer.n_k_slots, bufs)
    assert not out or all(g is o for g, o in zip(got, bufs))
    bad = [name for name, g, r in zip(("rep_idx", "head_to_cluster", "kv_of_slot", "slot_of_rep", "members",
                                       "cluster_start"), got, ref) if not torch.equal(g, r)]
    assert not bad, (bad, [(g.tolist(), r.tolist()) for g, r in zip(got, ref)])
    return 0.0


def window_case(B, H, Hkv, D, p0, n, W=5, rope=True, seed=0, device="cpu", dtype=torch.float32):
    """kernels.window_attention vs ChaiLayer._window's torch branch: rows p0..p0+n-1 of the window, earlier rows
    already in k_win -> the largest relative error over the output, the window's K and its probabilities."""
    from chai_models.llama import apply_rope

    gen = torch.Generator().manual_seed(seed)
    layer = chai.ChaiLayer(H, Hkv, D, 2, chai.ChaiConfig(clusters=[2], window=W), scale=D**-0.5)
    layer.setup(B + 1, dtype, torch.device(device))  # a larger batch than used: slices of the buffers
    layer.k_win.copy_(torch.randn(layer.k_win.shape, generator=gen))  # rows < p0: an earlier chunk's; past p0+n: stale
    layer.p_win.copy_(torch.rand(layer.p_win.shape, generator=gen))

    class Attn:
        def rotate(self, t, rope_):
            return apply_rope(t, *rope_) if rope_ else t

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q = rand(B, n, H, D).transpose(1, 2)  # [B, H, n, D] as projected (strided)
    k = rand(B, n, Hkv, D).transpose(1, 2)
    v = rand(B, Hkv, 3 * W, D)  # the cache's V; rows past p0+n are not read
    angles = torch.randn(n, D // 2, generator=gen)
    cs = tuple(torch.cat([f(angles)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin)) if rope else ()
    results = {}
    available = kernels.decode_available
    for kernel in (False, True):
        kernels.decode_available = lambda t: kernel
        try:
            lay = dict(k_win=layer.k_win.clone(), p_win=layer.p_win.clone())
            layer.k_win, layer.p_win = lay["k_win"], lay["p_win"]
            y = layer._window(Attn(), q, k, cs, v, p0)
            results[kernel] = (y, lay["k_win"][:B], lay["p_win"][:B])
        finally:
            kernels.decode_available = available
    return max(((a.double() - b.double()).norm() / b.double().norm()).item()
               for a, b in zip(results[True], results[False]))


WINDOW_CASES = {  # name: (B, H, Hkv, D, p0, n, extra)
    "window_mha": (2, 8, 8, 16, 0, 5, {}),
    "window_gqa_chunk": (2, 8, 2, 16, 2, 3, {}),
    "window_d24_one_row": (1, 6, 3, 24, 4, 1, {}),
    "window_no_rope": (2, 4, 4, 16, 0, 5, dict(rope=False)),
    "window_w20": (2, 4, 2, 16, 3, 11, dict(W=20)),
}


MEMBERSHIP_CASES = {  # name: (B, H, Hkv, k, extra)
    "membership_llama7b": (3, 32, 32, 4, {}),
    "membership_first": (2, 32, 32, 4, dict(rule="first")),
    "membership_gqa_slots": (3, 32, 8, 3, {}),
    "membership_gqa_whole_k": (3, 12, 4, 5, {}),
    "membership_k_eq_hkv": (2, 12, 4, 4, {}),
    "membership_h9": (4, 9, 3, 2, dict(out=False)),
    "membership_k1": (2, 8, 8, 1, {}),
    "membership_k_h_minus_1": (2, 8, 8, 7, {}),
    # exact ties between merge distances; rule "first", since the medoids of duplicate heads tie on costs that
    # are equal only up to the order of their sums
    "membership_duplicates": (3, 12, 12, 5, dict(duplicates=True, rule="first")),
    "membership_wide_features": (2, 16, 16, 6, dict(F=100)),
    "membership_k_eq_h": (2, 8, 8, 8, {}),  # no merge (cluster_heads may be asked for it)
    "membership_h64": (1, 64, 8, 5, {}),
}


GEMV_CASES = {
    # name: (rows per weight, K, extra); BLOCK_K = 512 at K = 333..512: a partial tile; rows not a multiple of BLOCK_N
    "gemv_qkv_gqa_norm_bias": ((40, 10, 10), 333, dict(norm=True, bias=True)),
    "gemv_qkv_fp16": ((64, 32, 32), 96, dict(norm=True, dtype="float16")),
    "gemv_one_residual": ((77,), 130, dict(residual=True, bias=True)),
    "gemv_swiglu_norm": ((50, 50), 200, dict(norm=True, swiglu=True)),
    "gemv_long_k": ((9,), 9000, dict(residual=True)),  # K >= 8192: several K tiles
    "gemv_opcheck": ((24, 8), 64, dict(norm=True, op="opcheck")),
    "gemv_grad": ((24,), 64, dict(op="grad")),
}


def fallback_case():
    """kernels.register_inductor_fallbacks: compiling a graph with the custom ops takes none of inductor's implicit
    fallback paths (torch 2.11 formats the op's IR arguments there, which took minutes on the CHAI step) -> 0.0, and
    the compiled result equals eager."""
    import torch._inductor.config as inductor_config
    import torch._inductor.graph as graph

    seen = []
    info = graph.log.info

    def spy(msg, *args, **kwargs):
        if "implicit fallback" in str(msg):
            seen.append(args)
        return info(msg, *args, **kwargs)

    def f(x, w, g, u, p, v):
        return (kernels.gemv(x, [w], [], None, 0.0, None, False) + kernels.silu_mul_op(g * 2, u).sum()
                + chai.probs_times_v(p.softmax(-1), v).sum())

    args = (torch.randn(1, 1, 16), torch.randn(8, 16), torch.randn(4), torch.randn(4), torch.randn(2, 1, 5),
            torch.randn(2, 5, 3))
    kernels.register_inductor_fallbacks()
    graph.log.info, inductor_config.force_disable_caches = spy, True  # a cached graph would skip lowering
    try:
        out = torch.compile(f, fullgraph=True)(*args)
    finally:
        graph.log.info, inductor_config.force_disable_caches = info, False
    assert not seen, f"implicit fallbacks: {len(seen)}"
    ref = f(*args)
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


SILU_CASES = {
    "silu_mul_one_block": ((2, 1, 96),),
    "silu_mul_partial_block": ((3, 5, 1111),),  # 16665 elements: a partial last block
    "silu_mul_strided": ((2, 40, 30), True),
    "silu_mul_opcheck": ((2, 3, 64), False, "opcheck"),
    "silu_mul_grad": ((2, 3, 64), False, "grad"),
}


MODEL_CASES = {
    "model_b1_gemv_dense": (2, "dense", 128, 1),  # batch 1: every projection through kernels.gemv
    "model_b1_gemv_chai": (2, "8,1,3", 128, 1),
    "model_dense_gqa_kernel": (2, "dense", 128),  # dense_decode: two splits, the second past pos
    "model_mha": (8, "1:3", 64),  # one split: stage 1 writes the output
    "model_gqa": (2, "8,1,3", 128),  # k < Hkv (K slots) and k >= Hkv (K whole); two splits, the second past pos
    "model_gqa_rope_outside": (2, "8,1,3", 128, 2, 0, False),  # RoPE and cache writes as torch ops, then the kernel
    "model_dense_rope_outside": (2, "dense", 128, 1, 0, False),
    "model_opt_dense": ("opt", "dense", 128),  # OPT: the new token's row without RoPE
    "model_opt_chai": ("opt", "4,1,3", 128),
    "model_probs_gqa": (2, "8,1,3", 128, 2, 0, True, True),  # kernels.clustered_probs, K slots and K whole
    "model_probs_mha_b1": (8, "1:3", 64, 1, 0, True, True),
    "model_probs_opt": ("opt", "4,1,3", 128, 2, 0, True, True),
    # dense with the decode kernel off: kernels.rope_and_cache, then SDPA
    "model_rope_cache_gqa": (2, "dense", 128, 2, 0, True, True),
    "model_rope_cache_opt": ("opt", "dense", 128, 2, 0, True, True),
}

NEW_TOKEN_CASES = {
    # name: (B, H, Hkv, k, D, T, pos, extra): kernels.new_token_decode (RoPE and the cache writes in the kernel)
    "new_dense_gqa": (2, 8, 2, 8, 16, 100, 70, dict(dense=True)),
    "new_dense_splits_pos_mid_tile": (2, 8, 2, 8, 24, 100, 70, dict(dense=True, split=32, block_t=8)),
    "new_dense_pos0": (2, 8, 2, 8, 16, 100, 0, dict(dense=True, split=16, block_t=8)),
    "new_dense_pos_split_start": (2, 8, 4, 8, 16, 100, 64, dict(dense=True, split=32, block_t=16)),
    "new_k_lt_hkv_slots": (2, 12, 4, 3, 16, 100, 64, dict(split=32, block_t=8, hpb=2)),
    "new_k_ge_hkv_whole": (2, 12, 4, 7, 24, 100, 99, {}),
    "new_mha_k3_many_writers": (2, 16, 16, 3, 16, 100, 57, dict(split=16, block_t=8, combine="kernel")),
    "new_one_split": (2, 8, 8, 3, 16, 100, 61, dict(split=128, block_t=32)),
    "new_no_rope": (2, 8, 2, 3, 16, 100, 57, dict(rope=False)),
    "new_op": (2, 8, 2, 3, 24, 100, 57, dict(op=True)),
    "new_op_dense_opcheck": (2, 8, 2, 8, 16, 100, 99, dict(dense=True, op="opcheck")),
}

CASES = {
    # name: (B, H, Hkv, k, D, T, pos, extra)
    "mha_k3_d16_mid": (2, 8, 8, 3, 16, 100, 57, {}),
    "mha_k3_d24_mid": (2, 8, 8, 3, 24, 100, 57, {}),
    "mha_k1_d16": (2, 8, 8, 1, 16, 100, 80, {}),
    "gqa_k1_d24": (2, 8, 2, 1, 24, 100, 63, {}),
    "gqa_k_lt_hkv_d16": (2, 12, 4, 3, 16, 100, 64, {}),
    "gqa_k_ge_hkv_d24": (2, 12, 4, 7, 24, 100, 99, {}),
    "dense_mha_d16": (2, 6, 6, 6, 16, 100, 70, dict(dense=True)),
    "dense_gqa_d24": (2, 8, 2, 8, 24, 100, 70, dict(dense=True)),
    "pos0": (2, 8, 8, 3, 16, 100, 0, {}),
    "pos0_many_splits": (2, 8, 4, 3, 24, 100, 0, dict(split=16, block_t=8)),
    "pos_last": (2, 8, 8, 3, 16, 100, 99, {}),
    "pos_last_gqa": (2, 8, 2, 3, 24, 100, 99, {}),
    # several tiles per split, splits past pos, a partial last tile
    "tiles_splits_hpb2": (2, 8, 4, 3, 24, 100, 70, dict(split=32, block_t=8, hpb=2)),
    "tiles_splits_hpb1": (2, 8, 8, 2, 16, 100, 45, dict(split=16, block_t=16, hpb=1)),
    "tiles_splits_hpb4": (2, 12, 12, 2, 16, 100, 93, dict(split=32, block_t=16, hpb=4)),
    "combine_kernel": (2, 8, 4, 3, 24, 100, 70, dict(split=16, block_t=8, hpb=2, combine="kernel")),
    "combine_kernel_dense": (2, 8, 2, 8, 24, 100, 99, dict(dense=True, split=16, block_t=8, combine="kernel")),
    "combine_fused_many": (2, 12, 12, 2, 16, 100, 93, dict(split=8, block_t=8, hpb=8, combine="fused")),
    "one_split": (2, 8, 4, 3, 16, 100, 61, dict(split=128, block_t=32)),
    "one_split_dense": (2, 8, 8, 8, 24, 100, 61, dict(split=128, dense=True)),
    "strided_views": (2, 8, 2, 3, 24, 100, 57, dict(strided=True)),
    "dense_decode_mha": (2, 6, 6, 6, 16, 100, 70, dict(dense=True, dense_op=True)),
    "dense_decode_gqa_splits": (2, 8, 2, 8, 24, 100, 70, dict(dense=True, dense_op=True, split=16, block_t=8)),
    "dense_decode_pos0": (2, 8, 2, 8, 24, 100, 0, dict(dense=True, dense_op=True, split=16, block_t=8)),
    "dense_decode_opcheck": (2, 8, 2, 8, 16, 100, 99, dict(dense=True, dense_op=True, op="opcheck")),
    "custom_op": (2, 8, 2, 3, 24, 100, 57, dict(op=True)),
    "custom_op_opcheck": (2, 8, 2, 3, 24, 100, 57, dict(op="opcheck")),
}


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton is imported)"
    _fix_interpreter_range()
    results = {}
    names = sys.argv[1:] or (list(CASES) + list(NEW_TOKEN_CASES) + list(MODEL_CASES) + list(SILU_CASES)
                             + list(GEMV_CASES) + list(MEMBERSHIP_CASES) + list(WINDOW_CASES) + list(PROBS_CASES)
                             + list(ROPE_CACHE_CASES) + ["inductor_fallbacks"])
    for name in names:
        try:
            if name == "inductor_fallbacks":
                results[name] = fallback_case()
            elif name in ROPE_CACHE_CASES:
                B, H, n_k, Hkv, D, T, pos, extra = ROPE_CACHE_CASES[name]
                results[name] = rope_cache_case(B, H, n_k, Hkv, D, T, pos, **extra)
            elif name in PROBS_CASES:
                B, H, Hkv, k, D, T, pos, extra = PROBS_CASES[name]
                results[name] = probs_case(B, H, Hkv, k, D, T, pos, **extra)
            elif name in WINDOW_CASES:
                B, H, Hkv, D, p0, n, extra = WINDOW_CASES[name]
                results[name] = window_case(B, H, Hkv, D, p0, n, **extra)
            elif name in MEMBERSHIP_CASES:
                B, H, Hkv, k, extra = MEMBERSHIP_CASES[name]
                results[name] = membership_case(B, H, Hkv, k, **extra)
            elif name in SILU_CASES:
                results[name] = silu_case(*SILU_CASES[name])
            elif name in GEMV_CASES:
                rows, K, extra = GEMV_CASES[name]
                results[name] = gemv_case(rows, K, **extra)
            elif name in NEW_TOKEN_CASES:
                B, H, Hkv, k, D, T, pos, extra = NEW_TOKEN_CASES[name]
                combine = extra.pop("combine", None)
                saved = kernels.FUSED_COMBINE, kernels.FUSED_COMBINE_MAX_PARTIALS
                if combine is not None:
                    kernels.FUSED_COMBINE = combine == "fused"
                try:
                    results[name] = new_token_case(B, H, Hkv, k, D, T, pos, **extra)
                finally:
                    kernels.FUSED_COMBINE, kernels.FUSED_COMBINE_MAX_PARTIALS = saved
            elif name in MODEL_CASES:
                results[name] = model_case(*MODEL_CASES[name])
            else:
                B, H, Hkv, k, D, T, pos, extra = CASES[name]
                results[name] = case(B, H, Hkv, k, D, T, pos, **extra)
        except Exception:
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
