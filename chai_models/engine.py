"""Continuous batching: a serving loop over the static cache's B rows ("slots").

    engine = Engine(model, tok, memory_gb=60)          # or max_batch_size=N; slots sized from the KV budget
    a = engine.submit("Hello", max_new_tokens=64, callback=lambda req, piece: print(piece, end=""))
    b = engine.submit([1, 2, 3], temperature=0.8, seed=1, stop=["\\n"])
    for req in engine.run():                            # finished requests, as they finish
        print(req.id, req.finish_reason, req.text)

Each step admits waiting requests into free slots (a group of newcomers prefilled together without padding:
generation.prefill), then runs one decode step for every slot, each row at its own position (models/shared.positions_and_mask). A request leaves its slot
the step it finishes (eos, a stop string, max_new_tokens, cancel), and the next waiting request takes it at once.

A prefill writes cache rows 0..n-1 (the model's cached forward fills the first rows), so before a prefill the engine
moves the sequences living in those rows to free rows (shared.move_rows: K, V and CHAI's per-sequence state, one copy
of each row). The slot a sequence lives in is therefore not fixed; nothing outside the engine sees it.

Free slots still take part in the decode step (its shape is fixed, so the compiled graph never changes) with a
dummy token at position W, the first past every CHAI window (0 without CHAI): early, because the decode kernel reads a
row only up to its position, and past the window, so that a free row never holds the step on the host-read path of
rows inside their window. Each row attends only to positions it has written itself (a one-token call masks past its
own position), and a new occupant rewrites CHAI's window from position 0 and decides its own membership at position
W-1, so nothing of a previous occupant leaks.

Memory: with `memory_gb` the slots are as many as the KV budget holds at max_seq_len positions each, measured on the
model's own cache (kv_cache_bytes of one slot), so CHAI's smaller K cache gives more slots in the same memory.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .chai import chai_layers, open_windows
from .chai import reset as reset_chai
from .fast.compile import decode_step
from .generation import _first_stop, _RowText, prefill
from .models.shared import move_rows
from .sampling import sample


@dataclass
class Request:
    """One request: what was asked, and (once finished) what came out.

    finish_reason: "eos" | "stop" | "length" | "cancelled" | "error" (then `error` says why).
    """
    id: Any
    prompt_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_ids: set[int] = field(default_factory=set)
    callback: Callable[["Request", str], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    submitted_s: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None
    # the engine's: the next position to feed, the token to feed there, the text so far, the sampler's generator
    pos: int = 0
    last_token: int = 0
    cancelled: bool = False
    _row: Any = None
    _gen: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def slots_for_memory(model, max_seq_len: int, memory_gb: float) -> int:
    """How many sequences of max_seq_len positions the KV cache (with CHAI's per-sequence state) holds in memory_gb
    GiB, measured on the model's own cache layout (one slot allocated, measured, released)."""
    model.setup_caches(1, max_seq_len)
    per_slot = model.kv_cache_bytes()["total"]
    model.clear_caches()
    n = int(memory_gb * 2**30 // per_slot)
    if n < 1:
        raise ValueError(f"memory_gb={memory_gb} holds no slot: one sequence of {max_seq_len} positions needs "
                         f"{per_slot / 2**30:.3f} GiB of KV cache; raise memory_gb or lower max_seq_len")
    return n


class Engine:
    """Serves a stream of requests on one model with continuous batching (see the module docstring).

    max_batch_size: the slots; or memory_gb: the KV-cache budget (GiB) the slots are sized from. max_seq_len: positions
    per slot (prompt + generated; default the model's context). compile: the decode step through torch.compile with
    CUDA graphs (fast.compile.decode_step). static_batching: admit only when every slot is free (a batch runs until
    its last request ends), the baseline continuous batching is measured against. max_prefill_tokens: prompt tokens
    per prefill group (newcomers beyond it wait for the next group).
    """

    def __init__(self, model, tokenizer, max_batch_size: int | None = None, max_seq_len: int | None = None, *,
                 memory_gb: float | None = None, compile: bool = False, static_batching: bool = False,
                 max_prefill_tokens: int = 16384):
        limit = model.config.max_seq_len
        max_seq_len = max_seq_len or limit
        if not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len}, but the model's context is {limit} positions")
        if max_batch_size is None:
            if memory_gb is None:
                raise ValueError("give the engine max_batch_size (slots) or memory_gb (a KV-cache budget in GiB)")
            max_batch_size = slots_for_memory(model, max_seq_len, memory_gb)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.static_batching, self.max_prefill_tokens = static_batching, max_prefill_tokens
        model.setup_caches(max_batch_size, max_seq_len)
        reset_chai(model)
        self.device = model.tok_embeddings.weight.device
        self.step_fn = decode_step(model, compile)
        # where free slots decode their dummy token (see the module docstring)
        self.idle_pos = min(max_seq_len - 1, max((a.window for a in chai_layers(model)), default=0))
        self.slots: list[Request | None] = [None] * max_batch_size
        self.waiting: deque[Request] = deque()
        self.finished: deque[Request] = deque()  # finished, not yet handed out by step()
        self._ids = itertools.count()
        # prefill_s / decode_s: host wall time of each phase (each ends in a host read of the logits, so it
        # includes the device's work)
        self.stats = {"prefill_groups": 0, "prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0,
                      "row_moves": 0, "prefill_s": 0.0, "decode_s": 0.0}

    # -- requests in

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: Sequence[str] | None = None, eos_ids: Sequence[int] | None = None, chat: bool = False,
               callback: Callable[[Request, str], None] | None = None, id: Any = None) -> Request:
        """Queues a request and returns it. A request that cannot run (no tokens, too long for a slot, bad sampling
        settings) is returned finished with finish_reason "error" and its reason in .error, and comes out of step()
        like any other: the rest go on."""
        req = Request(id=next(self._ids) if id is None else id, prompt_ids=[], max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=list(stop or []),
                      callback=callback, submitted_s=time.perf_counter())
        try:
            req.eos_ids = set(self.tokenizer.eos_ids if eos_ids is None else eos_ids)
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError("the prompt is empty; give some text to continue")
                t = self.tokenizer
                req.prompt_ids = t.encode(t.apply_chat_template(prompt), bos=False) if chat else t.encode(prompt)
            else:
                req.prompt_ids = [int(x) for x in prompt]
            self._check(req)
        except (ValueError, TypeError) as e:
            self._finish(req, "error", error=f"request {req.id!r}: {e}")
            return req
        req._row = _RowText(self.tokenizer, req.stop)
        if temperature > 0 and top_k != 1:
            req._gen = torch.Generator(device=self.device)
            req._gen.manual_seed(seed if seed is not None else torch.seed())
        self.waiting.append(req)
        return req

    def _check(self, req: Request):
        n, m = len(req.prompt_ids), req.max_new_tokens
        vocab = self.model.config.vocab_size
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if not all(0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
        if n + m > self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; with max_new_tokens={m} that is {n + m} positions but a "
                             f"slot holds {self.max_seq_len}; shorten the prompt, lower max_new_tokens, or start the "
                             f"engine with a larger max_seq_len (at most the model's {self.model.config.max_seq_len})")
        if req.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {req.temperature}")
        if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {req.top_p}")

    def cancel(self, req: Request) -> None:
        """Ends a request: a waiting one at once, a running one at the start of the next step (its slot is freed)."""
        if req.done:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
            self._finish(req, "cancelled")

    # -- the loop

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting or self.finished or any(r is not None for r in self.slots))

    def run(self) -> Iterator[Request]:
        """Steps until every submitted request has finished, yielding each as it finishes. More requests may be
        submitted meanwhile (from a callback, or between iterations)."""
        while self.has_work():
            yield from self.step()

    __iter__ = run

    @torch.no_grad()
    def step(self) -> list[Request]:
        """One scheduling step: frees cancelled slots, admits waiting requests (prefill), decodes one token for every
        running request. Returns the requests that finished."""
        for b, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._release(b, "cancelled")
        self._admit()
        if any(r is not None for r in self.slots):
            self._decode()
        out = list(self.finished)
        self.finished.clear()
        return out

    def _admit(self):
        if self.static_batching and any(r is not None for r in self.slots):
            return
        while self.waiting and None in self.slots:
            n_free = self.slots.count(None)
            group = [self.waiting.popleft()]
            n_tokens = len(group[0].prompt_ids)
            while (self.waiting and len(group) < n_free
                   and n_tokens + len(self.waiting[0].prompt_ids) <= self.max_prefill_tokens):
                n_tokens += len(self.waiting[0].prompt_ids)
                group.append(self.waiting.popleft())
            self._prefill(sorted(group, key=lambda r: -len(r.prompt_ids)))  # longest first, as prefill takes them
        open_windows(self.model, [r.pos for r in self.slots if r is not None])

    def _prefill(self, group: list[Request]):
        t0 = time.perf_counter()
        n = len(group)
        # free rows 0..n-1: their sequences move to free rows past n
        busy = [b for b in range(n) if self.slots[b] is not None]
        spare = [b for b in range(n, self.max_batch_size) if self.slots[b] is None][:len(busy)]
        move_rows(self.model, busy, spare)
        for src, dst in zip(busy, spare):
            self.slots[dst], self.slots[src] = self.slots[src], None
        self.stats["row_moves"] += len(busy)
        logits = prefill(self.model, [r.prompt_ids for r in group])  # [n, vocab]
        self.stats["prefill_groups"] += 1
        for b, r in enumerate(group):
            self.slots[b] = r
            r.pos = len(r.prompt_ids)
            self.stats["prefill_tokens"] += r.pos
        self._take_tokens(logits, list(range(n)))
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _decode(self):
        t0 = time.perf_counter()
        B = self.max_batch_size
        tok = [0] * B
        pos = [self.idle_pos] * B  # free slots: a dummy token (see the module docstring)
        for b, r in enumerate(self.slots):
            if r is not None:
                tok[b], pos[b] = r.last_token, r.pos
        tok_t = torch.tensor(tok, device=self.device)[:, None]  # [B, 1]
        pos_t = torch.tensor(pos, device=self.device)[:, None]  # [B, 1]
        logits = self.step_fn(tok_t, pos_t)  # [B, vocab]
        self.stats["decode_steps"] += 1
        rows = []
        for b, r in enumerate(self.slots):
            if r is not None:
                r.pos += 1
                rows.append(b)
        self._take_tokens(logits, rows)
        self.stats["decode_s"] += time.perf_counter() - t0

    def _take_tokens(self, logits: torch.Tensor, rows: list[int]):
        """Samples each listed row's next token (greedy rows in one argmax) and hands it to its request."""
        greedy = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        for b in rows:
            r = self.slots[b]
            t = greedy[b] if r._gen is None else int(sample(logits[b:b + 1].float(), r.temperature, r.top_k, r.top_p,
                                                            r._gen))
            if r.first_token_s is None:
                r.first_token_s = now
            self._push(b, r, t)

    def _push(self, b: int, r: Request, t: int):
        if t in r.eos_ids:
            self._release(b, "eos")
            return
        r.tokens.append(t)
        self.stats["generated_tokens"] += 1
        text = r._row.push(t)
        cut = _first_stop(text, r.stop) if r.stop else None
        if cut is not None:
            r._row.cut(cut)
            self._release(b, "stop")
            return
        self._emit(r, final=False)
        if len(r.tokens) >= r.max_new_tokens:
            self._release(b, "length")
            return
        r.last_token = t

    def _emit(self, r: Request, final: bool):
        piece = r._row.new_piece(final)
        if r.callback is not None and piece:
            r.callback(r, piece)

    def _release(self, b: int, reason: str):
        r = self.slots[b]
        self.slots[b] = None
        if reason != "stop":
            r._row.finish()
        r.text = r._row.text
        self._emit(r, final=True)
        self._finish(r, reason)

    def _finish(self, r: Request, reason: str, error: str | None = None):
        r.finish_reason, r.error, r.finished_s = reason, error, time.perf_counter()
        self.finished.append(r)
