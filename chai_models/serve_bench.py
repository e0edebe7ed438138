"""Serving benchmark: a stream of requests through chai_models.engine, one at a time, in static batches, and with
continuous batching dense and with CHAI, the slots of the batched modes sized from one KV-cache memory budget.

    python tools/serve_bench.py --shape llama-2-7b --memory-gb 60 --requests 256          # one H200
    python tools/serve_bench.py --shape tiny --device cpu --dtype float32 --requests 12 \\
        --prompt-len 4 48 --output-len 2 16 --memory-gb 0.01 --single-requests 3            # CPU check
    python tools/serve_bench.py --pair --model weights/smollm2-135m-instruct                 # 3 + 300 tokens

Requests: prompt lengths and output lengths drawn uniformly from the given ranges with a fixed seed, random token ids
(random weights: no end-of-sequence token stops a request, so every request generates exactly its output length).
Modes:
    one         one request at a time (an engine of one slot): the one-request decode rate
    static      batches of as many requests as the dense slots; a batch admits nothing until its last request ends
    continuous  dense: a finished request's slot takes the next one at once
    chai        continuous with CHAI (--chai preset), its slots from the same memory budget (more: smaller K)
"one" serves only the first --single-requests requests (its rate is per request, so a subset measures it).
Rates count generated tokens over the wall time of the whole stream (prefills included), after a warm-up stream.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from . import set_backend, set_chai
from .bench import SHAPES, random_model
from .chai import ChaiConfig
from .engine import Engine, slots_for_memory

MODES = ("one", "static", "continuous", "chai")


class TokenIds:
    """A tokenizer for random weights: requests are token ids, and their text is not decoded (empty)."""

    eos_ids: list[int] = []
    chat_template = None

    class _Silent:
        def push(self, token_id):
            return ""

        def flush(self):
            return ""

    def stream_decoder(self, skip_special=False):
        return self._Silent()


def workload(n: int, seed: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int):
    """n requests (prompt ids, output length) from a fixed seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = rng.randint(*prompt_len), rng.randint(*output_len)
        out.append(([rng.randrange(3, vocab) for _ in range(p)], o))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def serve_stream(model, tok, requests, slots: int, max_seq_len: int, static: bool, compile: bool) -> dict:
    """Serves the requests through an engine of `slots` slots; wall time and counts."""
    engine = Engine(model, tok, slots, max_seq_len, compile=compile, static_batching=static)
    device = engine.device
    # warm-up: a short stream (compiles the step when asked, fills allocator caches), not timed
    for ids, _ in requests[:min(slots, 2)]:
        engine.submit(ids[:8], max_new_tokens=4)
    list(engine.run())
    engine.stats = {k: 0 for k in engine.stats}
    _sync(device)
    t0 = time.perf_counter()
    reqs = [engine.submit(ids, max_new_tokens=n, eos_ids=[]) for ids, n in requests]
    for _ in engine.run():
        pass
    _sync(device)
    wall = time.perf_counter() - t0
    errors = [r.error for r in reqs if r.finish_reason == "error"]
    if errors:
        raise ValueError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    st = engine.stats
    n_tok = sum(len(r.tokens) for r in reqs)
    kv = model.kv_cache_bytes()["total"]
    return {"slots": slots, "requests": len(reqs), "generated": n_tok, "wall_s": wall, "req_per_s": len(reqs) / wall,
            "tok_per_s": n_tok / wall, "decode_steps": st["decode_steps"],
            "mean_batch": n_tok / max(st["decode_steps"], 1), "prefill_groups": st["prefill_groups"],
            "kv_gib": kv / 2**30, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"],
            "step_ms": 1e3 * st["decode_s"] / max(st["decode_steps"], 1)}


def run(model, requests, modes, memory_gb: float, max_seq_len: int, chai_cfg, single_requests: int,
        compile: bool, log=print) -> dict:
    tok = TokenIds()
    set_chai(model, None)
    dense_slots = slots_for_memory(model, max_seq_len, memory_gb)
    res = {}
    for mode in modes:
        if mode == "chai":
            set_chai(model, chai_cfg)
            slots = slots_for_memory(model, max_seq_len, memory_gb)
        else:
            set_chai(model, None)
            slots = 1 if mode == "one" else dense_slots
        reqs = requests[:single_requests] if mode == "one" else requests
        res[mode] = serve_stream(model, tok, reqs, slots, max_seq_len, mode == "static", compile)
        log(f"  {mode}: {res[mode]['tok_per_s']:.1f} tok/s over {res[mode]['wall_s']:.1f} s")
        model.clear_caches()
    set_chai(model, None)
    return res


def print_table(res: dict, head: str):
    print(head)
    cols = ("mode", "slots", "KV GiB", "requests", "generated", "wall s", "prefill s", "decode s", "req/s", "tok/s",
            "x one", "mean batch", "steps", "ms/step", "prefill groups")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    one = res.get("one", {}).get("tok_per_s")
    for mode, r in res.items():
        x_one = f"{r['tok_per_s'] / one:.2f}" if one else "-"
        print(f"| {mode} | {r['slots']} | {r['kv_gib']:.2f} | {r['requests']} | {r['generated']} | {r['wall_s']:.1f} | "
              f"{r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
              f"{r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {x_one} | {r['mean_batch']:.1f} | {r['decode_steps']} | "
              f"{r['step_ms']:.2f} | "
              f"{r['prefill_groups']} |")
    if "chai" in res and "continuous" in res:
        print(f"CHAI over dense continuous: {res['chai']['tok_per_s'] / res['continuous']['tok_per_s']:.2f}x tok/s "
              f"({res['chai']['slots']} vs {res['continuous']['slots']} slots)")
    if "continuous" in res and "static" in res:
        print(f"continuous over static: {res['continuous']['tok_per_s'] / res['static']['tok_per_s']:.2f}x tok/s")


def pair(model_dir, short: int, long: int, max_new: int, repeats: int) -> None:
    """A short and a long prompt in one generate() call vs the long one alone: medians of `repeats` runs of the
    prefill, the decode and the whole call. Then the same two prompts prefilled as one right-padded call (prefill
    only): the single call that generate does not make, and why."""
    from . import generate, load, load_tokenizer

    model = load(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    rng = random.Random(0)
    text = [rng.randrange(100, model.config.vocab_size) for _ in range(long)]
    cases = {f"{long} alone": [text], f"{short} + {long}": [text[:short], text]}
    print(f"| prompts ({max_new} new tokens each; {model_dir}, CPU fp32, {torch.get_num_threads()} threads) | "
          f"prefill s | decode s | total s |")
    print("|---|---|---|---|")
    for name, prompts in cases.items():
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(model, tok, prompts, max_new_tokens=max_new, eos_ids=[])
            runs.append((out.prefill_s, out.decode_s, time.perf_counter() - t0))
        med = [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(3)]
        print(f"| {name} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} |")
    # one call over [2, long] into the cache the generate calls set up (2 rows, long + max_new positions): the short
    # prompt right-padded (its padding sits after its tokens, which causal attention keeps from them), every token
    # through every layer
    tokens = torch.tensor([text, text[:short] + [0] * (long - short)])  # [2, long]
    runs = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tokens, torch.arange(long), last_only=True)
            runs.append(time.perf_counter() - t0)
    print(f"| {short} + {long} as one right-padded call ({2 * long} tokens) | {sorted(runs)[len(runs) // 2]:.3f} | "
          f"| |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--single-requests", type=int, default=8, help="requests served by mode 'one'")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(64, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gb", type=float, default=60.0, help="KV-cache budget (GiB) the slots are sized from")
    p.add_argument("--chai", default="llama-7b", help="CHAI preset or spec for mode 'chai'")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile", action="store_true", help="compiled CUDA-graph decode step (compile time is "
                                                          "spent in the untimed warm-up)")
    p.add_argument("--pair", action="store_true", help="instead: a short + a long prompt in one generate call vs "
                                                       "the long one alone, on a checkpoint (--model)")
    p.add_argument("--model", default="weights/smollm2-135m-instruct")
    p.add_argument("--pair-len", type=int, nargs=2, default=(3, 300), metavar=("SHORT", "LONG"))
    p.add_argument("--pair-new", type=int, default=8, help="new tokens per prompt in --pair")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.pair:
        pair(a.model, *a.pair_len, max_new=a.pair_new, repeats=a.repeats)
        return 0
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = random_model(a.shape, device, dtype).eval()
    backend = set_backend(model, a.backend)
    max_seq_len = a.prompt_len[1] + a.output_len[1]
    cfg = model.config
    chai_cfg = ChaiConfig.from_spec(a.chai, cfg.n_layers, cfg.n_heads)
    requests = workload(a.requests, a.seed, tuple(a.prompt_len), tuple(a.output_len), cfg.vocab_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    res = run(model, requests, a.modes, a.memory_gb, max_seq_len, chai_cfg, a.single_requests, a.compile)
    print_table(res, f"\n{a.shape} {dtype} on {name}, backend {backend}, {'compiled' if a.compile else 'eager'} "
                     f"decode; {a.requests} requests (seed {a.seed}), prompts {a.prompt_len[0]}-{a.prompt_len[1]}, "
                     f"outputs {a.output_len[0]}-{a.output_len[1]} tokens; KV budget {a.memory_gb} GiB, slots of "
                     f"{max_seq_len} positions; CHAI {a.chai}\n")
    return 0
