"""The compiled decode step: one token for every sequence, through torch.compile with CUDA graphs.

Static shapes, built once per model and reused across requests: positions, prompt lengths and CHAI's membership
live in buffers, so nothing recompiles between requests.
"""
from __future__ import annotations

import torch

from ..chai.attention import ready
from .kernels import register_inductor_fallbacks, triton


# mode="reduce-overhead" spelled as its inductor option (CUDA graphs), so the other options apply to this graph only:
# coordinate-descent tuning (decode is a chain of matrix-vector products, and tuned reductions read the weights faster
# than the library GEMV), and, added where the inductor has it, programmatic dependent launch (each kernel starts
# while the one before drains; docs/performance.md, "dense decode"). The GPU tests compile most graphs untuned.
OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def decode_step(model, compile: bool = False):
    """The one-token decode step: tokens [B, 1], positions [B, 1] (each row its own; or [1], every row at one)
    -> next-token logits [B, vocab]. Positions are data, not shapes: any mix of them replays the same graph.

    compile=True: torch.compile(fullgraph) with CUDA graphs on GPU. While a CHAI layer's window is still filling
    (a row shorter than the window) the step runs eagerly, since that phase reads positions on the host.
    """
    if not compile:
        return lambda tok, pos: model(tok, pos)[:, -1]
    compiled = model.__dict__.get("_compiled_decode")  # kept outside nn.Module's registry (not a submodule)
    if compiled is None:
        import torch._dynamo as dynamo
        import torch._inductor.config as inductor

        # one graph per (batch size, cache length, CHAI layout) and per model instance: allow many
        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        options = dict(OPTIONS)
        if hasattr(inductor.triton, "enable_pdl"):
            options["triton.enable_pdl"] = True
        if triton is not None:
            register_inductor_fallbacks()
        compiled = torch.compile(model, fullgraph=True, dynamic=False, options=options)
        model.__dict__["_compiled_decode"] = compiled

    def step(tok, pos):
        if not ready(model):
            return model(tok, pos)[:, -1]
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(tok, pos)[:, -1].clone()  # the graph's output buffer is reused on the next replay

    return step
