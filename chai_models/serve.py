"""`python -m chai_models serve`: JSON lines in on stdin, JSON lines out on stdout, over chai_models.engine.Engine.

One request per input line:
    {"id": "a", "prompt": "text" or [token ids], "max_new_tokens": 128, "temperature": 0, "top_k": null,
     "top_p": null, "seed": null, "stop": ["\\n\\n"], "raw": false, "stream": false}
One result per request, written when it finishes (in finishing order, not input order):
    {"id": "a", "text": "...", "tokens": [...], "prompt_tokens": 5, "finish_reason": "eos|stop|length|error", "error": ...}
With "stream": true, {"id": "a", "delta": "..."} lines come first, as text is generated. {"cancel": "a"} ends request
"a" (its result says "cancelled"). A line that is not a request (bad JSON, unknown fields) gets an error result with
the line's id if it has one; the other requests go on.
Requests are read while the engine runs (a reader thread), so a request arriving mid-flight joins the running batch.
"""
from __future__ import annotations

import json
import queue
import threading
from typing import Callable, Iterable

FIELDS = {"id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "raw", "stream"}
_EOF = object()


def result_line(req) -> dict:
    out = {"id": req.id, "text": req.text, "tokens": req.tokens, "prompt_tokens": len(req.prompt_ids),
           "finish_reason": req.finish_reason}
    if req.error:
        out["error"] = req.error
    return out


def submit_line(engine, line: str, write: Callable[[str], None], live: dict | None = None):
    """Parses one input line and submits it (or cancels the request it names); a line that is not a request is
    answered with an error at once. live: id -> unfinished request, for cancel lines."""
    live = {} if live is None else live
    try:
        spec = json.loads(line)
        if not isinstance(spec, dict):
            raise ValueError("each line must be a JSON object")
    except ValueError as e:
        write(json.dumps({"id": None, "finish_reason": "error", "error": f"not a JSON request line: {e}"}))
        return
    if set(spec) == {"cancel"}:
        req = live.get(spec["cancel"])
        if req is None:
            write(json.dumps({"id": spec["cancel"], "finish_reason": "error",
                              "error": "cancel: no running or waiting request has this id"}))
        else:
            engine.cancel(req)
        return
    unknown = set(spec) - FIELDS
    if unknown or "prompt" not in spec:
        why = f"unknown fields {sorted(unknown)}" if unknown else "no 'prompt'"
        write(json.dumps({"id": spec.get("id"), "finish_reason": "error",
                          "error": f"{why}; a request has the fields {sorted(FIELDS)}"}))
        return
    rid = spec.get("id")
    stream = bool(spec.get("stream"))
    chat = isinstance(spec["prompt"], str) and not spec.get("raw") and engine.tokenizer.chat_template is not None
    callback = (lambda req, piece: write(json.dumps({"id": req.id, "delta": piece}))) if stream else None
    req = engine.submit(spec["prompt"], max_new_tokens=spec.get("max_new_tokens", 128),
                        temperature=spec.get("temperature") or 0.0, top_k=spec.get("top_k"), top_p=spec.get("top_p"),
                        seed=spec.get("seed"), stop=spec.get("stop"), chat=chat, callback=callback, id=rid)
    if not req.done:
        live[rid] = req
    return req


def serve_lines(engine, lines: Iterable[str], write: Callable[[str], None]) -> int:
    """Serves every request line of `lines` (read on a thread, so requests join while others run); writes one result
    line per request through `write`. Returns the number of results written."""
    inbox: queue.Queue = queue.Queue()

    def read():
        for line in lines:
            if line.strip():
                inbox.put(line)
        inbox.put(_EOF)

    threading.Thread(target=read, daemon=True).start()
    n, eof, live = 0, False, {}
    while not eof or engine.has_work():
        block = not engine.has_work()  # idle: wait for the next line
        while not eof:
            try:
                item = inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if item is _EOF:
                eof = True
            else:
                submit_line(engine, item, write, live)
        for req in engine.step() if engine.has_work() else []:
            live.pop(req.id, None)
            write(json.dumps(result_line(req)))
            n += 1
    return n
