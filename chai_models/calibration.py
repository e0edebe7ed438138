"""Calibration of a checkpoint folder: its data, the counts (chai.budget or chai.calibrate), chai.json, the plots, the CLI.

    python tools/calibrate.py weights/MODEL [--budget 0.02] [--membership auto|window|prompt] [--data FILE] [--force]
    python tools/calibrate.py weights/MODEL --rule elbow [-n 1024] [--window 5] [--tolerance 0.05] [--force]
    python tools/calibrate.py --random-shape llama-2-7b --rule elbow -n 1024 --seq-len 512 --device cuda  (timing)

Two rules choose the per-layer counts:
  budget (default)  the counts that drop the most K+V cache (then skip the most attention scores) while perplexity,
                    measured with CHAI on calibration text the search did not see, stays within (1 + budget) x
                    dense (chai/budget.py). With --membership auto both the paper's window and membership from the
                    prompt are searched and the one that saves more is kept.
  elbow             the paper's: each layer's count at the elbow of its k-means error curve (chai/calibrate.py).

Calibration data: by default paragraphs of the Python standard library's documentation text
(pydoc_data/topics.py); or a .txt file (paragraphs, split on blank lines) or a .jsonl file (a "text" field per
line). The elbow rule uses each paragraph's first W tokens (a paragraph start is what the start of a request looks
like); the budget rule cuts the paragraphs, in a seeded order, into sequences of --seq-len tokens: the first
--n-search drive the search, the next --n-check are held out and checked last.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from .chai.calibrate import (CHAI_JSON, CHAI_STATIC_JSON, DEFAULT_TOLERANCE, PLOT_NAME, CalibrationError,
                             CalibrationResult, calibrate_model)
from .chai.budget import DEFAULT_BUDGET, BudgetCalibration, BudgetError, budget_calibration
from .chai.config import ChaiConfig
from .checkpoint import CheckpointError, load, read_config
from .tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------------
# Data: texts from a file (or the default) and their first tokens


def default_texts() -> list[str]:
    """Paragraphs of the Python standard library's documentation (pydoc_data/topics.py), in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise CalibrationError("this Python has no pydoc_data (standard library documentation text); give "
                               "calibration text with --data FILE.txt or FILE.jsonl") from e
    return [p for key in sorted(topics) for p in split_paragraphs(topics[key])]


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    paras, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur).strip())
            cur = []
    if cur:
        paras.append("\n".join(cur).strip())
    return paras


def read_texts(data) -> tuple[list[str], str]:
    """(texts, source description) from None (default text), a .txt or a .jsonl path."""
    if data is None:
        return default_texts(), "pydoc_data/topics.py (Python standard library documentation)"
    path = Path(data)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} does not exist (or is not a file); give a .txt file "
                               "or a .jsonl file with a 'text' field per line, or leave --data out for the "
                               "default text")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(raw, path)
    elif path.suffix == ".txt":
        texts = split_paragraphs(raw)
    else:
        raise CalibrationError(f"calibration data {path}: unknown type {path.suffix!r}; use .txt (paragraphs "
                               "separated by blank lines) or .jsonl (a 'text' field per line)")
    if not texts:
        raise CalibrationError(f"calibration data {path} is empty (no text found); fill it or leave --data out "
                               "for the default text")
    return texts, str(path)


def _jsonl_texts(raw: str, path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{i} is not valid JSON ({e}); each line must be an object with a "
                                   "'text' field") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CalibrationError(f"{path}:{i} has no string 'text' field; each line must be like "
                                   '{"text": "..."}')
        if rec["text"].strip():
            texts.append(rec["text"])
    return texts


def texts_to_tokens(texts: list[str], tokenizer, n: int, window: int, seed: int = 0) -> torch.Tensor:
    """The first `window` tokens of up to n texts, drawn in a seeded random order -> [n', window] int64.

    Texts shorter than window tokens are skipped. Tokenizes lazily, so large files cost only what is used.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    rows = []
    for i in order:
        ids = tokenizer.encode(texts[i])
        if len(ids) >= window:
            rows.append(list(ids[:window]))
            if len(rows) == n:
                break
    if not rows:
        raise CalibrationError(f"none of the {len(texts)} calibration texts has {window} tokens; give longer "
                               "texts or a smaller --window")
    return torch.tensor(rows, dtype=torch.long)


def texts_to_sequences(texts: list[str], tokenizer, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n sequences of seq_len tokens cut from the texts joined in a seeded random order -> [n', seq_len] int64.

    Paragraphs are joined by a blank line; each sequence starts with BOS when the tokenizer adds one (the model
    then sees what it was trained on). Tokenizes lazily, so large files cost only what is used.
    """
    if seq_len < 2:
        raise CalibrationError(f"seq_len = {seq_len}: a scored sequence needs at least 2 tokens")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None
    body = seq_len - (bos is not None)
    stream, rows = [], []
    for i in order:
        stream += tokenizer.encode(texts[i] + "\n\n", bos=False)
        while len(stream) >= body and len(rows) < n:
            rows.append(([bos] if bos is not None else []) + stream[:body])
            stream = stream[body:]
        if len(rows) == n:
            break
    if not rows:
        raise CalibrationError(f"the {len(texts)} calibration texts hold fewer than {seq_len} tokens; give more text "
                               "or a smaller --seq-len")
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Plots (the `plots` extra)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CalibrationError("elbow plots need matplotlib: pip install 'chai-models[plots]' (or matplotlib), "
                               "or pass --no-plot") from e
    return plt


def plot_available() -> bool:
    try:
        _pyplot()
    except CalibrationError:
        return False
    return True


def plot_elbows(result: CalibrationResult, path) -> Path:
    """One PNG: a grid of per-layer curves r(k), the chosen k marked, the shuffled-heads reference dashed."""
    plt = _pyplot()
    L, H = result.errors.shape
    cols = min(8, L)
    rows = (L + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), sharex=True, sharey=True,
                             squeeze=False)
    r = result.residual()
    r0 = None if result.null_errors is None else result.residual(result.null_errors)
    ks = list(range(1, H + 1))
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        k = result.clusters[i]
        if r0 is not None:
            ax.plot(ks, r0[i].tolist(), lw=0.8, ls="--", color="grey")
        ax.plot(ks, r[i].tolist(), lw=1)
        ax.plot([k], [float(r[i, k - 1])], "o", color="tab:red", ms=4)
        ax.axhline(result.tolerance, color="grey", lw=0.5, ls=":")
        ax.set_title(f"layer {i}: k={k}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"k-means error / error at k=1 ({result.n_sequences} sequences, W={result.window}, "
                 f"tolerance {result.tolerance}; dashed: heads shuffled)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The whole phase on a checkpoint folder


def calibrate_folder(model_dir, data=None, n: int = 1024, window: int = 5, tolerance: float = DEFAULT_TOLERANCE,
                     batch_size: int = 64, device="cpu", dtype=None, seed: int = 0, force: bool = False,
                     plot: bool | None = None, tokenizer=None, show_progress: bool = True,
                     **kw) -> CalibrationResult:
    """Calibrates a converted checkpoint and writes chai.json (and chai_static.json, the elbow PNG) beside it.

    data: None (default text), a .txt or .jsonl path. plot: True (required), False, None (if matplotlib is
    installed). tokenizer: one with .encode(text) -> ids (default: load_tokenizer(model_dir)). Extra keywords
    go to calibrate_model. Refuses to overwrite an existing chai.json unless force.
    """
    folder = Path(model_dir)
    if n < 1:
        raise CalibrationError(f"n = {n}: calibration needs at least one sequence (the paper used 1024)")
    read_config(folder)  # CheckpointError with the fix when the folder is not a checkpoint
    outs = [folder / CHAI_JSON, folder / CHAI_STATIC_JSON]
    existing = [p for p in outs if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass --force (force=True) to replace it")
    if plot:
        _pyplot()  # fail before the work, not after
    texts, source = read_texts(data)
    model = load(folder, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    tokens = texts_to_tokens(texts, tokenizer, n, window, seed)
    if tokens.shape[0] < n:
        print(f"note: only {tokens.shape[0]} of the {n} requested sequences have >= {window} tokens; using them",
              file=sys.stderr)
    result = calibrate_model(model, tokens, window, tolerance, batch_size, seed=seed, show_progress=show_progress,
                             **kw)
    extra = {"data": source, "model": str(folder)}
    result.chai_config(**extra).save(outs[0])
    if result.static_membership is not None:
        result.chai_config(static=True, **extra).save(outs[1])
    if plot or (plot is None and plot_available()):
        plot_elbows(result, folder / PLOT_NAME)
    elif plot is None:
        print("note: matplotlib is not installed, so no elbow plot; pip install 'chai-models[plots]'",
              file=sys.stderr)
    return result


def calibrate_budget_folder(model_dir, budget: float = DEFAULT_BUDGET, data=None, membership: str = "auto",
                            seq_len: int = 128, n_search: int = 8, n_check: int = 8, prompt_len: int = 32,
                            prompt_rows: int = 16, window: int = 5, batch_size: int = 4, device="cpu", dtype=None,
                            seed: int = 0, force: bool = False, tokenizer=None, counts=None,
                            show_progress: bool = True, reuse=None) -> BudgetCalibration:
    """The budget rule on a converted checkpoint: writes chai.json (and chai_static.json at the same counts).

    The calibration text is cut into n_search + n_check sequences of seq_len tokens (texts_to_sequences): the first
    n_search drive the search, the rest are held out and checked. Refuses to overwrite unless force.
    reuse: a chai.json written by this rule on the same data and settings (another budget): its single-layer runs
    are reused, so trying several budgets costs one search's measurements.
    """
    folder = Path(model_dir)
    read_config(folder)
    outs = [folder / CHAI_JSON, folder / CHAI_STATIC_JSON]
    existing = [p for p in outs if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass --force (force=True) to replace it")
    if n_search < 1 or n_check < 1:
        raise CalibrationError(f"n_search = {n_search}, n_check = {n_check}: the budget rule needs at least one "
                               "search and one check sequence")
    texts, source = read_texts(data)
    known = None
    if reuse is not None:
        rec = ChaiConfig.load(reuse).calibration or {}
        same = {"rule": "budget", "data": source, "seq_len": seq_len, "n_search": n_search, "prompt_len": prompt_len,
                "seed": seed, "window": window, "prompt_rows": prompt_rows}
        differ = [k for k, v in same.items() if rec.get(k) != v]
        if differ:
            raise CalibrationError(f"{reuse} was calibrated with other settings ({', '.join(differ)}); its "
                                   "single-layer runs do not apply: leave --reuse out")
        known = {m: {int(l): {int(c): d for c, d in s.items()} for l, s in per.items()}
                 for m, per in rec.get("sensitivity", {}).items()}
    model = load(folder, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    tokens = texts_to_sequences(texts, tokenizer, n_search + n_check, seq_len, seed)
    if tokens.shape[0] < 2:
        raise CalibrationError(f"the calibration text gives only {tokens.shape[0]} sequence(s) of {seq_len} tokens; "
                               "the budget rule needs a search and a check sequence: give more text or a smaller "
                               "--seq-len")
    n_s = min(n_search, tokens.shape[0] - 1) if tokens.shape[0] < n_search + n_check else n_search
    if n_s < n_search or tokens.shape[0] - n_s < n_check:
        print(f"note: the text gives {tokens.shape[0]} sequences of {seq_len} tokens: {n_s} search, "
              f"{tokens.shape[0] - n_s} check", file=sys.stderr)
    try:
        cal = budget_calibration(model, tokens[:n_s], tokens[n_s:], budget, membership, window, prompt_rows,
                                 prompt_len, counts, batch_size, show_progress,
                                 info={"data": source, "model": str(folder), "seed": seed, "window": window,
                                       "prompt_rows": prompt_rows}, known=known)
    except BudgetError as e:
        raise CalibrationError(str(e)) from e
    cal.config.save(outs[0])
    if cal.static is not None:
        cal.static.save(outs[1])
    elif outs[1].exists():
        outs[1].unlink()  # a stale CHAI-static file for other counts would mislead
    return cal


def random_shape_run(shape: str, rule: str, n: int, seq_len: int, device, dtype, budget: float, membership: str,
                     window: int, batch_size: int, seed: int = 0) -> str:
    """Times the calibration of a model of a real shape with random weights on random tokens (nothing is written):
    for GPU numbers of shapes whose weights are not at hand. Returns the report lines."""
    from .bench import SHAPES, random_model

    if shape not in SHAPES and not shape.startswith("opt-"):
        raise CalibrationError(f"unknown shape {shape!r}; use one of {sorted(SHAPES)} or opt-<size>")
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype or "float32"]
    model = random_model(shape, device, dt)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if rule == "elbow":
        tokens = torch.randint(vocab, (n, seq_len), generator=gen)
        res = calibrate_model(model, tokens, window, DEFAULT_TOLERANCE, batch_size, seed=seed, show_progress=True)
        summary = f"counts {res.clusters}"
    else:
        tokens = torch.randint(vocab, (2 * n, seq_len), generator=gen)
        cal = budget_calibration(model, tokens[:n], tokens[n:], budget, membership, window, batch_size=batch_size,
                                 prompt_len=min(32, seq_len // 4))
        summary = f"counts {cal.chosen.clusters} ({cal.chosen.membership}), {cal.chosen.runs} measured runs"
    sync()
    dt_s = time.perf_counter() - t0
    return (f"{shape} (random weights) on {device} {dt}: {rule} rule, {n} x {seq_len} tokens"
            f"{'' if rule == 'elbow' else ' search + the same held out'}: {dt_s:.1f} s; {summary}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="calibrate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model_dir", nargs="?", help="converted checkpoint folder (config.json inside)")
    p.add_argument("--rule", choices=("budget", "elbow"), default="budget",
                   help="budget (default): the most saving within a measured perplexity budget; elbow: the paper's")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"allowed perplexity increase over dense, a share (default {DEFAULT_BUDGET} = 2%%)")
    p.add_argument("--membership", choices=("auto", "window", "prompt"), default="auto",
                   help="budget rule: which membership to search (auto: both, the one that saves more is kept)")
    p.add_argument("--seq-len", type=int, default=128, help="budget rule: tokens per sequence (default 128)")
    p.add_argument("--n-search", type=int, default=8, help="budget rule: search sequences (default 8)")
    p.add_argument("--n-check", type=int, default=8, help="budget rule: held-out check sequences (default 8)")
    p.add_argument("--prompt-len", type=int, default=32,
                   help="budget rule: tokens of each sequence scored as its prompt (default 32)")
    p.add_argument("--prompt-rows", type=int, default=16,
                   help="membership from the prompt: the prompt's last rows that decide it (default 16)")
    p.add_argument("--counts", default=None, help="budget rule: candidate counts per layer, comma list "
                                                   "(default: powers of two, and for GQA n_kv_heads - 1 and n_kv_heads)")
    p.add_argument("--reuse", default=None, metavar="CHAI_JSON",
                   help="budget rule: reuse the single-layer runs of a chai.json from the same data and settings "
                        "(another budget)")
    p.add_argument("--random-shape", default=None, metavar="SHAPE",
                   help="time the rule on a model of this shape with random weights and random tokens (llama-2-7b, "
                        "smollm2-135m, tiny, opt-<size>); writes nothing")
    p.add_argument("--data", default=None, help=".txt (paragraphs) or .jsonl ('text' per line); default: "
                                                 "Python's documentation text")
    p.add_argument("-n", "--n", type=int, default=1024, help="elbow rule: calibration sequences (default 1024)")
    p.add_argument("--window", type=int, default=5, help="clustering window W (default 5)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"share of the k=1 error a layer may leave (default {DEFAULT_TOLERANCE})")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 64 elbow, 4 budget: the single-layer runs score the first batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing chai.json")
    p.add_argument("--no-plot", action="store_true", help="skip the elbow plot PNG")
    a = p.parse_args(argv)
    batch_size = a.batch_size or (64 if a.rule == "elbow" else 4)
    try:
        counts = None if a.counts is None else [int(c) for c in a.counts.split(",")]
        if a.random_shape:
            print(random_shape_run(a.random_shape, a.rule, a.n if a.rule == "elbow" else a.n_search, a.seq_len,
                                   a.device, a.dtype, a.budget, a.membership, a.window, batch_size, a.seed))
            return 0
        if a.model_dir is None:
            raise CalibrationError("give the checkpoint folder to calibrate (or --random-shape SHAPE for a timing run)")
        if a.rule == "elbow":
            res = calibrate_folder(a.model_dir, a.data, a.n, a.window, a.tolerance, batch_size, a.device, a.dtype,
                                   a.seed, a.force, plot=False if a.no_plot else None)
            print(res.table())
        else:
            cal = calibrate_budget_folder(a.model_dir, a.budget, a.data, a.membership, a.seq_len, a.n_search,
                                          a.n_check, a.prompt_len, a.prompt_rows, a.window, batch_size, a.device,
                                          a.dtype, a.seed, a.force, counts=counts, reuse=a.reuse)
            for m, r in cal.tried.items():
                print(f"-- membership from the {m}" + (" (kept)" if r is cal.chosen else ""))
                print(r.table())
            rec = cal.config.calibration
            print(f"chosen: {cal.chosen.membership} membership; held-out perplexity {rec['chai_ppl']} vs dense "
                  f"{rec['dense_ppl']} (budget {100 * a.budget:g}%); K+V saved {100 * rec['kv_saved']:.1f}%, "
                  f"decode scores skipped {100 * rec['scores_skipped']:.1f}%")
            if rec["kv_saved"] == 0:
                print("note: no config within the budget drops any K on this model; the counts skip attention "
                      "scores only")
    except (CheckpointError, CalibrationError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.model_dir) / CHAI_JSON}")
    return 0
