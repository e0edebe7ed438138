"""CHAI's cluster counts under a quality budget: the per-layer counts that save the most K+V cache while the model's
perplexity, measured with CHAI on held-out calibration text, stays within (1 + budget) x dense.

What is maximised: K+V cache bytes first, score FLOPs as the tie-break. Decode is memory-bound (docs: the floor of a
step is the bytes it reads), so the cache bytes a step reads are its time, and the cache is what limits batch size and
context. A count at or above a GQA layer's KV heads drops no K, but its member heads still skip their Q.K^T and softmax;
that compute is what the tie-break spends the budget left over on.

The search, on a model and two token sets (search, check), all of it measured by running the model with CHAI:
  1. A dense pass over the search set gives the reference NLL and keeps the hidden state entering every block (or
     every few blocks, within a memory cap), so a config whose first clustered layer is l re-runs blocks l.. only.
  2. Sensitivity: for each layer l and candidate count c, the search set's NLL with only layer l clustered at c,
     run from block l. K-saving counts go from the fewest heads saved to the most, and a count that alone breaks
     the budget ends that layer's ladder (fewer clusters are taken to be no better). The single-layer runs score
     the first batch of the search set only (sensitivity_batches); every whole config is scored on all of it.
  3. Bytes phase: from all-dense, a greedy order of layer moves (l: its count -> a smaller one that drops more K),
     each time the move with the least measured NLL increase per K head dropped; the longest prefix of that order
     whose whole config is within budget on the search set is found by bisection (each probe a measured run).
  4. Tie-break phase: the same for the layers still dense, over counts that skip scores but drop no K, from step
     3's config.
  5. Check: the result's NLL on the check set, which the search never saw. If it breaks the budget there, the
     combined order is bisected again on the check set, so the result is always within budget on its check set.
Perplexity counts the tokens after the first `prompt_len` of each sequence (the prompt; at least the first token),
so membership from the window and from the prompt are scored on the same tokens.
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import progress
from .attention import install, n_k_slots, scoring_prompt
from .config import MEMBERSHIPS, ChaiConfig

DEFAULT_BUDGET = 0.02
# NLL differences below this (nats per token) are rounding: a budget of 0 accepts exact duplicates of heads
NLL_ATOL = 1e-5


class BudgetError(ValueError):
    """Bad budget-search input; the message names the problem and the fix."""


def count_ladder(n_heads: int, n_kv_heads: int) -> list[int]:
    """The candidate counts of a layer: powers of two below n_heads, and for GQA n_kv_heads - 1 (the fewest K
    dropped) and n_kv_heads (the most scores skipped with no K dropped)."""
    counts = {1 << i for i in range(n_heads.bit_length())}
    if n_kv_heads < n_heads:
        counts |= {n_kv_heads - 1, n_kv_heads}
    return sorted(c for c in counts if 1 <= c < n_heads)


def k_heads_dropped(count: int, n_heads: int, n_kv_heads: int) -> int:
    """K heads a layer at this count drops from the cache (per sequence and position)."""
    return n_kv_heads - n_k_slots(count, n_heads, n_kv_heads)


def savings_of(clusters: list[int], n_heads: int, n_kv_heads: int) -> dict:
    """Shares of the dense K+V cache dropped and of the decode step's attention scores skipped."""
    L = len(clusters)
    dropped = sum(k_heads_dropped(c, n_heads, n_kv_heads) for c in clusters)
    return {"kv": dropped / (2 * L * n_kv_heads), "scores": 1 - sum(clusters) / (L * n_heads)}


# ----------------------------------------------------------------------------------------------------
# Measured NLL of a config, re-running only the blocks at and after its first clustered layer


class _Replay(nn.Module):
    """Stands in for the blocks before `start`: returns the kept hidden state whatever it is given."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden

    def forward(self, x, *args, **kwargs):
        return self.hidden


class _ScoredRows(nn.Module):
    """After the last block: keeps the rows that predict scored tokens, so the output projection runs on those only."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first

    def forward(self, x, *args, **kwargs):
        return x[:, self.first - 1:-1]  # [B, S - first, hidden]


class LayerwiseScorer:
    """Mean NLL per scored token of fixed sequences under CHAI configs (uncached forwards, as evaluation scores).

    tokens [N, S]; targets are positions >= max(prompt_len, 1). The dense pass keeps the hidden state entering every
    `stride`-th block (stride chosen so the kept states fit max_hidden_bytes); a config whose first clustered layer
    is l starts from the nearest kept block at or before l.
    """

    def __init__(self, model, tokens: torch.Tensor, prompt_len: int = 0, batch_size: int = 8,
                 max_hidden_bytes: int = 2 << 30):
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise BudgetError(f"scoring tokens must be [N, S] with S >= 2, got {tuple(tokens.shape)}")
        if not 0 <= prompt_len < tokens.shape[1]:
            raise BudgetError(f"prompt_len = {prompt_len} leaves no token to score in sequences of "
                              f"{tokens.shape[1]}; use 0 <= prompt_len < {tokens.shape[1]}")
        self.model, self.prompt_len = model, prompt_len
        self.device = next(model.parameters()).device
        self.batches = [b.to(self.device) for b in tokens.split(batch_size)]
        self.first = max(prompt_len, 1)  # first scored position
        self.n_scored = [b.shape[0] * (b.shape[1] - self.first) for b in self.batches]  # per batch
        L = len(model.layers)
        per_layer = tokens.numel() * model.config.hidden_size * next(model.parameters()).element_size()
        self.stride = max(1, math.ceil(L * per_layer / max_hidden_bytes))
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.runs = 0
        self.dense_sums = self._dense_pass()  # summed NLL per batch
        self.dense_nll = sum(self.dense_sums) / sum(self.n_scored)

    def dense_nll_of(self, n_batches: int | None = None) -> float:
        """The dense mean NLL of the first n_batches batches (None: all)."""
        return sum(self.dense_sums[:n_batches]) / sum(self.n_scored[:n_batches])

    @torch.inference_mode()
    def _dense_pass(self) -> list[float]:
        install(self.model, None)
        kept = [l for l in range(1, len(self.model.layers)) if l % self.stride == 0]
        self.hidden = {l: [] for l in kept}
        hooks = [self.model.layers[l].register_forward_pre_hook(
            lambda blk, args, l=l: self.hidden[l].append(args[0].clone())) for l in kept]
        try:
            return self._nll(0)
        finally:
            for h in hooks:
                h.remove()

    def _nll(self, start: int, n_batches: int | None = None) -> list[float]:
        sums = []
        layers = self.model.layers
        kept = start - start % self.stride
        for i, tokens in enumerate(self.batches[:n_batches]):
            blocks = [_Replay(self.hidden[kept][i]), *layers[kept:]] if kept else [*layers]
            self.model.layers = nn.ModuleList([*blocks, _ScoredRows(self.first)])
            try:
                pred = self.model(tokens).float()  # [B, S - first, V]: the scored rows' logits
            finally:
                self.model.layers = layers
            sums.append(float(F.cross_entropy(pred.flatten(0, 1), tokens[:, self.first:].flatten(),
                                              reduction="sum")))
        self.runs += 1
        return sums

    @torch.inference_mode()
    def nll(self, cfg: ChaiConfig, n_batches: int | None = None) -> float:
        """Mean NLL with cfg installed (dense layers: count == n_heads), over the first n_batches (None: all)."""
        H = self.model.config.n_heads
        clustered = [i for i, c in enumerate(cfg.clusters) if c < H]
        if not clustered:
            return self.dense_nll_of(n_batches)
        install(self.model, cfg)
        try:
            with scoring_prompt(self.model, self.prompt_len):
                return sum(self._nll(clustered[0], n_batches)) / sum(self.n_scored[:n_batches])
        finally:
            install(self.model, None)


# ----------------------------------------------------------------------------------------------------
# The search


@dataclass
class BudgetResult:
    clusters: list[int]
    membership: str
    budget: float
    dense_nll: float  # search set
    nll: float
    check_dense_nll: float
    check_nll: float
    n_heads: int
    n_kv_heads: int
    sensitivity: dict = field(default_factory=dict)  # layer -> {count: NLL increase alone}
    runs: int = 0  # measured model runs (sensitivity, bisection, check)
    seconds: float = 0.0

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.nll - self.dense_nll)

    @property
    def check_ppl_ratio(self) -> float:
        return math.exp(self.check_nll - self.check_dense_nll)

    def savings(self) -> dict:
        return savings_of(self.clusters, self.n_heads, self.n_kv_heads)

    def key(self):
        # which result is better: more K+V saved, then more scores skipped, then lower held-out NLL
        s = self.savings()
        return (round(s["kv"], 9), round(s["scores"], 9), -self.check_nll)

    def info(self) -> dict:
        s = self.savings()
        return {"membership": self.membership, "kv_saved": round(s["kv"], 6), "scores_skipped": round(s["scores"], 6),
                "search_ppl_dense": round(math.exp(self.dense_nll), 4), "search_ppl_chai": round(math.exp(self.nll), 4),
                "check_ppl_dense": round(math.exp(self.check_dense_nll), 4),
                "check_ppl_chai": round(math.exp(self.check_nll), 4), "runs": self.runs,
                "seconds": round(self.seconds, 1)}

    def table(self) -> str:
        lines = [f"{'layer':>5} {'k':>3} {'of H':>5} {'K dropped':>9}  alone: NLL increase per count"]
        for i, c in enumerate(self.clusters):
            sens = " ".join(f"{k}:{d:+.4f}" for k, d in sorted(self.sensitivity.get(i, {}).items()))
            lines.append(f"{i:>5} {c:>3} {self.n_heads:>5} {k_heads_dropped(c, self.n_heads, self.n_kv_heads):>9}  "
                         f"{sens}")
        s = self.savings()
        lines.append(f"membership {self.membership}: K+V saved {100 * s['kv']:.1f}%, decode scores skipped "
                     f"{100 * s['scores']:.1f}%; perplexity x{self.ppl_ratio:.4f} of dense on the search set, "
                     f"x{self.check_ppl_ratio:.4f} on the check set (budget x{1 + self.budget:.4f})")
        return "\n".join(lines)


def _greedy_order(base: list[int], candidates: dict[int, dict[int, float]], gain) -> list[tuple[int, int]]:
    """Moves (layer, count) from base, each the one with the least NLL increase per unit of gain(count) added."""
    cur = list(base)
    cost_now = {l: 0.0 for l in candidates}
    steps = []
    while True:
        best = None
        for l, options in candidates.items():
            for c, d in options.items():
                g = gain(c) - gain(cur[l])
                if g <= 0:
                    continue
                key = ((d - cost_now[l]) / g, l, c)
                if best is None or key < best:
                    best = key
        if best is None:
            return steps
        _, l, c = best
        cur[l], cost_now[l] = c, candidates[l][c]
        steps.append((l, c))


def _apply(base: list[int], steps) -> list[int]:
    out = list(base)
    for l, c in steps:
        out[l] = c
    return out


def _longest_within(n: int, ok) -> int:
    """The largest k in 0..n with ok(k), by bisection (ok(0) is taken as true; monotone ok assumed, and every
    returned k > 0 is one that ok measured true)."""
    if n == 0 or ok(n):
        return n
    lo, hi = 0, n  # ok(lo) true, ok(hi) false
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def budget_search(model, search_tokens: torch.Tensor, check_tokens: torch.Tensor, budget: float = DEFAULT_BUDGET,
                  membership: str = "window", window: int = 5, prompt_rows: int = 16, prompt_len: int = 0,
                  representative: str = "medoid", algorithm: str = "agglomerative", counts: list[int] | None = None,
                  batch_size: int = 8, sensitivity_batches: int | None = 1, atol: float = NLL_ATOL,
                  max_hidden_bytes: int = 2 << 30, show_progress: bool = True,
                  known: dict | None = None) -> BudgetResult:
    """Per-layer counts maximising the K+V bytes dropped (then scores skipped) with perplexity within
    (1 + budget) x dense on both token sets [N, S] (search: drives the search; check: held out, verified last).

    The model is left dense. counts: the candidate counts per layer (default count_ladder). sensitivity_batches:
    the single-layer runs (step 2, the most runs) score the first this many batches of the search set (None: all);
    every whole config is scored on all of it. known: {layer: {count: NLL increase}} from an earlier search on the
    same sequences and settings (BudgetResult.sensitivity): those single-layer runs are not repeated.
    """
    if not budget >= 0:
        raise BudgetError(f"budget = {budget}: use a share of the dense perplexity >= 0, e.g. 0.02 for 2%")
    if membership not in MEMBERSHIPS:
        raise BudgetError(f"membership = {membership!r}; use one of {MEMBERSHIPS}")
    if membership == "prompt" and prompt_len < 1:
        raise BudgetError("membership from the prompt needs prompt_len >= 1 (the tokens scored as the prompt)")
    mc = model.config
    H, Hkv, L = mc.n_heads, mc.n_kv_heads, mc.n_layers
    ladder = sorted(set(counts or count_ladder(H, Hkv)))
    if any(not 1 <= c < H for c in ladder):
        raise BudgetError(f"candidate counts {ladder} must lie in 1..{H - 1} (n_heads - 1)")
    t0 = time.perf_counter()
    training = model.training
    model.eval()

    def config(clusters):
        return ChaiConfig(clusters=list(clusters), window=window, representative=representative, algorithm=algorithm,
                          membership=membership, prompt_rows=prompt_rows)

    search = LayerwiseScorer(model, search_tokens, prompt_len, batch_size, max_hidden_bytes)
    limit = math.log1p(budget) + atol  # NLL increase allowed
    dense = [H] * L
    sensitivity: dict[int, dict[int, float]] = {l: {} for l in range(L)}

    def measure(l, options, bar):
        # options by growing saving; the first that alone breaks the budget ends the layer's ladder
        for c in options:
            d = (known or {}).get(l, {}).get(c)
            if d is None:
                d = search.nll(config(_apply(dense, [(l, c)])), sensitivity_batches) - search.dense_nll_of(
                    sensitivity_batches)
            sensitivity[l][c] = d
            bar.update(1)
            if d > limit:
                break

    def phase(base, layers, options, gain):
        bar = progress(total=len(layers) * len(options), desc=f"sensitivity ({membership})", unit="run",
                       disable=None if show_progress else True)
        for l in layers:
            measure(l, options, bar)
        bar.close()
        cands = {l: {c: d for c, d in sensitivity[l].items() if c in options and d <= limit} for l in layers}
        order = _greedy_order(base, {l: o for l, o in cands.items() if o}, gain)
        k = _longest_within(len(order), lambda k: search.nll(config(_apply(base, order[:k]))) - search.dense_nll
                            <= limit)
        return order, k

    # bytes phase: counts that drop K, from the fewest dropped to the most
    byte_counts = sorted((c for c in ladder if k_heads_dropped(c, H, Hkv) > 0), reverse=True)
    order1, k1 = phase(dense, range(L), byte_counts, lambda c: k_heads_dropped(c, H, Hkv))
    base = _apply(dense, order1[:k1])
    # tie-break phase: the layers still dense, counts that skip scores without dropping K
    score_counts = sorted((c for c in ladder if k_heads_dropped(c, H, Hkv) == 0), reverse=True)
    still_dense = [l for l in range(L) if base[l] == H]
    order2, k2 = phase(base, still_dense, score_counts, lambda c: H - c) if score_counts else ([], 0)
    order = order1[:k1] + order2[:k2]
    clusters = _apply(dense, order)
    nll = search.nll(config(clusters))
    runs = search.runs

    # check on the held-out set; back off along the order if the budget does not hold there
    check = LayerwiseScorer(model, check_tokens, prompt_len, batch_size, max_hidden_bytes)
    check_nll = check.nll(config(clusters))
    if check_nll - check.dense_nll > limit:
        k = _longest_within(len(order), lambda k: check.nll(config(_apply(dense, order[:k]))) - check.dense_nll
                            <= limit)
        clusters = _apply(dense, order[:k])
        check_nll = check.nll(config(clusters))
        nll = search.nll(config(clusters)) if k else search.dense_nll
    install(model, None)
    model.train(training)
    return BudgetResult(clusters, membership, budget, search.dense_nll, nll, check.dense_nll, check_nll, H, Hkv,
                        {l: s for l, s in sensitivity.items() if s}, runs + check.runs,
                        time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# The whole budget rule: both memberships searched, the better kept, chai.json's config and CHAI-static's


OBJECTIVE = ("most K+V cache bytes dropped, then most decode attention scores skipped, subject to perplexity <= "
             "(1 + budget) x dense, measured with CHAI on the search sequences and on held-out check sequences")
METHOD = ("per layer and candidate count, the search NLL with that layer alone clustered (run from its block on "
          "kept dense hidden states); greedy order of moves by measured NLL increase per K head dropped (then per "
          "query head's scores skipped); the longest prefix within budget on the search set by bisection of "
          "measured runs; verified on the check set, bisected again there if needed")


@dataclass
class BudgetCalibration:
    chosen: BudgetResult
    tried: dict  # membership -> BudgetResult
    config: ChaiConfig  # chai.json
    static: ChaiConfig | None  # chai_static.json (CHAI-static at the chosen counts), None when every layer is dense


def budget_calibration(model, search_tokens, check_tokens, budget: float = DEFAULT_BUDGET, membership: str = "auto",
                       window: int = 5, prompt_rows: int = 16, prompt_len: int = 32, counts=None, batch_size: int = 8,
                       show_progress: bool = True, info: dict | None = None,
                       known: dict | None = None) -> BudgetCalibration:
    """budget_search for one membership, or for both (membership="auto", the one that saves more kept), then the
    ChaiConfig to save (its calibration record: rule, budget, data, measured dense and CHAI perplexity) and the
    CHAI-static ablation at the same counts (the most common window membership of the search sequences).
    info: extra fields for the record (data, model, seed). known: {membership: {layer: {count: NLL increase}}}, the
    single-layer runs of an earlier calibration on the same sequences and settings (its record's "sensitivity")."""
    from .calibrate import collect_features, static_membership

    modes = MEMBERSHIPS if membership == "auto" else (membership,)
    if membership != "auto" and membership not in MEMBERSHIPS:
        raise BudgetError(f"membership = {membership!r}; use 'auto' or one of {MEMBERSHIPS}")
    known = known or {}
    tried = {m: budget_search(model, search_tokens, check_tokens, budget, m, window, prompt_rows, prompt_len,
                              counts=counts, batch_size=batch_size, show_progress=show_progress, known=known.get(m))
             for m in modes}
    chosen = max(tried.values(), key=BudgetResult.key)
    H = chosen.n_heads
    record = {"rule": "budget", "budget": budget, "objective": OBJECTIVE, "method": METHOD, **(info or {}),
              "seq_len": int(search_tokens.shape[1]), "n_search": int(search_tokens.shape[0]),
              "n_check": int(check_tokens.shape[0]), "prompt_len": prompt_len,
              "scored": "every token after the first prompt_len of each sequence",
              "dense_ppl": round(math.exp(chosen.check_dense_nll), 4), "chai_ppl": round(math.exp(chosen.check_nll), 4),
              "dense_ppl_search": round(math.exp(chosen.dense_nll), 4), "chai_ppl_search": round(math.exp(chosen.nll), 4),
              "kv_saved": round(chosen.savings()["kv"], 6), "scores_skipped": round(chosen.savings()["scores"], 6),
              "candidate_counts": sorted(set(counts or count_ladder(H, chosen.n_kv_heads))),
              "membership_tried": {m: r.info() for m, r in tried.items()},
              "sensitivity": {m: {str(l): {str(c): d for c, d in s.items()} for l, s in r.sensitivity.items()}
                              for m, r in tried.items()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    config = ChaiConfig(clusters=list(chosen.clusters), window=window, membership=chosen.membership,
                        prompt_rows=prompt_rows, calibration=record)
    static = None
    if any(c < H for c in chosen.clusters):
        feats = collect_features(model, [search_tokens], window, show_progress=False)  # [L, N, H, W*W]
        groups, agreement = [], []
        for l, c in enumerate(chosen.clusters):
            g, a = static_membership(feats[l], c) if c < H else (None, None)
            groups.append(g)
            agreement.append(a)
        static = ChaiConfig(clusters=list(chosen.clusters), window=window, static_membership=groups,
                            calibration={**record, "static_agreement": agreement})
    return BudgetCalibration(chosen, tried, config, static)
