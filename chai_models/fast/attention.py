"""The attention of the triton backend: the plain modules' math through the Triton kernels, installed as mixins
before a model's attention class (fast/__init__.py).

Both mixins add `attend_unrotated(q, k, v, rope, input_pos, mask)`: attention from projections made before RoPE, so
that a decode token's RoPE, its cache writes and its attention are one launch; and `attend_projected`, which the
blocks call with their projection, so that a CHAI layer chooses which Q/K rows each part of a call projects.
Everything that is not a decode token on a device the kernels serve goes through the plain `attend` (prefill runs
SDPA, as the plain path does).

Which kernel serves a decode token, from the measurements in docs/performance.md: with every row at one position
(generate, the bench), a rule on the cache's size (B x T positions): the split-T decode kernel while it beats cuDNN's
SDPA (dense) or cuBLAS over V (CHAI), which read every row's whole cache. With per-row positions ([B, 1]: a serving
batch, rows at different lengths) always the decode kernel, which reads each row only up to its own position.
"""
from __future__ import annotations

import torch

from ..chai.attention import ChaiAttention, batched_index
from ..models.llama import apply_rope
from ..models.shared import attention
from .kernels import available
from .kernels.decode import new_token_decode
from .kernels.membership import membership as membership_kernel
from .kernels.probs import clustered_probs, probs_times_v
from .kernels.rope_cache import rope_and_cache
from .kernels.window import window_attention

# Where the split-T decode kernel serves a decode token with every row at one position, from whole-step timings on
# the H200 (docs/performance.md, "decode kernel", "CHAI decode"): dense layers up to B x T = 1024 positions, then
# RoPE + writes + SDPA; CHAI's clustered layers up to 8192, then the probabilities + cuBLAS over V.
DENSE_DECODE_MAX_POSITIONS = 1024
CLUSTERED_DECODE_MAX_POSITIONS = 8192


def rotate(q, k, rope):
    # RoPE on q [B, H, S, D] and k [B, n, S, D]; rope None: the family has none (OPT)
    return (q, k) if rope is None else (apply_rope(q, *rope), apply_rope(k, *rope))


def rope_rows(rope, lo: int, hi: int):
    # the RoPE (cos, sin) [S, D] of a chunk's rows lo..hi-1; None (no RoPE) stays None
    return None if rope is None else tuple(t[lo:hi] for t in rope)


def rope_row(rope):
    # a decode token's RoPE (cos, sin) [1, D] (every row at one position) or [B, 1, 1, D] (per row) -> the [1, D] or
    # [B, D] rows the kernels take, or (None, None)
    return (None, None) if rope is None else tuple(t.reshape(-1, t.shape[-1]) for t in rope)


def decode_kernel_serves(B: int, T: int, input_pos, max_positions: int) -> bool:
    """Whether the split-T decode kernel serves a decode token over a cache of B x T positions: always with per-row
    positions (at B=48 T=2560 with rows spread like a serving batch, mean position 1309: 375 us per dense layer
    against SDPA's 519, which reads all T), else up to max_positions."""
    return input_pos.dim() == 2 or B * T <= max_positions


def is_decode(q, input_pos) -> bool:
    # q [B, n, S, D]: one cached token that the kernels can serve
    return input_pos is not None and q.shape[2] == 1 and available(q)


class FastAttention:
    """A dense attention layer's decode token through the kernels."""

    def attend_unrotated(self, q, k, v, rope, input_pos, mask):
        # q [B, H, S, D], k/v [B, Hkv, S, D] as projected (before RoPE) -> [B, H, S, D]
        if not is_decode(q, input_pos):
            return self.attend(*rotate(q, k, rope), v, input_pos, mask)
        cache, B = self.kv_cache, q.shape[0]
        cos, sin = rope_row(rope)
        if decode_kernel_serves(B, cache.k.shape[2], input_pos, DENSE_DECODE_MAX_POSITIONS):  # RoPE, writes, attention
            out = new_token_decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, cache.k, cache.v, input_pos,
                                   self.scale, None, None, None)
            return out[:, :, None]
        q = rope_and_cache(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos, sin, cache.k, cache.v, input_pos)[:, :, None]
        return attention(q, cache.k[:B], cache.v[:B], mask, self.scale)

    def qk_weights(self, n_tokens: int, input_pos):
        return self.wq, self.wk

    def attend_projected(self, project, x, rope, input_pos, mask):
        """x [B, S, hidden] -> [B, H, S, D]; project(rows, wq, wk) -> the rows' q, k, v before RoPE, projected by wq
        and wk (the modules, or a CHAI layer's representatives' rows: FastChaiAttention)."""
        wq, wk = self.qk_weights(x.shape[0] * x.shape[1], input_pos)
        return self.attend_unrotated(*project(x, wq, wk), rope, input_pos, mask)


def cluster_lists(head_to_cluster: torch.Tensor, n_clusters: int):
    """head_to_cluster [B, H] -> (members [B, H], cluster_start [B, C+1]), the decode kernel's layout.

    members[b] lists the query heads cluster by cluster (ascending head index inside a cluster); cluster c's heads are
    members[b, cluster_start[b, c]:cluster_start[b, c+1]].
    """
    labels, members = head_to_cluster.sort(dim=1, stable=True)
    ids = torch.arange(n_clusters + 1, device=head_to_cluster.device).expand(labels.shape[0], -1).contiguous()
    return members, torch.searchsorted(labels.contiguous(), ids)  # first entry of each cluster; C -> H


def gather_rows(weight: torch.Tensor, bias, heads: torch.Tensor, head_dim: int, out=None):
    """The weight (and bias) rows of the listed heads ([n] indices) -> (weight [n*D, hidden], bias [n*D] or None),
    written into out's tensors if given."""
    w = torch.index_select(weight.view(-1, head_dim * weight.shape[1]), 0, heads,
                           out=None if out is None else out[0].view(len(heads), -1)).view(-1, weight.shape[1])
    if bias is None:
        return w, None
    b = torch.index_select(bias.view(-1, head_dim), 0, heads,
                           out=None if out is None else out[1].view(len(heads), head_dim)).view(-1)
    return w, b


class FastChaiAttention(ChaiAttention):
    """A CHAI layer through the kernels: the window rows and the membership step in one launch each per prefill, a
    decode token in one launch (or two and cuBLAS for long caches), and at batch 1 a decode token, and a prompt's rows
    past the window, project only the representatives' Q rows and the slots' K rows (qk_weights, attend_projected)."""

    sequence_state = ChaiAttention.sequence_state + ("members", "cluster_start")

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        super().setup_cache(max_batch_size, max_seq_len, dtype, device)
        B, H, C = max_batch_size, self.n_heads, self.n_clusters
        self.register_buffer("members", torch.zeros(B, H, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("cluster_start", torch.zeros(B, C + 1, dtype=torch.long, device=device),
                             persistent=False)
        # batch 1: the representatives' Q rows and the slots' K rows, re-gathered per request into static buffers;
        # fewer bytes than the whole projections whenever the layer is clustered
        self.rows = None
        if max_batch_size == 1 and C < H:
            self.rows = tuple(gather_rows(lin.weight, lin.bias, idx[0], self.head_dim)
                              for lin, idx in ((self.wq, self.rep_idx), (self.wk, self.kv_of_slot)))

    def release_cache(self):
        super().release_cache()
        for name in ("members", "cluster_start"):  # its own sequence_state entries
            self._buffers.pop(name, None)
        self.rows = None

    def attend_window(self, q, k, v, p0: int, rows: slice | None = None):
        if not (available(q) and self.p_win.dtype == torch.float32):
            return super().attend_window(q, k, v, p0, rows)
        n = q.shape[2]
        rows = slice(0, q.shape[0]) if rows is None else rows
        self.kv_cache.v[rows, :, p0:p0 + n] = v
        # q and k arrive rotated: the kernel runs without RoPE
        return window_attention(q, k, None, None, self.window_k(rows), self.p_win[rows], self.kv_cache.v[rows], p0,
                                self.scale)

    def store_membership(self, rows: slice, features):
        # also the decode kernel's lists (members, cluster_start); on the device, all of it in one launch.
        # features [B, H, F]: the window's or the prompt's rows
        if (self.static is None and self.algorithm == "agglomerative" and len(self.group_counts) == 1
                and available(features)):
            out = (self.rep_idx[rows], self.head_to_cluster[rows], self.kv_of_slot[rows], self.slot_of_rep[rows],
                   self.members[rows], self.cluster_start[rows])
            membership_kernel(features, self.n_clusters, self.representative == "medoid",
                              self.n_heads // self.n_kv_heads, self.n_k_slots, out)
            return
        super().store_membership(rows, features)
        for dst, src in zip((self.members, self.cluster_start), cluster_lists(self.head_to_cluster[rows],
                                                                             self.n_clusters)):
            dst[rows].copy_(src)

    def decide_membership(self, rows: slice, features=None):
        super().decide_membership(rows, features)
        if self.rows is not None:  # the new representatives' Q rows and slots' K rows, into the static buffers
            for (w, b), lin, idx in zip(self.rows, (self.wq, self.wk), (self.rep_idx, self.kv_of_slot)):
                gather_rows(lin.weight, lin.bias, idx[0], self.head_dim, out=(w, b))

    def qk_weights(self, n_tokens: int, input_pos):
        """The Q and K projections for this call: the representatives' rows for a clustered decode token at batch 1
        (n_tokens = B x S == 1)."""
        if self.rows is not None and self.ready and n_tokens == 1 and input_pos is not None:
            return self.rows
        return self.wq, self.wk

    def prefill_window_rows(self, S: int, input_pos, mask):
        """For a batch-1 prompt chunk that reaches past the window: how many of its first rows lie inside the window
        (they project whole Q and K and decide the membership); the rows after them project only the representatives'
        Q rows and the slots' K rows (self.rows). None: the chunk projects whole (no row buffers, membership from the
        prompt, a chunk inside the window, one token)."""
        if self.rows is None or self.decides_on != "window" or input_pos is None or input_pos.dim() != 1 or S < 2:
            return None
        start = mask.shape[-1] - S  # the chunk's keys are 0..start+S-1
        if start + S <= self.window:
            return None
        if start >= self.window:
            return 0 if self.ready else None  # not ready: attend names the missing window
        return self.window - start

    def attend_projected(self, project, x, rope, input_pos, mask):
        """A batch-1 prompt chunk past the window projects its later rows with the representatives' Q rows and the
        slots' K rows: member heads need neither (6% of a 2048-token 7B prefill's FLOPs, docs/performance.md,
        "Open gaps"). The attention is ChaiAttention.attend's: window rows dense, then one causal pass over the chunk
        with each cluster's probabilities, the window rows' output replaced by their dense one."""
        B, S = x.shape[:2]
        n_w = self.prefill_window_rows(S, input_pos, mask)
        if n_w is None or B != 1:  # every head projected (or a decode token's rows, qk_weights)
            return FastAttention.attend_projected(self, project, x, rope, input_pos, mask)
        start = mask.shape[-1] - S  # the chunk's keys are 0..start+S-1
        q_rep, k_slots, v = [], [], []
        if n_w:  # the window rows: dense attention over the window, then the membership (and self.rows re-gathered)
            q, k, v_w = project(x[:, :n_w], self.wq, self.wk)  # [1, H, n_w, D], [1, Hkv, n_w, D] x2
            q, k = rotate(q, k, rope_rows(rope, 0, n_w))
            y_w = self.attend(q, k, v_w, input_pos[:n_w], mask[:n_w, :start + n_w])  # [1, H, n_w, D]
            q_rep.append(batched_index(q, self.rep_idx[:1]))  # [1, C, n_w, D]
            k_slots.append(batched_index(k, self.kv_of_slot[:1]))  # [1, n_slots, n_w, D]
            v.append(v_w)
        q, k, v_r = project(x[:, n_w:], *self.rows)  # [1, C, S-n_w, D], [1, n_slots, S-n_w, D], [1, Hkv, S-n_w, D]
        q, k = rotate(q, k, rope_rows(rope, n_w, S))
        q_rep, k_slots, v = (torch.cat(parts + [t], dim=2) for parts, t in ((q_rep, q), (k_slots, k), (v, v_r)))
        y = self.attend_representatives(q_rep, k_slots, v, input_pos, mask)  # [1, H, S, D]
        if n_w:
            y[:, :, :n_w] = y_w
        return y

    def attend_unrotated(self, q, k, v, rope, input_pos, mask):
        # q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, D]; a decode token at batch 1 with rows: q [1, C, 1, D] and
        # k [1, n_slots, 1, D] (qk_weights)
        if not (self.ready and is_decode(q, input_pos)):
            return self.attend(*rotate(q, k, rope), v, input_pos, mask)
        cache, B = self.kv_cache, q.shape[0]
        if not (self.rows is not None and B == 1):  # projected by all heads: pick the representatives and slots
            q = batched_index(q, self.rep_idx[:B])  # [B, C, 1, D]
            k = batched_index(k, self.kv_of_slot[:B])  # [B, n_slots, 1, D]
        cos, sin = rope_row(rope)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if decode_kernel_serves(B, cache.k.shape[2], input_pos, CLUSTERED_DECODE_MAX_POSITIONS):  # one launch
            out = new_token_decode(q, k, v, cos, sin, cache.k, cache.v, input_pos, self.scale, self.members[:B],
                                   self.cluster_start[:B], self.slot_of_rep[:B])
            return out[:, :, None]
        # long caches: the probabilities in two launches (RoPE and the writes too), then cuBLAS streams V
        probs = clustered_probs(q, k, v, cos, sin, cache.k, cache.v, input_pos, self.scale,
                                self.head_to_cluster[:B], self.slot_of_rep[:B])  # [B, H, T]
        H, (Hkv, T, D) = probs.shape[1], cache.v.shape[1:]
        out = probs_times_v(probs.view(B * Hkv, H // Hkv, T), cache.v[:B].view(B * Hkv, T, D))  # [B*Hkv, G, D]
        return out.view(B, H, 1, D)
