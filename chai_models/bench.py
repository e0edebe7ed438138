"""Decode / prefill / capacity benchmark on random weights of real shapes, dense vs CHAI, eager vs compiled.

Decode at small batch is memory-bound: a step reads every weight once plus the KV cache, so
    floor(step) = (weight_bytes + kv_bytes_read) / measured_copy_bandwidth
and we report achieved bandwidth (bytes per step / time) as a fraction of the measured device copy bandwidth.
CHAI reads fewer bytes (K of the representatives only; at small batch only the representatives' Q/K weight
rows), so its ideal decode speedup over dense is the ratio of the two byte counts; we print measured next to
ideal. The static cache is read whole each step (positions past the current one are masked), as in gpt-fast,
so "context" is the cache length T. Peak MB is the allocator's peak over one configuration on CUDA (weights,
caches, activations, CUDA-graph pools; "-" on CPU).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from . import gate, set_backend, set_chai
from .chai import ChaiConfig, reset
from .errors import UserError, run_main
from .fast.compile import decode_step
from .generation import prefill
from .models import Llama, LlamaConfig

SHAPES = {
    # LLaMA-1 7B and LLaMA-2 7B share this shape; the published CHAI counts (preset llama-7b) fit it
    "llama-2-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32,
                       n_heads=32, n_kv_heads=32, head_dim=128, max_seq_len=16384, norm_eps=1e-5),
    # LLaMA-1 33B (the paper's 33B; preset llama-33b fits it)
    "llama-33b": dict(family="llama", vocab_size=32000, hidden_size=6656, intermediate_size=17920, n_layers=60,
                      n_heads=52, n_kv_heads=52, head_dim=128, max_seq_len=2048, norm_eps=1e-6),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30,
                         n_heads=9, n_kv_heads=3, head_dim=64, max_seq_len=8192, norm_eps=1e-5,
                         tie_word_embeddings=True),
    "tiny": dict(family="llama", vocab_size=512, hidden_size=256, intermediate_size=688, n_layers=4, n_heads=8,
                 n_kv_heads=8, head_dim=32, max_seq_len=4096),
}


def known_shapes() -> list[str]:
    from .models.opt import OPT_PRESETS

    return sorted(SHAPES) + list(OPT_PRESETS)


def meta_model(shape: str) -> torch.nn.Module:
    """A model of a real shape on the meta device (shapes only)."""
    if shape.startswith("opt-"):
        from .models.opt import OPT, OPT_PRESETS, opt_config

        if shape not in OPT_PRESETS:
            raise UserError(f"unknown shape {shape!r}; known: {', '.join(known_shapes())}")
        cfg, cls = opt_config(shape[4:]), OPT
    elif shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}; known: {', '.join(known_shapes())}")
    else:
        fields = {k: v for k, v in SHAPES[shape].items() if k != "family"}
        cfg, cls = LlamaConfig(**fields), Llama
    with torch.device("meta"):
        return cls(cfg)


def random_model(shape: str, device, dtype, tp=None) -> torch.nn.Module:
    """A model of a real shape with random weights, built without a CPU copy; tp (parallel.TensorParallel): only this
    rank's shard is allocated (its random values are its own, not a slice of one-process weights)."""
    model = meta_model(shape)
    if tp is not None:
        from .parallel import shard

        shard(model, tp.group)
    model = model.to(dtype).to_empty(device=device)  # meta -> dtype first: no float32 copy is ever allocated
    gen = torch.Generator(device=device).manual_seed(0 if tp is None else tp.rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "bias" not in name:  # norm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.init_buffers(device)
    return model.eval()


def chai_config(model, spec: str) -> ChaiConfig | None:
    """A --chai spec for this model: None for 'dense'."""
    return None if spec == "dense" else ChaiConfig.from_spec(spec, model.config.n_layers, model.config.n_heads)


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: all parameters but the embedding table (only B rows of it are
    read), unless the table is also the (tied) output projection."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    tied = getattr(model.config, "tie_word_embeddings", True)
    for i, m in enumerate(emb):
        if not (i == 0 and tied):  # the token table is read whole when it is the output projection
            total -= m.weight.numel() * m.weight.element_size()
    return total


def step_bytes(model, B: int) -> int:
    """Bytes one decode step must read: weights (a CHAI layer at batch 1 on the triton backend: its representatives'
    Q/K rows instead of the whole projections) + the KV cache."""
    total = weight_bytes(model)
    for attn in model.attention_layers:
        c = attn.kv_cache
        es = c.k.element_size()
        total += c.k[:B].numel() * es + c.v[:B].numel() * es
        if getattr(attn, "rows", None) is not None and B == 1:
            for lin, (w, _) in zip((attn.wq, attn.wk), attn.rows):
                total -= (lin.weight.numel() - w.numel()) * lin.weight.element_size()
    return total


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    if device.type != "cuda":
        x = torch.empty(256 * 2**20 // 4, dtype=torch.float32)
        y = torch.empty_like(x)
        t = median([time_cpu(lambda: y.copy_(x)) for _ in range(5)])
        return 2 * x.numel() * 4 / t
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    return 2 * x.numel() / median([time_cuda(lambda: y.copy_(x)) for _ in range(10)])


def time_cuda(fn) -> float:
    """Seconds that fn's device work takes, between two CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1000


def time_cpu(fn) -> float:
    """Seconds that fn takes on the host clock."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs):
    return statistics.median(xs)


def time_graph(run, device, repeats: int = 20) -> float:
    """Seconds that run() takes: on CUDA, after one eager run (it compiles the kernels and warms cuBLAS), its work
    captured in a CUDA graph and replayed, the median of `repeats`; on the CPU one eager pass (the kernels run
    interpreted there: a check of a tool, not a timing)."""
    if device.type != "cuda":
        return time_cpu(run)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    return median([time_cuda(graph.replay) for _ in range(repeats)])


def kernel_device(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a bench of the Triton kernels alone; a UserError where the kernels cannot run."""
    from .checkpoint import dtype_from_name
    from .fast.kernels import available

    device, dtype = torch.device(device_name), dtype_from_name(dtype_name)
    if not available(torch.empty(0, device=device, dtype=dtype)):
        raise UserError(f"the Triton kernels cannot run on {device} here: use a CUDA device, or set "
                        "TRITON_INTERPRET=1 to run them interpreted on the CPU")
    return device, dtype


def check_close(got, want, dtype, what: str) -> None:
    """Raises `what` with the relative error when a kernel's output is off its reference by more than rounding
    (1e-4 in fp32, 2e-2 in 16-bit): a timing of a wrong result is no timing."""
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if err > (1e-4 if dtype == torch.float32 else 2e-2):
        raise RuntimeError(f"{what} (relative error {err:.2e})")


def fastest(time_config, configs, top: int = 3) -> list[tuple[float, dict]]:
    """(seconds, config) of the `top` fastest launch configs, time_config(config) timing each; a config whose tiles
    and stages need more shared memory than an SM has is skipped."""
    from triton.runtime.errors import OutOfResources

    timed = []
    for c in configs:
        try:
            timed.append((time_config(c), c))
        except OutOfResources:
            pass
    return sorted(timed, key=lambda t: t[0])[:top]


@torch.no_grad()
def bench_decode(model, B: int, T: int, compiled: bool, steps: int = 32, repeats: int = 5,
                 before_timing=None) -> dict:
    """Sets up a cache of T positions, clusters on a short prefill, then times decode steps near position T.
    before_timing() runs between the first call (which compiles the step) and the rest."""
    device = next(model.parameters()).device
    timer = time_cuda if device.type == "cuda" else time_cpu
    if device.type == "cuda":  # peak over this configuration: weights, caches, activations, CUDA-graph pools
        model.clear_caches()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.setup_caches(B, T)
    reset(model)
    W = model.chai_config.window if model.chai_config else 1
    prompt = torch.randint(0, model.config.vocab_size, (B, W), device=device)
    model(prompt, torch.arange(W, device=device))  # decides CHAI membership (the cache content is irrelevant)
    step = decode_step(model, compiled)
    tok = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    pos = torch.tensor([T - steps - 1], device=device)
    hits = counters["inductor"]["fxgraph_cache_hit"]
    t0 = time.perf_counter()
    step(tok, pos)  # warm-up; compiles on the first compiled call
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    cached = counters["inductor"]["fxgraph_cache_hit"] > hits  # the graph came from the compile cache on disk
    if before_timing is not None:
        before_timing()
    for _ in range(3):
        step(tok, pos)

    def run():
        for i in range(steps):
            pos.fill_(T - steps + i)
            step(tok, pos)

    t = median([timer(run) for _ in range(repeats)]) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"s_per_step": t, "first_call_s": first, "cached": cached, "bytes": step_bytes(model, B),
            "kv_bytes": model.kv_cache_bytes()["total"], "peak_bytes": peak}


@torch.no_grad()
def bench_allreduce(model, B: int, compiled: bool, steps: int = 32, repeats: int = 5) -> float:
    """Seconds per decode step spent in all-reduces alone (tensor parallelism): the step's 2 x n_layers all-reduces
    of [B, 1, hidden], each waiting for the one before as in the model, timed apart from the model, eager or
    compiled with CUDA graphs like the compiled step."""
    from torch.distributed import _functional_collectives as funcol

    tp = model.tensor_parallel
    device = next(model.parameters()).device
    timer = time_cuda if device.type == "cuda" else time_cpu
    n = 2 * len(model.layers)

    def reduces(x):
        for _ in range(n):
            x = funcol.all_reduce(x, "sum", tp.group) / tp.world  # every rank holds the same x: no growth
        return x

    fn = reduces
    if compiled:
        fn = torch.compile(reduces, fullgraph=True, options={"triton.cudagraphs": device.type == "cuda"})
    x = torch.ones(B, 1, model.config.hidden_size, dtype=model.tok_embeddings.weight.dtype, device=device)

    def run():
        for _ in range(steps):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            fn(x)

    for _ in range(3):
        run()
    return median([timer(run) for _ in range(repeats)]) / steps


@torch.no_grad()
def bench_prefill(model, S: int, repeats: int = 5) -> float:
    """Time to first token for one prompt of S tokens (CHAI clustering included), eager: generate's prefill."""
    device = next(model.parameters()).device
    timer = time_cuda if device.type == "cuda" else time_cpu
    model.setup_caches(1, S + 1)
    prompt = torch.randint(0, model.config.vocab_size, (S,)).tolist()
    prefill(model, [prompt])
    return median([timer(lambda: prefill(model, [prompt]).argmax(-1)) for _ in range(repeats)])


@torch.no_grad()
def capacity(model, T: int, budget_bytes: int, b_max: int = 4096) -> int:
    """Largest batch whose cache of T positions fits beside the weights in budget_bytes, found by allocating the
    caches and running one decode step (binary search)."""
    device = next(model.parameters()).device

    def fits(B):
        model.clear_caches()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model.setup_caches(B, T)
            W = model.chai_config.window if model.chai_config else 1
            model(torch.zeros(B, W, dtype=torch.long, device=device), torch.arange(W, device=device))
            model(torch.zeros(B, 1, dtype=torch.long, device=device), torch.tensor([T - 1], device=device))
            torch.cuda.synchronize()
            ok = torch.cuda.max_memory_allocated() <= budget_bytes
        except torch.OutOfMemoryError:
            ok = False
        model.clear_caches()
        torch.cuda.empty_cache()
        return ok

    lo, hi = 0, b_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def hf_decode(shape: str, B: int, T: int, device, dtype, steps: int = 32) -> float | None:
    """(Seconds per decode step, peak allocated bytes or None) of transformers' model of the same shape, static
    cache + torch.compile; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                                   intermediate_size=s["intermediate_size"], num_hidden_layers=s["n_layers"],
                                   num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
                                   head_dim=s["head_dim"], max_position_embeddings=s["max_seq_len"],
                                   tie_word_embeddings=s.get("tie_word_embeddings", False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    prompt = torch.randint(0, s["vocab_size"], (B, T - steps - 1), device=device)

    def run(n):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           cache_implementation="static", pad_token_id=0)

    with torch.no_grad():
        run(steps), run(steps)  # compile and warm up
        timer = time_cuda if device.type == "cuda" else time_cpu
        t_long = median([timer(lambda: run(steps)) for _ in range(3)])
        t_short = median([timer(lambda: run(1)) for _ in range(3)])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (t_long - t_short) / (steps - 1), peak  # the model is freed with this frame


def time_calibration(model, n: int, length: int, device) -> int:
    """Times calibrate_model end to end (features, k-means curves for k = 1..H, elbow, static membership)."""
    from .chai.calibrate import calibrate_model

    tokens = torch.randint(0, model.config.vocab_size, (n, length), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = calibrate_model(model, tokens, show_progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() - t
    print(f"calibration of {n} sequences x {length} tokens: {t:.1f} s; counts {res.clusters}")
    return 0


@torch.no_grad()
def load_memory(path, device, tp) -> list[dict]:
    """Loads a checkpoint (this rank's slices under torchrun, else checkpoint.load: the whole model, mmap-ed) and
    measures this process: bytes read through read calls, resident memory before, after loading and after a forward
    pass (which touches every weight, mmap-ed pages included) and at its peak. Returns every rank's row."""
    from .checkpoint import load
    from .parallel import host_memory
    from .parallel import load as load_rank

    before = host_memory()
    model = (load if tp is None else load_rank)(path, device=device, backend="torch")
    loaded = host_memory()
    model(torch.zeros(1, 8, dtype=torch.long, device=device))
    after = host_memory()
    row = {"rank": 0 if tp is None else tp.rank, "read": loaded["rchar"] - before["rchar"], "rss_before": before["rss"],
           "rss_loaded": loaded["rss"], "rss_forward": after["rss"], "peak": after["peak_rss"],
           "weights": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
    if tp is None:
        return [row]
    rows = [None] * tp.world
    torch.distributed.all_gather_object(rows, row)
    return rows


def tp_step_model(shape: str, world: int, B: int, T: int, dtype: torch.dtype, bandwidth: float,
                  allreduce_s: float) -> str:
    """What one decode step of a shape costs each rank of a tensor-parallel group, from the shapes alone (a meta
    model, nothing allocated): weight and KV bytes read per rank, the all-reduces, and the floor
    bytes / bandwidth + n_allreduce x allreduce_s (allreduce_s: one small all-reduce's latency, measured by bench
    under torchrun: AR ms / (2 n_layers))."""
    from .parallel import plan

    model = meta_model(shape)
    es = torch.empty((), dtype=dtype).element_size()
    slices = plan(model, 0, world)
    tied = getattr(model.config, "tie_word_embeddings", True)
    read = 0
    for name, t in model.state_dict().items():
        n = t.numel() if name not in slices else t.numel() // t.shape[slices[name][0]] * slices[name][2]
        if name.endswith("embeddings.weight") and not (tied and name.startswith("tok_")):
            continue  # a lookup reads B rows only
        read += n * es
    cfg = model.config
    n_kv = slices["layers.0.attention.wk.weight"][2] // cfg.head_dim
    kv = 2 * cfg.n_layers * B * n_kv * T * cfg.head_dim * es
    n_ar = 2 * cfg.n_layers if world > 1 else 0
    ar_bytes = B * cfg.hidden_size * es
    floor, t_ar = (read + kv) / bandwidth, n_ar * allreduce_s
    sent = 2 * (world - 1) / world * ar_bytes * n_ar  # a ring all-reduce sends 2 (tp - 1) / tp of the tensor
    lines = [f"# {shape} at tp={world}, B={B}, T={T}, {str(dtype).split('.')[-1]}, per rank:",
             f"weights read {read / 1e9:.2f} GB (replicated output projection included), KV read {kv / 1e9:.2f} GB",
             f"all-reduces {n_ar} of {ar_bytes / 1e3:.1f} kB (ring: {sent / 1e6:.2f} MB sent per rank per step)",
             f"floor {floor * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s + all-reduces {t_ar * 1e3:.2f} ms at "
             f"{allreduce_s * 1e6:.1f} us each = {(floor + t_ar) * 1e3:.2f} ms/step, {B / (floor + t_ar):.1f} tok/s; "
             f"all-reduce share {100 * t_ar / (floor + t_ar):.0f}%"]
    return "\n".join(lines)


RESULT = "# dense timings: "


@functools.lru_cache(maxsize=None)
def _shape_sizes(shape: str) -> tuple[int, int]:
    """(parameters, dense KV cache elements per sequence position) of a shape, from one meta model per shape."""
    model = meta_model(shape)
    cfg = model.config
    return sum(p.numel() for p in model.parameters()), 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim


def dense_kv_bytes(shape: str, B: int, T: int, dtype: torch.dtype) -> int:
    """The dense KV cache of B sequences of T positions (CHAI's is smaller)."""
    return _shape_sizes(shape)[1] * B * T * torch.empty((), dtype=dtype).element_size()


def cell_bytes(shape: str, B: int, T: int, dtype: torch.dtype) -> int:
    """Device memory a process timing one cell needs, estimated from the shape alone: weights and the dense KV cache,
    plus a tenth and 2 GiB for activations, the prefill and the CUDA-graph pool."""
    weights = _shape_sizes(shape)[0] * torch.empty((), dtype=dtype).element_size()
    return int(1.1 * (weights + dense_kv_bytes(shape, B, T, dtype))) + 2 * 2**30


def over_max_kv(a, B: int, T: int, dtype: torch.dtype) -> bool:
    """Whether --max-kv-gb leaves the cell (B, T) out."""
    return bool(a.max_kv_gb) and dense_kv_bytes(a.shape, B, T, dtype) > a.max_kv_gb * 1e9


def process_age() -> float | None:
    """Seconds since this process started (imports included), from /proc; None where there is no /proc."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _warm_up(argv, a, device, dtype, env) -> None:
    """Compiles every (configuration, cell) in its own process, a.warm_jobs at a time within the device's free
    memory, before anything is timed: the timing processes then load each graph from the compile caches (FX graph,
    Triton and autotuning caches on disk) instead of compiling it, ~5 s of first call instead of 20-50 s for the
    7B step on an H200 (docs/performance.md, "Commands"). The warm-up processes print nothing; one that fails says
    so. Compiling in parallel lets coordinate-descent tuning time its candidates while another process uses the
    device; the tuned choices are cached and reused by the timed run."""
    cells = [(b, s, B, T) for b in a.backend for s in a.chai for B in a.batch for T in a.context
             if not over_max_kv(a, B, T, dtype)]
    budget = a.warm_gb * 2**30 if a.warm_gb else gate.memory_budget(device)
    need = {c: cell_bytes(a.shape, c[2], c[3], dtype) for c in cells}
    pending = sorted((c for c in cells if need[c] <= budget), key=lambda c: -need[c])
    for c in cells:
        if need[c] > budget:
            print(f"# warm-up skips {c[0]} {c[1]} B={c[2]} T={c[3]}: needs ~{need[c] / 2**30:.0f} GiB of "
                  f"{budget / 2**30:.0f}", flush=True)
    running, t0, n = {}, time.perf_counter(), len(pending)
    while pending or running:
        for c in list(pending):
            if len(running) < a.warm_jobs and sum(need[r] for r in running) + need[c] <= budget:
                cmd = [sys.executable, "-m", "chai_models.bench", *argv, "--backend", c[0], "--chai", c[1],
                       "--batch", str(c[2]), "--context", str(c[3]), "--mode", "compiled", "--warm-child"]
                log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty compile cannot block on it
                running[c] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env), log)
                pending.remove(c)
        time.sleep(0.2)
        for c, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.seek(0)
                err = log.read()
                log.close()
                if proc.returncode != 0:
                    last = err.strip().splitlines()[-1:] or [""]
                    print(f"# warm-up of {c[0]} {c[1]} B={c[2]} T={c[3]} failed (exit status {proc.returncode}): "
                          f"{last[0][:200]}", flush=True)
                del running[c]
    then = ("the same command without --warm-only times them" if a.warm_only else
            "the first calls below load them from the compile caches")
    print(f"# warm-up: {n} compiled steps in {time.perf_counter() - t0:.0f} s, up to {a.warm_jobs} processes at "
          f"a time; {then}", flush=True)


def _read_dense(path: str) -> dict:
    """The dense timings the parent has gathered so far, {(backend, B, T, mode): {s_per_step, bytes}}."""
    return {tuple(json.loads(k)): r for k, r in json.loads(Path(path).read_text()).items()}


def _child_processes(argv, a, device, dtype) -> int:
    """Each configuration (backend, CHAI spec) in its own process, dense first as main ordered them, or with
    --processes per-cell each (configuration, B, T), and each --peer cell, run in turns (gate.run_in_turns:
    --load-jobs processes load side by side, one times at a time); one table."""
    env = gate.tree_env(str(Path(__file__).resolve().parents[1]))
    if a.warm_jobs and "compiled" in a.mode:
        _warm_up(argv, a, device, dtype, env)
    if a.warm_only:
        return 0
    configs = [(b, s) for b in a.backend for s in a.chai]
    dense_ref, header_done = {}, False
    with tempfile.TemporaryDirectory(prefix="chai-bench-") as tmp:
        dense_file = Path(tmp, "dense.json")  # rewritten as dense timings come in; a CHAI process reads it per row
        dense_file.write_text("{}")

        def show(lines):
            nonlocal header_done
            for line in lines:
                if line.startswith(RESULT):
                    dense_ref.update(json.loads(line[len(RESULT):]))
                    dense_file.with_suffix(".tmp").write_text(json.dumps(dense_ref))
                    dense_file.with_suffix(".tmp").replace(dense_file)
                elif not (line.startswith("config") and header_done):
                    header_done |= line.startswith("config")
                    print(line, end="", flush=True)

        def command(backend, spec, only):
            return [sys.executable, "-m", "chai_models.bench", *argv, "--backend", backend, "--chai", spec, *only,
                    "--child", str(dense_file)]

        if a.processes != "per-cell":
            for backend, spec in configs:
                proc = subprocess.Popen(command(backend, spec, []), stdout=subprocess.PIPE, text=True, env=env)
                show(proc.stdout)
                if proc.wait() != 0:
                    print(f"{backend + ' ' + spec:<22}failed (exit status {proc.returncode})", flush=True)
        else:
            jobs, what = [], {}
            for B, T in itertools.product(a.batch, a.context):  # cell by cell: dense, CHAI, then the peer
                for backend, spec in configs:
                    name = f"{backend} {spec}"
                    if over_max_kv(a, B, T, dtype):
                        print(left_out(name, a, B, T, dtype), flush=True)
                        continue
                    job = gate.Job(command(backend, spec, ["--batch", str(B), "--context", str(T)]),
                                   cell_bytes(a.shape, B, T, dtype), env)
                    jobs.append(job)
                    what[id(job)] = f"{name:<22}{B:>4}{T:>7}  "
                if not a.peer or over_max_kv(a, B, T, dtype):
                    continue
                peer = shlex.split(a.peer.format(B=B, T=T))
                # a peer may build its weights in float32 first, then convert them to the dtype
                need = cell_bytes(a.shape, B, T, dtype) + _shape_sizes(a.shape)[0] * max(0, 4 - dtype.itemsize)
                job = gate.Job([sys.executable, "-m", "chai_models.gate", *peer], need, env)
                jobs.append(job)
                what[id(job)] = f"peer {' '.join(peer)}: "

            def done(job, returncode, out):
                show(out.splitlines(keepends=True))
                if returncode != 0:
                    print(f"{what[id(job)]}failed (exit status {returncode})", flush=True)

            budget = a.warm_gb * 2**30 if a.warm_gb else gate.memory_budget(device)
            gate.run_in_turns(jobs, budget, a.load_jobs or 1, done)
    if a.hf:
        _print_hf(a, device, dtype)
    return 0


def left_out(name: str, a, B: int, T: int, dtype: torch.dtype) -> str:
    """The table's line for a cell that --max-kv-gb leaves out."""
    return (f"{name:<22}{B:>4}{T:>7}  left out: dense KV cache {dense_kv_bytes(a.shape, B, T, dtype) / 1e9:.0f} GB > "
            f"--max-kv-gb {a.max_kv_gb:g}")


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _print_hf(a, device, dtype) -> None:
    for B in a.batch:
        for T in a.context:
            try:
                r = hf_decode(a.shape, B, T, device, dtype, a.steps)
            except Exception as e:  # report, don't hide: HF's compile path changes between releases
                print(f"{'transformers':<22}{B:>4}{T:>7}  failed: {type(e).__name__}: {e}"[:300])
                continue
            if r is not None:
                t, peak = r
                print(f"{'transformers static+compile':<22}{B:>4}{T:>7}{'compiled':>10}{B / t:>10.1f}"
                      f"{t * 1000:>9.3f}{'':>8}{'':>6}{'':>9}{_mb(peak):>9}", flush=True)


def main(argv=None) -> int:
    """tools/bench.py: a UserError (an unknown shape, a bad spec) ends in one `error:` line and exit status 2."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help=f"one of {', '.join(known_shapes())}")
    p.add_argument("--chai", nargs="+", default=["dense"], help="'dense' and/or CHAI specs (preset, 'k', 'N:k')")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--context", nargs="+", type=int, default=[512])
    p.add_argument("--mode", nargs="+", default=["eager"], choices=["eager", "compiled"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ttft", type=int, default=0, help="also time a prefill of this many tokens")
    p.add_argument("--capacity-gb", type=float, default=0, help="also find the largest batch at each context "
                                                                "within this memory budget (GPU)")
    p.add_argument("--hf", action="store_true", help="also time transformers (static cache + compile)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--backend", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                   help="torch: the plain modules; triton: chai_models.fast (Triton kernels, fused forwards); "
                        "auto: triton on CUDA when available")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="instead: time the offline calibration on N random sequences of --calibrate-len tokens")
    p.add_argument("--calibrate-len", type=int, default=512)
    p.add_argument("--processes", default="auto", choices=["auto", "one", "per-config", "per-cell"],
                   help="time each configuration (dense, a CHAI spec) in its own process (per-config; auto: on CUDA), "
                        "each (configuration, B, T) in its own (per-cell: a fresh process loads each compiled step in "
                        "~5 s, where a later cell of a shared process took up to 30 s) or all in this one (in one "
                        "process a second compiled configuration can measure slower, whichever it is: "
                        "docs/performance.md)")
    p.add_argument("--tp-model", type=int, default=0, metavar="N",
                   help="instead: print the per-rank bytes and all-reduces of a decode step at tensor parallelism N "
                        "(from the shape alone; --copy-bw and --allreduce-us set the floor's constants)")
    p.add_argument("--copy-bw", type=float, default=4.2, help="TB/s for --tp-model (default 4.2: one H200, measured)")
    p.add_argument("--allreduce-us", type=float, default=10.0,
                   help="one all-reduce's latency in us for --tp-model (bench under torchrun measures it)")
    p.add_argument("--load-memory", default=None, metavar="CHECKPOINT",
                   help="instead: load this checkpoint (under torchrun: each rank its slices) and print each rank's "
                        "bytes read and resident memory")
    p.add_argument("--warm-jobs", type=int, default=0, metavar="N",
                   help="with one process per configuration: first compile every (configuration, B, T) step in up to "
                        "N parallel processes within the free device memory (--warm-gb), so the timed processes load "
                        "their graphs from the compile caches")
    p.add_argument("--warm-gb", type=float, default=0, help="memory budget of --warm-jobs and --load-jobs in GiB "
                                                             "(default: 90%% of the device's free memory; on CPU half "
                                                             "the RAM)")
    p.add_argument("--load-jobs", type=int, default=0, metavar="N",
                   help="with --processes per-cell: start up to N processes at once (within --warm-gb) that load "
                        "their steps side by side, then time one at a time with nothing else running "
                        "(chai_models/gate.py); a grid's minutes are mostly process starts and loads")
    p.add_argument("--peer", default=None, metavar="'SCRIPT ARG...'",
                   help="with --processes per-cell: also run another project's decode timer script for each cell, "
                        "{B} and {T} in its arguments standing for the cell's batch and context, in turns with ours "
                        "(e.g. 'peers/gptfast_decode.py --batch {B} --context {T}'); its lines print as it prints them")
    p.add_argument("--warm-only", action="store_true",
                   help="with --warm-jobs: compile every step into the caches and time nothing (a later run times "
                        "them)")
    p.add_argument("--max-kv-gb", type=float, default=0, metavar="G",
                   help="leave out the cells whose dense KV cache is over G GB (dense and CHAI alike, so every timed "
                        "CHAI cell has its dense pair)")
    p.add_argument("--warm-child", action="store_true", help=argparse.SUPPRESS)  # internal: one step, compiled
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: the parent's dense timings (a file)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.shape not in known_shapes():
        raise UserError(f"unknown shape {a.shape!r}; known: {', '.join(known_shapes())}")
    a.chai.sort(key=lambda s: s != "dense")  # dense first: the others are timed against it (same backend)
    from .checkpoint import dtype_from_name
    from .parallel import init_from_env

    if a.tp_model:
        for B in a.batch:
            for T in a.context:
                print(tp_step_model(a.shape, a.tp_model, B, T, dtype_from_name(a.dtype), a.copy_bw * 1e12,
                                    a.allreduce_us * 1e-6))
        return 0

    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # one graph per (batch, cache length, CHAI layout)
    # under torchrun: one rank of a tensor-parallel group; every rank runs the same configurations, rank 0 prints
    tp, a.device = init_from_env(a.device)
    if tp is not None and (a.calibrate or a.hf or a.capacity_gb):
        p.error("under torchrun, bench times decode and prefill only (no --calibrate, --hf, --capacity-gb)")
    if tp is not None and tp.rank != 0:
        sys.stdout = open(os.devnull, "w")
    device, dtype = torch.device(a.device), dtype_from_name(a.dtype)
    if a.load_memory:
        print(f"# loading {a.load_memory} on {a.device}, {1 if tp is None else tp.world} process(es); MB")
        print(f"{'rank':>4}{'weights':>9}{'read':>9}{'RSS before':>12}{'loaded':>9}{'forward':>9}{'peak':>9}")
        for r in load_memory(a.load_memory, device, tp):
            print(f"{r['rank']:>4}" + "".join(f"{r[k] / 1e6:>{w}.0f}" for k, w in (
                ("weights", 9), ("read", 9), ("rss_before", 12), ("rss_loaded", 9), ("rss_forward", 9), ("peak", 9))))
        if tp is not None:
            torch.distributed.destroy_process_group()
        return 0
    children = a.processes in ("per-config", "per-cell") or (a.processes == "auto" and device.type == "cuda"
                                                               and tp is None)
    if children and tp is not None:
        p.error(f"--processes {a.processes} cannot run under torchrun (each configuration runs in the ranks' "
                "processes)")
    if a.warm_jobs and not children:
        p.error("--warm-jobs compiles in processes of their own: it needs one process per configuration "
                "(--processes per-config, the default on CUDA, or per-cell)")
    if a.processes == "per-cell" and (a.ttft or a.capacity_gb or a.hf):
        p.error("--processes per-cell times decode cells only: --ttft, --capacity-gb and --hf go with per-config or "
                "one")
    if (a.load_jobs or a.peer) and a.processes != "per-cell":
        p.error("--load-jobs and --peer run one process per cell: add --processes per-cell")
    if a.peer and not os.path.isfile(shlex.split(a.peer)[0] if a.peer.strip() else ""):
        p.error(f"--peer {a.peer!r}: its first word must be the path of the peer's timer script (a Python file)")
    if a.warm_only and not (a.warm_jobs and "compiled" in a.mode):
        p.error("--warm-only goes with --warm-jobs N and --mode compiled (it compiles the steps and times nothing)")
    several = len(a.chai) * len(a.backend) > 1 or (a.processes == "per-cell" and len(a.batch) * len(a.context) > 1)
    if children and (several or a.warm_jobs) and a.child is None and not a.calibrate and not a.warm_child:
        return _child_processes(argv, a, device, dtype)
    model = random_model(a.shape, device, dtype, tp)
    if a.warm_child:  # a --warm-jobs process: one configuration, one cell; its compiled step stays in the caches
        set_backend(model, a.backend[0])
        set_chai(model, chai_config(model, a.chai[0]))
        try:
            bench_decode(model, a.batch[0], a.context[0], compiled=True, steps=2, repeats=1)
        except torch.OutOfMemoryError:
            pass  # the timed process reports it
        return 0
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    hdr = (f"{'config':<22}{'B':>4}{'T':>7}{'mode':>10}{'tok/s':>10}{'ms/tok':>9}{'GB/s':>8}{'%bw':>6}"
           f"{'KV MB':>9}{'peak MB':>9}{'vs dense':>9}{'ideal':>7}")
    hdr += "" if tp is None else f"{'AR ms':>8}{'AR %':>6}"
    bw = None

    def measure_bandwidth():  # at the start; in a process that times in turns (gate), once its turn has come
        nonlocal bw
        gate.wait_turn()
        bw = copy_bandwidth(device)
        print(f"# {a.shape} {a.dtype} on {card}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s, "
              f"weights {weight_bytes(model) / 1e9:.2f} GB" + ("" if tp is None else " per rank"))
        if tp is not None:
            print(f"# tensor parallel over {tp.world} ranks ({torch.distributed.get_backend()}): bytes, GB/s and %bw "
                  "per rank; AR: the step's 2 x n_layers all-reduces timed alone, and their share of the step")
        if not a.calibrate:
            print(hdr)

    if gate.ENV not in os.environ:
        measure_bandwidth()
    if a.calibrate:
        return time_calibration(model, a.calibrate, a.calibrate_len, device)
    dense_ref = {}
    for backend, spec in ((b, s) for b in a.backend for s in a.chai):
        cfg = chai_config(model, spec)
        backend = set_backend(model, backend)
        set_chai(model, cfg)
        name = f"{backend} {spec}"
        # a fresh compile per configuration, as a user's process has, not a recompile of the previous one's step,
        # so that first-call times are comparable
        dynamo.reset()
        model.__dict__.pop("_compiled_decode", None)
        for B in a.batch:
            for T in a.context:
                if over_max_kv(a, B, T, dtype):
                    print(left_out(name, a, B, T, dtype))
                    continue
                for mode in a.mode:
                    try:
                        r = bench_decode(model, B, T, mode == "compiled", steps=a.steps,
                                         before_timing=measure_bandwidth if bw is None else None)
                    except torch.OutOfMemoryError:
                        print(f"{name:<22}{B:>4}{T:>7}{mode:>10}  out of memory")
                        model.clear_caches()
                        torch.cuda.empty_cache()
                        continue
                    t = r["s_per_step"]
                    gbs = r["bytes"] / t / 1e9
                    key = (backend, B, T, mode)
                    if cfg is None:
                        dense_ref[key] = r
                    elif a.child is not None:  # the dense pair may have ended in another process since this began
                        dense_ref.update(_read_dense(a.child))
                    ref = dense_ref.get(key)
                    speed = f"{ref['s_per_step'] / t:>8.3f}x" if ref and cfg is not None else f"{'':>9}"
                    ideal = f"{ref['bytes'] / r['bytes']:>6.3f}x" if ref and cfg is not None else f"{'':>7}"
                    line = (f"{name:<22}{B:>4}{T:>7}{mode:>10}{B / t:>10.1f}{t * 1000:>9.3f}{gbs:>8.0f}"
                            f"{100 * gbs * 1e9 / bw:>6.1f}{r['kv_bytes'] / 1e6:>9.1f}{_mb(r['peak_bytes']):>9}"
                            f"{speed}{ideal}")
                    if tp is not None:
                        t_ar = bench_allreduce(model, B, mode == "compiled", steps=a.steps)
                        line += f"{t_ar * 1000:>8.3f}{100 * t_ar / t:>6.1f}"
                    if mode == "compiled":
                        age = process_age()
                        line += (f"   (first call {r['first_call_s']:.1f} s{', from the compile cache' * r['cached']}"
                                 + ("" if age is None else f"; {age:.0f} s into its process") + ")")
                    print(line, flush=True)
        if a.ttft:
            print(f"{name:<22} time to first token at {a.ttft}: {bench_prefill(model, a.ttft) * 1000:.1f} ms "
                  f"(clustering included)", flush=True)
        if a.capacity_gb and device.type == "cuda":
            for T in a.context:
                n = capacity(model, T, int(a.capacity_gb * 2**30))
                print(f"{name:<22} capacity within {a.capacity_gb:g} GiB at T={T}: batch {n}", flush=True)
        model.clear_caches()
    if a.child is not None:  # the parent reads this process's dense timings from this line
        print(RESULT + json.dumps({json.dumps(list(k)): {n: r[n] for n in ("s_per_step", "bytes")}
                                   for k, r in dense_ref.items()}))
    elif a.hf:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _print_hf(a, device, dtype)
    if tp is not None:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # python -m chai_models.bench (one process per configuration runs this)
    sys.exit(main())
