"""Continuous batching (chai_models.engine) and per-row positions: every request's tokens equal its prompt run alone,
dense and with CHAI, LLaMA and OPT, for mixed lengths, requests that join mid-flight and slots reused after a request
ends; bad requests fail alone; cancelling frees a slot; CHAI's smaller K cache gives more slots in the same memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ByteTokenizer, tiny_byte_llama

from chai_models import ChaiConfig, generate, load, load_tokenizer, set_chai
from chai_models.chai import chai_layers
from chai_models.engine import Engine, slots_for_memory
from chai_models.models.opt import OPT, opt_config

TOK = ByteTokenizer(eos_ids=())
REPO = Path(__file__).resolve().parent.parent
# lengths 2..40 tokens: some shorter than CHAI's window (5), some far longer; output lengths differ too
PROMPTS = ["Hi", "Hello there", "abc", "A much longer prompt than the others, by far the longest",
           "xy", "The quick brown fox jumps", "0123", "short again"]
N_NEW = [6, 3, 9, 4, 7, 2, 8, 5]


def tiny_opt():
    torch.manual_seed(0)
    m = OPT(opt_config("opt-125m", vocab_size=256, hidden_size=64, ffn_dim=96, n_layers=2, n_heads=4,
                       max_seq_len=96)).eval()
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(4)
    return m


MODELS = {"llama": tiny_byte_llama, "opt": tiny_opt}
# layer 0: 3 clusters (K kept whole, 3 >= the KV heads); layer 1: one cluster (one K slot)
CHAI = {"llama": ChaiConfig(clusters=[3, 1]), "opt": ChaiConfig(clusters=[3, 1])}


def alone(model, prompts, n_new):
    return [generate(model, TOK, [p], max_new_tokens=n, eos_ids=[]).tokens[0] for p, n in zip(prompts, n_new)]


@pytest.fixture(scope="module", params=["llama", "opt"])
def family(request):
    return request.param


@pytest.mark.parametrize("chai", [False, True], ids=["dense", "chai"])
def test_engine_gives_every_request_its_alone_tokens(family, chai):
    """8 requests through 3 slots: prefills of mixed lengths, joins mid-flight, every slot reused at least once."""
    model = MODELS[family]()
    if chai:
        set_chai(model, CHAI[family])
    ref = alone(model, PROMPTS, N_NEW)
    engine = Engine(model, TOK, max_batch_size=3, max_seq_len=64)
    reqs = [engine.submit(p, max_new_tokens=n) for p, n in zip(PROMPTS, N_NEW)]
    done = list(engine.run())
    assert sorted(r.id for r in done) == [r.id for r in reqs]
    assert [r.tokens for r in reqs] == ref
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.stats["prefill_groups"] >= 3 and engine.stats["row_moves"] > 0  # joins, and rows moved for them
    assert engine.slots == [None] * 3


def test_generate_batch_of_mixed_lengths_prefills_no_padding(family):
    """generate(): a 2-token and a 40-token prompt cost 2 + 40 prefill tokens (two calls: both rows, then the long
    one), each row its alone tokens, with CHAI (the short row finishes its window while decoding)."""
    model = MODELS[family]()
    set_chai(model, CHAI[family])
    prompts = [PROMPTS[0], PROMPTS[3]]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    out = generate(model, TOK, prompts, max_new_tokens=6, eos_ids=[])
    hook.remove()
    assert calls[:2] == [(2, 2), (1, len(PROMPTS[3]) - 2)] and all(c == (2, 1) for c in calls[2:])
    assert out.tokens == alone(model, prompts, [6, 6])


def test_slot_reuse_leaks_nothing():
    """A slot's next occupant gets the same tokens whatever lived there before: a long CHAI request, then a short
    one (inside its window) in the same single slot, equals the short one in a fresh engine."""
    model = tiny_byte_llama()
    set_chai(model, CHAI["llama"])
    engine = Engine(model, TOK, max_batch_size=1, max_seq_len=64)
    engine.submit(PROMPTS[3], max_new_tokens=10)
    second = engine.submit("Hi", max_new_tokens=8)
    list(engine.run())
    reused = [a.head_to_cluster[0].clone() for a in chai_layers(model)]
    fresh = Engine(model, TOK, max_batch_size=1, max_seq_len=64)
    again = fresh.submit("Hi", max_new_tokens=8)
    list(fresh.run())
    assert second.tokens == again.tokens
    # the slot's membership is the short request's own (decided at its position W-1), not the long one's
    assert all(torch.equal(m, a.head_to_cluster[0]) for m, a in zip(reused, chai_layers(model)))


def test_too_long_request_fails_alone_and_cancel_frees_its_slot():
    model = tiny_byte_llama()
    ref = alone(model, ["abc", "Hello"], [5, 5])
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=32)
    long = engine.submit("x" * 30, max_new_tokens=5)
    assert long.finish_reason == "error" and "30 tokens" in long.error and "max_seq_len" in long.error
    empty = engine.submit("  ")
    assert empty.finish_reason == "error" and "empty" in empty.error
    a = engine.submit("abc", max_new_tokens=5)
    doomed = engine.submit("zzz", max_new_tokens=20)
    b = engine.submit("Hello", max_new_tokens=5)  # waits: both slots are taken
    first = engine.step()
    assert {r.id for r in first} == {long.id, empty.id}
    engine.cancel(doomed)
    done = list(engine.run())
    assert doomed.finish_reason == "cancelled" and len(doomed.tokens) < 20
    assert a.tokens == ref[0] and b.tokens == ref[1]
    assert {r.id for r in done} == {a.id, b.id, doomed.id}


def test_sampling_stop_and_streaming_per_request():
    model = tiny_byte_llama()
    greedy = generate(model, TOK, ["hello"], max_new_tokens=20, eos_ids=[]).texts[0]
    stop = greedy[5:7]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, seed=7)
    engine = Engine(model, TOK, max_batch_size=2, max_seq_len=64)
    solo = engine.submit("abc", **kw)
    list(engine.run())
    pieces = []
    s1 = engine.submit("abc", **kw)
    s2 = engine.submit("hello", max_new_tokens=20, stop=[stop], callback=lambda r, p: pieces.append(p))
    s3 = engine.submit("abc", **{**kw, "seed": 8})
    list(engine.run())
    assert s1.tokens == solo.tokens and s3.tokens != s1.tokens  # each request its own generator
    assert s2.finish_reason == "stop" and s2.text == greedy[:greedy.find(stop)]
    assert "".join(pieces) == s2.text


def test_chai_memory_budget_gives_more_slots():
    model = tiny_byte_llama()
    dense = slots_for_memory(model, 64, 0.001)
    set_chai(model, ChaiConfig(clusters=[1, 1]))
    chai = slots_for_memory(model, 64, 0.001)
    assert chai > dense
    assert Engine(model, TOK, memory_gb=0.001, max_seq_len=64).max_batch_size == chai
    with pytest.raises(ValueError, match="holds no slot"):
        Engine(model, TOK, memory_gb=1e-9, max_seq_len=64)


def test_per_row_positions_checked():
    model = tiny_byte_llama()
    model.setup_caches(2, 16)
    with pytest.raises(ValueError, match=r"per-row input_pos \[B, 1\] serves one token"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_smollm2_engine_matches_alone(smol_dir):
    """The real SmolLM2-135M (GQA 9/3): mixed lengths through 2 slots, dense and with its shipped CHAI counts."""
    model = load(smol_dir, dtype="float32")
    tok = load_tokenizer(smol_dir)
    prompts = ["Hi", "The capital of France is", "Write a haiku about the sea, the wind and a small boat", "1 2"]
    n_new = [5, 8, 4, 6]
    for chai in (None, "auto"):
        set_chai(model, chai)
        ref = [generate(model, tok, [p], max_new_tokens=n, eos_ids=[]).tokens[0] for p, n in zip(prompts, n_new)]
        engine = Engine(model, tok, max_batch_size=2, max_seq_len=64)
        reqs = [engine.submit(p, max_new_tokens=n, eos_ids=[]) for p, n in zip(prompts, n_new)]
        list(engine.run())
        assert [r.tokens for r in reqs] == ref, chai


def test_serve_cli_json_lines():
    """`python -m chai_models serve` on a tiny checkpoint: one JSON line per request, a bad one answered with its
    error, the others served."""
    lines = [{"id": "a", "prompt": "Hello", "max_new_tokens": 3, "raw": True},
             {"id": "b", "prompt": "", "max_new_tokens": 3},
             "not json",
             {"id": "c", "prompt": [72, 105], "max_new_tokens": 2},
             {"id": "d", "prompt": "long one", "max_new_tokens": 80},
             {"cancel": "d"}]
    stdin = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n"
    from chai_models.serve import serve_lines

    model = tiny_byte_llama()
    out = []
    serve_lines(Engine(model, TOK, max_batch_size=2, max_seq_len=96), iter(stdin.splitlines()), out.append)
    res = {r.get("id"): r for r in map(json.loads, out)}
    assert len(res["a"]["tokens"]) == 3 and res["a"]["finish_reason"] == "length"
    assert res["b"]["finish_reason"] == "error" and "empty" in res["b"]["error"]
    assert res[None]["finish_reason"] == "error" and "JSON" in res[None]["error"]
    assert res["c"]["tokens"] == alone(tiny_byte_llama(), [[72, 105]], [2])[0]
    assert res["d"]["finish_reason"] == "cancelled" and len(res["d"]["tokens"]) < 80


def test_serve_cli_runs(tmp_path):
    """The command line itself, on the bundled SmolLM2 folder (weights/): two requests in, two results out."""
    smol = REPO / "weights" / "smollm2-135m-instruct"
    if not (smol / "config.json").exists():
        pytest.skip("weights/smollm2-135m-instruct is not converted here")
    stdin = "\n".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": 3}) for i, p in enumerate(["Hi", "2+2="]))
    proc = subprocess.run([sys.executable, "-m", "chai_models", "serve", "--model", str(smol), "--device", "cpu",
                           "--max-batch-size", "2", "--max-seq-len", "128"], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    res = [json.loads(x) for x in proc.stdout.splitlines()]
    assert sorted(r["id"] for r in res) == [0, 1] and all(r["finish_reason"] in ("length", "eos") for r in res)


def test_serve_bench_tiny(capsys):
    """The serving benchmark at a tiny shape: every mode serves the whole stream (exact output lengths), CHAI's
    slots outnumber dense's in the same budget, and the table prints."""
    from chai_models.bench import random_model
    from chai_models.serve_bench import MODES, print_table, run, workload

    model = random_model("tiny", torch.device("cpu"), torch.float32).eval()
    requests = workload(5, 0, (4, 20), (2, 6), model.config.vocab_size)
    cfg = ChaiConfig.from_spec("2:2", 4, 8)
    res = run(model, requests, MODES, 0.0092, 200, cfg, single_requests=2, compile=False, log=lambda *a: None)
    assert res["one"]["generated"] == sum(n for _, n in requests[:2]) and res["one"]["slots"] == 1
    for mode in ("static", "continuous", "chai"):
        assert res[mode]["generated"] == sum(n for _, n in requests) and res[mode]["requests"] == 5
    assert res["chai"]["slots"] > res["continuous"]["slots"] == res["static"]["slots"] > 1
    print_table(res, "tiny")
    assert "CHAI over dense continuous" in capsys.readouterr().out


def test_serve_bench_pair_runs(capsys):
    """`serve_bench --pair` on the bundled SmolLM2 folder: the long prompt alone, the pair in one generate call, and the
    pair as one right-padded prefill call, one table row each."""
    smol = REPO / "weights" / "smollm2-135m-instruct"
    if not (smol / "config.json").exists():
        pytest.skip("weights/smollm2-135m-instruct is not converted here")
    from chai_models.serve_bench import main

    assert main(["--pair", "--model", str(smol), "--pair-len", "3", "24", "--pair-new", "2", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    names = [r.split(" | ")[0] for r in rows[1:]]
    assert names == ["| 24 alone", "| 3 + 24", "| 3 + 24 as one right-padded call (48 tokens)"]
