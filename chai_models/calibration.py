"""Calibration of a checkpoint folder: its data, the offline phase (chai.calibrate), chai.json, the elbow plot, the CLI.

    python tools/calibrate.py weights/MODEL [--data FILE] [-n 1024] [--window 5] [--tolerance 0.05] [--force]

Calibration data (the thin layer above calibrate_model): by default paragraphs of the Python standard
library's documentation text (pydoc_data/topics.py); or a .txt file (paragraphs, split on blank lines) or a
.jsonl file (a "text" field per line). Each paragraph is one sequence: only its first W tokens matter, and
a paragraph start is what the start of a request looks like.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from .chai.calibrate import (CHAI_JSON, CHAI_STATIC_JSON, DEFAULT_TOLERANCE, PLOT_NAME, CalibrationError,
                             CalibrationResult, calibrate_model)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="calibrate", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="converted checkpoint folder (config.json inside)")
    p.add_argument("--data", default=None, help=".txt (paragraphs) or .jsonl ('text' per line); default: "
                                                 "Python's documentation text")
    p.add_argument("-n", "--n", type=int, default=1024, help="calibration sequences (default 1024)")
    p.add_argument("--window", type=int, default=5, help="clustering window W (default 5)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"share of the k=1 error a layer may leave (default {DEFAULT_TOLERANCE})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing chai.json")
    p.add_argument("--no-plot", action="store_true", help="skip the elbow plot PNG")
    a = p.parse_args(argv)
    try:
        res = calibrate_folder(a.model_dir, a.data, a.n, a.window, a.tolerance, a.batch_size, a.device, a.dtype,
                               a.seed, a.force, plot=False if a.no_plot else None)
    except (CheckpointError, CalibrationError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.table())
    print(f"wrote {Path(a.model_dir) / CHAI_JSON}")
    return 0
