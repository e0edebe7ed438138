"""CHAI: Clustered Head Attention (Agarwal et al., ICML 2024), in plain torch. The one module a porter reads.

Many heads of a layer put nearly the same attention probabilities on the same tokens. CHAI groups a layer's H query
heads into C clusters, computes the probabilities once per cluster with a representative head, and lets every head
of the cluster use them with its OWN values:

    A_c   = softmax(q_rep(c) . K_rep(c)^T * scale + causal_mask)   # C times, not H
    out_h = A_c(h) . V_h                                           # every head h, its own V

Member heads need no Q or K and no K cache: a clustered layer keeps K for C heads ("slots"), V for all.

Per request (per sequence), the first W tokens decide the membership:
  1. Window rows (positions < W) attend densely. Their causal probabilities over the window, softmax(q_i K_<=i^T) for
     i < W, are both their attention output and the clustering features: [H, W, W] per sequence.
  2. Once position W-1 is processed, the layer clusters its heads on those features (clustering.py: average-linkage
     on cosine distance, batched, on the device), picks each cluster's representative (the medoid, or the lowest
     index), and keeps only the slots' K of the window.
  3. Every later position uses clustered attention with that membership, fixed for the rest of the request.
Window rows are the same whether a prompt arrives in one chunk or token by token, so a sequence shorter than W is
dense until it reaches W tokens, and batching never changes a sequence's result. Rows of a batch decode at their own
positions ([B, 1]): a row still inside its window (a prompt shorter than W) finishes it while decoding, and decides
its own membership at position W-1; a row whose cache slot held another sequence before redoes every window row it
reaches, so nothing of the previous one is used.

Membership from the prompt (ChaiConfig.membership = "prompt", an option beside the paper's window): a request's first
call (its prompt, from position 0) runs densely over its own K and V; its last R rows' probabilities over all of the
prompt's keys, [H, R, P] per sequence, decide the membership; only the slots' K of the prompt enter the cache, and every
later call is clustered. An uncached forward scores its first `prompt_len` tokens as the prompt (scoring_prompt; the
whole sequence when unset, i.e. dense), so it equals a prefill of those tokens followed by the rest.

GQA (G = H / Hkv query heads share a KV head): query heads are clustered. With C < Hkv the layer keeps C K slots,
slot c holding representative c's KV head (two representatives of one KV head each hold a copy: the allocation stays
C < Hkv). With C >= Hkv every KV head may be some representative's, so K stays whole: such a layer saves score
compute but no memory.

Membership lives in fixed-shape index tensors per layer (one compiled decode step serves every request):
rep_idx [B, C] (each cluster's representative query head), head_to_cluster [B, H], kv_of_slot [B, n_slots] (the KV
head each K slot holds) and slot_of_rep [B, C] (the slot each representative reads).

How it attaches: `install` swaps a model's attention modules for ChaiAttention subclasses of their own class (same
weights, same projections); ChaiAttention overrides `attend` (the attention after projection and RoPE) and
`setup_cache` (the compact K). The models never call into this module.

Shapes: B batch, S new tokens, T cache length, H query heads, Hkv KV heads, C clusters, W window, D head_dim.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..models.shared import KVCache, attention, repeat_kv
from .clustering import canonical_labels, cluster_groups, cosine_distance, representatives
from .config import ChaiConfig

# ----------------------------------------------------------------------------------------------------
# The math


def window_probs(q, k_win, p0: int, scale):
    """Causal probabilities of window rows over window keys, in fp32 (the clustering features).

    q [B, H, n, D] at positions p0..p0+n-1 (all < W), k_win [B, Hkv, W, D] -> [B, H, n, W], zero past each row.
    """
    n, W = q.shape[2], k_win.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    k = repeat_kv(k_win, q.shape[1]).to(dt)
    scores = torch.matmul(q.to(dt), k.transpose(-1, -2)) * scale  # [B, H, n, W]
    future = torch.arange(W, device=q.device)[None, :] > (p0 + torch.arange(n, device=q.device))[:, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def prompt_probs(q, k, rows: int, scale):
    """Causal probabilities of a prompt's last `rows` query rows over all of its keys, in fp32 (the features of
    membership from the prompt): q [B, H, P, D], k [B, Hkv, P, D] -> [B, H, min(rows, P), P]."""
    P = q.shape[2]
    R = min(rows, P)
    return window_probs(q[:, :, P - R:], k, P - R, scale)


def clustered_attention(q_rep, k_slots, v, head_to_cluster, slot_of_rep, mask, scale):
    """Attention with probabilities shared inside clusters.

    q_rep [B, C, S, D] (the representatives' queries), k_slots [B, n_slots, n, D], v [B, Hkv, n, D],
    head_to_cluster [B, H], slot_of_rep [B, C] (None: slot c is representative c's), mask [S, n] bool, or None:
    causal with the S queries at the last S of the n positions -> [B, H, S, D].
    """
    B, C, S, D = q_rep.shape
    H = head_to_cluster.shape[1]
    if S > 1:
        # a prompt: every head takes its representative's q and K, and one fused causal attention runs over them:
        # the same probabilities as below, without materialising [B, H, S, n] of them
        slot_of_head = head_to_cluster if slot_of_rep is None else slot_of_rep.gather(1, head_to_cluster)  # [B, H]
        q_h = batched_index(q_rep, head_to_cluster)  # [B, H, S, D]
        k_h = batched_index(k_slots, slot_of_head)  # [B, H, n, D]
        return attention(q_h, k_h, repeat_kv(v, H), mask, scale)
    k_rep = k_slots if slot_of_rep is None else batched_index(k_slots, slot_of_rep)  # [B, C, n, D]
    scores = torch.matmul(q_rep, k_rep.transpose(-1, -2)) * scale  # [B, C, 1, n]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    dt = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.to(dt), dim=-1).to(v.dtype)  # [B, C, 1, n]: once per cluster
    probs = batched_index(probs, head_to_cluster)  # [B, H, 1, n]: each head takes its cluster's
    return torch.matmul(probs, repeat_kv(v, H))  # [B, H, 1, D]: each head its own V


def batched_index(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...], idx [B, M] -> [B, M, ...] with out[b, m] = t[b, idx[b, m]]."""
    B, N = t.shape[:2]
    # index_select of whole rows of t [B*N, ...]: several times faster on CUDA than t[arange(B)[:, None], idx]
    rows = idx if B == 1 else idx + N * torch.arange(B, device=idx.device)[:, None]  # [B, M]
    return t.flatten(0, 1).index_select(0, rows.flatten()).view(B, idx.shape[1], *t.shape[2:])


def n_k_slots(n_clusters: int, n_heads: int, n_kv_heads: int) -> int:
    """K heads a layer keeps per sequence: one slot per representative when that is fewer than the KV heads, else
    every KV head (dense layers, n_clusters == n_heads, keep all too)."""
    return n_clusters if n_clusters < n_kv_heads and n_clusters < n_heads else n_kv_heads


# ----------------------------------------------------------------------------------------------------
# A clustered attention layer


class ChaiAttention:
    """Placed before a family's attention class (install): CHAI's `attend` and cache; the rest is the family's.

    Uses from the family's module: n_heads, n_kv_heads, head_dim, scale, and project()'s q [B, H, S, D] and k, v
    [B, Hkv, S, D] with RoPE already applied.
    """

    # per-sequence buffers besides the KV cache, batch first (shared.move_rows moves a sequence with them)
    sequence_state = ("rep_idx", "head_to_cluster", "kv_of_slot", "slot_of_rep", "k_win", "p_win")

    def init_chai(self, n_clusters: int, cfg: ChaiConfig, static: list[int] | None = None,
                  group_counts: list[int] | None = None):
        # group_counts: the clusters of each contiguous group of heads, clustered apart (ChaiConfig.groups)
        self.n_clusters, self.window = n_clusters, cfg.window
        self.group_counts = group_counts or [n_clusters]
        self.algorithm, self.representative = cfg.algorithm, cfg.representative
        self.decides_on, self.prompt_rows = cfg.membership, cfg.prompt_rows  # "window" | "prompt"
        self.prompt_len = None  # uncached forwards: tokens scored as the prompt (scoring_prompt); None: all
        self.n_k_slots = n_k_slots(n_clusters, self.n_heads, self.n_kv_heads)
        # fewer slots than KV heads: slot c holds representative c's KV head; else K is whole, slot i is KV head i
        self.slots_are_reps = self.n_k_slots < self.n_kv_heads
        # CHAI-static: a fixed head -> cluster list from calibration instead of the request's window
        self.static = None if static is None else torch.tensor(static, dtype=torch.long)
        self.ready = False  # host flag: every sequence in the cache is past its window (decode reads no positions)

    # -- the cache: K of n_k_slots heads, plus the window state and the membership of each sequence

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        B, H, Hkv, C, W, D = (max_batch_size, self.n_heads, self.n_kv_heads, self.n_clusters, self.window,
                              self.head_dim)
        self.kv_cache = KVCache(B, max_seq_len, self.n_k_slots, Hkv, D, dtype, device)
        idx = dict(dtype=torch.long, device=device)
        self.register_buffer("rep_idx", torch.zeros(B, C, **idx), persistent=False)
        self.register_buffer("head_to_cluster", torch.zeros(B, H, **idx), persistent=False)
        self.register_buffer("kv_of_slot", torch.zeros(B, self.n_k_slots, **idx), persistent=False)
        self.register_buffer("slot_of_rep", torch.zeros(B, C, **idx), persistent=False)
        # the window (window membership only): every KV head's K of positions < W, kept apart only when the cache
        # drops some K (else it is the cache's own first W positions: window_k), and the window rows'
        # probabilities (the features). Membership from the prompt needs neither: the prompt's call holds them.
        by_window = self.decides_on == "window"
        own_k = by_window and (self.slots_are_reps or max_seq_len < W)
        self.register_buffer("k_win", torch.zeros(B, Hkv, W, D, dtype=dtype, device=device) if own_k else None,
                             persistent=False)
        p_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("p_win", torch.zeros(B, H, W, W, dtype=p_dtype, device=device) if by_window else None,
                             persistent=False)
        self.ready = False

    def release_cache(self):
        self.kv_cache = None
        for name in ChaiAttention.sequence_state:
            self._buffers.pop(name, None)
        self.ready = False

    def window_k(self, rows: slice):
        # the cache rows' window K of every KV head, [B, Hkv, W, D]
        return self.kv_cache.k[rows, :, :self.window] if self.k_win is None else self.k_win[rows]

    def cache_nbytes(self) -> dict:
        """Bytes of the K and V caches, and of CHAI's per-sequence state beside them (window K and features,
        membership indices): what this layer allocates beyond K and V."""
        state = [self.k_win, self.p_win, self.rep_idx, self.head_to_cluster, self.kv_of_slot, self.slot_of_rep]
        return {**self.kv_cache.nbytes(), "chai_state": sum(b.numel() * b.element_size() for b in state
                                                            if b is not None)}

    # -- attention

    def attend(self, q, k, v, input_pos, mask):
        """q [B, H, S, D], k/v [B, Hkv, S, D] (RoPE applied); input_pos [S] or None (no cache); mask [S, n_keys]
        -> [B, H, S, D]. Window rows attend densely and record the features; later rows are clustered."""
        if input_pos is None:
            return self.attend_uncached(q, k, v)
        S = q.shape[2]
        if self.ready and S == 1:  # decode: no host read
            return self.attend_clustered(q, k, v, input_pos, mask)
        if input_pos.dim() == 2:  # one token per row, each at its own position, some maybe inside their window
            return self.attend_rows(q, k, v, input_pos, mask)
        # a prefill chunk spans keys 0..start+S-1 (its mask's width); a single token inside the window is read from
        # the device (only until the window is full)
        start = mask.shape[-1] - S if S > 1 else int(input_pos[0])
        if start == 0:
            self.ready = False  # a new sequence
        if self.ready:
            return self.attend_clustered(q, k, v, input_pos, mask)
        if self.decides_on == "prompt":
            if start:
                raise RuntimeError(f"CHAI layer {self.layer_idx}: membership from the prompt is decided by a "
                                   f"request's first call, from position 0, but this call starts at {start}")
            return self.attend_prompt(q, k, v, input_pos)
        if start >= self.window:
            raise RuntimeError(f"CHAI layer {self.layer_idx}: positions start at {start} but the window "
                               f"0..{self.window - 1} was never processed; start each sequence at position 0")
        n_w = min(S, self.window - start)  # rows of this call inside the window
        y_w = self.attend_window(q[:, :, :n_w], k[:, :, :n_w], v[:, :, :n_w], start)  # [B, H, n_w, D]
        if start + n_w < self.window:
            return y_w  # still inside the window: dense
        self.decide_membership(slice(0, q.shape[0]))
        self.ready = True
        if S == n_w:
            return y_w
        # the rows after the window: the whole chunk goes through the clustered pass, so that its attention is one
        # square causal kernel from position 0 (the K it writes at window positions is the K just kept); its window
        # rows are then overwritten with the dense ones (a copy of n_w rows, not a concatenation of all S)
        y = self.attend_clustered(q, k, v, input_pos, mask)  # [B, H, S, D]
        y[:, :, :n_w] = y_w
        return y

    def attend_rows(self, q, k, v, input_pos, mask):
        """One token per row at its own position (input_pos [B, 1], read on the host): every row through the clustered
        pass, then each row still inside its window redone densely (its clustered output and its K written at a window
        position are replaced: the window's K goes into the compact cache when the row decides at position W-1)."""
        if self.decides_on == "prompt":  # every row's membership came with its prompt's call: all rows clustered
            return self.attend_clustered(q, k, v, input_pos, mask)
        y = self.attend_clustered(q, k, v, input_pos, mask)  # [B, H, 1, D]
        pos = input_pos[:, 0].tolist()
        for b, p in enumerate(pos):
            if p < self.window:
                rows = slice(b, b + 1)
                y[rows] = self.attend_window(q[rows], k[rows], v[rows], p, rows)
                if p == self.window - 1:
                    self.decide_membership(rows)
        self.ready = min(pos) >= self.window - 1
        return y

    def attend_window(self, q, k, v, p0: int, rows: slice | None = None):
        """Window rows p0..p0+n-1 of the cache rows `rows` (default the first B): q [B, H, n, D], k/v [B, Hkv, n, D]
        -> their dense output [B, H, n, D]; k into the window's K, v into the cache, their probabilities over the
        window into p_win (the features)."""
        n = q.shape[2]
        rows = slice(0, q.shape[0]) if rows is None else rows
        self.window_k(rows)[:, :, p0:p0 + n] = k
        self.kv_cache.v[rows, :, p0:p0 + n] = v
        probs = window_probs(q, self.window_k(rows), p0, self.scale)  # [B, H, n, W]
        self.p_win[rows, :, p0:p0 + n] = probs
        v_win = repeat_kv(self.kv_cache.v[rows, :, :self.window], self.n_heads)  # [B, H, W, D]
        return torch.matmul(probs.to(v.dtype), v_win)

    def attend_prompt(self, q, k, v, input_pos):
        """A request's first call, the prompt (membership from the prompt): dense attention over its own K and V, the
        membership from its last rows, then only the slots' K and all V into the cache -> [B, H, P, D]."""
        B = q.shape[0]
        y = attention(q, k, v, None, self.scale)  # [B, H, P, D], causal
        self.decide_membership(slice(0, B), prompt_probs(q, k, self.prompt_rows, self.scale).flatten(2))
        self.ready = True
        self.kv_cache.update(input_pos, batched_index(k, self.kv_of_slot[:B]), v)
        return y

    def membership(self, features):
        """features [B, H, ...] (a head's probabilities over the window, or the prompt's rows) -> rep_idx [B, C],
        head_to_cluster [B, H], kv_of_slot [B, n_slots], slot_of_rep [B, C]."""
        B, H = features.shape[:2]
        C = self.n_clusters
        features = features.reshape(B, H, -1)  # [B, H, F]
        dev = features.device
        if self.static is not None:  # fixed clusters; the representative still follows the rule, per sequence
            head_to_cluster = canonical_labels(self.static.to(dev).expand(B, H), C)
            rep_idx = representatives(cosine_distance(features), head_to_cluster, C, self.representative)
        else:
            rep_idx, head_to_cluster = cluster_groups(features, self.group_counts, self.algorithm, self.representative)
        rep_kv = rep_idx // (H // self.n_kv_heads)  # [B, C]: each representative's KV head
        if self.slots_are_reps:  # slot c holds representative c's KV head
            kv_of_slot, slot_of_rep = rep_kv, torch.arange(C, device=dev).expand(B, C)
        else:  # K whole: representative c reads its own KV head
            kv_of_slot, slot_of_rep = torch.arange(self.n_kv_heads, device=dev).expand(B, -1), rep_kv
        return rep_idx, head_to_cluster, kv_of_slot, slot_of_rep

    def decide_membership(self, rows: slice, features=None):
        """Clusters the cache rows `rows` on features [B, H, F] (None: their window's) and, for the window, keeps only
        the slots' window K."""
        by_window = features is None
        if by_window:
            features = self.p_win[rows].flatten(2)  # [B, H, W*W]
        self.store_membership(rows, features)
        if by_window and self.k_win is not None:
            self.kv_cache.k[rows, :, :self.window] = batched_index(self.k_win[rows], self.kv_of_slot[rows])

    def store_membership(self, rows: slice, features):
        # the rows' membership into the buffers that later steps read
        for dst, src in zip((self.rep_idx, self.head_to_cluster, self.kv_of_slot, self.slot_of_rep),
                            self.membership(features)):
            dst[rows].copy_(src)

    def attend_clustered(self, q, k, v, input_pos, mask):
        """Rows past the window: the representatives' q, the slots' K into the compact cache, V into the cache."""
        B = q.shape[0]
        q_rep = batched_index(q, self.rep_idx[:B])  # [B, C, S, D]
        k_slots = batched_index(k, self.kv_of_slot[:B])  # [B, n_slots, S, D]
        return self.attend_representatives(q_rep, k_slots, v, input_pos, mask)

    def attend_representatives(self, q_rep, k_slots, v, input_pos, mask):
        """q_rep [B, C, S, D], k_slots [B, n_slots, S, D], v [B, Hkv, S, D] -> [B, H, S, D]: the slots' K and all V
        into the cache, then attention with each cluster's probabilities."""
        B = q_rep.shape[0]
        k_all, v_all = self.kv_cache.update(input_pos, k_slots, v)  # [B, n_slots, T, D], [B, Hkv, T, D]
        if q_rep.shape[2] > 1:  # a prefill chunk reads keys 0..start+S-1, causally
            n = mask.shape[-1]
            k_all, v_all, mask = k_all[:, :, :n], v_all[:, :, :n], None
        return clustered_attention(q_rep, k_all, v_all, self.head_to_cluster[:B], self.slot_of_rep_or_none(B), mask,
                                   self.scale)

    def attend_uncached(self, q, k, v):
        """A whole sequence from position 0, no cache: the window (or the prompt) dense, then the rest clustered."""
        S = q.shape[2]
        if self.decides_on == "prompt":
            W = S if self.prompt_len is None else min(self.prompt_len, S)
            y_w = attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], None, self.scale)  # [B, H, W, D]
            if S == W:
                return y_w
            probs = prompt_probs(q[:, :, :W], k[:, :, :W], self.prompt_rows, self.scale)  # [B, H, R, W]
        else:
            W = self.window
            n_w = min(S, W)
            probs = window_probs(q[:, :, :n_w], k[:, :, :n_w], 0, self.scale)  # [B, H, n_w, n_w]
            y_w = torch.matmul(probs.to(v.dtype), repeat_kv(v[:, :, :n_w], self.n_heads))
            if S <= W:
                return y_w
        rep_idx, head_to_cluster, kv_of_slot, slot_of_rep = self.membership(probs)
        q_rep = batched_index(q[:, :, W:], rep_idx)  # [B, C, S-W, D]
        k_slots = batched_index(k, kv_of_slot)  # [B, n_slots, S, D]
        slot_of_rep = None if self.slots_are_reps else slot_of_rep
        y_r = clustered_attention(q_rep, k_slots, v, head_to_cluster, slot_of_rep, None, self.scale)
        return torch.cat([y_w, y_r], dim=2)

    def slot_of_rep_or_none(self, B: int):
        # with one slot per representative, slot c is representative c's: no gather needed
        return None if self.slots_are_reps else self.slot_of_rep[:B]


# ----------------------------------------------------------------------------------------------------
# Attaching CHAI to a model


_CLASSES: dict = {}


def swap_class(module, *mixins) -> None:
    """Gives module the class `mixins + its plain class` (no mixins: the plain class back). Weights, buffers and
    state-dict names stay; only methods change, the way an adapter overrides one method of a module."""
    plain = getattr(type(module), "plain_class", type(module))
    if not mixins:
        module.__class__ = plain
        return
    key = (mixins, plain)
    if key not in _CLASSES:
        name = "".join(m.__name__ for m in mixins) + "_" + plain.__name__
        _CLASSES[key] = type(name, (*mixins, plain), {"plain_class": plain})
    module.__class__ = _CLASSES[key]


def install(model, cfg: ChaiConfig | None, cluster_dense_layers: bool = False) -> None:
    """Makes the model's clustered layers (a count below n_heads) use CHAI; None restores dense attention.

    cluster_dense_layers: layers whose count equals n_heads run the clustered code too (each head its own cluster;
    the same logits as dense attention, which is how the tests check the clustered path); else they stay dense.
    Caches are re-allocated if the model has them. chai_models.set_chai also re-applies the model's backend.
    A tensor-parallel model (chai_models.parallel) holds n_heads / tp heads per rank: each rank clusters its own heads
    (groups = tp, or cfg.groups when it is a multiple of tp) and takes its groups' share of the counts.
    """
    mc = model.config
    tp = getattr(model, "tensor_parallel", None)
    rank, world = (tp.rank, tp.world) if tp is not None else (0, 1)
    if cfg is not None:
        cfg.validate(mc.n_layers, mc.n_heads)
        groups = cfg.groups if cfg.groups > 1 else world
        if groups % world:
            raise ValueError(f"ChaiConfig.groups = {cfg.groups} under tensor parallelism over {world} ranks: each "
                             f"rank clusters its own heads, so groups must be a multiple of {world} (or 1)")
        if groups != cfg.groups:  # the same checks as one process with these groups
            try:
                dataclasses.replace(cfg, groups=groups).validate(mc.n_layers, mc.n_heads)
            except ValueError as e:
                raise ValueError(f"tensor parallelism over {world} ranks: each rank clusters its own heads, "
                                 f"so {e}") from e
    for i, attn in enumerate(model.attention_layers):
        n_clusters = mc.n_heads if cfg is None else cfg.clusters[i]
        if cfg is None or (n_clusters == mc.n_heads and not cluster_dense_layers):
            if isinstance(attn, ChaiAttention):
                attn.release_cache()
            swap_class(attn)
            continue
        static = None if cfg.static_membership is None else cfg.static_membership[i]
        per_rank = groups // world
        counts = cfg.group_counts(i, mc.n_heads, groups)[rank * per_rank:(rank + 1) * per_rank]  # this rank's groups
        swap_class(attn, ChaiAttention)
        attn.init_chai(sum(counts), cfg, static, counts)
    model.chai_config = cfg
    if model.max_batch_size:
        model.setup_caches(model.max_batch_size, model.max_seq_len)


def chai_layers(model) -> list[ChaiAttention]:
    return [a for a in model.attention_layers if isinstance(a, ChaiAttention)]


@contextlib.contextmanager
def scoring_prompt(model, n_tokens: int | None):
    """Inside, uncached forwards (model(tokens)) score their first n_tokens as the prompt for membership from the
    prompt: dense, membership from its last rows, the rest clustered, the same as a prefill of those tokens followed
    by the rest. Window membership ignores it."""
    layers = chai_layers(model)
    saved = [a.prompt_len for a in layers]
    for a in layers:
        a.prompt_len = n_tokens
    try:
        yield
    finally:
        for a, n in zip(layers, saved):
            a.prompt_len = n


def reset(model) -> None:
    """Makes the next call read positions on the host (a new request starts, or a row is inside its window): each
    row then follows its own position, and a row that reaches position W-1 decides its membership."""
    for attn in chai_layers(model):
        attn.ready = False


def open_windows(model, next_positions) -> None:
    """Tells the CHAI layers the next position of each row of the cache (host ints): if any is inside a layer's
    window, that layer's next decode call reads positions on the host and routes each row (ChaiAttention.attend_rows).
    A serving loop calls it after every prefill, whose rows may be shorter than the window."""
    low = min(next_positions, default=None)
    for attn in chai_layers(model):
        if low is not None and low < attn.window:
            attn.ready = False


def ready(model) -> bool:
    """True when every clustered layer has its membership (decode runs without host reads)."""
    return all(a.ready for a in chai_layers(model))


def summary(model) -> str:
    """One line: clusters per layer, what CHAI saves in K+V cache bytes (measured on the allocated buffers, its own
    per-sequence state included) and in decode attention scores (Q.K^T and softmax of member heads skipped)."""
    cfg = model.chai_config
    if cfg is None:
        return "CHAI off (dense)"
    mc = model.config
    parts, run = [], None
    for n in cfg.clusters:  # run-length: "18x32 14x4"
        if run and run[1] == n:
            run[0] += 1
        else:
            run = [1, n]
            parts.append(run)
    line = ("CHAI clusters per layer: " + " ".join(f"{n}x{c}" for n, c in parts) +
            f" (of {mc.n_heads} heads; membership from the {cfg.membership})")
    skipped = 1 - sum(cfg.clusters) / (len(cfg.clusters) * mc.n_heads)
    if model.max_batch_size:
        b = model.kv_cache_bytes()
        if b["saved"] > 0:
            line += (f"; K+V cache {b['total'] / 2**20:.2f} MiB vs dense {b['dense_total'] / 2**20:.2f} MiB: saved "
                     f"{b['saved'] / 2**20:.2f} MiB ({100 * b['saved'] / b['dense_total']:.1f}%, CHAI's state of "
                     f"{b['chai_state'] / 2**10:.1f} KiB counted)")
        elif any(n_k_slots(c, mc.n_heads, mc.n_kv_heads) < mc.n_kv_heads for c in cfg.clusters):
            line += (f"; K+V cache {b['total'] / 2**20:.2f} MiB vs dense {b['dense_total'] / 2**20:.2f} MiB: at "
                     f"{model.max_seq_len} positions CHAI's state of {b['chai_state'] / 2**10:.1f} KiB outweighs the "
                     f"K it drops, so no cache saved")
        else:
            line += (f"; no K dropped (every count >= the {mc.n_kv_heads} KV heads), so no cache saved: CHAI's state "
                     f"adds {b['chai_state'] / 2**10:.1f} KiB to the dense {b['dense_total'] / 2**20:.2f} MiB")
    return line + f"; decode attention scores skipped {100 * skipped:.1f}%"
