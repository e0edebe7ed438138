"""Evaluation: perplexity by hand and against transformers, task loaders on real-format fixtures, scoring on
models whose answer is forced, CHAI vs random grouping on the real model, and the error paths."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chai_models import ChaiConfig, set_chai
from chai_models.evaluate import (Doc, EvaluationError, Method, Request, Task, build_requests, continuation_logprobs,
                                  format_table, load_task, main, make_windows, perplexity, random_grouping,
                                  savings, score_task, score_windows, task_accuracy)
from chai_models.models.llama import Llama, LlamaConfig

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_llama(seed=0, chai=None):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, max_seq_len=128)
    model = Llama(cfg).eval()
    if chai is not None:
        set_chai(model, chai)
    return model


def hand_perplexity(model, windows):
    """Each window alone (no batching, no padding): sum of -log p(next token), divided by the count."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            t = torch.tensor([w])
            logp = F.log_softmax(model(t)[0, :-1].double(), dim=-1)  # [S-1, V]
            nll -= float(logp[torch.arange(len(w) - 1), t[0, 1:]].sum())
            n += len(w) - 1
    return math.exp(nll / n)


# ----------------------------------------------------------------------------------------------------
# perplexity on a tiny random model


def test_make_windows():
    ids = list(range(10))
    assert make_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert make_windows(ids[:9], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert make_windows(ids[:6], 4, bos_id=99) == [[99, 0, 1, 2], [99, 3, 4, 5]]
    with pytest.raises(EvaluationError, match="at least 2"):
        make_windows(ids, 1)


@pytest.mark.parametrize("chai", [None, "1"])
def test_perplexity_matches_hand_computation(chai):
    model = tiny_llama(chai=None if chai is None else ChaiConfig.from_spec(chai, 2, 4, window=3))
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    # 4 full windows and a short tail, batches of 3: the tail is right-padded next to full windows
    ours = perplexity(model, ids, window_len=16, batch_size=3)
    ref = hand_perplexity(model, make_windows(ids, 16))
    assert abs(ours / ref - 1) < 1e-5, (ours, ref)


def test_agreement_and_kl_against_dense():
    model = tiny_llama()
    ids = torch.randint(0, 96, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    windows = make_windows(ids, 32)
    # counts = heads everywhere, through the clustered code: exactly dense
    same = Method("same-as-dense", ChaiConfig.from_spec("4", 2, 4), cluster_dense_layers=True)
    other = Method("one-cluster", ChaiConfig.from_spec("1", 2, 4, window=3))
    st = score_windows(model, [Method("dense", None, "dense"), same, other], windows, 2, show_progress=False)
    assert st["dense"].agreement == 1.0 and st["dense"].mean_kl == 0.0
    assert st["same-as-dense"].agreement == 1.0 and abs(st["same-as-dense"].mean_kl) < 1e-6
    assert st["one-cluster"].mean_kl > 1e-4
    # KL by hand for the second window
    with torch.no_grad():
        t = torch.tensor([windows[1]])
        p = F.log_softmax(model(t)[0, :-1].double(), -1)
        set_chai(model, other.chai)
        q = F.log_softmax(model(t)[0, :-1].double(), -1)
        set_chai(model, None)
        t0 = torch.tensor([windows[0]])
        p0 = F.log_softmax(model(t0)[0, :-1].double(), -1)
        set_chai(model, other.chai)
        q0 = F.log_softmax(model(t0)[0, :-1].double(), -1)
        set_chai(model, None)
    kl = float((p.exp() * (p - q)).sum() + (p0.exp() * (p0 - q0)).sum()) / 62
    assert abs(st["one-cluster"].mean_kl / kl - 1) < 1e-4
    assert model.chai_config is None  # the model's own config is restored


# ----------------------------------------------------------------------------------------------------
# methods


def test_random_grouping_keeps_counts_and_is_seeded():
    cfg = ChaiConfig.from_spec("3,9,1,5", 4, 9)
    r = random_grouping(cfg, 9, seed=3)
    assert r.clusters == cfg.clusters and r.static_membership[1] is None
    for k, m in zip(cfg.clusters, r.static_membership):
        if m is not None:
            assert sorted(set(m)) == list(range(k)) and len(m) == 9
    assert random_grouping(cfg, 9, seed=3).static_membership == r.static_membership
    assert random_grouping(cfg, 9, seed=4).static_membership != r.static_membership
    r.validate(4, 9)


def test_savings_from_counts():
    # SmolLM2's shape: 9 query heads, 3 KV heads; k >= 3 keeps every KV head's K, k = 2 keeps 2 of 3
    s = savings(ChaiConfig.from_spec("15:2", 30, 9), 9, 3)
    assert abs(s["k"] - 15 / 30 / 3) < 1e-12 and abs(s["kv"] - s["k"] / 2) < 1e-12
    assert abs(s["scores"] - 15 * 7 / (30 * 9)) < 1e-12
    assert savings(ChaiConfig.from_spec("4", 30, 9), 9, 3)["k"] == 0.0
    assert savings(None, 9, 3) == {"k": 0.0, "kv": 0.0, "scores": 0.0}


# ----------------------------------------------------------------------------------------------------
# task loaders on real-format fixtures


def test_piqa_loader():
    t = load_task(str(FIXTURES / "piqa.jsonl"))
    assert (t.layout, t.name, len(t.docs)) == ("piqa", "piqa", 12)
    d = t.docs[1]
    assert d.context == "Question: How can I keep bread fresh for longer?\nAnswer:"
    assert d.choices == ["Leave it open on the windowsill.", "Store it in a sealed bag."] and d.gold == 1


def test_hellaswag_loader_and_preprocessing():
    t = load_task(str(FIXTURES / "hellaswag.jsonl"))
    assert t.layout == "hellaswag" and len(t.docs) == 8
    d = t.docs[0]
    assert d.context == "Making a sandwich: A man puts two slices of bread on a plate. He"  # ctx_b capitalized
    assert d.gold == 0 and len(d.choices) == 4  # label "0" is a string in the HF files
    w = t.docs[4]  # WikiHow markup: " [title]" -> ". ", other [tags] dropped, double spaces collapsed
    assert w.context == "Home and Garden: How to water a lawn. Water early in the morning. morning"
    assert w.choices[0] == "watering lets the grass drink before the sun is hot."


def test_arc_loader_both_layouts(tmp_path):
    t = load_task(str(FIXTURES / "arc_easy.jsonl"))
    assert t.layout == "arc" and len(t.docs) == 12
    assert t.docs[0].context == "Question: Which of these is a source of light?\nAnswer:"
    assert t.docs[0].choices[1] == "the Sun" and t.docs[0].gold == 1
    ai2 = tmp_path / "arc_ai2.jsonl"  # AI2's own release nests the choices in the question
    ai2.write_text('{"id": "x", "question": {"stem": "2 + 2 = ?", "choices": [{"text": "3", "label": "1"}, '
                   '{"text": "4", "label": "2"}]}, "answerKey": "2"}\n')
    d = load_task(str(ai2)).docs[0]
    assert (d.context, d.choices, d.gold) == ("Question: 2 + 2 = ?\nAnswer:", ["3", "4"], 1)


def test_boolq_loader_label_and_answer(tmp_path):
    t = load_task("boolq:" + str(FIXTURES / "boolq.jsonl"))
    d = t.docs[1]
    assert d.context.endswith("\nQuestion: can penguins fly?\nAnswer:") and d.context.startswith("Penguins are")
    assert d.choices == ["no", "yes"] and d.gold == 0
    g = tmp_path / "boolq_google.jsonl"  # Google's release: "answer": true/false
    g.write_text('{"question": "is it", "passage": "It is.", "answer": true}\n')
    assert load_task(str(g)).docs[0].gold == 1


def test_loader_errors(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n\n{"goal": "a", "sol1": \n')
    with pytest.raises(EvaluationError, match=rf"{bad}:3: not valid JSON"):
        load_task(str(bad))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "x", "answer": "y"}\n')
    with pytest.raises(EvaluationError, match=rf"{odd}:1: unknown task layout .*piqa: goal, sol1"):
        load_task(str(odd))
    with pytest.raises(EvaluationError, match="unknown task layout 'mmlu'"):
        load_task("mmlu:" + str(FIXTURES / "piqa.jsonl"))
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n')
    with pytest.raises(EvaluationError, match=rf"{lacking}:1: piqa record has no field 'label'"):
        load_task(str(lacking))
    unlabelled = tmp_path / "hs_test.jsonl"
    unlabelled.write_text('{"ctx_a": "a", "ctx_b": "b", "activity_label": "c", "endings": ["x", "y"], "label": ""}\n')
    with pytest.raises(EvaluationError, match="hs_test.jsonl:1: label '' is not a choice index"):
        load_task(str(unlabelled))


def test_cli_reports_errors(capsys, smol_dir):
    assert main([str(smol_dir), "--task", "/nonexistent/piqa.jsonl"]) == 2
    assert "task file /nonexistent/piqa.jsonl does not exist" in capsys.readouterr().err
    assert main([str(smol_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# scoring on models whose answer is forced


class CharTokenizer:
    """One token per character (its code point), no BOS: enough to check the bookkeeping."""

    bos_id, eos_ids, add_bos = None, [0], False

    def encode(self, text, bos=None):
        return [ord(c) for c in text]


class FavouringModel(nn.Module):
    """Stub: every position gives log-prob ~0 to the favoured tokens and ~-20 to every other token."""

    def __init__(self, favoured: str, vocab: int = 128):
        super().__init__()
        self.config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, n_layers=1, n_heads=1,
                                  n_kv_heads=1, head_dim=8, max_seq_len=64)
        self.bias = nn.Parameter(torch.full((vocab,), -20.0))
        with torch.no_grad():
            self.bias[[ord(c) for c in favoured]] = 0.0
        self.chai_config = None

    def set_chai(self, cfg):
        self.chai_config = cfg

    def forward(self, tokens):
        return self.bias.expand(*tokens.shape, -1)  # [B, S, V]


def test_scoring_picks_the_forced_answer():
    model, tok = FavouringModel(" yes"), CharTokenizer()
    docs = [Doc("Is it?\nAnswer:", ["no", "yes"], 1), Doc("Is it not?\nAnswer:", ["no", "yes"], 0)]
    res = score_task(model, [Method("dense", None, "dense")], Task("t", "boolq", docs), tok, show_progress=False)
    assert res["dense"] == {"acc": 0.5, "acc_norm": 0.5, "n": 2}  # "yes" both times: right once


def test_acc_norm_divides_by_bytes():
    model, tok = FavouringModel(" a"), CharTokenizer()
    # " b": one unfavoured token (~-20 over 1 byte); " aaaabb": two (~-40 over 6 bytes): acc picks the first
    # choice, acc_norm the second
    task = Task("t", "piqa", [Doc("Q:", ["b", "aaaabb"], 1)])
    lps = continuation_logprobs(model, build_requests(task, tok, 64))
    # two favoured tokens share the mass: each costs log 2, an unfavoured one 20 + log 2
    assert lps[0] == pytest.approx(-20 - 2 * math.log(2), abs=1e-3)
    assert lps[1] == pytest.approx(-40 - 7 * math.log(2), abs=1e-3)
    assert task_accuracy(task, lps) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    # bytes, not characters: "é" is 2 bytes
    t2 = Task("t", "piqa", [Doc("Q:", ["é", "x"], 0)])
    assert task_accuracy(t2, [-3.0, -2.0])["acc_norm"] == 1.0  # -3/2 > -2/1


def test_continuation_logprobs_batched_equals_one_by_one():
    """A real (tiny) model, right padding, sequences of different lengths, CHAI on: batching changes nothing."""
    model = tiny_llama(chai=ChaiConfig.from_spec("1:2", 2, 4, window=3))
    tok = CharTokenizer()
    docs = [Doc("Question: a b c d e f?\nAnswer:", ["yes", "no", "perhaps not"], 0), Doc("Q?", ["x", "yy"], 1)]
    reqs = build_requests(Task("t", "arc", docs), tok, 128)
    batched = continuation_logprobs(model, reqs, batch_size=5)
    for r, lp in zip(reqs, batched):
        t = torch.tensor([r.ctx + r.cont])
        with torch.no_grad():
            logp = F.log_softmax(model(t)[0].double(), -1)
        ref = sum(float(logp[len(r.ctx) - 1 + j, c]) for j, c in enumerate(r.cont))
        assert abs(lp - ref) < 1e-4, (lp, ref)


def test_build_requests_split_and_truncation():
    tok = CharTokenizer()
    (r,) = build_requests(Task("t", "piqa", [Doc("ctx ", ["ab"], 0)]), tok, 128)
    assert r.ctx == [ord(c) for c in "ctx"] and r.cont == [ord(c) for c in "  ab"]  # trailing space moves over
    (r,) = build_requests(Task("t", "piqa", [Doc("abcdefgh", ["xy"], 0)]), tok, 6)
    assert len(r.ctx) + len(r.cont) == 6 and r.ctx == [ord(c) for c in "fgh"]  # oldest context dropped
    assert isinstance(r, Request)


# ----------------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="module")
def smol(smol_dir):
    from chai_models import load, load_tokenizer

    return load(smol_dir), load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def license_ids(smol):
    _, tok = smol
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    return tok.encode(text, bos=False)




@pytest.mark.slow
def test_perplexity_equals_transformers_loss(smol, license_ids, hf_smol):
    model, _ = smol
    ids = license_ids[:300]
    ours = perplexity(model, ids, window_len=128, batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in make_windows(ids, 128):  # 128, 128, 44 tokens: HF's loss is the mean over len - 1 targets
            t = torch.tensor([w])
            nll += float(hf_smol(t, labels=t).loss) * (len(w) - 1)
            n += len(w) - 1
    ref = math.exp(nll / n)
    assert abs(ours / ref - 1) < 1e-4, (ours, ref)


# Per-layer counts calibrated for SmolLM2-135M-Instruct (tools/calibrate.py, 1024 pydoc sequences, W=5,
# tolerance 0.05; docs/evaluation.md)
SMOL_CALIBRATED = [7, 7, 7, 5, 6, 5, 6, 4, 6, 9, 7, 7, 7, 9, 5, 5, 6, 4, 5, 6, 3, 5, 6, 5, 4, 6, 5, 7, 5, 5]


@pytest.mark.slow
def test_chai_beats_random_grouping_at_equal_counts(smol, license_ids):
    model, _ = smol
    cfg = ChaiConfig(clusters=SMOL_CALIBRATED)
    methods = [Method("dense", None, "dense"), Method("chai", cfg)]
    methods += [Method(f"random@{s}", random_grouping(cfg, 9, s), "random") for s in range(3)]
    windows = make_windows(license_ids[:1024], 256)
    st = score_windows(model, methods, windows, batch_size=4, show_progress=False)
    chai, rnd = st["chai"], [st[f"random@{s}"] for s in range(3)]
    print({k: (round(v.perplexity, 2), round(v.agreement, 4)) for k, v in st.items()})
    for r in rnd:
        assert chai.perplexity < r.perplexity
        assert chai.agreement > r.agreement


def test_table_has_every_method():
    from chai_models.evaluate import Report, TextStats

    methods = [Method("dense", None, "dense"), Method("chai", ChaiConfig.from_spec("1", 2, 4))]
    rep = Report(methods, {m.name: savings(m.chai, 4, 2) for m in methods},
                 texts={"t": {"dense": TextStats(10.0, 10, 10, 0.0), "chai": TextStats(12.0, 10, 8, 0.5)}},
                 tasks={"piqa": {"dense": {"acc": 0.5, "acc_norm": 0.6, "n": 10},
                                 "chai": {"acc": 0.4, "acc_norm": 0.6, "n": 10}}},
                 settings={"window_len": 16})
    rep.pooled = {k: v for k, v in rep.texts["t"].items()}
    table = format_table(rep)
    assert "| chai | 50.0% | 25.0% | 75.0% | 3.320 (+22.1%) | 80.00% | 0.0500 | 40.0 (-10.0) | 60.0 (+0.0) |" in table


# ----------------------------------------------------------------------------------------------------
# membership from the prompt, the prompt length, random groupings of named methods, the trade-off plot


def test_prompt_len_scores_after_the_prompt_and_prompt_membership_needs_it(tmp_path):
    from chai_models import chai
    from chai_models.evaluate import _chai_source, build_methods, plot_report, Report

    model = tiny_llama()
    ids = torch.randint(0, 96, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    windows = make_windows(ids, 32)
    cfg = _chai_source("1@prompt", model, None)
    assert cfg.membership == "prompt" and cfg.clusters == [1, 1]
    methods = [Method("dense", None, "dense"), Method("prompt", cfg)]
    with pytest.raises(EvaluationError, match="--prompt-len"):
        score_windows(model, methods, windows, 2, show_progress=False)
    st = score_windows(model, methods, windows, 2, show_progress=False, prompt_len=8)
    assert st["dense"].tokens == 2 * (32 - 8)  # the tokens after each window's 8-token prompt
    # by hand: the prompt's 8 tokens decide, the rest clustered; NLL of tokens 8..31
    nll = 0.0
    set_chai(model, cfg)
    with torch.no_grad(), chai.scoring_prompt(model, 8):
        for w in windows:
            logp = F.log_softmax(model(torch.tensor([w]))[0, :-1].double(), -1)
            nll -= float(logp[torch.arange(7, 31), torch.tensor(w[8:])].sum())
    set_chai(model, None)
    assert st["prompt"].perplexity == pytest.approx(math.exp(nll / st["prompt"].tokens), rel=1e-5)
    ms = build_methods(model, None, ["a=1", "b=2"], n_random=1, random_of=["b"])
    assert [m.name for m in ms] == ["dense", "a", "b", "random[b]"]
    with pytest.raises(EvaluationError, match="no such CHAI method"):
        build_methods(model, None, ["a=1"], n_random=1, random_of=["zzz"])
    pytest.importorskip("matplotlib")
    rep = Report(methods, {m.name: savings(m.chai, 4, 2) for m in methods}, texts={"t": st}, pooled=st)
    assert plot_report(rep, tmp_path / "p.png").stat().st_size > 0
