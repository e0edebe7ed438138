"""The one Q/K row permutation that Meta's and llama.cpp's layouts need: interleaved RoPE pairs -> rotate-half.

Meta's checkpoints and llama.cpp's GGUF files keep, within each head, the two rows that RoPE rotates together
(i, i + D/2 in Hugging Face's numbering) next to each other; llama.py rotates halves like Hugging Face, so the
rows of wq / wk (and their biases) are put back head by head.
"""
from __future__ import annotations

import torch


def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows -> rotate-half rows, head by head. w: a weight [H*D, hidden] or a bias [H*D]."""
    rest = w.shape[1:]
    D = w.shape[0] // n_heads
    w = w.reshape(n_heads, D // 2, 2, *rest)  # [H, D/2, pair, ...]
    return w.transpose(1, 2).reshape(n_heads * D, *rest)  # [H, pair, D/2, ...] -> [H*D, ...]
