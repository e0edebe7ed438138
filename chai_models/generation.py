"""The generation loop: prefill, then one token at a time through the static KV cache.

Prompts of different lengths are prefilled without padding (`prefill`: rows longest first, one call per distinct
length over the rows that reach it), and decoding then gives each row its own position (input_pos [B, 1]). Every
token sits at the position it has alone (models/shared.positions_and_mask), so each row gets the tokens it would get
alone, and a batch costs the tokens it holds: a 3-token prompt beside a 300-token one adds 3 tokens of prefill.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .chai import open_windows
from .chai import reset as reset_chai
from .fast.compile import decode_step
from .sampling import sample


@dataclass
class Generation:
    texts: list[str]  # generated text per prompt (prompt excluded; cut at a stop string)
    tokens: list[list[int]]  # generated ids per prompt (eos excluded)
    prompt_tokens: list[int]  # prompt length per prompt
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stats: dict = field(default_factory=dict)

    @property
    def n_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


class _RowText:
    """A row's generated text, built token by token with the tokenizer's stream decoder (which holds back a UTF-8
    character split across tokens), and the part of it a callback may see: everything but a tail that could
    still become a stop string."""

    def __init__(self, tokenizer, stop):
        self.decoder, self.stop, self.text, self.emitted = tokenizer.stream_decoder(), stop, "", 0

    def push(self, token_id: int) -> str:
        self.text += self.decoder.push(token_id)
        return self.text

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self.text

    def cut(self, n: int) -> str:
        self.text = self.text[:n]  # a stop string starts at n
        return self.text

    def new_piece(self, final: bool) -> str:
        text = self.text
        if not final:
            hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - hold]
        piece = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return piece


@torch.no_grad()
def generate(model, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: Sequence[str] | None = None, eos_ids: Sequence[int] | None = None,
             chat: bool = False, callback: Callable[[int, str], None] | None = None,
             max_seq_len: int | None = None, compile: bool = False) -> Generation:
    """Generates a continuation for each prompt.

    prompts: one string, a list of strings, or a list of token-id lists (used as they are).
    chat: wrap each string prompt in the tokenizer's chat template as a user turn.
    stop: strings that end a row's generation (the text is cut before them); eos_ids: default the
    tokenizer's. callback(row, text_piece) receives text as it is generated.
    compile: run the one-token decode step through torch.compile (CUDA graphs on GPU); prefill stays eager
    (fused SDPA). The first call's compile time is reported in stats["compile_s"], outside tokens/s.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty; give some text to continue")
            ids.append(tokenizer.encode(tokenizer.apply_chat_template(p), bos=False) if chat else tokenizer.encode(p))
        else:
            ids.append([int(t) for t in p])
        if not ids[-1]:
            raise ValueError(f"prompt {i} has no tokens")
    eos = set(tokenizer.eos_ids if eos_ids is None else eos_ids)
    stop = list(stop or [])
    lengths = [len(x) for x in ids]
    B, l_max = len(ids), max(lengths)
    limit = model.config.max_seq_len
    total = l_max + max_new_tokens
    if total > limit:
        raise ValueError(f"the longest prompt has {l_max} tokens; with max_new_tokens={max_new_tokens} that is "
                         f"{total} positions but the model's context is {limit}; shorten the prompt or lower "
                         "max_new_tokens")
    total = min(limit, max(total, max_seq_len or 0))
    if model.max_batch_size < B or model.max_seq_len < total:
        model.setup_caches(max(B, model.max_batch_size), max(total, model.max_seq_len))
    reset_chai(model)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())

    out_ids: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    texts: list[str | None] = [None] * B
    rows = [_RowText(tokenizer, stop) for _ in range(B)]

    def emit(b: int, final: bool = False):
        piece = rows[b].new_piece(final)
        if callback is not None and piece:
            callback(b, piece)

    step = decode_step(model, compile)
    order = sorted(range(B), key=lambda b: -lengths[b])  # cache row r holds prompt order[r]: longest first
    to_rows = torch.tensor(order, device=device)  # prompt order -> cache-row order
    to_prompts = torch.tensor([order.index(b) for b in range(B)], device=device)  # and back
    pos_t = torch.tensor([lengths[b] for b in order], device=device)[:, None]  # [B, 1] next positions, in place
    compile_s = 0.0
    t0 = time.perf_counter()
    logits = prefill(model, [ids[b] for b in order])[to_prompts]  # [B, vocab]
    open_windows(model, lengths)  # a row shorter than CHAI's window finishes it while decoding
    _sync(device)
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        nxt = sample(logits.float(), temperature, top_k, top_p, gen)  # [B]
        nxt_host = nxt.tolist()
        for b in range(B):
            if reasons[b] is not None:
                continue
            t = nxt_host[b]
            if t in eos:
                reasons[b] = "eos"
            else:
                out_ids[b].append(t)
                text = rows[b].push(t)
                cut = _first_stop(text, stop) if stop else None
                if cut is not None:
                    texts[b], reasons[b] = rows[b].cut(cut), "stop"
                    emit(b, final=True)
                    continue
                emit(b)
                if len(out_ids[b]) >= max_new_tokens:
                    reasons[b] = "length"
        if all(r is not None for r in reasons):
            break
        ts = time.perf_counter()
        logits = step(nxt[to_rows][:, None], pos_t)[to_prompts]
        pos_t += 1
        if compile and i == 0:  # the first compiled call traces, compiles and captures
            _sync(device)
            compile_s = time.perf_counter() - ts
    _sync(device)
    t2 = time.perf_counter() - compile_s
    for b in range(B):
        if texts[b] is None:
            texts[b] = rows[b].finish()
        emit(b, final=True)
    res = Generation(texts, out_ids, lengths, [r or "length" for r in reasons], t1 - t0, t2 - t1)
    n_decode = max(res.n_generated - B, 0)  # the first token of each row comes from the prefill
    res.stats = {"prompt_tokens": sum(lengths), "generated_tokens": res.n_generated, "compile_s": compile_s,
                 "tokens_per_s": n_decode / res.decode_s if res.decode_s > 0 else float("nan"),
                 "kv_cache_bytes": model.kv_cache_bytes()["total"]}
    return res


# Prefill attention without cuDNN's: it builds an execution plan for every new sequence length (~60 ms each on an
# H200), and prompts seldom repeat a length. Prefills of 20 new lengths (7B, bf16): 2.05 s with it, 0.84 s without;
# the same 20 lengths again: 0.70 s against 0.79 s (docs/performance.md, "prefill").
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@torch.no_grad()
def prefill(model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Prefills cache rows 0..B-1 with prompts ordered longest first -> each row's next-token logits [B, vocab].

    One call per distinct length: the call for positions [s, e) covers the rows whose prompts reach e (the first rows,
    which is what a cached call writes), so no row is padded and the work is the tokens themselves. Each row's logits
    come from the call where its prompt ends. CHAI decides each row's membership in the call that reaches its position
    W-1; a row shorter than W finishes its window while decoding (chai.open_windows).
    """
    lengths = [len(p) for p in prompts]
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"prefill takes prompts longest first, got lengths {lengths}")
    device = model.tok_embeddings.weight.device
    out: list = [None] * len(prompts)
    start = 0
    for end in sorted(set(lengths)):
        n = sum(L >= end for L in lengths)  # rows 0..n-1 reach position end - 1
        tokens = torch.tensor([list(p[start:end]) for p in prompts[:n]], device=device)  # [n, end - start]
        with sdpa_kernel(PREFILL_SDPA):
            logits = model(tokens, torch.arange(start, end, device=device), last_only=True)[:, -1]  # [n, vocab]
        for b in range(n):
            if lengths[b] == end:
                out[b] = logits[b]
        start = end
    return torch.stack(out)


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
