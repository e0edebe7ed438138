#!/usr/bin/env python
"""Time to first token, dense vs CHAI, eager prefill: wall time per round (alternating, no profiler attached), then
each one's GPU kernel time, kernel launches and top kernels from one profiled prefill.

    python tools/profile_prefill.py --shape llama-2-7b --chai llama-7b --tokens 2048
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chai_models.bench import random_model  # noqa: E402
from chai_models import set_backend, set_chai  # noqa: E402
from chai_models.chai import ChaiConfig  # noqa: E402
from chai_models.generation import prefill as generation_prefill  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--chai", default="llama-7b")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    a = p.parse_args()
    model = random_model(a.shape, torch.device("cuda"), torch.bfloat16)
    print("backend", set_backend(model, a.backend))
    cfg = model.config
    specs = {"dense": None, a.chai: ChaiConfig.from_spec(a.chai, cfg.n_layers, cfg.n_heads)}
    prompt = torch.randint(0, cfg.vocab_size, (a.tokens,)).tolist()

    def prefill():  # generate's prefill (its attention backends included), then the first token
        generation_prefill(model, [prompt]).argmax(-1)
        torch.cuda.synchronize()

    walls = {s: [] for s in specs}
    with torch.no_grad():
        for _ in range(a.rounds):  # alternating, so drifting clocks or host load hit both alike
            for name, chai_cfg in specs.items():
                set_chai(model, chai_cfg)
                model.setup_caches(1, a.tokens + 1)
                for _ in range(2):
                    prefill()
                for _ in range(5):
                    t = time.perf_counter()
                    prefill()
                    walls[name].append(time.perf_counter() - t)
        for name in specs:
            print(f"{name:>12}: wall median {statistics.median(walls[name]) * 1e3:.1f} ms, "
                  f"min {min(walls[name]) * 1e3:.1f} ms over {len(walls[name])} prefills of {a.tokens} tokens")
        from torch.profiler import ProfilerActivity, profile

        for name, chai_cfg in specs.items():  # the profiler slows the host: only kernel times from here on
            set_chai(model, chai_cfg)
            model.setup_caches(1, a.tokens + 1)
            prefill()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                prefill()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            print(f"{name:>12}: kernels {sum(e.self_device_time_total for e in events) / 1e3:.1f} ms, "
                  f"{sum(e.count for e in events)} launches")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
                print(f"    {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<5} {e.key[:100]}")


if __name__ == "__main__":
    main()
