"""What LLaMA and OPT share: the static KV cache, causal attention over it, and the checks of a cached call.

Shapes: B batch, S new tokens, T cache length, H query heads, Hkv key/value heads, D head_dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


class KVCache(nn.Module):
    """K and V of max_batch_size sequences of max_seq_len positions, held as buffers (static shapes, so one
    compiled decode step serves every position).

    n_k_heads and n_v_heads are separate: a CHAI-clustered layer keeps K only for its representatives.
    """

    def __init__(self, max_batch_size, max_seq_len, n_k_heads, n_v_heads, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(max_batch_size, n_k_heads, max_seq_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros(max_batch_size, n_v_heads, max_seq_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)

    def update(self, pos, k, v):
        # pos [S] (every row) or [B, S] (per row); k [B, n_k, S, D], v [B, n_v, S, D] -> the first B sequences'
        # K [B, n_k, T, D] and V [B, n_v, T, D]
        B = k.shape[0]
        if pos.dim() == 2:  # row b's tokens go to its own positions pos[b]
            rows = torch.arange(B, device=pos.device)[:, None]  # [B, 1]
            self.k[:B][rows, :, pos] = k.transpose(1, 2)  # indexed [B, S, n_k, D]
            self.v[:B][rows, :, pos] = v.transpose(1, 2)
            return self.k[:B], self.v[:B]
        self.k[:B].index_copy_(2, pos, k)
        self.v[:B].index_copy_(2, pos, v)
        return self.k[:B], self.v[:B]

    def nbytes(self) -> dict:
        return {"k": self.k.numel() * self.k.element_size(), "v": self.v.numel() * self.v.element_size()}


def attention(q, k, v, mask, scale):
    """softmax(q K^T * scale) V.

    q [B, H, S, D], k/v [B, Hkv, n, D] -> [B, H, S, D]. mask [S, n] or [B, 1, S, n] (per row) bool (True: attend), or
    None: causal with the S queries at the last S of the n positions (a whole sequence, or a prefill chunk over the cache's first n slots).
    """
    S, n = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]  # SDPA maps query heads to their KV head itself: no copy of K and V
    if mask is None and S == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if mask is None and not gqa:  # causal kernels skip the masked half; a [S, n] mask tensor costs ~4x
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(S, n), scale=scale)
    if mask is None:
        mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - S, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def cached_attention(cache: KVCache, q, k, v, input_pos, mask, scale):
    """Writes the new tokens' k, v into the cache at input_pos and attends over it.

    q [B, H, S, D], k/v [B, Hkv, S, D]; input_pos [S], [B, 1] (one token per row at its own position), or None (an
    uncached call: attend causally over k, v alone); mask from positions_and_mask -> [B, H, S, D].
    """
    if input_pos is None:
        return attention(q, k, v, None, scale)
    k, v = cache.update(input_pos, k, v)  # [B, Hkv, T, D]
    if q.shape[2] > 1:  # a prefill chunk reads keys 0..start+S-1 only (the mask's width), causally
        n = mask.shape[-1]
        return attention(q, k[:, :, :n], v[:, :, :n], None, scale)
    return attention(q, k, v, mask, scale)


def repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, H, T, D]: each KV head repeated for its query heads (GQA)."""
    g = n_heads // t.shape[1]
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def check_cache_call(model, B: int, S: int, input_pos: torch.Tensor) -> int | None:
    """Checks a cached forward's arguments; returns where a prefill chunk (S > 1) starts, None for one token.

    input_pos is [S] (every row at the same positions) or, for one token per row, [B, 1] (each row at its own
    position). A chunk's positions must be consecutive (its attention is causal over cache slots 0..start+S-1): they are
    read on the host once per prefill call. A one-token call never reads the device, so it can be captured in a graph.
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
    if input_pos.dim() == 2:
        if S != 1 or input_pos.shape != (B, 1):
            raise ValueError(f"per-row input_pos [B, 1] serves one token per row; got shape {tuple(input_pos.shape)} "
                             f"for tokens [{B}, {S}]. A prefill of rows of different lengths runs one call per length "
                             f"with shared positions [S] (generation.prefill)")
        return None
    if input_pos.dim() != 1 or input_pos.shape[0] != S:
        raise ValueError(f"input_pos must be a 1-D tensor of the {S} positions of the tokens (or [B, 1] for one token "
                         f"per row), got shape {tuple(input_pos.shape)}")
    if S == 1:
        return None
    host = input_pos.tolist()
    start = host[0]
    if host != list(range(start, start + S)):
        raise ValueError(f"input_pos of a {S}-token call must be consecutive positions (start, start+1, ...), "
                         f"got {host[:3]}...{host[-1:]}")
    if not 0 <= start <= model.max_seq_len - S:
        raise ValueError(f"positions {start}..{start + S - 1} do not fit the cache's {model.max_seq_len} slots; "
                         f"call setup_caches with a larger max_seq_len")
    return start


def positions_and_mask(model, tokens: torch.Tensor, input_pos: torch.Tensor | None):
    """tokens [B, S] -> (positions, mask) of a forward call.

    Uncached: positions 0..S-1 and mask None (causal). Cached: the checked input_pos and the keys each new token sees
    (position p sees cache slots 0..p): [S, n_keys] bool, or [B, 1, 1, T] for per-row positions [B, 1]. One token
    masks the whole cache (its position stays on the device); a prefill chunk starting at `start` spans slots
    0..start+S-1 only, which is all its attention reads.

    Rows of different lengths (generation.prefill): rows sorted longest first, one call per distinct length, each over
    the rows whose prompts reach it (the first rows: a call writes rows 0..B-1), so no token is padding; decoding then
    gives each row its own position ([B, 1]). Every token sits at the position it has alone (RoPE and learned positions
    unchanged, the fused causal kernel for a prompt, no key mask), and a one-token call masks each row past its own
    position: cache slots a row has not reached hold nothing it can see.
    """
    B, S = tokens.shape
    if input_pos is None:
        return torch.arange(S, device=tokens.device), None
    start = check_cache_call(model, B, S, input_pos)
    n_keys = model.max_seq_len if start is None else start + S
    keys = torch.arange(n_keys, device=input_pos.device)
    if input_pos.dim() == 2:
        return input_pos, (keys <= input_pos[:, :, None])[:, None]  # [B, 1, 1, T]
    return input_pos, keys[None, :] <= input_pos[:, None]


def move_rows(model, src: list[int], dst: list[int]) -> None:
    """Copies the cache rows src to rows dst in every attention layer: K, V and the per-sequence state a layer names in
    `sequence_state` (CHAI's membership and window), so a sequence moves whole. A serving engine uses it to free the
    first rows for a prefill (which writes rows 0..B-1)."""
    if len(src) != len(dst):
        raise ValueError(f"move_rows: {len(src)} source rows but {len(dst)} destinations")
    if not src:
        return
    device = model.tok_embeddings.weight.device
    s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
    for attn in model.attention_layers:
        for buf in (attn.kv_cache.k, attn.kv_cache.v, *(getattr(attn, n) for n in getattr(attn, "sequence_state", ()))):
            buf[d] = buf[s]


def setup_caches(model, max_batch_size: int, max_seq_len: int | None):
    """Gives every attention layer its cache (attn.setup_cache: a CHAI layer allocates its compact K there)."""
    max_seq_len = max_seq_len or model.config.max_seq_len
    if max_batch_size < 1 or max_seq_len < 1:
        raise ValueError(f"setup_caches needs max_batch_size >= 1 and max_seq_len >= 1, got "
                         f"{max_batch_size}, {max_seq_len}")
    w = model.tok_embeddings.weight
    model.max_batch_size, model.max_seq_len = max_batch_size, max_seq_len
    for attn in model.attention_layers:
        attn.setup_cache(max_batch_size, max_seq_len, w.dtype, w.device)


def clear_caches(model):
    for attn in model.attention_layers:
        attn.release_cache()
    model.max_batch_size, model.max_seq_len = 0, 0


def kv_cache_bytes(model) -> dict:
    """Allocated KV-cache bytes, measured on the buffers, and what dense attention would allocate.

    k, v: the caches; chai_window: CHAI's per-sequence window state (window K and features); dense_total: K with
    V's shape, plus V; saved: dense_total - total.
    """
    total = {"k": 0, "v": 0, "chai_window": 0}
    for attn in model.attention_layers:
        if attn.kv_cache is None:
            raise RuntimeError("no KV cache is allocated; call model.setup_caches(...) first")
        for key, n in attn.cache_nbytes().items():
            total[key] += n
    total["total"] = total["k"] + total["v"] + total["chai_window"]
    total["dense_total"] = 2 * total["v"]  # dense K has the shape of V
    total["saved"] = total["dense_total"] - total["total"]
    return total
