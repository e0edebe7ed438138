"""LLaMA (1, 2, 3.x) and llama-architecture models (SmolLM2, TinyLlama), with CHAI in the attention.

One file, top to bottom: config, RoPE, RMSNorm, the static KV cache, attention, MLP, block, model.
Conventions follow Hugging Face's LlamaForCausalLM so that its weights load by renaming:
rotate-half RoPE (Q/K rows in HF order), cos/sin computed in fp32, RMSNorm computed in fp32.

Shapes: B batch, S new tokens, T cache length, H query heads, Hkv key/value heads, D head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import chai, kernels


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("llama3", "linear"):
            raise ValueError(f"rope_scaling {self.rope_scaling} is not supported; supported rope_type: "
                             "'llama3', 'linear'")


# ----------------------------------------------------------------------------------------------------
# RoPE and RMSNorm


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / sc["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between them
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
    freqs = pos.float()[:, None] * inv_freq[None, :]  # [S, D/2], fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, n, S, D]; rotate-half pairs dimension i with i + D/2 (the HF layout)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    gemv_fusable = True  # kernels.linear may fold this norm into a decode GEMV (same math, same roundings)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Static KV cache


class KVCache(nn.Module):
    """K and V for max_batch_size sequences of max_seq_len positions, held as buffers.

    n_k_heads may be smaller than n_v_heads: a CHAI-clustered layer keeps K only for its representatives.
    """

    def __init__(self, max_batch_size, max_seq_len, n_k_heads, n_v_heads, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(max_batch_size, n_k_heads, max_seq_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros(max_batch_size, n_v_heads, max_seq_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)

    def update_k(self, pos, k):  # pos [S], k [B, n, S, D] -> all K [B, n, T, D]
        self.k[: k.shape[0]].index_copy_(2, pos, k)
        return self.k[: k.shape[0]]

    def update_v(self, pos, v):
        self.v[: v.shape[0]].index_copy_(2, pos, v)
        return self.v[: v.shape[0]]


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, block


class Attention(nn.Module):
    forward_takes_norm = True  # forward(x, norm, ...) normalises x itself (calibrate's hooks read this)

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.head_dim**-0.5
        self.kv_cache: KVCache | None = None
        self.chai: chai.ChaiLayer | None = None  # set when this layer is clustered (k < n_heads)

    def rotate(self, t, rope):  # RoPE on q or k [B, n, S, D]; rope (cos, sin) [S, D]
        return apply_rope(t, *rope)

    # CHAI projects a subset of heads; heads=None means all of them; rope=None leaves RoPE to the caller.
    def project_q(self, x, rope, heads=None):  # -> [B, n, S, D]
        q = chai.project_heads(x, self.wq, self.head_dim, heads)
        return q if rope is None else self.rotate(q, rope)

    def project_k(self, x, rope, heads=None):
        k = chai.project_heads(x, self.wk, self.head_dim, heads)
        return k if rope is None else self.rotate(k, rope)

    def forward(self, x, norm, rope, input_pos=None, mask=None):
        # x [B, S, hidden] (the residual stream) -> x + attention(norm(x)); rope (cos, sin) [S, D];
        # input_pos [S] or None (no cache); mask [S, T] bool. kernels.linear folds the norm and the residual add
        # into the projections when it can (one token on CUDA).
        B, S, _ = x.shape
        # a clustered token at batch 1 projects only its representatives' Q/K rows, with V in the same call
        rows = self.chai.decode_rows(x, input_pos) if self.chai is not None else None
        if self.chai is not None and rows is None:
            h = norm(x)
            v = chai.project_heads(h, self.wv, self.head_dim)  # [B, Hkv, S, D]
            y = self.chai(self, h, rope, v, input_pos, mask)  # [B, H, S, D]
        else:
            wq, wk = (self.wq, self.wk) if rows is None else rows
            q, k, v = kernels.linear(x, (wq, wk, self.wv), norm=norm)  # [B, S, n*D] each
            q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, S, D]
            # RoPE on q and k, the cache write at input_pos, attention: one kernel launch for a decode token on CUDA
            if rows is not None:
                y = self.chai.decode(self, q, k, v, rope, input_pos, mask)  # [B, H, 1, D]
            else:
                y = chai.attend(self, q, k, v, rope, input_pos, mask)  # [B, H, S, D]
        return kernels.linear(y.transpose(1, 2).reshape(B, S, -1), (self.wo,), residual=x)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)  # down

    def forward(self, x, norm):  # x + w2(silu(w1 norm(x)) * w3 norm(x))
        h = kernels.linear(x, (self.w1, self.w3), norm=norm, swiglu=True)  # [B, S, intermediate]
        return kernels.linear(h, (self.w2,), residual=x)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, rope, input_pos, mask):
        x = self.attention(x, self.attention_norm, rope, input_pos, mask)  # x + attention(norm(x))
        return self.feed_forward(x, self.ffn_norm)  # x + mlp(norm(x))


# ----------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    family = "llama"
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        # tied embeddings: the output projection reads tok_embeddings.weight; no second copy exists
        self.output = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                        bias=False)
        self.max_batch_size, self.max_seq_len = 0, 0
        self.chai_config: chai.ChaiConfig | None = None
        self.init_buffers(None)

    def init_buffers(self, device):
        """(Re)computes non-persistent buffers; the loader calls it after building on the meta device."""
        self.register_buffer("inv_freq", rope_inv_freq(self.config, device=device), persistent=False)

    @property
    def attention_layers(self):
        return [blk.attention for blk in self.layers]

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None):
        """Allocates the static KV cache (and CHAI's per-sequence state) for this many sequences and positions."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"setup_caches needs max_batch_size >= 1 and max_seq_len >= 1, got "
                             f"{max_batch_size}, {max_seq_len}")
        w = self.tok_embeddings.weight
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for attn in self.attention_layers:
            n_k = attn.chai.n_k_slots if attn.chai is not None else cfg.n_kv_heads
            attn.kv_cache = KVCache(max_batch_size, max_seq_len, n_k, cfg.n_kv_heads, cfg.head_dim, w.dtype, w.device)
            if attn.chai is not None:
                attn.chai.setup(max_batch_size, w.dtype, w.device)

    def clear_caches(self):
        for attn in self.attention_layers:
            attn.kv_cache = None
            if attn.chai is not None:
                attn.chai.release()
        self.max_batch_size, self.max_seq_len = 0, 0

    def set_chai(self, cfg: chai.ChaiConfig | None):
        """Turns CHAI on with this config (None: dense). Re-allocates caches if they exist."""
        chai.install(self, cfg)

    def kv_cache_bytes(self) -> dict:
        return chai.kv_cache_bytes(self)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab]; last_only: of the last position only, [B, 1, vocab] (a prefill
        that only samples the next token skips the output projection of the other S - 1 rows).

        Without input_pos: scores the whole sequence at positions 0..S-1 and touches no cache.
        With input_pos [S] (positions of these tokens, the same for every row): reads and writes the KV cache
        set up by setup_caches; serves prefill (S > 1) and one-token decode (S == 1).
        """
        B, S = tokens.shape
        if input_pos is None:
            pos = torch.arange(S, device=tokens.device)
            mask = None  # causal
        else:
            start = chai.prepare_cache_call(self, B, S, input_pos)  # a prefill chunk's first position, or None
            pos = input_pos
            # a query at position p sees cache slots 0..p; one token masks the whole cache (pos stays on the device),
            # a prefill chunk only slots 0..start+S-1, which is all its attention reads
            n_keys = self.max_seq_len if start is None else start + S
            mask = torch.arange(n_keys, device=tokens.device)[None, :] <= pos[:, None]  # [S, n_keys]
        x = self.tok_embeddings(tokens)  # [B, S, hidden]
        rope = rope_cos_sin(self.inv_freq, pos, x.dtype)
        for blk in self.layers:
            x = blk(x, rope, input_pos, mask)
        if last_only:
            x = x[:, -1:]  # [B, 1, hidden]
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return kernels.linear(x, (w,), norm=self.norm)  # [B, S, vocab]
