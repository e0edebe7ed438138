"""The triton backend's blocks: the plain blocks' math with the projections fused with what surrounds them.

LLaMA: RMSNorm + Q/K/V, the output projection + the residual add, RMSNorm + gate/up + SwiGLU, down + the residual add
are one `linear` call each (one GEMV launch for a decode token at batch 1 inside torch.compile), and attention starts
from the projections before RoPE (the decode kernel applies it). OPT: its attention starts from its own projections
(it has no RoPE), so the decode kernels serve it too. Uncached calls (scoring, calibration hooks) take the plain path.
"""
from __future__ import annotations

from .kernels.gemv import linear


class FastLlamaBlock:
    def forward(self, x, rope, input_pos, mask):
        if input_pos is None:
            return super().forward(x, rope, input_pos, mask)
        attn, mlp = self.attention, self.feed_forward
        B, S, _ = x.shape
        wq, wk = attn.qk_weights(B * S, input_pos)  # a CHAI decode token at batch 1: its representatives' rows
        q, k, v = linear(x, (wq, wk, attn.wv), norm=self.attention_norm)  # [B, S, n*D] each
        q, k, v = (t.view(B, S, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, S, D]
        y = attn.attend_unrotated(q, k, v, rope, input_pos, mask)  # [B, H, S, D]
        x = add_linear(x, attn.wo, y.transpose(1, 2).reshape(B, S, -1))  # x + wo(y)
        h = linear(x, (mlp.w1, mlp.w3), norm=self.ffn_norm, swiglu=True)  # silu(w1 norm(x)) * w3 norm(x)
        return add_linear(x, mlp.w2, h)


def add_linear(residual, lin, x):
    """residual + lin(x); a tensor-parallel lin (chai_models.parallel.RowParallelLinear) sums the ranks' partial
    products first, so the residual add stays outside the kernel."""
    if not hasattr(lin, "reduce"):
        return linear(x, (lin,), residual=residual)
    return residual + lin.reduce(linear(x, (lin.weight,)))


class FastOPTAttention:
    def forward(self, x, rope=None, input_pos=None, mask=None):
        B, S, _ = x.shape
        wq, wk = self.qk_weights(B * S, input_pos)  # a CHAI decode token at batch 1: its representatives' rows
        q, k, v = linear(x, (wq, wk, self.wv))  # [B, S, n*D] each
        q = q * self.q_scale  # as OPT's project: q scaled after its projection; OPT has no RoPE
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, S, D]
        y = self.attend_unrotated(q, k, v, None, input_pos, mask)  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))
