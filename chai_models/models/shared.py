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
        # pos [S]; k [B, n_k, S, D], v [B, n_v, S, D] -> the first B sequences' K [B, n_k, T, D] and V [B, n_v, T, D]
        B = k.shape[0]
        self.k[:B].index_copy_(2, pos, k)
        self.v[:B].index_copy_(2, pos, v)
        return self.k[:B], self.v[:B]

    def nbytes(self) -> dict:
        return {"k": self.k.numel() * self.k.element_size(), "v": self.v.numel() * self.v.element_size()}


def attention(q, k, v, mask, scale):
    """softmax(q K^T * scale) V.

    q [B, H, S, D], k/v [B, Hkv, n, D] -> [B, H, S, D]. mask [S, n] bool (True: attend), or None: causal with the S
    queries at the last S of the n positions (a whole sequence, or a prefill chunk over the cache's first n slots).
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

    q [B, H, S, D], k/v [B, Hkv, S, D]; input_pos [S] or None (an uncached call: attend causally over k, v alone);
    mask [S, n_keys] from positions_and_mask -> [B, H, S, D].
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

    A chunk's positions must be consecutive (its attention is causal over cache slots 0..start+S-1): they are read
    on the host once per prefill call. A one-token call never reads the device, so it can be captured in a graph.
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
    """tokens [B, S] -> (positions [S], mask) of a forward call.

    Uncached: positions 0..S-1 and mask None (causal). Cached: the checked input_pos and the keys each new token sees,
    [S, n_keys] bool (position p sees cache slots 0..p). One token masks the whole cache (its position stays on the
    device); a prefill chunk starting at `start` spans slots 0..start+S-1 only, which is all its attention reads.
    """
    B, S = tokens.shape
    if input_pos is None:
        return torch.arange(S, device=tokens.device), None
    start = check_cache_call(model, B, S, input_pos)
    n_keys = model.max_seq_len if start is None else start + S
    return input_pos, torch.arange(n_keys, device=input_pos.device)[None, :] <= input_pos[:, None]


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

    k, v: the caches; chai_state: CHAI's per-sequence state beside them (window K and features, membership
    indices); dense_total: K with V's shape, plus V; saved: dense_total - total (negative when CHAI drops no K: its
    state is then all it adds).
    """
    total = {"k": 0, "v": 0, "chai_state": 0}
    for attn in model.attention_layers:
        if attn.kv_cache is None:
            raise RuntimeError("no KV cache is allocated; call model.setup_caches(...) first")
        for key, n in attn.cache_nbytes().items():
            total[key] += n
    total["total"] = total["k"] + total["v"] + total["chai_state"]
    total["dense_total"] = 2 * total["v"]  # dense K has the shape of V
    total["saved"] = total["dense_total"] - total["total"]
    return total
