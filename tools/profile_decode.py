#!/usr/bin/env python
"""Where does a compiled decode step spend its time? Kernel time per step vs wall time per step, top kernels.

    python tools/profile_decode.py --shape llama-2-7b [--chai llama-7b] [--batch 1] [--context 512]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chai_models import set_backend, set_chai  # noqa: E402
from chai_models.bench import random_model, step_bytes  # noqa: E402
from chai_models.chai import ChaiConfig  # noqa: E402
from chai_models.chai import reset  # noqa: E402
from chai_models.fast.compile import decode_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--chai", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    a = p.parse_args()
    model = random_model(a.shape, torch.device("cuda"), torch.bfloat16)
    if a.chai:
        set_chai(model, ChaiConfig.from_spec(a.chai, model.config.n_layers, model.config.n_heads))
    set_backend(model, a.backend)
    B, T = a.batch, a.context
    model.setup_caches(B, T)
    reset(model)
    with torch.no_grad():
        # a random prompt, as bench.bench_decode: CHAI's clusters (and the decode kernel's work per program) depend
        # on it; identical rows of zeros give every sequence the same membership
        gen = torch.Generator(device="cuda").manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (B, 8), device="cuda", generator=gen)
        model(prompt, torch.arange(8, device="cuda"))
        step = decode_step(model, True)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        pos = torch.tensor([T - 40], device="cuda")
        for _ in range(5):
            step(tok, pos)
        torch.cuda.synchronize()
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            step(tok, pos)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step(tok, pos)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in events) / n / 1e6
    print(f"{a.shape} chai={a.chai} backend {model.backend} B={B} T={T}: "
          f"wall {wall * 1e3:.3f} ms/step, kernels "
          f"{gpu * 1e3:.3f} ms/step, bytes {step_bytes(model, B) / 1e9:.2f} GB -> "
          f"{step_bytes(model, B) / wall / 1e9:.0f} GB/s wall, {step_bytes(model, B) / gpu / 1e9:.0f} GB/s kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / n / 1e3:8.3f} ms  x{e.count // n:<4} {e.key[:110]}")


if __name__ == "__main__":
    main()
