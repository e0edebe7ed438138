"""LLaMA (1, 2, 3.x) and llama-architecture models (SmolLM2, TinyLlama).

One file, top to bottom: config, RoPE, RMSNorm, attention, MLP, block, model. The KV cache and the attention
call are shared with OPT (shared.py). CHAI replaces `Attention.attend` and the cache's shape from outside
(chai_models.chai), and the fast path swaps in fused forwards (chai_models.fast): neither is visible here.
Conventions follow Hugging Face's LlamaForCausalLM so that its weights load by renaming:
rotate-half RoPE (Q/K rows in HF order), cos/sin computed in fp32, RMSNorm computed in fp32.

Shapes: B batch, S new tokens, T cache length, H query heads, Hkv key/value heads, D head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import shared
from .shared import KVCache


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LlamaConfig.{name} = {v!r}; it must be a positive int")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"LlamaConfig.{name} = {v!r}; it must be a positive number")
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
    # pos [S] -> cos, sin [S, D]; per-row pos [B, S] -> [B, 1, S, D] (broadcast over heads)
    freqs = pos.float()[..., None] * inv_freq  # [..., S, D/2], fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., S, D]
    if pos.dim() == 2:
        emb = emb[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, n, S, D]; rotate-half pairs dimension i with i + D/2 (the HF layout)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, block


class Attention(nn.Module):
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

    def project(self, x, rope):
        # x [B, S, hidden]; rope (cos, sin) [S, D] -> q [B, H, S, D], k and v [B, Hkv, S, D], RoPE on q and k
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def attend(self, q, k, v, input_pos, mask):
        # writes k, v at input_pos (None: no cache) and attends over the cache -> [B, H, S, D]
        return shared.cached_attention(self.kv_cache, q, k, v, input_pos, mask, self.scale)

    def forward(self, x, rope, input_pos=None, mask=None):
        # x [B, S, hidden] (normalised); input_pos [S], [B, 1] or None; mask (shared.positions_and_mask) or None
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        y = self.attend(q, k, v, input_pos, mask)  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        self.kv_cache = KVCache(max_batch_size, max_seq_len, self.n_kv_heads, self.n_kv_heads, self.head_dim,
                                dtype, device)

    def release_cache(self):
        self.kv_cache = None

    def cache_nbytes(self) -> dict:
        return self.kv_cache.nbytes()


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)  # down

    def forward(self, x):  # SwiGLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, rope, input_pos, mask):
        x = x + self.attention(self.attention_norm(x), rope, input_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


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
        self.chai_config = None  # set by chai_models.chai.install
        self.init_buffers(None)

    def init_buffers(self, device):
        """(Re)computes non-persistent buffers; the loader calls it after building on the meta device."""
        self.register_buffer("inv_freq", rope_inv_freq(self.config, device=device), persistent=False)

    @property
    def attention_layers(self):
        return [blk.attention for blk in self.layers]

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None):
        """Allocates the static KV cache (and CHAI's per-sequence state) for this many sequences and positions."""
        shared.setup_caches(self, max_batch_size, max_seq_len)

    def clear_caches(self):
        shared.clear_caches(self)

    def kv_cache_bytes(self) -> dict:
        return shared.kv_cache_bytes(self)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab]; last_only: of the last position only, [B, 1, vocab] (a prefill
        that only samples the next token skips the output projection of the other S - 1 rows).

        Without input_pos: scores the whole sequence at positions 0..S-1 and touches no cache.
        With input_pos [S] (positions of these tokens, the same for every row) or [B, 1] (one token per row, each at
        its own position): reads and writes the KV cache set up by setup_caches; serves prefill (S > 1) and decode.
        """
        pos, mask = shared.positions_and_mask(self, tokens, input_pos)  # pos [S] or [B, 1]; mask or None (causal)
        x = self.tok_embeddings(tokens)  # [B, S, hidden]
        rope = rope_cos_sin(self.inv_freq, pos, x.dtype)  # cos, sin [S, D] or [B, 1, 1, D]
        for blk in self.layers:
            x = blk(x, rope, input_pos, mask)
        if last_only:
            x = x[:, -1:]  # [B, 1, hidden]
        x = self.norm(x)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, w)  # [B, S, vocab]
