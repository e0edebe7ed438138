"""One decoder layer's projections alone, as the compiled decode step runs them: the triton backend's kernel (the
one-row GEMV for 1 row, the small-M GEMM for 2..32) against the torch path (cuBLAS on the packed weights, with the
norm and the epilogue as torch ops; at several rows the norm is left out of both, as the compiled step runs it in a
kernel of its own), each in a CUDA graph that cycles through several copies of the weights so that
none stays in L2. Prints microseconds and TB/s of weight bytes per projection and per layer.

    python tools/bench_projections.py --shape llama-2-7b --rows 1 8 32
"""
from __future__ import annotations

import argparse
import sys

import torch

from .bench import check_close, copy_bandwidth, fastest, kernel_device, known_shapes, meta_model, time_graph
from .errors import UserError, run_main
from .fast.kernels import gemv, triton
from .models.llama import LlamaConfig, RMSNorm


def projections(cfg) -> list[dict]:
    """A layer's projection groups as the triton backend's blocks call `linear`: name, weight shapes [(N, K)], and
    what is folded around them (norm "rms" / "layer" / None, bias, swiglu, relu, residual); the output head last."""
    if isinstance(cfg, LlamaConfig):
        hid, qd, kvd, ffn = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, \
            cfg.intermediate_size
        return [dict(name="q/k/v", shapes=[(qd, hid), (kvd, hid), (kvd, hid)], norm="rms", bias=cfg.attention_bias),
                dict(name="wo", shapes=[(hid, qd)], residual=True, bias=cfg.attention_bias),
                dict(name="gate/up", shapes=[(ffn, hid)] * 2, norm="rms", swiglu=True, bias=cfg.mlp_bias),
                dict(name="down", shapes=[(hid, ffn)], residual=True, bias=cfg.mlp_bias),
                dict(name="head", shapes=[(cfg.vocab_size, hid)], norm="rms")]
    hid, ffn, b = cfg.hidden_size, cfg.ffn_dim, cfg.enable_bias  # OPT's pre-LN block
    return [dict(name="q/k/v", shapes=[(hid, hid)] * 3, norm="layer", bias=b),
            dict(name="out_proj", shapes=[(hid, hid)], residual=True, bias=b),
            dict(name="fc1", shapes=[(ffn, hid)], norm="layer", relu=True, bias=b),
            dict(name="fc2", shapes=[(hid, ffn)], residual=True, bias=b),
            dict(name="head", shapes=[(cfg.vocab_size, cfg.word_embed_proj_dim)], norm="layer")]


def _inputs(p: dict, M: int, copies: int, dtype, device, eps: float):
    """copies x (linears as (weight, bias) pairs, packed (weight, bias)), one x [M, 1, K], the norm, the residual."""
    gen = torch.Generator(device=device).manual_seed(0)
    K = p["shapes"][0][1]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    sets = []
    for _ in range(copies):
        lins = [(randn(n, k) / k**0.5, randn(n) if p.get("bias") else None) for n, k in p["shapes"]]
        packed = (torch.cat([w for w, _ in lins]), torch.cat([b for _, b in lins]) if p.get("bias") else None)
        sets.append((lins, packed))
    norm = None
    if p.get("norm") == "rms":
        norm = RMSNorm(K, eps).to(device, dtype)
    elif p.get("norm") == "layer":
        norm = torch.nn.LayerNorm(K, eps=eps).to(device, dtype)
    n_out = p["shapes"][0][0] if p.get("swiglu") else sum(n for n, _ in p["shapes"])
    residual = randn(M, 1, n_out) if p.get("residual") else None
    return sets, randn(M, 1, K), norm, residual


def _call(path: str, p: dict, x, lins, packed, norm, residual, config=None):
    args = dict(norm=norm, residual=residual, swiglu=p.get("swiglu", False), relu=p.get("relu", False))
    if path == "torch":
        return gemv.linear(x, lins, packed=packed if len(lins) > 1 else None, **args)  # eager: the torch path
    weights, biases = [w for w, _ in lins], [b for _, b in lins] if p.get("bias") else []
    x, norm_weight, norm_bias, eps = gemv.fold_norm(x, norm)  # as linear hands them to the kernels
    return gemv.gemv_launch(x, weights, biases, norm_weight, norm_bias, eps, residual, args["swiglu"], args["relu"],
                            config)


@torch.no_grad()
def time_projection(p: dict, M: int, path: str, copies: int, dtype, device, eps: float = 1e-5,
                    repeats: int = 20, config: dict | None = None) -> float:
    """Seconds per call of one projection group at M rows on `path` ("kernel" or "torch"; config: the kernel's
    launch config in place of its own), one call per weight copy through bench.time_graph."""
    sets, x, norm, residual = _inputs(p, M, copies, dtype, device, eps)
    if norm is not None and M > 1:  # several rows: the compiled step normalizes them in a kernel of inductor's own
        x, norm = norm(x), None     # before the projection, so neither path's timing holds the norm

    def run():
        for lins, packed in sets:
            _call(path, p, x, lins, packed, norm, residual, config)

    if path == "kernel":  # a timing of a wrong result is no timing: the kernel against the torch path first
        lins, packed = sets[0]
        got, want = (_call(q, p, x, lins, packed, norm, residual, config) for q in ("kernel", "torch"))
        want = torch.cat(want, -1) if isinstance(want, tuple) else want
        check_close(got, want, dtype, f"{p['name']} at {M} rows: the kernel differs from the torch path")

    return time_graph(run, device, repeats) / copies


def candidates(p: dict, M: int, itemsize: int) -> list[dict]:
    """Launch configs to sweep for one projection group at M rows: _gemv_kernel's (BLOCK_N x BLOCK_K, warps) for one
    row, _rows_kernel's (BLOCK_N x BLOCK_K, stages) for more, within the shared memory its stages need."""
    K = p["shapes"][0][1]
    k_max = max(16, triton.next_power_of_2(K))
    if M == 1:
        tiles = sorted({min(bk, k_max) for bk in (512, 1024, 2048, 4096)})  # short rows: one whole-row tile
        return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn in (1, 2, 4, 8, 16) for bk in tiles
                if bn * bk <= 16384 for w in (4, 8)]
    bm = max(16, triton.next_power_of_2(M))
    tiles = sorted({min(bk, k_max) for bk in (64, 128, 256, 512)})
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st) for bn in (16, 32, 64, 128)
            for bk in tiles for st in (2, 3, 4, 5)
            if gemv.rows_stage_bytes(bm, bn, bk, p.get("swiglu", False), itemsize) * st <= gemv.ROWS_SHARED_BYTES]


def sweep(p: dict, M: int, copies: int, dtype, device, top: int = 3) -> list[tuple[float, dict]]:
    """(seconds, config) of every candidate config, fastest first (the `top` best)."""
    es = torch.empty((), dtype=dtype).element_size()
    return fastest(lambda c: time_projection(p, M, "kernel", copies, dtype, device, repeats=10, config=c),
                   candidates(p, M, es), top)


def main(argv=None) -> int:
    """tools/bench_projections.py: a UserError (an unknown shape, too many rows) ends in one `error:` line."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help=f"one of {', '.join(known_shapes())}")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32], help=f"decode rows, 1..{gemv.MAX_ROWS}")
    p.add_argument("--copies", type=int, default=4, help="weight copies cycled through (more than L2 holds)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", action="store_true",
                   help="also time every candidate launch config of the kernel and print the three fastest (each "
                        "candidate compiles once: minutes for a whole layer; --only narrows it)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these projection groups (q/k/v, wo, "
                                                                            "...)")
    a = p.parse_args(argv)
    if a.shape not in known_shapes():
        raise UserError(f"unknown shape {a.shape!r}; known: {', '.join(known_shapes())}")
    bad = [m for m in a.rows if not 1 <= m <= gemv.MAX_ROWS]
    if bad:
        raise UserError(f"--rows {bad}: the kernels serve 1..{gemv.MAX_ROWS} rows; past that the step runs cuBLAS")
    groups = projections(meta_model(a.shape).config)
    if a.only:
        unknown = sorted(set(a.only) - {g["name"] for g in groups})
        if unknown:
            raise UserError(f"--only {unknown}: not a projection group of {a.shape}; its groups: "
                            f"{', '.join(g['name'] for g in groups)}")
        groups = [g for g in groups if g["name"] in a.only]
    device, dtype = kernel_device(a.device, a.dtype)
    bw = copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {a.shape} {a.dtype} on {card}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"{a.copies} weight copies per graph; TB/s of weight bytes")
    print(f"{'projection':<12}{'rows':>5}{'kernel us':>11}{'TB/s':>7}{'torch us':>10}{'TB/s':>7}{'torch/kernel':>14}")
    es = torch.empty((), dtype=dtype).element_size()
    for M in a.rows:
        total = {"kernel": 0.0, "torch": 0.0}
        for proj in groups:
            nbytes = sum(n * k for n, k in proj["shapes"]) * es
            t = {path: time_projection(proj, M, path, a.copies, dtype, device) for path in ("kernel", "torch")}
            if proj["name"] != "head":
                for path in t:
                    total[path] += t[path]
            print(f"{proj['name']:<12}{M:>5}{t['kernel'] * 1e6:>11.1f}{nbytes / t['kernel'] / 1e12:>7.2f}"
                  f"{t['torch'] * 1e6:>10.1f}{nbytes / t['torch'] / 1e12:>7.2f}{t['torch'] / t['kernel']:>13.3f}x",
                  flush=True)
            if a.sweep:
                for t_c, c in sweep(proj, M, a.copies, dtype, device):
                    print(f"{'  sweep':<12}{M:>5}{t_c * 1e6:>11.1f}{nbytes / t_c / 1e12:>7.2f}   "
                          f"{' '.join(f'{k}={v}' for k, v in c.items())}", flush=True)
        if not a.only:
            print(f"{'layer':<12}{M:>5}{total['kernel'] * 1e6:>11.1f}{'':>7}{total['torch'] * 1e6:>10.1f}{'':>7}"
                  f"{total['torch'] / total['kernel']:>13.3f}x   (head not included)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
