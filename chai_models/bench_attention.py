"""One layer's attention for a decode token alone, as the compiled decode step runs it: the decode kernel
(new_token_decode: RoPE, the K/V row writes and the attention in one launch) against the step's other path for
that layer (dense: rope_and_cache, then SDPA over the cache; CHAI: clustered_probs, then cuBLAS over V), each in a
CUDA graph over several layers' caches so that none stays in L2. Every row of the batch sits at position T - 40,
among the last positions bench.py's timed steps run over. Prints microseconds and TB/s of the cache bytes the
layer must read (its K slots and V up to the position), and which path the step takes at that size; `--sweep`
also times the decode kernel's launch configs.

    python tools/bench_attention.py --shape llama-2-7b --clusters 0 4 --batch 1 8 32 --context 512 2048 8192
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from .bench import check_close, copy_bandwidth, fastest, kernel_device, known_shapes, meta_model, time_graph
from .chai.attention import n_k_slots
from .errors import UserError, run_main
from .fast.attention import CLUSTERED_DECODE_MAX_POSITIONS, DENSE_DECODE_MAX_POSITIONS
from .fast.kernels import triton
from .fast.kernels.decode import DECODE_MAX_SPLITS, decode_config, decode_launch
from .fast.kernels.membership import membership
from .fast.kernels.probs import clustered_probs, probs_times_v
from .fast.kernels.rope_cache import rope_and_cache
from .models.llama import LlamaConfig
from .models.shared import attention

BEFORE_END = 40  # the token sits this many positions before the cache's end, as in tools/profile_decode.py


def layer_shape(shape: str) -> tuple[int, int, int, bool]:
    """(query heads, KV heads, head dim, RoPE) of a known model shape."""
    cfg = meta_model(shape).config
    H = cfg.n_heads
    if isinstance(cfg, LlamaConfig):
        return H, cfg.n_kv_heads, cfg.head_dim, True
    return H, H, cfg.hidden_size // H, False  # OPT: multi-head attention, learned positions


def layer_inputs(shape: tuple, k: int, B: int, T: int, copies: int, dtype, device):
    """copies x one layer's caches (K [B, n_slots, T, D], V [B, Hkv, T, D]); the token's q [B, C, D] (C = k
    representatives, or H), k [B, n_slots, D], v [B, Hkv, D]; cos, sin [1, D] or None; pos [1]; the membership
    (members, cluster_start, slot_of_rep, head_to_cluster; None for dense) of random head features, so the clusters
    are as uneven as a real request's."""
    H, Hkv, D, rope = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    n_slots = Hkv if k == 0 else n_k_slots(k, H, Hkv)
    caches = [(randn(B, n_slots, T, D), randn(B, Hkv, T, D)) for _ in range(copies)]
    C = H if k == 0 else k
    token = (randn(B, C, D), randn(B, n_slots, D), randn(B, Hkv, D))
    pos = torch.tensor([T - BEFORE_END], device=device)
    cos = sin = None
    if rope:
        ang = (T - BEFORE_END) * 10000.0 ** (-torch.arange(0, D, 2, device=device) / D)
        cos, sin = ang.repeat(2).cos()[None].to(dtype), ang.repeat(2).sin()[None].to(dtype)
    lists = None
    if k:
        features = torch.randn(B, H, 64, generator=gen, device=device)
        _, h2c, _, slot_of_rep, members, start = membership(features, k, group=H // Hkv, n_slots=n_slots)
        lists = (members, start, slot_of_rep, h2c)
    return caches, token, cos, sin, pos, lists


def _call(path: str, caches, token, cos, sin, pos, lists, scale: float, config: dict | None = None):
    k_cache, v_cache = caches
    q, k, v = token
    B, T = v_cache.shape[0], v_cache.shape[2]
    if path == "kernel":
        members, start, slot_of_rep = (None, None, None) if lists is None else lists[:3]
        return decode_launch(q, k_cache, v_cache, k, v, cos, sin, members, start, slot_of_rep, pos, scale,
                             **(config or {}))
    if lists is None:  # dense past the decode kernel's reach: RoPE and the writes, then SDPA over the whole cache
        q = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, pos)[:, :, None]  # [B, H, 1, D]
        mask = torch.arange(T, device=q.device)[None, :] <= pos  # [1, T]
        return attention(q, k_cache, v_cache, mask, scale)[:, :, 0]
    probs = clustered_probs(q, k, v, cos, sin, k_cache, v_cache, pos, scale, lists[3], lists[2])  # [B, H, T]
    H, (Hkv, _, D) = probs.shape[1], v_cache.shape[1:]
    return probs_times_v(probs.view(B * Hkv, H // Hkv, T), v_cache.view(B * Hkv, T, D)).view(B, H, D)


@torch.no_grad()
def time_attention(shape: tuple, k: int, B: int, T: int, path: str, copies: int, dtype, device,
                   repeats: int = 20, config: dict | None = None, inputs: tuple | None = None) -> float:
    """Seconds per call of one layer's decode-token attention on `path` ("kernel" or "other"; config: the decode
    kernel's launch config in place of decode_config's), one call per cache copy through bench.time_graph. The
    kernel is checked against the other path first. inputs: layer_inputs' for this cell, built once for all the
    timings of a cell (the caches are GBs at B=32)."""
    caches, token, cos, sin, pos, lists = inputs or layer_inputs(shape, k, B, T, copies, dtype, device)
    scale = shape[2] ** -0.5

    def run():
        for c in caches:
            _call(path, c, token, cos, sin, pos, lists, scale, config)

    if path == "kernel":  # a timing of a wrong result is no timing
        got, want = (_call(p, caches[0], token, cos, sin, pos, lists, scale, config) for p in ("kernel", "other"))
        check_close(got, want, dtype, f"{k or 'dense'} B={B} T={T}: the decode kernel differs from the other path")
    return time_graph(run, device, repeats) / copies


def read_bytes(shape: tuple, k: int, B: int, T: int, itemsize: int) -> int:
    """Cache bytes a decode token's attention must read: every row's K slots and V up to its position."""
    H, Hkv, D, _ = shape
    n_slots = Hkv if k == 0 else n_k_slots(k, H, Hkv)
    return B * (T - BEFORE_END + 1) * (n_slots + Hkv) * D * itemsize


def candidates(shape: tuple, k: int, T: int) -> list[dict]:
    """Decode kernel launch configs to sweep: heads per program (clustered layers), positions per tile and per
    split, warps and pipeline stages."""
    H = shape[0]
    hpbs = [1] if k == 0 else sorted({min(8, triton.next_power_of_2(max(1, round(H / k)))), 4, 8})
    splits = [s for s in (64, 128, 256, 512, 1024, 2048) if s < 2 * T and triton.cdiv(T, s) <= DECODE_MAX_SPLITS]
    return [dict(hpb=h, block_t=bt, split=s, num_warps=w, num_stages=st)
            for h, bt, s, w, st in itertools.product(hpbs, (32, 64), splits, (4, 8), (2, 3))]


def sweep(shape: tuple, k: int, B: int, T: int, copies: int, dtype, device, top: int = 3, inputs=None):
    """(seconds, config) of every candidate config, fastest first (the `top` best)."""
    inputs = inputs or layer_inputs(shape, k, B, T, copies, dtype, device)
    return fastest(lambda c: time_attention(shape, k, B, T, "kernel", copies, dtype, device, repeats=10, config=c,
                                            inputs=inputs), candidates(shape, k, T), top)


def main(argv=None) -> int:
    """tools/bench_attention.py: a UserError (an unknown shape, a bad cluster count) ends in one `error:` line."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help=f"one of {', '.join(known_shapes())}")
    p.add_argument("--clusters", nargs="+", type=int, default=[0, 4],
                   help="0: a dense layer; k: a CHAI layer of k clusters (preset llama-7b: 4)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--context", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--copies", type=int, default=4, help="layers' caches cycled through")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", action="store_true", help="also time every candidate launch config of the decode "
                                                        "kernel and print the three fastest (each compiles once)")
    a = p.parse_args(argv)
    if a.shape not in known_shapes():
        raise UserError(f"unknown shape {a.shape!r}; known: {', '.join(known_shapes())}")
    shape = layer_shape(a.shape)
    bad = [k for k in a.clusters if not 0 <= k < shape[0]]
    if bad:
        raise UserError(f"--clusters {bad}: 0 (dense) or 1..{shape[0] - 1} clusters of {a.shape}'s {shape[0]} heads")
    short = [t for t in a.context if t <= BEFORE_END]
    if short:
        raise UserError(f"--context {short}: the token sits {BEFORE_END} positions before the end; use more")
    device, dtype = kernel_device(a.device, a.dtype)
    bw = copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    print(f"# {a.shape} {a.dtype} on {card}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"{a.copies} layers' caches per graph; TB/s of the cache bytes read; step: the path the compiled step takes")
    print(f"{'layer':<8}{'B':>4}{'T':>7}{'kernel us':>11}{'TB/s':>7}{'other us':>10}{'TB/s':>7}{'other/kernel':>14}"
          f"{'step':>8}  decode_config")
    es = torch.empty((), dtype=dtype).element_size()
    for k, B, T in itertools.product(a.clusters, a.batch, a.context):
        nbytes = read_bytes(shape, k, B, T, es)
        inputs = layer_inputs(shape, k, B, T, a.copies, dtype, device)
        t = {path: time_attention(shape, k, B, T, path, a.copies, dtype, device, inputs=inputs)
             for path in ("kernel", "other")}
        limit = DENSE_DECODE_MAX_POSITIONS if k == 0 else CLUSTERED_DECODE_MAX_POSITIONS
        name = "dense" if k == 0 else f"k={k}"
        cfg = decode_config(B, shape[0], k or shape[0], shape[2], T, n_sms)
        print(f"{name:<8}{B:>4}{T:>7}{t['kernel'] * 1e6:>11.1f}{nbytes / t['kernel'] / 1e12:>7.2f}"
              f"{t['other'] * 1e6:>10.1f}{nbytes / t['other'] / 1e12:>7.2f}{t['other'] / t['kernel']:>13.3f}x"
              f"{'kernel' if B * T <= limit else 'other':>8}  {' '.join(f'{n}={v}' for n, v in cfg.items())}",
              flush=True)
        if a.sweep:
            for t_c, c in sweep(shape, k, B, T, a.copies, dtype, device, inputs=inputs):
                print(f"{'  sweep':<8}{B:>4}{T:>7}{t_c * 1e6:>11.1f}{nbytes / t_c / 1e12:>7.2f}   "
                      f"{' '.join(f'{n}={v}' for n, v in c.items())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
