"""The triton backend's blocks: the plain blocks' math with the projections fused with what surrounds them.

LLaMA: RMSNorm + Q/K/V, the output projection + the residual add, RMSNorm + gate/up + SwiGLU, down + the residual add
are one `linear` call each (inside torch.compile one kernel launch for up to 32 decode tokens: the GEMV at batch 1,
the small-M GEMM beyond, its norm a kernel before it), and attention starts from the projections before RoPE (the
decode kernel applies it). OPT's pre-LN block the same way: LayerNorm + Q/K/V, the output projection + the residual
add, LayerNorm + fc1 + ReLU, fc2 + the residual add; its attention alone (post-LN OPT-350m) starts from its own
projections (it has no RoPE), so the decode kernels serve it too. Uncached calls (scoring, calibration hooks) take
the plain path.

Packed projections: the linears that share an input (Q/K/V; LLaMA's gate/up) keep their weights as row ranges of one
tensor, the block's non-persistent buffer `<group>_weight` (and `_bias`), so that several rows (eager batch > 1,
prefill, compiled past 32 rows) multiply by them in one GEMM: at 8 rows an H200 reads the LLaMA-2-7B Q/K/V weights
at 3.6 TB/s as one GEMM and at 2.5 TB/s as three (docs/performance.md, "packed projections"). The linears'
parameters are views of it, so names, values and the state dict are those of the plain model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .kernels.gemv import linear


def pack(block, group: str, linears) -> None:
    """Stacks the weights (and biases) of linears sharing an input into one tensor, registered on the block as
    `<group>_weight` / `<group>_bias`, and makes each linear's parameters views of it. Linears where only some have a
    bias, or on the meta device, are left as they are."""
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) != all(has_bias) or linears[0].weight.device.type == "meta":
        return
    w = torch.cat([lin.weight.detach() for lin in linears])  # [sum N, K]
    b = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None  # [sum N]
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(w[row:row + n], requires_grad=lin.weight.requires_grad)
        if b is not None:
            lin.bias = nn.Parameter(b[row:row + n], requires_grad=lin.bias.requires_grad)
        row += n
    block.register_buffer(f"{group}_weight", w, persistent=False)
    block.register_buffer(f"{group}_bias", b, persistent=False)


def packed(block, group: str, linears):
    """(weight, bias) of the group's packed tensor while its linears' parameters still are views of it, else None
    (parameters replaced since: `model.to(dtype)`, `load_state_dict(assign=True)`, ...)."""
    w = block._buffers.get(f"{group}_weight")
    if w is None:
        return None
    first, last = linears[0].weight, linears[-1].weight
    if not (first.data_ptr() == w.data_ptr() and first.dtype == w.dtype and first.device == w.device
            and last.data_ptr() == w[-last.shape[0]:].data_ptr()):
        return None
    return w, block._buffers.get(f"{group}_bias")


def repack(block) -> None:
    """Packs each of the block's groups whose linears are not (or no longer) views of its packed tensor."""
    for group, linears in block.packed_groups().items():
        if packed(block, group, linears) is None:
            pack(block, group, linears)


def group_weights(block, group: str):
    """The packed (weight, bias) a forward multiplies by: checked (and re-packed) outside torch.compile; a compiled
    graph is traced after an eager prefill has checked them."""
    if not torch.compiler.is_compiling():
        repack(block)
    return getattr(block, f"{group}_weight"), getattr(block, f"{group}_bias")


class FastLlamaBlock:
    def packed_groups(self):
        attn, mlp = self.attention, self.feed_forward
        return {"qkv": (attn.wq, attn.wk, attn.wv), "gate_up": (mlp.w1, mlp.w3)}

    def forward(self, x, rope, input_pos, mask):
        if input_pos is None:
            return super().forward(x, rope, input_pos, mask)
        attn, mlp = self.attention, self.feed_forward
        B, S, _ = x.shape

        def project(rows, wq, wk):  # wq, wk: the modules, or a CHAI layer's representatives' rows (fewer heads)
            qkv = group_weights(self, "qkv") if wq is attn.wq else None
            q, k, v = linear(rows, (wq, wk, attn.wv), norm=self.attention_norm, packed=qkv)  # [B, s, n*D] each
            return tuple(t.view(B, rows.shape[1], -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, s, D]

        y = attn.attend_projected(project, x, rope, input_pos, mask)  # [B, H, S, D]
        x = add_linear(x, attn.wo, y.transpose(1, 2).reshape(B, S, -1))  # x + wo(y)
        h = linear(x, (mlp.w1, mlp.w3), norm=self.ffn_norm, swiglu=True,
                   packed=group_weights(self, "gate_up"))  # silu(w1 norm(x)) * w3 norm(x)
        return add_linear(x, mlp.w2, h)


class FastOPTAttention:
    def forward(self, x, rope=None, input_pos=None, mask=None):
        B, S, _ = x.shape

        def project(rows, wq, wk):  # wq, wk: the modules, or a CHAI layer's representatives' rows (fewer heads)
            q, k, v = linear(rows, (wq, wk, self.wv))  # [B, s, n*D] each
            q = q * self.q_scale  # as OPT's project: q scaled after its projection; OPT has no RoPE
            return tuple(t.view(B, rows.shape[1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, s, D]

        y = self.attend_projected(project, x, None, input_pos, mask)  # [B, H, S, D]
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class FastOPTBlock:
    def packed_groups(self):
        attn = self.attention
        return {"qkv": (attn.wq, attn.wk, attn.wv)}

    def forward(self, x, rope, input_pos, mask):
        if input_pos is None or not self.pre_ln:  # post-LN (350m): the plain block over FastOPTAttention
            return super().forward(x, rope, input_pos, mask)
        attn, mlp = self.attention, self.feed_forward
        B, S, _ = x.shape

        def project(rows, wq, wk):  # as LLaMA's block, with OPT's q scaling
            qkv = group_weights(self, "qkv") if wq is attn.wq else None
            q, k, v = linear(rows, (wq, wk, attn.wv), norm=self.attention_norm, packed=qkv)  # [B, s, n*D] each
            q = q * attn.q_scale
            return tuple(t.view(B, rows.shape[1], -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, n, s, D]

        y = attn.attend_projected(project, x, None, input_pos, mask)  # [B, H, S, D]
        x = add_linear(x, attn.wo, y.transpose(1, 2).reshape(B, S, -1))  # x + wo(y)
        h = linear(x, (mlp.fc1,), norm=self.ffn_norm, relu=True)  # relu(fc1 norm(x))
        return add_linear(x, mlp.fc2, h)


def add_linear(residual, lin, x):
    """residual + lin(x); a tensor-parallel lin (chai_models.parallel.RowParallelLinear) sums the ranks' partial
    products first, so the residual add (and its bias) come after the all-reduce, outside the kernel."""
    if not hasattr(lin, "reduce"):
        return linear(x, (lin,), residual=residual)
    return residual + lin.reduce(linear(x, (lin.weight,)))
