"""The budget rule (chai.budget): measured perplexity under a budget, on a tiny model with planted duplicate heads."""
import math

import pytest
import torch
import torch.nn.functional as F

from chai_models import ChaiConfig, set_chai
from chai_models.chai.budget import (BudgetError, LayerwiseScorer, _greedy_order, _longest_within, budget_calibration,
                                     budget_search, count_ladder, savings_of)
from test_calibrate import PLANTS, planted_model

EXPECTED = [8, 3, 1]  # PLANTS: 8 distinct heads, 3 groups, one group


@torch.no_grad()
def sampled_tokens(model, n, s, seed):
    """Sequences sampled from the model itself: the dense model is then the best predictor of them, so removing
    real head structure raises their NLL while merging duplicates does not."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(model.config.vocab_size, (n, 1), generator=gen)
    for _ in range(s - 1):
        probs = torch.softmax(model(x)[:, -1].float(), dim=-1)
        x = torch.cat([x, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return x


@pytest.fixture(scope="module")
def model():
    m = planted_model()
    with torch.no_grad():  # sharper next-token distributions and louder heads: structure changes the NLL visibly
        m.tok_embeddings.weight.mul_(3)
        for attn in m.attention_layers:
            attn.wo.weight.mul_(6)
    return m


@pytest.fixture(scope="module")
def tokens(model):
    return sampled_tokens(model, 12, 24, seed=3)


def nll_of(model, cfg, tokens, first=1):
    """Mean NLL of tokens[:, first:] with cfg installed, through the plain forward (not the scorer)."""
    set_chai(model, cfg)
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        set_chai(model, None)
    return float(F.cross_entropy(logits[:, first - 1:-1].flatten(0, 1), tokens[:, first:].flatten()))


def test_scorer_equals_plain_forward_from_every_start(model, tokens):
    scorer = LayerwiseScorer(model, tokens, prompt_len=0, batch_size=5, max_hidden_bytes=1)  # keeps no state
    kept = LayerwiseScorer(model, tokens, prompt_len=0, batch_size=5)  # keeps every block's input
    assert kept.stride == 1 and scorer.stride > 1
    assert scorer.dense_nll == pytest.approx(nll_of(model, None, tokens), abs=1e-6)
    for counts in ([8, 2, 1], [8, 8, 2], [4, 8, 8]):
        cfg = ChaiConfig(clusters=counts)
        ref = nll_of(model, cfg, tokens)
        assert scorer.nll(cfg) == pytest.approx(ref, abs=1e-6)
        assert kept.nll(cfg) == pytest.approx(ref, abs=1e-6)


def test_budget_zero_finds_the_planted_counts(model, tokens):
    res = budget_search(model, tokens[:6], tokens[6:], budget=0.0, counts=list(range(1, 8)), show_progress=False)
    assert res.clusters == EXPECTED
    assert res.check_nll <= res.check_dense_nll + 1e-5
    assert type(model.attention_layers[1]).__name__ == "Attention"  # the model is left dense


def test_the_budget_holds_on_its_own_held_out_data(model, tokens):
    for budget in (0.01, 0.05, 0.3):
        res = budget_search(model, tokens[:6], tokens[6:], budget=budget, show_progress=False)
        cfg = ChaiConfig(clusters=res.clusters)
        # measured again through the plain forward: within budget on the check set, and on the search set
        assert math.exp(nll_of(model, cfg, tokens[6:]) - nll_of(model, None, tokens[6:])) <= 1 + budget + 1e-4
        assert res.nll - res.dense_nll <= math.log1p(budget) + 1e-5
    assert savings_of(res.clusters, 8, 8)["kv"] > 0  # a loose budget saves something


def test_prompt_membership_search(model, tokens):
    res = budget_search(model, tokens[:6], tokens[6:], budget=0.0, membership="prompt", prompt_len=8,
                        counts=[1, 3, 4], show_progress=False)
    assert res.clusters == EXPECTED  # duplicates agree on every row, so the prompt finds them too
    with pytest.raises(BudgetError, match="prompt_len"):
        budget_search(model, tokens[:6], tokens[6:], membership="prompt", prompt_len=0, show_progress=False)


def test_budget_calibration_keeps_the_larger_saving(model, tokens):
    cal = budget_calibration(model, tokens[:6], tokens[6:], budget=0.0, membership="auto", counts=[1, 3, 4],
                             prompt_len=8, show_progress=False, info={"data": "sampled"})
    assert set(cal.tried) == {"window", "prompt"}
    assert cal.config.clusters == EXPECTED and cal.config.membership in ("window", "prompt")
    rec = cal.config.calibration
    assert rec["rule"] == "budget" and rec["budget"] == 0.0 and rec["data"] == "sampled"
    assert rec["chai_ppl"] <= rec["dense_ppl"] * (1 + 1e-4) and set(rec["membership_tried"]) == {"window", "prompt"}
    assert cal.static.static_membership[1] == PLANTS[1] and cal.static.static_membership[0] is None
    ChaiConfig.from_json(cal.config.to_json()).validate(3, 8)
    # another budget reusing these single-layer runs: only whole configs are measured again
    known = {m: r.sensitivity for m, r in cal.tried.items()}
    again = budget_calibration(model, tokens[:6], tokens[6:], budget=0.0, membership="window", counts=[1, 3, 4],
                               prompt_len=8, show_progress=False, known=known)
    assert again.chosen.clusters == cal.tried["window"].clusters and again.chosen.runs < cal.tried["window"].runs


def test_count_ladder():
    assert count_ladder(9, 3) == [1, 2, 3, 4, 8]  # SmolLM2: 1 and 2 drop K, 3..8 skip scores only
    assert count_ladder(32, 32) == [1, 2, 4, 8, 16]
    assert count_ladder(8, 8) == [1, 2, 4]


def test_greedy_order_and_bisection():
    # layer 0: count 2 cheap, 1 dear; layer 1: count 1 cheap; gain = heads dropped of 4
    cands = {0: {2: 0.01, 1: 0.5}, 1: {1: 0.02}}
    order = _greedy_order([4, 4], cands, lambda c: 4 - c)
    assert order == [(0, 2), (1, 1), (0, 1)]
    assert _longest_within(5, lambda k: k <= 3) == 3
    assert _longest_within(5, lambda k: True) == 5
    assert _longest_within(5, lambda k: k == 0) == 0


def test_bad_budget():
    m = planted_model()
    x = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(BudgetError, match="budget"):
        budget_search(m, x, x, budget=-0.1, show_progress=False)
    with pytest.raises(BudgetError, match="1..7"):
        budget_search(m, x, x, counts=[8], show_progress=False)
