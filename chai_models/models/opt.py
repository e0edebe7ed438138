"""OPT (Meta's Open Pre-trained Transformers, 125M to 66B).

One file, top to bottom: config and the public sizes, attention, MLP, block, model. The KV cache and the attention
call are shared with LLaMA (shared.py); CHAI and the fast path attach from outside, as for LLaMA.
Conventions follow Hugging Face's OPTForCausalLM so that its weights load by renaming:
  - learned position embeddings with an offset of 2 (row p + 2 holds position p; fairseq reserved rows 0-1);
  - q is scaled by head_dim^-0.5 right after its projection, before the product with K, so the attention
    kernels (dense and CHAI) run with scale 1.0; scaling q rather than the scores matters in fp16;
  - biases on every projection and fc layer, ReLU, LayerNorm (eps 1e-5);
  - pre-LN blocks with a final LayerNorm, except OPT-350m: post-LN blocks, no final LayerNorm, and a
    512-wide embedding projected in to / out of the 1024-wide model (project_in, project_out);
  - the output projection is tied to the token embedding.
There is no RoPE: attention modules of both families take a `rope` argument, unused here.

Shapes: B batch, S new tokens, T cache length, H heads, D head_dim, E word_embed_proj_dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import shared
from .shared import KVCache

POS_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclass
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    max_seq_len: int = 2048  # HF max_position_embeddings; the position table has max_seq_len + 2 rows
    word_embed_proj_dim: int | None = None  # None: hidden_size (every size but 350m)
    do_layer_norm_before: bool = True  # False: post-LN blocks and no final LayerNorm (350m)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "relu"
    bos_token_id: int | None = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = 1

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        for name in ("vocab_size", "hidden_size", "ffn_dim", "n_layers", "n_heads", "max_seq_len",
                     "word_embed_proj_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"OPTConfig.{name} = {v!r}; it must be a positive int")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of n_heads ({self.n_heads})")
        if self.activation != "relu":
            raise ValueError(f"OPTConfig.activation = {self.activation!r}; every OPT uses 'relu', the only one "
                             "supported")

    # CHAI and the cache code read these from any family's config; OPT has plain multi-head attention.
    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads


# The public OPT sizes (facebook/opt-*): shapes only, for random-weight tests and benchmarks.
OPT_PRESETS = {
    "opt-125m": dict(hidden_size=768, ffn_dim=3072, n_layers=12, n_heads=12),
    "opt-350m": dict(hidden_size=1024, ffn_dim=4096, n_layers=24, n_heads=16, word_embed_proj_dim=512,
                     do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, n_layers=24, n_heads=32),
    "opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, n_layers=32, n_heads=32),
    "opt-6.7b": dict(hidden_size=4096, ffn_dim=16384, n_layers=32, n_heads=32),
    "opt-13b": dict(hidden_size=5120, ffn_dim=20480, n_layers=40, n_heads=40),
    "opt-30b": dict(hidden_size=7168, ffn_dim=28672, n_layers=48, n_heads=56),
    "opt-66b": dict(hidden_size=9216, ffn_dim=36864, n_layers=64, n_heads=72),
}


def opt_config(name: str, **overrides) -> OPTConfig:
    """OPTConfig of a public size ('opt-125m' or '125m', ...); overrides change fields (e.g. n_layers=2)."""
    key = name if name.startswith("opt-") else f"opt-{name}"
    if key not in OPT_PRESETS:
        raise ValueError(f"unknown OPT size {name!r}; known: {', '.join(OPT_PRESETS)}")
    return OPTConfig(**{"vocab_size": 50272, "max_seq_len": 2048, **OPT_PRESETS[key], **overrides})


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, block


class Attention(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.enable_bias
        self.wq = nn.Linear(d, d, bias=bias)
        self.wk = nn.Linear(d, d, bias=bias)
        self.wv = nn.Linear(d, d, bias=bias)
        self.wo = nn.Linear(d, d, bias=bias)
        self.q_scale = cfg.head_dim**-0.5  # applied to q after its projection, as OPT was trained
        self.scale = 1.0  # what attention multiplies q.K^T by: q is already scaled
        self.kv_cache: KVCache | None = None

    def project(self, x, rope=None):
        # x [B, S, hidden] -> q, k, v [B, H, S, D]; q scaled; no RoPE (positions are in the embeddings)
        B, S, _ = x.shape
        q = (self.wq(x) * self.q_scale).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, input_pos, mask):
        # writes k, v at input_pos (None: no cache) and attends over the cache -> [B, H, S, D]
        return shared.cached_attention(self.kv_cache, q, k, v, input_pos, mask, self.scale)

    def forward(self, x, rope=None, input_pos=None, mask=None):
        # x [B, S, hidden]; input_pos [S], [B, 1] or None; mask (shared.positions_and_mask) or None
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        y = self.attend(q, k, v, input_pos, mask)  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def setup_cache(self, max_batch_size, max_seq_len, dtype, device):
        self.kv_cache = KVCache(max_batch_size, max_seq_len, self.n_heads, self.n_heads, self.head_dim, dtype, device)

    def release_cache(self):
        self.kv_cache = None

    def cache_nbytes(self) -> dict:
        return self.kv_cache.nbytes()


class MLP(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: OPTConfig, layer_idx: int):
        super().__init__()
        affine = cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.feed_forward = MLP(cfg)

    def forward(self, x, rope, input_pos, mask):
        if self.pre_ln:
            x = x + self.attention(self.attention_norm(x), rope, input_pos, mask)
            return x + self.feed_forward(self.ffn_norm(x))
        # post-LN (350m): normalize each residual sum
        x = self.attention_norm(x + self.attention(x, rope, input_pos, mask))
        return self.ffn_norm(x + self.feed_forward(x))


# ----------------------------------------------------------------------------------------------------
# The model


class OPT(nn.Module):
    family = "opt"
    config_class = OPTConfig

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        E, d = config.word_embed_proj_dim, config.hidden_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, E)
        self.pos_embeddings = nn.Embedding(config.max_seq_len + POS_OFFSET, d)
        # 350m embeds tokens in E = 512 dims and runs the blocks at 1024; no bias on either projection
        self.project_in = nn.Linear(E, d, bias=False) if E != d else None
        self.project_out = nn.Linear(d, E, bias=False) if E != d else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = (nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
                     if config.do_layer_norm_before else None)
        # the output projection reads tok_embeddings.weight (tied); no second copy exists
        self.max_batch_size, self.max_seq_len = 0, 0
        self.chai_config = None  # set by chai_models.chai.install
        self.init_buffers(None)

    def init_buffers(self, device):
        """(Re)computes non-persistent buffers; the loader calls it after building on the meta device.

        OPT has none (positions are learned weights); kept so that every family has the same contract.
        """

    @property
    def attention_layers(self):
        return [blk.attention for blk in self.layers]

    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None):
        """Allocates the static KV cache (and CHAI's per-sequence state) for this many sequences and positions."""
        if (max_seq_len or 0) > self.config.max_seq_len:
            raise ValueError(f"setup_caches(max_seq_len={max_seq_len}) but OPT has learned positions for "
                             f"{self.config.max_seq_len} only; use max_seq_len <= {self.config.max_seq_len}")
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
        Rows are never padded, so a row's positions are 0..n-1, which is what HF derives from an all-ones
        attention mask (its cumsum - 1).
        """
        S = tokens.shape[1]
        if input_pos is None and S > self.config.max_seq_len:
            raise ValueError(f"{S} tokens but OPT has learned positions for {self.config.max_seq_len}; "
                             f"score at most {self.config.max_seq_len} tokens at a time")
        pos, mask = shared.positions_and_mask(self, tokens, input_pos)  # pos [S] or [B, 1]; mask or None (causal)
        x = self.tok_embeddings(tokens)  # [B, S, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [B, S, hidden]
        x = x + self.pos_embeddings(pos + POS_OFFSET)
        for blk in self.layers:
            x = blk(x, None, input_pos, mask)
        if last_only:
            x = x[:, -1:]  # [B, 1, hidden]
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [B, S, E]
        return F.linear(x, self.tok_embeddings.weight)  # [B, S, vocab]
