#!/usr/bin/env python
"""One-token attention of one LLaMA-7B layer (H = Hkv = 32, D = 128, bf16): the fused Triton kernel
(kernels.clustered_decode) vs the torch decode path of chai.clustered_attention vs dense SDPA. Needs CUDA.

    python tools/bench_decode_kernel.py [--quick] [--batch 1 8] [--context 512 2048 8192] [--clusters 4 32]
    python tools/bench_decode_kernel.py --sweep --batch 1 --context 8192 --clusters 4   # tune the kernel's blocks

Each variant is captured in a CUDA graph (as compiled decode runs it) of back-to-back calls that rotate over
enough copies of the cache to overflow L2, so every call reads from HBM. The cache is full (pos = T - 1, or
--pos). Bytes per call: K read for positions <= pos (the k representatives' K for CHAI, all KV heads for
SDPA) + V for positions <= pos + q + out; GB/s = bytes / time. k = 32 is dense attention written as 32
clusters of one head (the kernel's dense special case), where SDPA computes the same thing
(kernels.dense_decode, the kernel's DENSE path). max|err|: largest
absolute difference from an fp32 reference computed from the same bf16 inputs.
"""
import argparse
import itertools
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chai_models import chai, kernels  # noqa: E402

H, HKV, D = 32, 32, 128
L2_FLUSH_BYTES = 256 * 2**20  # rotate over at least this many bytes of caches (H100/H200 L2: 50-60 MB)


def clusters(B, k, seed=0):
    """head_to_cluster [B, H]: k uneven clusters per row (each row its own, from a fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        labels = torch.cat([torch.arange(k), torch.randint(0, k, (H - k,), generator=gen)])
        rows.append(labels[torch.randperm(H, generator=gen)])
    return chai.canonical_labels(torch.stack(rows), k).cuda()


class Case:
    """Inputs of one (B, T, k): membership, n_buf copies of the caches and queries."""

    def __init__(self, B, T, k, pos, dtype=torch.bfloat16):
        self.B, self.T, self.k, self.pos = B, T, k, pos
        self.dense = k == H
        self.h2c = clusters(B, k) if not self.dense else torch.arange(H, device="cuda").expand(B, H)
        self.members, self.start = chai.cluster_lists(self.h2c, k)  # dense: every head its own cluster
        self.n_slots = chai.k_slots(k, H, HKV)
        rep = chai.representatives(torch.zeros(B, H, H, device="cuda"), self.h2c, k, "first")  # [B, k]
        self.slot_of_rep = (torch.arange(k, device="cuda").expand(B, k) if self.n_slots == k
                            else rep // (H // HKV)).contiguous()
        self.scale = D ** -0.5
        self.pos_t = torch.tensor([pos], device="cuda")
        self.mask = torch.arange(T, device="cuda")[None, :] <= pos  # [1, T], as dense decode builds it
        n = pos + 1
        self.bytes = {  # per call, positions <= pos only
            "chai": 2 * B * k * n * D + 2 * B * HKV * n * D + 2 * B * (k + H) * D,  # MHA: k slots of K
            "sdpa": 2 * 2 * B * HKV * n * D + 2 * 2 * B * H * D,
        }
        per_buf = 2 * B * T * D * (self.n_slots + HKV + (0 if self.dense else HKV))
        self.n_buf = max(1, min(64, math.ceil(L2_FLUSH_BYTES / per_buf)))
        gen = torch.Generator(device="cuda").manual_seed(1)
        self.bufs = []
        for _ in range(self.n_buf):
            b = dict(q=torch.randn(B, k, D, device="cuda", generator=gen).to(dtype),
                     k_slots=torch.randn(B, self.n_slots, T, D, device="cuda", generator=gen).to(dtype),
                     v=torch.randn(B, HKV, T, D, device="cuda", generator=gen).to(dtype))
            if self.dense:  # SDPA on the same inputs: same math
                b["q_full"], b["k_full"] = b["q"][:, :, None], b["k_slots"]
            else:
                b["q_full"] = torch.randn(B, H, 1, D, device="cuda", generator=gen).to(dtype)
                b["k_full"] = torch.randn(B, HKV, T, D, device="cuda", generator=gen).to(dtype)
            self.bufs.append(b)

    def reference(self):
        b = self.bufs[0]
        out = chai.clustered_attention(b["q"].float()[:, :, None], b["k_slots"].float(), b["v"].float(), self.h2c,
                                       None if self.n_slots == self.k else self.slot_of_rep, self.mask, self.scale)
        return out[:, :, 0]

    # the variants: buf -> out [B, H, D]
    def triton(self, b, **launch):
        lists = (None, None, None) if self.dense else (self.members, self.start, self.slot_of_rep)
        if launch:
            return kernels.clustered_decode_launch(b["q"], b["k_slots"], b["v"], *lists, self.pos_t, self.scale,
                                                   **launch)
        if self.dense:  # what chai.DENSE_DECODE_KERNEL runs: no membership lists read
            return kernels.dense_decode(b["q"], b["k_slots"], b["v"], self.pos_t, self.scale)
        return kernels.clustered_decode(b["q"], b["k_slots"], b["v"], *lists, self.pos_t, self.scale)

    def torch_path(self, b):
        return chai.clustered_attention(b["q"][:, :, None], b["k_slots"], b["v"], self.h2c,
                                        None if self.n_slots == self.k else self.slot_of_rep, self.mask,
                                        self.scale)[:, :, 0]

    def probs(self, b):
        """kernels.clustered_probs (the new row at pos rewritten with the value it holds) and the batched GEMM over
        V: CHAI's decode past the Triton kernel's range (chai.decode_probs_times_v, without RoPE)."""
        k_new = b["k_slots"][:, :, self.pos]
        v_new = b["v"][:, :, self.pos]
        p = kernels.clustered_probs(b["q"], k_new, v_new, None, None, b["k_slots"], b["v"], self.pos_t, self.scale,
                                    self.h2c, self.slot_of_rep)  # [B, H, T]
        B, T = self.B, self.T
        return chai.probs_times_v(p.view(B * HKV, H // HKV, T), b["v"].view(B * HKV, T, D)).view(B, H, D)

    def sdpa(self, b):
        return chai.dense_attention(b["q_full"], b["k_full"], b["v"], self.mask, self.scale)[:, :, 0]


def time_graph(case, fn, calls, iters):
    """Microseconds per call: a CUDA graph of `calls` calls rotating over the case's buffers, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles, cuBLAS picks its kernels) outside the capture
        for b in case.bufs[:2]:
            fn(b)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    calls = max(calls, case.n_buf)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(case.bufs[i % case.n_buf])
    g.replay()  # warm
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * calls)


def measure(case, name, fn, ref, calls, iters):
    row = dict(variant=name)
    try:
        out = fn(case.bufs[0])
        row["err"] = (out.float() - ref).abs().max().item() if ref is not None else None
        row["us"] = time_graph(case, fn, calls, iters)
    except Exception as e:  # one failing variant must not end the run
        row["fail"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
        if "--trace" in sys.argv:
            traceback.print_exc()
    return row


def fmt(B, T, k, row, bytes_, base):
    head = f"{B:>3} {T:>6} {k:>3}  {row['variant']:<11}"
    if "fail" in row:
        return f"{head} FAILED {row['fail']}"
    us = row["us"]
    err = "n/a" if row.get("err") is None else f"{row['err']:.2e}"
    ratios = "  ".join(f"{base[n] / us:6.3f}x" if n in base else "     - " for n in ("torch", "sdpa"))
    return f"{head} {us:9.2f} {bytes_ / us / 1e3:9.0f} {bytes_ / 1e6:9.2f} {err:>9}  {ratios}"


def sweep(case, ref, calls, iters):
    """Times the kernel over block sizes, warps, pipeline stages and split lengths; prints the best 8."""
    cfg = kernels.decode_config(case.B, H, case.k, D, case.T, kernels._n_sms(torch.device("cuda")))
    hpbs = sorted({cfg["hpb"], 2, 4, 8}) if not case.dense else [1]
    splits = sorted({max(64, cfg["split"] // 2), cfg["split"], cfg["split"] * 2})
    configs = [c for c in itertools.product(hpbs, (16, 32, 64), (4, 8), (1, 2, 3), splits)
               if c[4] % c[1] == 0 and c[0] * c[1] * D <= 32768]  # (hpb, block_t, warps, stages, split)
    print(f"  sweeping {len(configs)} launch configs (first use of each block shape compiles)", flush=True)
    results = []
    for hpb, bt, nw, st, sp in configs:
        launch = dict(hpb=hpb, block_t=bt, num_warps=nw, num_stages=st, split=sp)
        row = measure(case, "sweep", lambda b, launch=launch: case.triton(b, **launch), ref, calls, iters)
        if "us" in row and row["err"] < 0.05:
            results.append((row["us"], launch))
    results.sort(key=lambda r: r[0])
    print(f"  default {cfg}")
    for us, launch in results[:8]:
        print(f"  {us:8.2f} us  {case.bytes['chai'] / us / 1e3:6.0f} GB/s  {launch}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192], help="cache length T")
    p.add_argument("--clusters", type=int, nargs="+", default=[4, 32], help="k (32: dense special case)")
    p.add_argument("--pos", type=float, default=1.0, help="fraction of the cache that is valid (pos + 1 = frac T)")
    p.add_argument("--quick", action="store_true", help="fewer replays (a rough table in under a minute)")
    p.add_argument("--sweep", action="store_true", help="also tune the kernel's launch parameters per row")
    p.add_argument("--sweep-probs", action="store_true", help="also time kernels.clustered_probs' split lengths")
    p.add_argument("--trace", action="store_true", help="print the traceback of a failing variant")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    calls, iters = (10, 5) if a.quick else (40, 25)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; LLaMA-7B layer H={H} Hkv={HKV} D={D} bf16; "
          f"CUDA-graph replay, us per call; speedups = that column's time / this row's time")
    print(f"{'B':>3} {'T':>6} {'k':>3}  {'variant':<11} {'us/call':>9} {'GB/s':>9} {'MB/call':>9} {'max|err|':>9}  "
          f"{'vs torch':>7}  {'vs sdpa':>7}")
    for B, T, k in itertools.product(a.batch, a.context, a.clusters):
        pos = max(0, min(T - 1, round(a.pos * T) - 1))
        try:
            case = Case(B, T, k, pos)
            ref = case.reference()
        except Exception as e:
            print(f"{B:>3} {T:>6} {k:>3}  setup FAILED {type(e).__name__}: {e}")
            continue
        rows = [measure(case, "triton", case.triton, ref, calls, iters),
                measure(case, "torch", case.torch_path, ref, calls, iters)]
        if not case.dense:
            rows.append(measure(case, "probs", case.probs, ref, calls, iters))
            if a.sweep_probs:  # the scores kernel's positions per program / per tile
                saved = kernels.CLUSTER_SCORES_SPLIT, kernels.CLUSTER_SCORES_BLOCK_T
                for split, block_t in itertools.product((64, 128, 256, 512), (32, 64, 128)):
                    kernels.CLUSTER_SCORES_SPLIT, kernels.CLUSTER_SCORES_BLOCK_T = split, block_t
                    rows.append(measure(case, f"p{split}/{block_t}", case.probs, ref, calls, iters))
                kernels.CLUSTER_SCORES_SPLIT, kernels.CLUSTER_SCORES_BLOCK_T = saved
        rows.append(measure(case, "sdpa", case.sdpa, ref if case.dense else None, calls, iters))
        base = {r["variant"]: r["us"] for r in rows if "us" in r}
        for row in rows:
            print(fmt(B, T, k, row, case.bytes["sdpa" if row["variant"] == "sdpa" else "chai"], base))
        if a.sweep:
            sweep(case, ref, calls, max(3, iters // 3))
        del case, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
