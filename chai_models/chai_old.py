"""CHAI: Clustered Head Attention (Agarwal et al., ICML 2024), the one place a porter needs to read.

The idea: many heads of a layer put nearly the same attention probabilities on the same tokens. CHAI groups
a layer's H query heads into k clusters, computes softmax(q K^T) once per cluster with a representative head,
and lets every head of the cluster use those probabilities with its OWN value vectors:

    A_c   = softmax(q_rep(c) . K_rep(c)^T / sqrt(D) + causal_mask)   # k times, not H
    out_h = A_{c(h)} . V_h                                           # every head, its own V

So member heads need no Q or K projection and no K cache: a clustered layer keeps K for k heads, V for all.

Per request (per sequence), the first W tokens decide the membership:
  1. Window rows (positions < W) attend densely. Their probabilities over the window, softmax(q_i K_{<=i}^T)
     for i < W, are both their attention output and the clustering features: [H, W, W] per sequence.
  2. When position W-1 has been processed, each layer clusters its heads on those features (average-linkage
     agglomerative clustering on cosine distance, on the device, batched, no host sync), picks each
     cluster's representative (the medoid, or the lowest index), and keeps the representatives' window K.
  3. Every later position uses clustered attention with that membership, fixed for the rest of the request.
Window rows are the same whether the prompt arrives in one chunk or token by token, so a sequence shorter
than W is dense until it reaches W tokens, and batching never changes a sequence's result.

GQA (several query heads share one KV head, G = H / Hkv): query heads are clustered. A KV head's K must be
kept while any of its query heads is a representative. With k < Hkv the layer keeps k K "slots", slot c
holding the K of representative c's KV head (two representatives of one KV head hold a copy each: the
allocation stays k, always fewer than Hkv); with k >= Hkv every KV head may be needed and K stays whole,
so such a layer saves Q/K compute but no memory.

Membership is held as fixed-shape index tensors per layer: rep_idx [B, k] (query head of each cluster's
representative), head_to_cluster [B, H], kv_of_slot [B, n_slots] and slot_of_rep [B, k]; for the fused
decode kernel on CUDA (CLUSTERED_DECODE_KERNEL, kernels.clustered_decode) also members [B, H] and cluster_start
[B, k+1] (cluster_lists).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import kernels

ALGORITHMS = ("agglomerative", "kmeans")
REPRESENTATIVES = ("medoid", "first")

# Published per-layer cluster counts of the CHAI reference code (LLaMA, MHA). See shared/CHAI.md.
PRESETS = {
    "llama-7b": dict(n_heads=32, clusters=[32] * 18 + [4] * 14),
    "llama-7b-aggressive": dict(n_heads=32, clusters=[28] * 3 + [18] * 11 + [8] * 2 + [4] * 16),
    "llama-33b": dict(n_heads=52, clusters=[48] * 18 + [36] * 8 + [24] * 6 + [8] * 2 + [6] * 26),
}


@dataclass
class ChaiConfig:
    """Per-layer cluster counts (k == n_heads: that layer stays dense) and how to cluster.

    static_membership: CHAI-static, one head->cluster list per layer (None for a dense layer), fixed
    offline instead of decided per request; representatives are then the lowest index of each cluster.
    """

    clusters: list[int]
    window: int = 5
    representative: str = "medoid"
    algorithm: str = "agglomerative"
    static_membership: list[list[int] | None] | None = None
    calibration: dict | None = None  # how the counts were obtained (written by calibrate)

    def validate(self, n_layers: int, n_heads: int) -> "ChaiConfig":
        if len(self.clusters) != n_layers:
            raise ValueError(f"ChaiConfig has {len(self.clusters)} cluster counts but the model has {n_layers} "
                             f"layers; give one count per layer ({n_heads} keeps a layer dense)")
        for i, k in enumerate(self.clusters):
            if not isinstance(k, int) or not 1 <= k <= n_heads:
                raise ValueError(f"ChaiConfig.clusters[{i}] = {k!r}: a layer's cluster count must be an int in "
                                 f"1..{n_heads} (n_heads; {n_heads} means dense)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"ChaiConfig.window = {self.window!r}: the clustering window must be an int >= 1")
        if self.representative not in REPRESENTATIVES:
            raise ValueError(f"ChaiConfig.representative = {self.representative!r}; use one of {REPRESENTATIVES}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"ChaiConfig.algorithm = {self.algorithm!r}; use one of {ALGORITHMS}")
        if self.static_membership is not None:
            if len(self.static_membership) != n_layers:
                raise ValueError(f"ChaiConfig.static_membership has {len(self.static_membership)} entries for "
                                 f"{n_layers} layers")
            for i, (k, m) in enumerate(zip(self.clusters, self.static_membership)):
                if k == n_heads:
                    continue
                if m is None or len(m) != n_heads or sorted(set(m)) != list(range(k)):
                    raise ValueError(f"ChaiConfig.static_membership[{i}] must list a cluster id in 0..{k - 1} "
                                     f"for each of the {n_heads} heads, every id used; got {m}")
        return self

    @classmethod
    def from_spec(cls, spec: str, n_layers: int, n_heads: int, **kw) -> "ChaiConfig":
        """A config from a short string: a preset name, 'k' (every layer k clusters), 'N:k' (first N layers
        dense, the rest k), or a comma list of n_layers counts."""
        spec = spec.strip()
        if spec in PRESETS:
            p = PRESETS[spec]
            if p["n_heads"] != n_heads or len(p["clusters"]) != n_layers:
                raise ValueError(f"preset {spec!r} is for {len(p['clusters'])} layers of {p['n_heads']} heads; "
                                 f"this model has {n_layers} layers of {n_heads} heads")
            return cls(clusters=list(p["clusters"]), **kw).validate(n_layers, n_heads)
        try:
            if "," in spec:
                counts = [int(c) for c in spec.split(",")]
            elif ":" in spec:
                n_dense, k = (int(c) for c in spec.split(":"))
                counts = [n_heads] * n_dense + [k] * (n_layers - n_dense)
            else:
                counts = [int(spec)] * n_layers
        except ValueError:
            raise ValueError(f"CHAI spec {spec!r} not understood: use a preset ({', '.join(PRESETS)}), 'k', "
                             "'N:k' or a comma list of per-layer counts") from None
        return cls(clusters=counts, **kw).validate(n_layers, n_heads)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "chai.json") -> "ChaiConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "clusters" not in d:
            raise ValueError(f"{where}: missing 'clusters' (one cluster count per layer)")
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "ChaiConfig":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-run calibration") from e


def resolve_chai(chai, model, path=None) -> ChaiConfig | None:
    """Turns load()'s chai argument into a validated ChaiConfig (or None for dense)."""
    cfg = model.config
    if chai is None:
        return None
    if isinstance(chai, ChaiConfig):
        return chai.validate(cfg.n_layers, cfg.n_heads)
    if chai == "auto":
        f = Path(path) / "chai.json" if path is not None else None
        return ChaiConfig.load(f).validate(cfg.n_layers, cfg.n_heads) if f is not None and f.exists() else None
    if isinstance(chai, str) and chai.endswith(".json"):
        return ChaiConfig.load(chai).validate(cfg.n_layers, cfg.n_heads)
    if isinstance(chai, str):
        return ChaiConfig.from_spec(chai, cfg.n_layers, cfg.n_heads)
    raise TypeError(f"chai must be None, 'auto', a preset or spec string, a chai.json path or a ChaiConfig; "
                    f"got {type(chai).__name__}")


# ----------------------------------------------------------------------------------------------------
# Projections and attention kernels shared by both models


@dataclass
class HeadRows:
    """Heads to project given by their pre-gathered weight rows, one set per sequence.

    weight [B, n*D, hidden], bias [B, n*D] or None. Decode at small batch reads only these rows: for LLaMA-7B's
    4-of-32 clusters that is 1/8 of the Q and K weights of a clustered layer.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def of(self, b: int):
        """Sequence b's rows as a (weight [n*D, hidden], bias [n*D] or None) pair, as kernels.linear takes them."""
        return self.weight[b], None if self.bias is None else self.bias[b]


def gather_rows(linear: nn.Linear, heads: torch.Tensor, head_dim: int, out: HeadRows | None = None) -> HeadRows:
    """The weight (and bias) rows of the listed heads ([B, n] indices), written into out if given."""
    B, n = heads.shape
    idx = heads.flatten()  # [B*n]
    # whole heads are rows of weight viewed [n_heads, D*hidden]: one index_select per tensor, one launch each
    w_heads = linear.weight.view(-1, head_dim * linear.weight.shape[1])
    w_out = None if out is None else out.weight[:B].view(B * n, -1)
    w = torch.index_select(w_heads, 0, idx, out=w_out).view(B, n * head_dim, -1)  # [B, n*D, hidden]
    b = None
    if linear.bias is not None:
        b_out = None if out is None else out.bias[:B].view(B * n, head_dim)
        b = torch.index_select(linear.bias.view(-1, head_dim), 0, idx, out=b_out).view(B, n * head_dim)  # [B, n*D]
    return HeadRows(w, b) if out is None else out


def project_heads(x: torch.Tensor, linear: nn.Linear, head_dim: int, heads=None):
    """x [B, S, hidden] -> [B, n, S, D] for the selected heads.

    heads: None (all heads), a [B, n] index tensor (full projection, then each sequence's heads gathered),
    or HeadRows (only those weight rows are read).
    """
    B, S, _ = x.shape
    if heads is None:
        return kernels.linear(x, (linear,)).view(B, S, -1, head_dim).transpose(1, 2)
    if isinstance(heads, HeadRows):
        if B * S == 1:  # one token: the rows are one weight matrix (a decode GEMV on CUDA)
            y = kernels.linear(x, (heads.of(0),))
            return y.view(B, S, -1, head_dim).transpose(1, 2)
        y = torch.bmm(x, heads.weight[:B].transpose(1, 2))  # [B, S, n*D]
        if heads.bias is not None:
            y = y + heads.bias[:B, None, :]
        return y.view(B, S, -1, head_dim).transpose(1, 2)
    n = heads.shape[1]
    y = linear(x).view(B, S, -1, head_dim)  # [B, S, H, D]
    return y.gather(2, heads[:, None, :, None].expand(B, S, n, head_dim)).transpose(1, 2)  # [B, n, S, D]


def expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, H, T, D]: each KV head repeated for its query heads (GQA)."""
    g = n_heads // t.shape[1]
    return t if g == 1 else t.repeat_interleave(g, dim=1)


# The fused Triton decode kernels (kernels.py) for one-token attention on CUDA, instead of the torch paths:
# CLUSTERED for CHAI's clustered layers (kernels.clustered_decode instead of scores + softmax + batched GEMM),
# DENSE for dense layers (kernels.dense_decode instead of SDPA). None (the default) picks per call: the kernel
# while the cache holds at most *_MAX_POSITIONS positions (B x T); above that SDPA (dense) or the path of
# CLUSTERED_PROBS_KERNEL (CHAI). True / False: always / never. Measured (docs/performance.md): dense_decode takes
# 8.8 vs SDPA's 14.1 us for one 7B layer at B=1, T=512 and 14.1 vs 16.1 at T=1024 (H200), but cuDNN wins from
# T=2048 or B=8. One clustered 7B layer on an H100: the kernel 61 us vs 64 (clustered_probs + cuBLAS) at B=8,
# T=2048, 62 vs 73 at B=1, T=16384, 435 vs 431 at B=8, T=16384; in the compiled B=8, T=2048 step 8.331 vs 8.414 ms.
CLUSTERED_DECODE_KERNEL: bool | None = None
CLUSTERED_DECODE_MAX_POSITIONS = 16384
DENSE_DECODE_KERNEL: bool | None = None
DENSE_DECODE_MAX_POSITIONS = 1024


def _cuda_decode(q, pos) -> bool:
    # q [B, n, S, D]: one cached token (pos None: an uncached call) that our Triton kernels can serve
    return pos is not None and q.shape[2] == 1 and kernels.decode_available(q)


def _use_kernel(flag: bool | None, max_positions: int, q, k, pos) -> bool:
    # q [B, n, S, D], k [B, n_k, T, D]
    if not _cuda_decode(q, pos):
        return False
    return q.shape[0] * k.shape[2] <= max_positions if flag is None else flag


def _rope_at_pos(rope):
    # a one-token call's RoPE (cos, sin) [1, D] -> the [D] rows the kernels take, or (None, None): no RoPE
    return (rope[0][0], rope[1][0]) if rope else (None, None)


# A decode token's RoPE and its K/V cache writes happen inside the decode kernel's launch (kernels.new_token_decode)
# rather than as torch ops before it (launches of their own between the Q/K/V projection and attention), and in
# one launch before SDPA (kernels.rope_and_cache). False: those torch ops (for A/B runs; the same numbers).
NEW_TOKEN_IN_KERNEL = True

# A clustered decode token outside the decode kernel's range (B x T > CLUSTERED_DECODE_MAX_POSITIONS) on CUDA:
# kernels.clustered_probs (RoPE, cache writes, scores, softmax: two launches) and cuBLAS' batched GEMM over V,
# instead of ~6 torch ops before that GEMM. False: the torch ops (for A/B runs).
CLUSTERED_PROBS_KERNEL = True


def dense_attention(q, k, v, mask, scale):
    # q [B, H, S, D], k/v [B, Hkv, T, D], mask [S, T] bool, or None: causal with the S queries at the last S of the
    # T positions (a prefill chunk) -> [B, H, S, D]
    S, T = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]  # SDPA maps query heads to their KV head itself: no copy of K and V
    if mask is None and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None and not gqa:  # causal kernels skip the masked half; a [S, T] mask tensor costs ~4x (H200)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, T), scale=scale)
    if mask is None:
        mask = torch.arange(T, device=q.device)[None, :] <= torch.arange(T - S, T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attend(attn, q, k, v, rope, pos, mask):
    """Dense attention of a model's attention module over its KV cache.

    q [B, H, S, D], k/v [B, Hkv, S, D] as projected, before RoPE; rope (cos, sin) [S, D], or empty (no RoPE); pos [S]
    or None (an uncached call); mask [S, n_keys] (the model's: keys <= each position) or None (uncached: causal)
    -> [B, H, S, D]. Rotates q and k (attn.rotate), writes k and v into attn.kv_cache at pos and attends. A decode
    token on CUDA (DENSE_DECODE_KERNEL) does all three in one launch.
    """
    if pos is None:
        return dense_attention(attn.rotate(q, rope), attn.rotate(k, rope), v, mask, attn.scale)
    if _use_kernel(DENSE_DECODE_KERNEL, DENSE_DECODE_MAX_POSITIONS, q, attn.kv_cache.k, pos):
        return decode_token(attn, q, k, v, rope, pos)
    if NEW_TOKEN_IN_KERNEL and _cuda_decode(q, pos):
        # a decode token for SDPA: RoPE and the cache writes in one launch (three inductor kernels otherwise)
        cache, B = attn.kv_cache, q.shape[0]
        cos, sin = _rope_at_pos(rope)
        q = kernels.rope_and_cache(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, cache.k, cache.v, pos)[:, :, None]
        return dense_attention(q, cache.k[:B], cache.v[:B], mask, attn.scale)
    q, k, v = rotate_and_cache(attn, q, k, v, rope, pos)  # k, v [B, Hkv, T, D]
    if q.shape[2] > 1:  # a prefill chunk: keys 0..start+S-1 (the mask's width), causal (prepare_cache_call)
        n = mask.shape[-1]
        k, v, mask = k[:, :, :n], v[:, :, :n], None
    return dense_attention(q, k, v, mask, attn.scale)


def rotate_and_cache(attn, q, k, v, rope, pos):
    """RoPE on q and k (attn.rotate), then k and v written into attn.kv_cache at pos -> (q, the cache's K, its V)."""
    q, k = attn.rotate(q, rope), attn.rotate(k, rope)
    return q, attn.kv_cache.update_k(pos, k), attn.kv_cache.update_v(pos, v)


def decode_token(attn, q, k, v, rope, pos, lists=None):
    """One token through the decode kernel: q [B, n, 1, D], k [B, n_slots, 1, D], v [B, Hkv, 1, D] as projected
    (before RoPE); lists: a clustered layer's (members, cluster_start, slot_of_rep), or None (dense) -> [B, H, 1, D]."""
    cache = attn.kv_cache
    members, start, slot_of_rep = lists or (None, None, None)
    if NEW_TOKEN_IN_KERNEL:
        cos, sin = _rope_at_pos(rope)
        out = kernels.new_token_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, cache.k, cache.v, pos,
                                       attn.scale, members, start, slot_of_rep)
        return out[:, :, None]
    q, k_all, v_all = rotate_and_cache(attn, q, k, v, rope, pos)  # k_all, v_all [B, n_slots | Hkv, T, D]
    if lists is None:
        return kernels.dense_decode(q[:, :, 0], k_all, v_all, pos, attn.scale)[:, :, None]
    return kernels.clustered_decode(q[:, :, 0], k_all, v_all, members, start, slot_of_rep, pos,
                                    attn.scale)[:, :, None]


def decode_probs_times_v(attn, q, k, v, rope, pos, head_to_cluster, slot_of_rep):
    """One clustered token as kernels.clustered_probs (RoPE, cache writes, probabilities [B, H, T]) and one batched
    GEMM over the cache's V: q [B, k, 1, D], k [B, n_slots, 1, D], v [B, Hkv, 1, D] as projected -> [B, H, 1, D]."""
    cache = attn.kv_cache
    cos, sin = _rope_at_pos(rope)
    probs = kernels.clustered_probs(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, cache.k, cache.v, pos, attn.scale,
                                    head_to_cluster, slot_of_rep)  # [B, H, T], zero past pos
    B, H, T = probs.shape
    Hkv, D = cache.v.shape[1], cache.v.shape[3]
    out = probs_times_v(probs.view(B * Hkv, H // Hkv, T), cache.v[:B].view(B * Hkv, T, D))  # [B*Hkv, G, D]
    return out.view(B, H, 1, D)


def clustered_attention(q_rep, k_slots, v, head_to_cluster, slot_of_rep, mask, scale):
    """Attention with probabilities shared inside clusters.

    q_rep [B, k, S, D] (representatives' queries), k_slots [B, n_slots, T, D], v [B, Hkv, T, D],
    head_to_cluster [B, H], slot_of_rep [B, k] (None: slot c is representative c), mask [S, n] bool (keys n..T-1
    unused) or None (n = T) -> [B, H, S, D]. With S > 1 (prefill) the queries are the last S of n consecutive
    positions and attend causally; only the mask's width is read.
    """
    B, k, S, D = q_rep.shape
    H = head_to_cluster.shape[1]
    if S > 1:
        # prefill: give every head its representative's q and K and run fused causal attention over the keys the
        # mask spans (prefill masks are causal: prepare_cache_call); the math is the same as below, without
        # materializing [B, H, S, T] probabilities
        n = k_slots.shape[2] if mask is None else mask.shape[-1]
        slot_of_head = head_to_cluster if slot_of_rep is None else slot_of_rep.gather(1, head_to_cluster)  # [B, H]
        q_h, k_h = batched_index(q_rep, head_to_cluster), batched_index(k_slots[:, :, :n], slot_of_head)  # [B, H, *, D]
        return dense_attention(q_h, k_h, expand_kv(v[:, :, :n], H), None, scale)  # K per query head, so V is too
    k_rep = k_slots if slot_of_rep is None else batched_index(k_slots, slot_of_rep)  # [B, k, T, D]
    scores = torch.matmul(q_rep, k_rep.transpose(-1, -2)) * scale  # [B, k, S, T]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(_at_least_fp32(scores.dtype)), dim=-1).to(v.dtype)  # [B, k, S, T]: once per cluster
    probs = batched_index(probs, head_to_cluster)  # [B, H, S, T]: each head takes its cluster's
    Hkv, T = v.shape[1], v.shape[2]
    out = probs_times_v(probs.view(B * Hkv, H // Hkv, T), v.reshape(B * Hkv, T, D))  # [B*Hkv, G, D], own V
    return out.view(B, H, S, D)


@torch.library.custom_op("chai_models::probs_times_v", mutates_args=())
def probs_times_v(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, G, T] @ [N, T, D] -> [N, G, D]: one batched GEMM that streams V once.

    An opaque op on purpose: torch.compile with coordinate-descent tuning rewrites a one-row matmul into a
    reduction over T that reads V at under half the bandwidth of cuBLAS' batched GEMM (measured on H200,
    batch 8, 2048 positions: 1.8 vs 3.4 TB/s), which cost CHAI more than its K saving.
    """
    return torch.bmm(probs, v)


@probs_times_v.register_fake
def _(probs, v):
    return probs.new_empty(probs.shape[0], probs.shape[1], v.shape[2])


def cluster_lists(head_to_cluster: torch.Tensor, k: int):
    """head_to_cluster [B, H] -> (members [B, H], cluster_start [B, k+1]), the layout of kernels.clustered_decode.

    members[b] lists the query heads cluster by cluster (ascending head index inside a cluster); cluster c's
    heads are members[b, cluster_start[b, c]:cluster_start[b, c+1]]. Once per request, not per step.
    """
    labels, members = head_to_cluster.sort(dim=1, stable=True)
    ids = torch.arange(k + 1, device=head_to_cluster.device).expand(labels.shape[0], k + 1).contiguous()
    return members, torch.searchsorted(labels.contiguous(), ids)  # first entry of each cluster; k -> H


def _at_least_fp32(dtype):
    return torch.promote_types(dtype, torch.float32)


def batched_index(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...], idx [B, M] -> [B, M, ...] with out[b, m] = t[b, idx[b, m]]."""
    B, N = t.shape[:2]
    # index_select of whole rows of t [B*N, ...]: ~8x faster on CUDA than advanced indexing t[arange(B)[:, None], idx]
    rows = idx if B == 1 else idx + N * torch.arange(B, device=idx.device)[:, None]  # [B, M]
    return t.flatten(0, 1).index_select(0, rows.flatten()).view(B, idx.shape[1], *t.shape[2:])


def window_probs(q, k_win, p0: int, scale):
    """Causal probabilities of window rows over window keys, in fp32.

    q [B, H, n, D] for positions p0..p0+n-1 (all < W), k_win [B, Hkv, W, D] -> [B, H, n, W], zero past each row.
    """
    H, W = q.shape[1], k_win.shape[2]
    n = q.shape[2]
    k = expand_kv(k_win, H)
    dt = _at_least_fp32(q.dtype)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # [B, H, n, W]
    keys = torch.arange(W, device=q.device)
    rows = p0 + torch.arange(n, device=q.device)
    scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Clustering (batched over sequences, on the device, no host synchronisation)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """features [B, H, F] -> [B, H, H] cosine distances (1 - cosine similarity), in fp32 (fp64 stays)."""
    f = features if features.dtype == torch.float64 else features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = (1 - f @ f.transpose(1, 2)).clamp_min(0)
    d = (d + d.transpose(1, 2)) / 2  # exactly symmetric, so equal costs tie exactly and the lowest index wins
    return d * (1 - torch.eye(f.shape[1], device=f.device, dtype=f.dtype))


def agglomerative_average(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Average-linkage agglomerative clustering of H items into k clusters, per batch row.

    dist [B, H, H] symmetric -> labels [B, H], each label the lowest index of its cluster. H - k merges of the
    closest pair of clusters (ties: the lowest pair in row-major order), with the Lance-Williams update
    d(i+j, m) = (n_i d(i, m) + n_j d(j, m)) / (n_i + n_j), which is exactly average linkage.
    """
    B, H, _ = dist.shape
    dev = dist.device
    inf = torch.tensor(float("inf"), device=dev, dtype=dist.dtype)
    d = dist.clone()
    eye = torch.eye(H, device=dev, dtype=torch.bool)
    d = d.masked_fill(eye, float("inf"))
    size = torch.ones(B, H, device=dev, dtype=dist.dtype)
    labels = torch.arange(H, device=dev).expand(B, H).clone()
    rows = torch.arange(B, device=dev)
    for _ in range(H - k):
        flat = d.view(B, H * H).argmin(dim=1)
        i, j = flat // H, flat % H  # i < j: the matrix is symmetric, row-major finds (i, j) before (j, i)
        ni, nj = size[rows, i], size[rows, j]
        merged = (ni[:, None] * d[rows, i] + nj[:, None] * d[rows, j]) / (ni + nj)[:, None]  # [B, H]
        d[rows, i] = merged
        d[rows, :, i] = merged
        d[rows, j] = inf
        d[rows, :, j] = inf
        d[rows, i, i] = inf
        size[rows, i] = ni + nj
        labels = torch.where(labels == j[:, None], i[:, None], labels)
    return labels


def kmeans(features: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means (cosine) per batch row, deterministic farthest-point init from head 0.

    features [B, H, F] -> labels [B, H] (arbitrary ids in 0..k-1; relabel with canonical_labels).
    Exactly k clusters: an emptied cluster takes the point farthest from its own centre.
    """
    B, H, _ = features.shape
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = torch.arange(B, device=f.device)
    centre_idx = torch.zeros(B, k, dtype=torch.long, device=f.device)
    min_d = 1 - (f * f[:, :1]).sum(-1)  # [B, H]
    for c in range(1, k):
        nxt = min_d.argmax(dim=1)
        centre_idx[:, c] = nxt
        min_d = torch.minimum(min_d, 1 - (f * f[rows, nxt][:, None]).sum(-1))
    centres = f[rows[:, None], centre_idx]  # [B, k, F]
    labels = None
    for _ in range(iters):
        sim = f @ centres.transpose(1, 2)  # [B, H, k]
        labels = sim.argmax(dim=2)
        onehot = F.one_hot(labels, k).to(f.dtype)  # [B, H, k]
        counts = onehot.sum(1)  # [B, k]
        new = onehot.transpose(1, 2) @ f  # [B, k, F]
        new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        centres = torch.where(counts[:, :, None] > 0, new, centres)
    for c in range(k):  # repair empty clusters without a host sync
        counts = F.one_hot(labels, k).sum(1)  # [B, k]
        own = (f * centres[rows[:, None], labels]).sum(-1)  # [B, H] similarity to own centre
        movable = counts[rows[:, None], labels] > 1
        far = torch.where(movable, own, torch.full_like(own, float("inf"))).argmin(dim=1)  # [B]
        empty = counts[:, c] == 0
        labels[rows, far] = torch.where(empty, torch.full_like(far, c), labels[rows, far])
    return labels


def canonical_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Relabels clusters 0..k-1 in the order of their lowest member. labels [B, H] (ids in 0..H-1) -> [B, H]."""
    B, H = labels.shape
    idx = torch.arange(H, device=labels.device).expand(B, H)
    # lowest member of each head's cluster
    lowest = torch.full((B, H), H, device=labels.device, dtype=torch.long)
    lowest = lowest.scatter_reduce(1, labels, idx, reduce="amin")  # [B, H] indexed by old label
    root = lowest.gather(1, labels)  # [B, H]
    is_root = root == idx
    rank = is_root.long().cumsum(1) - 1  # rank of each root among roots
    return rank.gather(1, root)


def representatives(dist: torch.Tensor, head_to_cluster: torch.Tensor, k: int, rule: str) -> torch.Tensor:
    """One representative query head per cluster -> rep_idx [B, k].

    medoid: the member with the least total cosine distance to its cluster's members; first: the lowest index.
    Ties go to the lowest index (argmin returns the first minimum).
    """
    B, H = head_to_cluster.shape
    member = head_to_cluster[:, None, :] == torch.arange(k, device=dist.device)[None, :, None]  # [B, k, H]
    if rule == "first":
        cost = torch.arange(H, device=dist.device, dtype=dist.dtype).expand(B, k, H)
    else:
        same = head_to_cluster[:, :, None] == head_to_cluster[:, None, :]  # [B, H, H]
        cost = (dist * same).sum(-1)[:, None, :].expand(B, k, H)  # [B, k, H]
    return torch.where(member, cost, torch.full_like(cost, float("inf"))).argmin(dim=2)


def cluster_heads(features: torch.Tensor, k: int, algorithm: str = "agglomerative", rule: str = "medoid"):
    """features [B, H, F] -> (rep_idx [B, k], head_to_cluster [B, H]); clusters ordered by lowest member."""
    if algorithm == "agglomerative" and kernels.decode_available(features):
        # on CUDA one Triton kernel runs the same steps as below (kernels.membership)
        return kernels.membership(features, k, rule == "medoid")[:2]
    dist = cosine_distance(features)
    if algorithm == "agglomerative":
        labels = agglomerative_average(dist, k)
    elif algorithm == "kmeans":
        labels = kmeans(features, k)
    else:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; use one of {ALGORITHMS}")
    head_to_cluster = canonical_labels(labels, k)
    return representatives(dist, head_to_cluster, k, rule), head_to_cluster


# ----------------------------------------------------------------------------------------------------
# A clustered layer: its per-sequence state and its forward


def k_slots(k: int, n_heads: int, n_kv_heads: int) -> int:
    """K heads a layer keeps per sequence with k clusters: one slot per representative when k < Hkv, else every
    KV head (no K saving possible; dense layers, k == n_heads, keep all too)."""
    return k if k < n_kv_heads and k < n_heads else n_kv_heads


class ChaiLayer(nn.Module):
    """CHAI state and forward of one clustered attention layer (k < n_heads).

    The model's attention module supplies project_q / project_k (its own projections, scaling included; RoPE
    too unless rope is None), rotate (its RoPE, or none) and its KV cache, whose K holds n_k_slots heads instead of
    n_kv_heads.
    """

    def __init__(self, n_heads, n_kv_heads, head_dim, n_clusters, cfg: ChaiConfig, scale, static=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.n_clusters, self.window, self.scale = n_clusters, cfg.window, scale
        self.algorithm, self.rule = cfg.algorithm, cfg.representative
        self.group = n_heads // n_kv_heads
        self.n_k_slots = k_slots(n_clusters, n_heads, n_kv_heads)
        self.static = None if static is None else torch.tensor(static, dtype=torch.long)
        self.ready = False  # host flag: membership decided for the sequences in the cache
        self.chunk_start = 0  # first position of the current cached call (set by prepare_cache_call)
        self.q_rows: HeadRows | None = None  # representatives' weight rows, when that reads fewer bytes
        self.k_rows: HeadRows | None = None

    def setup(self, max_batch_size, dtype, device):
        B, H, Hkv, W, D, k = max_batch_size, self.n_heads, self.n_kv_heads, self.window, self.head_dim, self.n_clusters
        z = dict(device=device, dtype=torch.long)
        self.register_buffer("rep_idx", torch.zeros(B, k, **z), persistent=False)
        self.register_buffer("head_to_cluster", torch.zeros(B, H, **z), persistent=False)
        self.register_buffer("kv_of_slot", torch.zeros(B, self.n_k_slots, **z), persistent=False)
        self.register_buffer("slot_of_rep", torch.zeros(B, k, **z), persistent=False)
        self.register_buffer("members", torch.zeros(B, H, **z), persistent=False)  # decode kernel's lists
        self.register_buffer("cluster_start", torch.zeros(B, k + 1, **z), persistent=False)
        # the window: full K of positions < W, and the window rows' probabilities (the features)
        self.register_buffer("k_win", torch.zeros(B, Hkv, W, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer("p_win", torch.zeros(B, H, W, W, dtype=_at_least_fp32(dtype), device=device),
                             persistent=False)
        self.ready = False
        self.q_rows = self.k_rows = None
        # per-sequence weight rows pay off when they are fewer than the rows of the full projections
        self.use_rows = B * k < H and B * self.n_k_slots <= Hkv

    def _store_rows(self, attn, B):
        """Copies the representatives' Q and K weight rows into static buffers (allocated once per setup)."""
        if self.q_rows is None:
            self.q_rows = gather_rows(attn.wq, self.rep_idx, self.head_dim)  # [B_max, k*D, hidden]
            self.k_rows = gather_rows(attn.wk, self.kv_of_slot, self.head_dim)
        else:
            gather_rows(attn.wq, self.rep_idx[:B], self.head_dim, out=self.q_rows)
            gather_rows(attn.wk, self.kv_of_slot[:B], self.head_dim, out=self.k_rows)

    def release(self):
        for name in ("rep_idx", "head_to_cluster", "kv_of_slot", "slot_of_rep", "members", "cluster_start", "k_win",
                     "p_win"):
            self._buffers.pop(name, None)
        self.ready = False
        self.q_rows = self.k_rows = None

    def window_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n in ("k_win", "p_win"))

    def membership(self, probs: torch.Tensor, out: tuple | None = None) -> tuple:
        """probs [B, H, W, W] window probabilities -> (rep_idx [B, k], head_to_cluster [B, H], kv_of_slot
        [B, n_slots], slot_of_rep [B, k], members [B, H], cluster_start [B, k+1]), written into out if given."""
        B, H = probs.shape[:2]
        k = self.n_clusters
        features = probs.reshape(B, H, -1)  # [B, H, W*W]
        if self.static is None and self.algorithm == "agglomerative" and kernels.decode_available(features):
            # on CUDA: every step below in one launch (a prefill of ~50 small launches per layer is host-bound)
            return kernels.membership(features, k, self.rule == "medoid", self.group, self.n_k_slots, out)
        if self.static is not None:
            head_to_cluster = canonical_labels(self.static.to(probs.device).expand(B, H), k)
            rep_idx = representatives(cosine_distance(features), head_to_cluster, k, "first")
        else:
            rep_idx, head_to_cluster = cluster_heads(features, k, self.algorithm, self.rule)
        rep_kv = rep_idx // self.group  # [B, k] KV head of each representative
        if self.n_k_slots == k:
            kv_of_slot, slot_of_rep = rep_kv, torch.arange(k, device=probs.device).expand(B, k)
        else:
            kv_of_slot, slot_of_rep = torch.arange(self.n_kv_heads, device=probs.device).expand(B, -1), rep_kv
        result = (rep_idx, head_to_cluster, kv_of_slot, slot_of_rep, *cluster_lists(head_to_cluster, k))
        if out is None:
            return result
        for dst, src in zip(out, result):
            dst.copy_(src)
        return out

    def forward(self, attn, x, rope, v, input_pos, mask):
        """x [B, S, hidden], v [B, Hkv, S, D] (already projected) -> [B, H, S, D]."""
        if input_pos is None:
            return self._forward_uncached(attn, x, rope, v)
        B, S, _ = x.shape
        cache = attn.kv_cache
        if self.ready and S == 1:  # decode: no host sync
            return self._clustered(attn, x, rope, v, input_pos, mask, B)
        p0 = self.chunk_start  # read once per call by prepare_cache_call
        if p0 == 0:
            self.ready = False  # a new sequence starts
        if self.ready:
            return self._clustered(attn, x, rope, v, input_pos, mask, B)
        if p0 >= self.window:
            raise RuntimeError(f"CHAI layer {attn.layer_idx}: positions start at {p0} but the window "
                               f"0..{self.window - 1} was never processed; start each sequence at position 0")
        n_w = min(S, self.window - p0)  # rows of this chunk inside the window
        # the window rows' V (the clustered pass below writes the whole chunk's)
        v_all = cache.update_v(input_pos[:n_w], v[:, :, :n_w])  # [B, Hkv, T, D]
        q_w = attn.project_q(x[:, :n_w], None)  # [B, H, n_w, D], before RoPE
        k_w = attn.project_k(x[:, :n_w], None)  # [B, Hkv, n_w, D]
        y_w = self._window(attn, q_w, k_w, tuple(r[:n_w] for r in rope), v_all, p0)  # [B, H, n_w, D]
        if p0 + n_w < self.window:
            return y_w  # still inside the window: dense
        self.membership(self.p_win[:B], out=(self.rep_idx[:B], self.head_to_cluster[:B], self.kv_of_slot[:B],
                                             self.slot_of_rep[:B], self.members[:B], self.cluster_start[:B]))
        cache.k[:B, :, : self.window] = batched_index(self.k_win[:B], self.kv_of_slot[:B])  # keep only needed K
        if self.use_rows:
            self._store_rows(attn, B)
        self.ready = True
        if S == n_w:
            return y_w
        # the rows after the window: the whole chunk goes through the clustered path and its window rows are
        # dropped, so that from position 0 its attention is SDPA's square causal kernel (2x faster on an H200 than
        # the S - n_w rows alone; the K rows it writes at window positions are the ones already kept)
        y_r = self._clustered(attn, x, rope, v, input_pos, mask, B)[:, :, n_w:]
        return torch.cat([y_w, y_r], dim=2)

    def _window(self, attn, q, k, rope, v_all, p0):
        """Window rows p0..p0+n-1: RoPE on q [B, H, n, D] and k [B, Hkv, n, D], k into k_win, their causal
        probabilities over the window into p_win (the clustering features), and their dense output [B, H, n, D]."""
        B, n = q.shape[0], q.shape[2]
        if kernels.decode_available(q) and self.p_win.dtype == torch.float32:
            # CUDA: one launch (~20 small ones below; a prefill's launches are host time)
            cos, sin = rope if rope else (None, None)  # OPT: no RoPE
            return kernels.window_attention(q, k, cos, sin, self.k_win[:B], self.p_win[:B], v_all, p0, self.scale)
        q, k = attn.rotate(q, rope), attn.rotate(k, rope)
        self.k_win[:B, :, p0:p0 + n] = k
        probs = window_probs(q, self.k_win[:B], p0, self.scale)  # [B, H, n, W]
        self.p_win[:B, :, p0:p0 + n] = probs
        return dense_from_probs(probs.to(v_all.dtype), v_all[:, :, : self.window])

    def decode_rows(self, x, input_pos):
        """The representatives' Q and K weight rows as (weight, bias) pairs when this call is one clustered token at
        batch 1, so that the caller can project them with V (and the norm) in one kernels.linear; else None."""
        if input_pos is None or x.shape[0] * x.shape[1] != 1 or not (self.ready and self.use_rows):
            return None
        return self.q_rows.of(0), self.k_rows.of(0)

    def decode(self, attn, q, k, v, rope, input_pos, mask):
        """One clustered token from projections made by the caller (see decode_rows), before RoPE: q [B, k, 1, D],
        k [B, n_slots, 1, D], v [B, Hkv, 1, D] -> [B, H, 1, D]."""
        return self._attend(attn, q, k, v, rope, input_pos, mask)

    def _clustered(self, attn, x, rope, v, pos, mask, B):
        rows = self.use_rows  # the representatives' own weight rows: fewer bytes and FLOPs than all heads
        q = attn.project_q(x, None, self.q_rows if rows else self.rep_idx[:B])  # [B, k, S, D], no RoPE yet
        k = attn.project_k(x, None, self.k_rows if rows else self.kv_of_slot[:B])  # [B, n_slots, S, D]
        return self._attend(attn, q, k, v, rope, pos, mask)

    def _attend(self, attn, q, k, v, rope, pos, mask):
        # q, k before RoPE; v [B, Hkv, S, D]: the rows at pos, written into the cache here
        B = q.shape[0]
        if _use_kernel(CLUSTERED_DECODE_KERNEL, CLUSTERED_DECODE_MAX_POSITIONS, q, attn.kv_cache.k, pos):
            # decode on CUDA: RoPE, the cache writes and a fused split-T attention in one launch (sums in fp32)
            lists = self.members[:B], self.cluster_start[:B], self.slot_of_rep[:B]
            return decode_token(attn, q, k, v, rope, pos, lists)
        if CLUSTERED_PROBS_KERNEL and _cuda_decode(q, pos):
            # decode past the kernel's range: the probabilities in two launches, then cuBLAS over V
            return decode_probs_times_v(attn, q, k, v, rope, pos, self.head_to_cluster[:B], self.slot_of_rep[:B])
        q, k_all, v_all = rotate_and_cache(attn, q, k, v, rope, pos)  # k_all, v_all [B, n_slots | Hkv, T, D]
        slot_of_rep = None if self.n_k_slots == self.n_clusters else self.slot_of_rep[:B]
        return clustered_attention(q, k_all, v_all, self.head_to_cluster[:B], slot_of_rep, mask, self.scale)

    def _forward_uncached(self, attn, x, rope, v):
        """Scores a whole sequence from position 0 (no cache): window dense, the rest clustered."""
        B, S, _ = x.shape
        W = self.window
        n_w = min(S, W)
        w_rope = tuple(r[:n_w] for r in rope)
        q_w = attn.project_q(x[:, :n_w], w_rope)  # [B, H, n_w, D]
        k_w = attn.project_k(x[:, :n_w], w_rope)  # [B, Hkv, n_w, D]
        probs = window_probs(q_w, k_w, 0, self.scale)  # [B, H, n_w, n_w]
        y_w = dense_from_probs(probs.to(v.dtype), v[:, :, :n_w])
        if S <= W:
            return y_w
        rep_idx, h2c, kv_of_slot, slot_of_rep = self.membership(probs)[:4]
        q = attn.project_q(x[:, W:], tuple(r[W:] for r in rope), rep_idx)  # [B, k, S-W, D]
        k = attn.project_k(x, rope, kv_of_slot)  # [B, n_slots, S, D]
        mask = torch.arange(S, device=x.device)[None, :] <= torch.arange(W, S, device=x.device)[:, None]
        y_r = clustered_attention(q, k, v, h2c, None if self.n_k_slots == self.n_clusters else slot_of_rep,
                                  mask, self.scale)
        return torch.cat([y_w, y_r], dim=2)


def dense_from_probs(probs, v):
    """probs [B, H, n, W] (already softmaxed), v [B, Hkv, W, D] -> [B, H, n, D]."""
    return torch.matmul(probs, expand_kv(v, probs.shape[1]))


# ----------------------------------------------------------------------------------------------------
# Model-level helpers (both families call these)


def install(model, cfg: ChaiConfig | None) -> None:
    """Makes the model's clustered layers (k < H) use CHAI; None restores dense attention."""
    mc = model.config
    if cfg is not None:
        cfg.validate(mc.n_layers, mc.n_heads)
    for i, attn in enumerate(model.attention_layers):
        k = mc.n_heads if cfg is None else cfg.clusters[i]
        if k == mc.n_heads:
            attn.chai = None
            continue
        static = None if cfg.static_membership is None else cfg.static_membership[i]
        attn.chai = ChaiLayer(mc.n_heads, mc.n_kv_heads, attn.head_dim, k, cfg, attn.scale, static)
    model.chai_config = cfg
    if model.max_batch_size:
        model.setup_caches(model.max_batch_size, model.max_seq_len)


def reset(model) -> None:
    """Forgets every sequence's membership (a new request starts)."""
    for attn in model.attention_layers:
        if attn.chai is not None:
            attn.chai.ready = False


def ready(model) -> bool:
    """True when every clustered layer has its membership (decode can run without host reads)."""
    return all(a.chai.ready for a in model.attention_layers if a.chai is not None)


def prepare_cache_call(model, B: int, S: int, input_pos: torch.Tensor) -> int | None:
    """Checks a cached forward's arguments and returns where a prefill chunk (S > 1) starts; None for one token.

    A chunk's positions must be consecutive: its attention is causal over cache slots 0..start+S-1. They are read
    from the device once per prefill call; one-token decode never synchronises with the host, except while a CHAI
    layer is still inside its window (it needs the position on the host).
    """
    if not model.max_batch_size:
        raise RuntimeError("forward with input_pos needs a KV cache: call model.setup_caches(max_batch_size, "
                           "max_seq_len) first, or call forward(tokens) without input_pos to score a sequence")
    if B > model.max_batch_size:
        raise ValueError(f"batch of {B} sequences but the cache holds {model.max_batch_size}; call "
                         f"setup_caches with max_batch_size >= {B}")
    if S > model.max_seq_len:
        raise ValueError(f"{S} tokens in one call but the cache holds {model.max_seq_len} positions; call "
                         f"setup_caches with a larger max_seq_len (at most the model's {model.config.max_seq_len})")
    if input_pos.dim() != 1 or input_pos.shape[0] != S:
        raise ValueError(f"input_pos must be a 1-D tensor of the {S} positions of the tokens, got shape "
                         f"{tuple(input_pos.shape)}")
    layers = [a.chai for a in model.attention_layers if a.chai is not None]
    start = None
    if S > 1:
        host = input_pos.tolist()
        start = host[0]
        if host != list(range(start, start + S)):
            raise ValueError(f"input_pos of a {S}-token call must be consecutive positions (start, start+1, ...), "
                             f"got {host[:3]}...{host[-1:]}")
        if not 0 <= start <= model.max_seq_len - S:
            raise ValueError(f"positions {start}..{start + S - 1} do not fit the cache's {model.max_seq_len} slots; "
                             f"call setup_caches with a larger max_seq_len")
    elif layers and not all(c.ready for c in layers):
        start = int(input_pos[0])
    if start is not None:
        for c in layers:
            c.chunk_start = start
    return start if S > 1 else None


def kv_cache_bytes(model) -> dict:
    """Allocated KV-cache bytes, measured on the buffers, and what dense attention would allocate."""
    k = v = win = 0
    for attn in model.attention_layers:
        if attn.kv_cache is None:
            raise RuntimeError("no KV cache is allocated; call model.setup_caches(...) first")
        k += attn.kv_cache.k.numel() * attn.kv_cache.k.element_size()
        v += attn.kv_cache.v.numel() * attn.kv_cache.v.element_size()
        if attn.chai is not None:
            win += attn.chai.window_bytes()
    dense_k = v  # dense K has the shape of V
    return {"k": k, "v": v, "chai_window": win, "total": k + v + win, "dense_total": dense_k + v,
            "saved": dense_k + v - (k + v + win)}


def summary(model) -> str:
    """One line: clusters per layer and the K-cache saving."""
    cfg = model.chai_config
    if cfg is None:
        return "CHAI off (dense)"
    H = model.config.n_heads
    parts, run = [], None
    for k in cfg.clusters:  # run-length: "18x32 14x4"
        if run and run[1] == k:
            run[0] += 1
        else:
            run = [1, k]
            parts.append(run)
    line = "CHAI clusters per layer: " + " ".join(f"{n}x{k}" for n, k in parts) + f" (of {H} heads)"
    if model.max_batch_size:
        b = kv_cache_bytes(model)
        line += (f"; K cache {b['k'] / 2**20:.2f} MiB vs dense {b['v'] / 2**20:.2f} MiB, "
                 f"KV saved {b['saved'] / 2**20:.2f} MiB ({100 * b['saved'] / b['dense_total']:.1f}%)")
    return line
