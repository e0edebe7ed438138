"""Evaluation: does CHAI keep the model's quality?

    python tools/evaluate.py weights/MODEL --text pydoc --text /usr/share/common-licenses \\
        --chai auto --chai aggressive=6:2 --static --random 1 --task piqa.jsonl --task arc:arc_easy.jsonl

Every method runs on the same engine and the same inputs, side by side with dense attention:
  dense         the reference (always the first row)
  chai          CHAI with per-layer counts from chai.json (or a spec string: 'k', 'N:k', a preset, a list);
                SPEC@prompt / SPEC@window: the same counts with membership from the prompt / the window
  chai-static   the paper's ablation: one membership per layer fixed offline (chai_static.json)
  random        the same counts with a random membership per layer (seeded): what clustering buys

What is measured:
  perplexity    per text: the token stream cut into non-overlapping windows of `window_len` tokens, each
                scored with model(tokens) (no cache: CHAI's membership then comes from the window's first W
                tokens, exactly as for a request), exp of the token-weighted mean NLL. With --prompt-len P the
                first P tokens of each window are its prompt (membership from the prompt is decided on them, as
                generate would) and only the tokens after it are scored, for every method alike
  agreement     share of positions where the method's top-1 next token equals dense's, same windows
  KL            mean KL(dense || method) of the next-token distributions, nats per position
  tasks         zero-shot multiple choice by log-likelihood of each choice after the context (acc), and
                divided by the choice's length in UTF-8 bytes (acc_norm), on local jsonl files in the layouts
                of PIQA, HellaSwag, ARC (Easy/Challenge) and BoolQ with lm-evaluation-harness's prompts
  savings       from the counts alone: share of K heads dropped from the cache (GQA: a KV head's K is kept
                while any representative uses it), the same as a share of K+V, and the share of query heads
                whose scores and softmax are skipped

Batches are right-padded: the uncached forward has no padding mask, but attention is causal, so padding after
a sequence never reaches its real positions, and CHAI's window (the first W tokens) is never padding for any
position that is read. Only real positions' logits are read.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import set_chai
from .chai import ChaiConfig, n_k_slots, resolve, scoring_prompt
from .errors import UserError
from .progress import progress


class EvaluationError(UserError):
    """Bad evaluation input (a file, a task layout, an option); the message says what is wrong and the fix."""


# ----------------------------------------------------------------------------------------------------
# Methods: what is compared


@dataclass
class Method:
    name: str
    chai: ChaiConfig | None  # None: dense attention
    kind: str = "chai"  # dense | chai | static | random
    # layers whose count equals n_heads run the clustered code too (each head alone; dense logits), not dense attention
    cluster_dense_layers: bool = False


def savings(cfg: ChaiConfig | None, n_heads: int, n_kv_heads: int) -> dict:
    """What the counts save: share of K dropped, of K+V dropped (V stays whole), of query heads' scores skipped."""
    if cfg is None:
        return {"k": 0.0, "kv": 0.0, "scores": 0.0}
    L = len(cfg.clusters)
    kept = sum(n_k_slots(k, n_heads, n_kv_heads) for k in cfg.clusters)
    k_frac = 1 - kept / (L * n_kv_heads)
    return {"k": k_frac, "kv": k_frac / 2, "scores": 1 - sum(cfg.clusters) / (L * n_heads)}


def random_membership(k: int, n_heads: int, gen: torch.Generator) -> list[int]:
    """A random head -> cluster labelling with exactly k non-empty clusters (seeded through gen)."""
    perm = torch.randperm(n_heads, generator=gen)
    labels = torch.randint(k, (n_heads,), generator=gen)
    labels[perm[:k]] = torch.arange(k)  # k random heads found the k clusters, so none is empty
    return labels.tolist()


def random_grouping(cfg: ChaiConfig, n_heads: int, seed: int = 0) -> ChaiConfig:
    """The random-grouping baseline: cfg's counts, a random static membership per clustered layer."""
    gen = torch.Generator().manual_seed(seed)
    membership = [None if k == n_heads else random_membership(k, n_heads, gen) for k in cfg.clusters]
    return ChaiConfig(clusters=list(cfg.clusters), window=cfg.window, static_membership=membership,
                      calibration={"random_grouping_seed": seed})


def _chai_source(spec: str, model, model_dir) -> ChaiConfig:
    """'auto' (chai.json beside the checkpoint), a .json path, or a spec string, optionally '@prompt' or '@window'
    (the same counts, that membership) -> ChaiConfig."""
    spec, _, membership = spec.partition("@")
    try:
        cfg = resolve(spec, model, model_dir, required=True)
        if membership:
            cfg = dataclasses.replace(cfg, membership=membership, static_membership=None).validate(
                model.config.n_layers, model.config.n_heads)
        return cfg
    except ValueError as e:
        raise EvaluationError(str(e)) from e


def build_methods(model, model_dir=None, chai=("auto",), static: str | bool | None = None, n_random: int = 0,
                  seed: int = 0, random_of: list[str] | None = None, groups=()) -> list[Method]:
    """dense, then one CHAI method per entry of chai ('[name=]auto|path.json|spec'), each also with its heads
    clustered in g groups apart for g in groups (named NAME/g<g>: what g tensor-parallel ranks do), then CHAI-static
    (static: True for chai_static.json beside the model, or a path), then n_random random groupings per CHAI method
    (or per method named in random_of)."""
    methods = [Method("dense", None, "dense")]
    H = model.config.n_heads
    chai_methods = []
    for entry in chai:
        name, _, spec = entry.rpartition("=")
        cfg = _chai_source(spec, model, model_dir)
        name = name or ("chai" if spec == "auto" else f"chai[{spec}]")
        chai_methods.append(Method(name, cfg, "chai"))
        for g in groups:
            try:
                grouped = dataclasses.replace(cfg, groups=g).validate(model.config.n_layers, H)
            except ValueError as e:
                raise EvaluationError(f"{name} in {g} groups: {e}") from e
            chai_methods.append(Method(f"{name}/g{g}", grouped, "chai"))
    methods += chai_methods
    if static:
        path = Path(model_dir) / "chai_static.json" if static is True else Path(static)
        if not path.is_file():
            raise EvaluationError(f"{path} does not exist; calibrate first (it writes chai_static.json beside "
                                  "chai.json) or leave --static out")
        cfg = ChaiConfig.load(path).validate(model.config.n_layers, H)
        if cfg.static_membership is None:
            raise EvaluationError(f"{path} has no static_membership; it is not a CHAI-static config")
        methods.append(Method("chai-static", cfg, "static"))
    if random_of and set(random_of) - {m.name for m in chai_methods}:
        raise EvaluationError(f"--random-of {sorted(set(random_of) - {m.name for m in chai_methods})}: no such CHAI "
                              f"method; named ones: {[m.name for m in chai_methods]}")
    for m in (m for m in chai_methods if m.chai.groups == 1):
        if random_of and m.name not in random_of:
            continue
        for r in range(n_random):
            tag = f"random[{m.name}]" + (f"@{seed + r}" if n_random > 1 else "")
            methods.append(Method(tag, random_grouping(m.chai, H, seed + r), "random"))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise EvaluationError(f"method names repeat ({names}); name them with --chai NAME=SPEC")
    return methods


class _Installed:
    """Runs a block with a method's CHAI config installed, restoring the model's own config afterwards."""

    def __init__(self, model):
        self.model, self.saved = model, model.chai_config

    def use(self, method: Method):
        if self.model.chai_config is not method.chai:
            set_chai(self.model, method.chai, method.cluster_dense_layers)

    def restore(self):
        if self.model.chai_config is not self.saved:
            set_chai(self.model, self.saved)


# ----------------------------------------------------------------------------------------------------
# Batching: right padding, real lengths kept


def pad_right(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> tokens [B, S] (right-padded with pad_id) and lengths [B]."""
    S = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs])


def _device_of(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------
# Perplexity, agreement, KL on text windows


def read_text(source: str) -> tuple[str, str]:
    """(name, text) of a source: 'pydoc' (the standard library's documentation text), a text file, or a folder
    (its files in name order, symlinks and identical copies read once)."""
    if source == "pydoc":
        from .calibration import CalibrationError, default_texts

        try:
            return "pydoc", "\n\n".join(default_texts())
        except CalibrationError as e:
            raise EvaluationError(str(e)) from e
    path = Path(source)
    if path.is_dir():
        seen, parts = set(), []
        for f in sorted(path.iterdir()):
            if not f.is_file():
                continue
            data = f.read_bytes()
            digest = hashlib.sha256(data).hexdigest()  # GPL and GPL-3 are one file under two names
            if digest not in seen:
                seen.add(digest)
                parts.append(data.decode("utf-8", errors="replace"))
        if not parts:
            raise EvaluationError(f"text folder {path} holds no files")
        return path.name, "\n\n".join(parts)
    if not path.is_file():
        raise EvaluationError(f"text {path} does not exist; give a text file, a folder of text files, or 'pydoc'")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EvaluationError(f"text {path} is empty")
    return path.name, text


def make_windows(ids: list[int], window_len: int, bos_id: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of window_len tokens (the last may be shorter; one of < 2 tokens predicts nothing
    and is dropped). bos_id: each window starts with it (models trained with BOS at every sequence start)."""
    if window_len < 2:
        raise EvaluationError(f"window length {window_len}: use at least 2 (a window predicts its tokens 1..)")
    step = window_len - (bos_id is not None)
    out = []
    for lo in range(0, len(ids), step):
        w = ([bos_id] if bos_id is not None else []) + list(ids[lo:lo + step])
        if len(w) >= 2:
            out.append(w)
    return out


@dataclass
class TextStats:
    """Sums over predicted positions (a window of n tokens predicts n - 1)."""

    nll: float = 0.0
    tokens: int = 0
    agree: int = 0
    kl: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")

    def add(self, other: "TextStats"):
        self.nll += other.nll
        self.tokens += other.tokens
        self.agree += other.agree
        self.kl += other.kl


def _window_stats(logp: torch.Tensor, ref_logp: torch.Tensor, targets: torch.Tensor, real: torch.Tensor) -> TextStats:
    """logp, ref_logp [B, S-1, V] log-probs (method, dense); targets [B, S-1]; real [B, S-1] bool -> sums."""
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # [B, S-1]
    agree = logp.argmax(-1) == ref_logp.argmax(-1)  # [B, S-1]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, S-1]: KL(dense || method) per position
    return TextStats(float(nll[real].sum()), int(real.sum()), int(agree[real].sum()), float(kl[real].sum()))


@torch.no_grad()
def score_windows(model, methods: list[Method], windows: list[list[int]], batch_size: int = 4,
                  show_progress: bool = True, desc: str = "perplexity", prompt_len: int = 0) -> dict[str, TextStats]:
    """Every method on every window; per method the summed NLL, agreement with and KL from methods[0] (dense).
    prompt_len: each window's first tokens are its prompt (scoring_prompt); only tokens after it are scored."""
    if prompt_len == 0 and any(m.chai is not None and m.chai.membership == "prompt" for m in methods):
        raise EvaluationError("membership from the prompt needs a prompt: give --prompt-len P (the first P tokens "
                              "of each window are the prompt; the tokens after it are scored)")
    stats = {m.name: TextStats() for m in methods}
    device = _device_of(model)
    inst = _Installed(model)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    bar = progress(total=len(batches) * len(methods), desc=desc, unit="batch", disable=None if show_progress else True)
    try:
        for batch in batches:
            tokens, lengths = pad_right(batch)
            tokens = tokens.to(device)
            S = tokens.shape[1]
            pos = torch.arange(S - 1)[None, :]  # position p predicts token p + 1
            real = ((pos < (lengths - 1)[:, None]) & (pos >= max(prompt_len, 1) - 1)).to(device)  # [B, S-1] scored
            targets = tokens[:, 1:]  # [B, S-1]
            ref = None
            for m in methods:
                inst.use(m)
                with scoring_prompt(model, prompt_len or None):
                    logp = F.log_softmax(model(tokens)[:, :-1].float(), dim=-1)  # [B, S-1, V]
                ref = logp if ref is None else ref  # the first method (dense) is the reference
                stats[m.name].add(_window_stats(logp, ref, targets, real))
                bar.update(1)
    finally:
        inst.restore()
        bar.close()
    return stats


def perplexity(model, ids: list[int], window_len: int = 512, batch_size: int = 4, bos_id: int | None = None,
               show_progress: bool = False) -> float:
    """Perplexity of one token stream under the model as it is (its installed CHAI config, or dense)."""
    windows = make_windows(ids, window_len, bos_id)
    if not windows:
        raise EvaluationError(f"{len(ids)} tokens make no window of >= 2 tokens")
    as_is = Method("model", model.chai_config)
    return score_windows(model, [as_is], windows, batch_size, show_progress)["model"].perplexity


# ----------------------------------------------------------------------------------------------------
# Zero-shot multiple-choice tasks: loaders for four layouts


@dataclass
class Doc:
    context: str
    choices: list[str]  # without the leading space; it is added between context and choice when scoring
    gold: int


@dataclass
class Task:
    name: str
    layout: str
    docs: list[Doc]
    path: str = ""


def _field(rec: dict, key: str, where: str, layout: str):
    if key not in rec:
        raise EvaluationError(f"{where}: {layout} record has no field {key!r} (fields: {sorted(rec)})")
    return rec[key]


def _gold(value, n: int, where: str) -> int:
    """A label given as int, digit string or bool -> index in 0..n-1."""
    try:
        g = int(value)  # bool -> 0/1, "3" -> 3
    except (TypeError, ValueError):
        raise EvaluationError(f"{where}: label {value!r} is not a choice index; an unlabelled (test) split "
                              "cannot be scored, use the validation split") from None
    if not 0 <= g < n:
        raise EvaluationError(f"{where}: label {g} is out of range for {n} choices")
    return g


def piqa_doc(rec: dict, where: str) -> Doc:
    goal, s1, s2 = (_field(rec, k, where, "piqa") for k in ("goal", "sol1", "sol2"))
    return Doc(f"Question: {goal}\nAnswer:", [s1, s2], _gold(_field(rec, "label", where, "piqa"), 2, where))


def hellaswag_clean(text: str) -> str:
    """HellaSwag's text clean-up as the harness does it: WikiHow's ' [title]' becomes a sentence end, other
    [bracketed] markers go, and the double spaces they leave collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(rec: dict, where: str) -> Doc:
    if "ctx_a" in rec:
        # str.capitalize also lowercases the rest of ctx_b, as the harness's prompt does
        ctx = rec["ctx_a"] + " " + _field(rec, "ctx_b", where, "hellaswag").capitalize()
    else:
        ctx = _field(rec, "ctx", where, "hellaswag")
    label = _field(rec, "activity_label", where, "hellaswag")
    endings = _field(rec, "endings", where, "hellaswag")
    if not isinstance(endings, list) or not endings:
        raise EvaluationError(f"{where}: hellaswag 'endings' must be a non-empty list of strings")
    return Doc(hellaswag_clean(f"{label}: {ctx}"), [hellaswag_clean(e) for e in endings],
               _gold(_field(rec, "label", where, "hellaswag"), len(endings), where))


def arc_doc(rec: dict, where: str) -> Doc:
    q = _field(rec, "question", where, "arc")
    if isinstance(q, dict):  # AI2's own release: {"question": {"stem", "choices": [{"text", "label"}]}}
        texts = [c["text"] for c in q.get("choices", [])]
        labels = [c["label"] for c in q.get("choices", [])]
        q = q.get("stem", "")
    else:  # the Hugging Face layout: choices {"text": [...], "label": [...]}
        ch = _field(rec, "choices", where, "arc")
        if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
            raise EvaluationError(f"{where}: arc 'choices' must be {{'text': [...], 'label': [...]}}")
        texts, labels = ch["text"], ch["label"]
    key = _field(rec, "answerKey", where, "arc")
    if key not in labels:
        raise EvaluationError(f"{where}: answerKey {key!r} is not among the choice labels {labels}")
    return Doc(f"Question: {q}\nAnswer:", list(texts), labels.index(key))


def boolq_doc(rec: dict, where: str) -> Doc:
    passage, question = (_field(rec, k, where, "boolq") for k in ("passage", "question"))
    if "label" in rec:  # SuperGLUE: 0 = False, 1 = True
        gold = rec["label"]
    elif "answer" in rec:  # Google's release: true / false
        gold = rec["answer"]
    else:
        raise EvaluationError(f"{where}: boolq record has neither 'label' nor 'answer'")
    return Doc(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], _gold(gold, 2, where))


LAYOUTS = {"piqa": piqa_doc, "hellaswag": hellaswag_doc, "arc": arc_doc, "boolq": boolq_doc}
LAYOUT_FIELDS = {"piqa": "goal, sol1, sol2, label", "hellaswag": "ctx_a, ctx_b (or ctx), activity_label, endings, label",
                 "arc": "question, choices {text, label}, answerKey", "boolq": "passage, question, label (or answer)"}


def detect_layout(rec: dict, where: str) -> str:
    if {"goal", "sol1", "sol2"} <= rec.keys():
        return "piqa"
    if "endings" in rec and ("ctx_a" in rec or "ctx" in rec):
        return "hellaswag"
    if "answerKey" in rec and "question" in rec:
        return "arc"
    if {"passage", "question"} <= rec.keys():
        return "boolq"
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUT_FIELDS.items())
    raise EvaluationError(f"{where}: unknown task layout (fields {sorted(rec)}); known layouts and their fields: "
                          f"{known}. Convert the file to one of them or name the layout as LAYOUT:PATH")


def read_jsonl(path) -> list[tuple[str, dict]]:
    """(where, record) per non-empty line; where is 'path:line' for messages."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"task file {path} does not exist; give a .jsonl file with one example per line")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                  "JSON object") from None
        if not isinstance(rec, dict):
            raise EvaluationError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    if not out:
        raise EvaluationError(f"task file {path} has no examples")
    return out


def load_task(spec: str, limit: int | None = None) -> Task:
    """A task from '[LAYOUT:]PATH' (layout auto-detected from the first record when not given)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in LAYOUTS:
        layout, path = prefix, rest
    elif sep and re.fullmatch(r"\w+", prefix) and not Path(spec).exists():
        raise EvaluationError(f"unknown task layout {prefix!r} in {spec!r}; known: {sorted(LAYOUTS)} (or leave "
                              "the layout out to detect it from the file's fields)")
    else:
        layout, path = None, spec
    records = read_jsonl(path)
    if limit is not None:
        records = records[:limit]
    if layout is None:
        layout = detect_layout(records[0][1], records[0][0])
    make = LAYOUTS[layout]
    return Task(Path(path).stem, layout, [make(rec, where) for where, rec in records], str(path))


# ----------------------------------------------------------------------------------------------------
# Zero-shot multiple-choice tasks: scoring


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as they tokenize together.

    The whole string is encoded once and the continuation is what follows the context's own tokens, so the
    continuation is scored with the tokens the model would actually see. Trailing spaces of the context move
    to the continuation (' yes' is one token; 'x ' + 'yes' would not be).
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation)
    ctx = tok.encode(stripped)
    return ctx, whole[len(ctx):]


@dataclass
class Request:
    ctx: list[int]
    cont: list[int]


def build_requests(task: Task, tok, max_len: int) -> list[Request]:
    """One request per (doc, choice), in doc order; ' ' joins context and choice (the harness's delimiter)."""
    prefix = tok.bos_id if tok.bos_id is not None else (tok.eos_ids[0] if tok.eos_ids else 0)
    out = []
    for doc in task.docs:
        for choice in doc.choices:
            ctx, cont = encode_pair(tok, doc.context, " " + choice)
            if not cont:
                raise EvaluationError(f"task {task.name}: choice {choice!r} encodes to no tokens")
            ctx = ctx or [prefix]  # the first continuation token needs a position to be predicted from
            ctx = ctx[max(0, len(ctx) + len(cont) - max_len):] or [prefix]  # too long: drop the oldest context
            out.append(Request(ctx, cont[-max_len + 1:]))
    return out


@torch.no_grad()
def continuation_logprobs(model, requests: list[Request], batch_size: int = 16) -> list[float]:
    """Sum of log p(continuation tokens | context) per request, with the model as installed.

    Requests run longest first (less padding), each context + continuation in one uncached pass, so CHAI's
    membership comes from the context's first W tokens.
    """
    device = _device_of(model)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].ctx) + len(requests[i].cont)))
    out = [0.0] * len(requests)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        seqs = [requests[i].ctx + requests[i].cont for i in idx]
        tokens, lengths = pad_right(seqs)
        tokens = tokens.to(device)
        logp = F.log_softmax(model(tokens)[:, :-1].float(), dim=-1)  # [B, S-1, V]: position p predicts p + 1
        tok_lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, S-1]
        pos = torch.arange(tokens.shape[1] - 1, device=device)[None, :]
        first = torch.tensor([len(requests[i].ctx) - 1 for i in idx], device=device)[:, None]
        is_cont = (pos >= first) & (pos < lengths.to(device)[:, None] - 1)  # [B, S-1] continuation targets
        sums = (tok_lp * is_cont).sum(1)
        for j, i in enumerate(idx):
            out[i] = float(sums[j])
    return out


def task_accuracy(task: Task, logprobs: list[float]) -> dict:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per UTF-8 byte of the choice)."""
    acc = acc_norm = 0
    k = 0
    for doc in task.docs:
        lls = logprobs[k:k + len(doc.choices)]
        k += len(doc.choices)
        norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, doc.choices)]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc.gold
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == doc.gold
    n = len(task.docs)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def score_task(model, methods: list[Method], task: Task, tok, batch_size: int = 16,
               show_progress: bool = True) -> dict[str, dict]:
    """acc / acc_norm of every method on one task."""
    requests = build_requests(task, tok, model.config.max_seq_len)
    inst = _Installed(model)
    out = {}
    bar = progress(total=len(methods), desc=f"task {task.name}", unit="method",
                   disable=None if show_progress else True)
    try:
        for m in methods:
            inst.use(m)
            out[m.name] = task_accuracy(task, continuation_logprobs(model, requests, batch_size))
            bar.update(1)
    finally:
        inst.restore()
        bar.close()
    return out


# ----------------------------------------------------------------------------------------------------
# One run: every method on every text and task, one table


@dataclass
class Report:
    methods: list[Method]
    savings: dict[str, dict]
    texts: dict[str, dict[str, TextStats]] = field(default_factory=dict)  # text -> method -> stats
    pooled: dict[str, TextStats] = field(default_factory=dict)  # method -> stats over all texts
    tasks: dict[str, dict[str, dict]] = field(default_factory=dict)  # task -> method -> acc
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        return format_table(self)


def evaluate(model, tok, methods: list[Method], texts: list[str] = (), tasks: list[str] = (),
             window_len: int = 512, max_tokens: int | None = None, batch_size: int = 4,
             task_batch_size: int = 16, task_limit: int | None = None, show_progress: bool = True,
             prompt_len: int = 0) -> Report:
    """Runs every method on every text source ('pydoc', a file, a folder) and task spec ('[LAYOUT:]PATH')."""
    if not methods or methods[0].chai is not None:
        raise EvaluationError("the first method must be dense (the reference for agreement, KL and deltas)")
    mc = model.config
    if window_len > mc.max_seq_len:
        raise EvaluationError(f"window length {window_len} exceeds the model's {mc.max_seq_len} positions")
    if not 0 <= prompt_len < window_len - 1:
        raise EvaluationError(f"prompt length {prompt_len}: use 0 <= P < window length - 1 ({window_len - 1}) so "
                              "that each window has tokens to score after its prompt")
    report = Report(methods, {m.name: savings(m.chai, mc.n_heads, mc.n_kv_heads) for m in methods},
                    settings={"window_len": window_len, "max_tokens": max_tokens, "prompt_len": prompt_len})
    loaded = [load_task(t, task_limit) for t in tasks]  # every file is checked before the long part starts
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    report.pooled = {m.name: TextStats() for m in methods}
    for source in texts:
        name, text = read_text(source)
        ids = tok.encode(text, bos=False)[:max_tokens]
        stats = score_windows(model, methods, make_windows(ids, window_len, bos), batch_size, show_progress,
                              desc=f"text {name}", prompt_len=prompt_len)
        report.texts[name] = stats
        for m in methods:
            report.pooled[m.name].add(stats[m.name])
    for task in loaded:
        report.tasks[task.name] = score_task(model, methods, task, tok, task_batch_size, show_progress)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(report: Report) -> str:
    """A markdown table: one row per method; deltas are against dense (first row), task deltas in points."""
    dense = report.methods[0].name
    head = ["method", "K saved", "K+V saved", "scores skipped"]
    head += [f"ppl {t}" for t in report.texts]
    if report.texts:
        head += ["top-1 agree", "KL nats"]
    for t in report.tasks:
        head += [f"{t} acc", f"{t} acc_norm"]
    rows = []
    for m in report.methods:
        s = report.savings[m.name]
        row = [m.name, _pct(s["k"]), _pct(s["kv"]), _pct(s["scores"])]
        for t, stats in report.texts.items():
            p, p0 = stats[m.name].perplexity, stats[dense].perplexity
            row.append(f"{p:.3f}" if m.name == dense else f"{p:.3f} ({100 * (p / p0 - 1):+.1f}%)")
        if report.texts:
            st = report.pooled[m.name]
            row += [f"{100 * st.agreement:.2f}%", f"{st.mean_kl:.4f}"]
        for t, res in report.tasks.items():
            for key in ("acc", "acc_norm"):
                v, v0 = res[m.name][key], res[dense][key]
                row.append(f"{100 * v:.1f}" if m.name == dense else f"{100 * v:.1f} ({100 * (v - v0):+.1f})")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"{t}: {n} docs" for t, n in ((t, next(iter(r.values()))["n"]) for t, r in report.tasks.items())]
    toks = [f"{t}: {next(iter(s.values())).tokens} predicted tokens" for t, s in report.texts.items()]
    if toks or notes:
        lines.append("")
        P = report.settings.get("prompt_len") or 0
        scored = f", the tokens after a {P}-token prompt scored" if P else ""
        lines.append("(" + "; ".join(toks + notes) + f"; windows of {report.settings.get('window_len')} tokens"
                     f"{scored})")
    return "\n".join(lines)


def plot_report(report: Report, path, title: str | None = None) -> Path:
    """The trade-off: perplexity increase over dense (pooled over texts) against the K+V cache saved and against the
    decode attention scores skipped, one point per method; marker by kind, filled for membership from the window,
    hollow for membership from the prompt."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EvaluationError("--plot needs matplotlib: pip install 'chai-models[plots]'") from e
    if not report.pooled:
        raise EvaluationError("--plot needs at least one --text (it plots perplexity against the saving)")
    dense = report.pooled[report.methods[0].name].perplexity
    colours = {"dense": "black", "chai": "tab:blue", "static": "tab:orange", "random": "tab:red"}
    markers = {"dense": "s", "chai": "o", "static": "^", "random": "x"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "kv", "K+V cache saved"), (axes[1], "scores", "decode attention scores skipped")):
        seen = {}  # methods at one point get their labels stacked, not drawn over each other
        for m in report.methods:
            increase = 100 * (report.pooled[m.name].perplexity / dense - 1)
            x = 100 * report.savings[m.name][key]
            point = (round(x, 3), round(increase, 3))
            at = seen[point] = seen.get(point, -1) + 1
            prompt = m.chai is not None and m.chai.membership == "prompt"
            c = colours[m.kind]
            ax.plot(x, max(increase, 1e-2), markers[m.kind], ms=7, color=c,
                    markerfacecolor="none" if prompt else c)
            ax.annotate(m.name, (x, max(increase, 1e-2)), fontsize=7, xytext=(4, 3 - 8 * at), textcoords="offset points")
        ax.set_xlabel(f"{label} (%)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity increase over dense (%, log; dense drawn at 0.01)")
    fig.suptitle(title or "CHAI: saving vs quality (hollow: membership from the prompt)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model_dir", help="converted checkpoint folder (config.json inside)")
    p.add_argument("--text", action="append", default=[],
                   help="text for perplexity: 'pydoc', a file, or a folder of files (repeatable)")
    p.add_argument("--task", action="append", default=[], help="[LAYOUT:]FILE.jsonl, LAYOUT one of "
                   f"{sorted(LAYOUTS)} (auto-detected when left out; repeatable)")
    p.add_argument("--chai", action="append", default=None,
                   help="[NAME=]auto|FILE.json|SPEC (repeatable; default: auto, i.e. chai.json beside the model)")
    p.add_argument("--static", nargs="?", const=True, default=None,
                   help="add CHAI-static (chai_static.json beside the model, or the given file)")
    p.add_argument("--groups", type=int, action="append", default=[], metavar="G",
                   help="also run each CHAI method with each layer's heads clustered in G equal groups apart, its "
                        "counts shared out among them (what G tensor-parallel ranks do; repeatable)")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="add N random groupings (seeds seed..seed+N-1) with each CHAI method's counts")
    p.add_argument("--random-of", action="append", default=None, metavar="NAME",
                   help="random groupings only for these CHAI methods (repeatable; default: every one)")
    p.add_argument("--window-len", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--prompt-len", type=int, default=0, metavar="P",
                   help="each window's first P tokens are its prompt, only the rest is scored (needed by "
                        "membership from the prompt, SPEC@prompt; default 0: every token scored)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of each text")
    p.add_argument("--task-limit", type=int, default=None, help="use only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
    p.add_argument("--task-batch-size", type=int, default=16, help="choices per batch (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random groupings (default 0)")
    p.add_argument("--plot", default=None, metavar="PNG", help="save a saving-vs-quality plot")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    a = p.parse_args(argv)
    from .checkpoint import CheckpointError, load
    from .tokenizer import TokenizerError, load_tokenizer

    try:
        if not a.text and not a.task:
            raise EvaluationError("nothing to evaluate: give --text (perplexity) and/or --task (zero-shot tasks)")
        for spec in a.task:  # a bad task file fails here, before minutes of model work
            load_task(spec, a.task_limit)
        model = load(a.model_dir, device=a.device, dtype=a.dtype)
        tok = load_tokenizer(a.model_dir)
        methods = build_methods(model, a.model_dir, a.chai or ["auto"], a.static, a.random, a.seed, a.random_of,
                                a.groups)
        report = evaluate(model, tok, methods, a.text, a.task, a.window_len, a.max_tokens, a.batch_size,
                          a.task_batch_size, a.task_limit, prompt_len=a.prompt_len)
        print(report.table())
        if a.plot:
            print(f"wrote {plot_report(report, a.plot)}")
        if a.json:
            Path(a.json).write_text(json.dumps(report_json(report), indent=2) + "\n")
            print(f"wrote {a.json}")
    except (EvaluationError, CheckpointError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def report_json(report: Report) -> dict:
    return {"settings": report.settings,
            "methods": [{"name": m.name, "kind": m.kind, "clusters": None if m.chai is None else m.chai.clusters,
                         "membership": None if m.chai is None else m.chai.membership,
                         **report.savings[m.name]} for m in report.methods],
            "texts": {t: {n: vars(s) for n, s in st.items()} for t, st in report.texts.items()},
            "pooled": {n: {"agreement": s.agreement, "kl": s.mean_kl, "perplexity": s.perplexity}
                       for n, s in report.pooled.items()},
            "tasks": report.tasks}
