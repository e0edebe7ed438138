"""Command line: `python -m chai_models generate "prompt"` (the main job), `... serve` (JSON lines on stdin, continuous
batching) and `... convert SRC DST`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from .errors import UserError, run_main


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """CPU threads for generation: every core this process may use, less one on a machine of at most 4 cores.

    torch's intra-op threads spin at a barrier after every operation, so one thread that shares its core with
    another busy process stalls all the others: on 2 shared cores with one busy, 2 threads ran 2-4x slower than 1
    (README, "CPU threads"). On a small machine, leaving one core free costs little when the machine is idle and
    saves the run when it is not; on larger machines one busy core matters less.
    """
    try:
        n = len(os.sched_getaffinity(0))  # the cores this process may run on (a container's share)
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, n - 1) if n <= 4 else n


def _check_threads(a) -> None:
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: give at least 1 (the number of CPU threads for generation)")


def _set_threads(a, device: str) -> None:
    if device == "cpu" or a.threads is not None:
        torch.set_num_threads(a.threads or default_threads())


def _model_dir(a):
    """--model, or the default model (fetched and converted on first use)."""
    if a.model is not None:
        return a.model
    from .default_model import ensure_default_model

    return ensure_default_model()


def cmd_generate(a) -> int:
    from . import chai, parallel, set_chai
    from .checkpoint import load
    from .generation import generate
    from .tokenizer import load_tokenizer

    _check_threads(a)
    model_dir = _model_dir(a)
    # under torchrun: one rank of a tensor-parallel group, which loads its slices only; rank 0 alone prints
    tp, device = parallel.init_from_env(a.device)
    show = tp is None or tp.rank == 0
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    _set_threads(a, device)
    try:
        model = (load if tp is None else parallel.load)(model_dir, device=device, dtype=dtype, chai=a.chai)
        if a.chai_groups > 1 and model.chai_config is not None:
            set_chai(model, dataclasses.replace(model.chai_config, groups=a.chai_groups))
        tok = load_tokenizer(model_dir)
    except (FileNotFoundError, ValueError) as e:  # load's argument checks (device, dtype, CHAI spec)
        raise UserError(str(e)) from e
    if a.chai is not None and model.chai_config is None:
        raise UserError("--chai auto but the checkpoint has no chai.json; calibrate it first "
                        f"(python tools/calibrate.py {model_dir}) or give counts, e.g. --chai 4")
    seed = a.seed
    if tp is not None and seed is None:  # every rank must sample the same token: one seed, rank 0's
        seed = [torch.seed() if show else 0]
        torch.distributed.broadcast_object_list(seed, src=0)
        seed = seed[0]
    chat = not a.raw and tok.chat_template is not None

    def stream(row, piece):
        if show:
            print(piece, end="", flush=True)

    try:
        out = generate(model, tok, [a.prompt], max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       top_k=a.top_k, top_p=a.top_p, seed=seed, stop=a.stop, chat=chat, callback=stream)
    except ValueError as e:  # generate's argument checks (empty prompt, prompt longer than the context)
        raise UserError(str(e)) from e
    except KeyboardInterrupt:
        # what was generated is already on stdout (streamed); end its line and say where it stopped
        print(flush=True)
        print("[interrupted (Ctrl-C); the text above is everything generated so far]", file=sys.stderr)
        return 130
    if tp is not None:
        torch.distributed.destroy_process_group()
    if not show:
        return 0
    s = out.stats
    print(flush=True)
    print(f"[{s['prompt_tokens']} prompt tokens, {s['generated_tokens']} generated, "
          f"{s['tokens_per_s']:.1f} tok/s, prefill {out.prefill_s * 1000:.0f} ms, KV cache "
          f"{s['kv_cache_bytes'] / 2**20:.2f} MiB, {device} {dtype}"
          f"{'' if tp is None else f'; rank 0 of {tp.world}, KV and weights per rank'}]", file=sys.stderr)
    if model.chai_config is not None:
        print(f"[{chai.summary(model)}]", file=sys.stderr)
    return 0


def cmd_serve(a) -> int:
    from . import chai
    from .checkpoint import CheckpointError, load
    from .engine import Engine
    from .serve import serve_lines
    from .tokenizer import load_tokenizer

    _check_threads(a)
    model_dir = _model_dir(a)
    device = a.device or _default_device()
    dtype = a.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    _set_threads(a, device)
    try:
        model = load(model_dir, device=device, dtype=dtype, chai=a.chai)
        tok = load_tokenizer(model_dir)
        engine = Engine(model, tok, a.max_batch_size, a.max_seq_len,
                        memory_gb=a.memory_gb if a.max_batch_size is None else None, compile=a.compile)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[serving {model_dir}: {engine.max_batch_size} slots of {engine.max_seq_len} positions, KV cache "
          f"{model.kv_cache_bytes()['total'] / 2**30:.2f} GiB, {device} {dtype}; {chai.summary(model)}]",
          file=sys.stderr)

    def write(line: str):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    serve_lines(engine, sys.stdin, write)
    return 0


def main(argv=None) -> int:
    """`python -m chai_models ...`: a UserError ends in one `error:` line and exit status 2, Ctrl-C in 130."""
    return run_main(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chai-models", description="LLaMA and OPT with CHAI, in pure PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt (default model: SmolLM2-135M-Instruct)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="converted checkpoint folder (default: the default model, "
                                                 "fetched and converted on first use)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads (default: the usable cores, less one on machines of at most 4 cores)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    g.add_argument("--chai", default=None, metavar="SPEC",
                   help="CHAI on: 'auto' (chai.json beside the checkpoint), a preset name, 'k' (all layers), "
                        "'N:k' (first N layers dense), or a comma list of per-layer counts")
    g.add_argument("--chai-groups", type=int, default=1, metavar="G",
                   help="cluster each layer's heads in G equal groups apart (what G tensor-parallel ranks do; one "
                        "process with G reproduces torchrun --nproc-per-node G)")
    v = sub.add_parser("serve", help="serve JSON-line requests from stdin with continuous batching (results to "
                                     "stdout; see chai_models/serve.py for the format)")
    v.add_argument("--model", default=None, help="converted checkpoint folder (default: the default model)")
    v.add_argument("--memory-gb", type=float, default=1.0,
                   help="KV-cache budget in GiB the slots are sized from (CHAI's smaller K cache gives more slots)")
    v.add_argument("--max-batch-size", type=int, default=None, help="slots, instead of --memory-gb")
    v.add_argument("--max-seq-len", type=int, default=None, help="positions per slot, prompt + generated "
                                                                 "(default: the model's context)")
    v.add_argument("--compile", action="store_true", help="compiled CUDA-graph decode step")
    v.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: as for generate)")
    v.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    v.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    v.add_argument("--chai", default=None, metavar="SPEC", help="as for generate")
    c = sub.add_parser("convert", help="convert a Hugging Face folder or .gguf file into our format",
                       add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["convert"]:
        from .convert import main as convert_main

        return convert_main(argv[1:])
    a = p.parse_args(argv)
    return cmd_serve(a) if a.cmd == "serve" else cmd_generate(a)
