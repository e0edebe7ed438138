"""CHAI core: clustering, clustered attention, the compact K cache, against slow obviously-correct references."""
import random

import pytest
import torch
from conftest import rel_err

from chai_models import ChaiConfig, chai, set_chai
from chai_models.chai import ChaiAttention
from chai_models.models.shared import repeat_kv
from chai_models.models.llama import Llama, LlamaConfig

W = 5


def tiny_llama(n_heads=8, n_kv_heads=8, n_layers=4, dtype=torch.float32, seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=head_dim, max_seq_len=128)
    m = Llama(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper attention than the default init, so heads differ visibly
        for attn in m.attention_layers:
            attn.wq.weight.mul_(4)
            attn.wk.weight.mul_(4)
    return m


def random_static(n_layers, n_heads, counts, seed=0):
    """A random head->cluster labelling per layer with exactly k clusters (None for dense layers)."""
    rng = random.Random(seed)
    out = []
    for k in counts:
        if k == n_heads:
            out.append(None)
            continue
        labels = list(range(k)) + [rng.randrange(k) for _ in range(n_heads - k)]
        rng.shuffle(labels)
        out.append(labels)
    return out


# ----------------------------------------------------------------------------------------------------
# A slow reference: every head's probabilities computed densely, then each member's rows (positions >= W)
# overwritten with its representative's.


def reference_forward(model, tokens, memberships, start=W):
    """memberships: per layer None (dense) or (rep_idx [B, k], head_to_cluster [B, H]); rows from `start` on are
    clustered."""
    originals = {}

    def make(attn, member):
        def forward(x, rope, *args, **kwargs):  # x: the normalised input of the layer
            B, S, _ = x.shape
            H = attn.n_heads
            q, k, v = attn.project(x, rope)  # [B, H, S, D], [B, Hkv, S, D] x2
            k, v = repeat_kv(k, H), repeat_kv(v, H)
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).clone()  # [B, H, S, S]
            if member is not None:
                rep_idx, h2c = member
                dense = probs.clone()
                for b in range(B):
                    for h in range(H):
                        r = rep_idx[b, h2c[b, h]].item()
                        probs[b, h, start:] = dense[b, r, start:]
            y = probs @ v  # [B, H, S, D]
            return attn.wo(y.transpose(1, 2).reshape(B, S, -1))

        return forward

    for attn, member in zip(model.attention_layers, memberships):
        originals[attn] = attn.forward
        attn.forward = make(attn, member)
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for attn, f in originals.items():
            attn.forward = f


def membership_of(model, B):
    out = []
    for attn in model.attention_layers:
        chai_layer = isinstance(attn, ChaiAttention)
        out.append((attn.rep_idx[:B].clone(), attn.head_to_cluster[:B].clone()) if chai_layer else None)
    return out


def run_cached(model, x, prefill):
    B, S = x.shape
    model.setup_caches(B, S + 4)
    with torch.no_grad():
        parts = [model(x[:, :prefill], torch.arange(prefill))]
        parts += [model(x[:, p:p + 1], torch.tensor([p])) for p in range(prefill, S)]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("kv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_fast_path_equals_reference(kv, static):
    model = tiny_llama(n_kv_heads=kv, seed=kv)
    counts = [8, 3, 1, 2]
    cfg = ChaiConfig(clusters=counts, representative="first" if static else "medoid",
                     static_membership=random_static(4, 8, counts, seed=kv) if static else None)
    set_chai(model, cfg)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(kv))
    for prefill in (16, 1):  # one prefill chunk, and token by token from position 0
        cached = run_cached(model, x, prefill)
        ref = reference_forward(model, x, membership_of(model, 2))
        assert rel_err(cached, ref) < 1e-5, prefill
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-5  # uncached scoring
    if static:
        for layer, labels in enumerate(cfg.static_membership):
            if labels is not None:
                h2c = model.attention_layers[layer].head_to_cluster[0].tolist()
                assert same_partition(h2c, labels)


def test_counts_equal_heads_is_dense():
    """Counts equal to the heads: by default those layers stay dense (bit for bit); forced through the clustered code
    (each head its own cluster) they give dense logits to fp32 rounding, uncached, in one prefill and token by token."""
    model = tiny_llama(n_kv_heads=2)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        dense = model(x)
        dense_cached = run_cached(model, x, 12)
        set_chai(model, ChaiConfig(clusters=[8] * 4))
        assert not chai.chai_layers(model)
        assert torch.equal(model(x), dense)
        assert torch.equal(run_cached(model, x, 12), dense_cached)


@pytest.mark.parametrize("kv", [8, 2])
def test_singleton_clusters_through_clustered_path_match_dense(kv):
    """Every layer through ChaiAttention with k = H (each head its own cluster) reproduces dense."""
    model = tiny_llama(n_kv_heads=kv)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        dense = model(x)
        set_chai(model, ChaiConfig(clusters=[8] * 4), cluster_dense_layers=True)
        assert len(chai.chai_layers(model)) == 4
        assert rel_err(model(x), dense) < 1e-6
        assert rel_err(run_cached(model, x, 12), dense) < 1e-6
        assert rel_err(run_cached(model, x, 1), dense) < 1e-6
        for attn in model.attention_layers:  # membership really decided: every head its own representative
            assert attn.ready and attn.rep_idx[:2].tolist() == [list(range(8))] * 2


def test_short_prompt_is_dense_until_window_then_clustered():
    model = tiny_llama(n_kv_heads=2)
    set_chai(model, ChaiConfig(clusters=[8, 2, 1, 3]))
    x = torch.randint(0, 96, (1, 14))
    with torch.no_grad():
        set_chai(model, None)
        dense = model(x[:, :W - 1])
        set_chai(model, ChaiConfig(clusters=[8, 2, 1, 3]))
        assert torch.allclose(model(x[:, :W - 1]), dense, atol=1e-6)  # shorter than W: dense
        tokenwise = run_cached(model, x, 2)  # prompt of 2 tokens, then one at a time
        assert rel_err(tokenwise, model(x)) < 1e-5
        assert rel_err(tokenwise[:, : W - 1], dense) < 1e-6


def test_batch_rows_match_alone():
    model = tiny_llama(n_kv_heads=2, seed=3)
    set_chai(model, ChaiConfig(clusters=[8, 3, 2, 1]))
    x = torch.randint(0, 96, (3, 18), generator=torch.Generator().manual_seed(7))
    batch = run_cached(model, x, 10)
    members = membership_of(model, 3)
    for b in range(3):
        alone = run_cached(model, x[b:b + 1], 10)
        assert rel_err(batch[b:b + 1], alone) < 1e-5
        for layer, m in enumerate(membership_of(model, 1)):
            if m is not None:
                assert torch.equal(m[0][0], members[layer][0][b]) and torch.equal(m[1][0], members[layer][1][b])


# ----------------------------------------------------------------------------------------------------
# Planted duplicate heads


def plant_duplicates(model, groups_per_layer):
    """Makes each group's query heads exact duplicates (same wq rows; same wk rows for MHA)."""
    D = model.config.head_dim
    with torch.no_grad():
        for attn, groups in zip(model.attention_layers, groups_per_layer):
            for g in groups:
                for h in g[1:]:
                    attn.wq.weight[h * D:(h + 1) * D] = attn.wq.weight[g[0] * D:(g[0] + 1) * D]
                    if attn.n_kv_heads == attn.n_heads:
                        attn.wk.weight[h * D:(h + 1) * D] = attn.wk.weight[g[0] * D:(g[0] + 1) * D]


PLANTED = [[[h] for h in range(8)], [[0, 3, 5], [1, 2], [4, 6, 7]], [[0, 1, 2, 3, 4, 5, 6, 7]],
           [[0, 7], [1, 6], [2, 5], [3, 4]]]


def same_partition(labels, other) -> bool:
    def parts(lab):
        d = {}
        for h, c in enumerate(lab):
            d.setdefault(c, set()).add(h)
        return {frozenset(s) for s in d.values()}

    return parts(labels) == parts(other)


@pytest.mark.parametrize("algorithm", ["agglomerative", "kmeans"])
def test_planted_groups_recovered_and_logits_dense(algorithm):
    model = tiny_llama(n_kv_heads=8, dtype=torch.float64, seed=11)
    plant_duplicates(model, PLANTED)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        dense = model(x)
        set_chai(model, ChaiConfig(clusters=[len(g) for g in PLANTED], algorithm=algorithm))
        chai_logits = run_cached(model, x, 12)
        assert rel_err(model(x), dense) < 1e-12
    assert rel_err(chai_logits, dense) < 1e-12
    for attn, groups in zip(model.attention_layers, PLANTED):
        if not isinstance(attn, ChaiAttention):
            continue
        planted = [next(i for i, g in enumerate(groups) if h in g) for h in range(8)]
        for b in range(2):
            assert same_partition(attn.head_to_cluster[b].tolist(), planted)


# ----------------------------------------------------------------------------------------------------
# Clustering against the scikit-learn oracle, representatives by hand


def test_agglomerative_matches_sklearn():
    from sklearn.cluster import AgglomerativeClustering

    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(150):
        H = [4, 8, 9, 12, 32][trial % 5]
        k = int(torch.randint(1, H + 1, (1,), generator=gen))
        feats = torch.rand(3, H, 25, generator=gen, dtype=torch.float64) ** 3  # probabilities-like, skewed
        dist = chai.cosine_distance(feats)
        labels = chai.canonical_labels(chai.agglomerative_average(dist, k), k)
        for b in range(3):
            if k == 1 or k == H:
                assert len(set(labels[b].tolist())) == k
                continue
            sk = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
            ref = sk.fit_predict(dist[b].numpy())
            assert same_partition(labels[b].tolist(), ref.tolist()), (trial, b)
            checked += 1
    assert checked > 300


def test_canonical_labels_order_by_lowest_member():
    labels = torch.tensor([[4, 4, 3, 5, 3, 5]])  # any ids in 0..H-1
    assert chai.canonical_labels(labels, 3).tolist() == [[0, 0, 1, 2, 1, 2]]


def test_medoid_by_hand():
    # one cluster of 3 on a line: distances 0-1: 0.1, 1-2: 0.1, 0-2: 0.2 -> the middle one (1) is the medoid
    dist = torch.tensor([[[0.0, 0.1, 0.2, 0.9], [0.1, 0.0, 0.1, 0.9], [0.2, 0.1, 0.0, 0.9], [0.9, 0.9, 0.9, 0.0]]])
    h2c = torch.tensor([[0, 0, 0, 1]])
    assert chai.representatives(dist, h2c, 2, "medoid").tolist() == [[1, 3]]
    assert chai.representatives(dist, h2c, 2, "first").tolist() == [[0, 3]]
    # a tie (two members, equal cost): the lowest index wins, every time
    tie = torch.tensor([[[0.0, 0.5], [0.5, 0.0]]])
    for _ in range(3):
        assert chai.representatives(tie, torch.tensor([[0, 0]]), 1, "medoid").tolist() == [[0]]


def test_clustering_is_deterministic_with_ties():
    feats = torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0], [1.0, 1.0]]])  # exact duplicates
    results = {tuple(t.flatten().tolist()) for _ in range(5) for t in chai.cluster_heads(feats, 2)}
    assert len(results) == 2  # one rep_idx and one head_to_cluster result, identical each run


# ----------------------------------------------------------------------------------------------------
# Memory and configuration


@pytest.mark.parametrize("kv", [8, 2])
def test_kv_cache_bytes_match_formula(kv):
    model = tiny_llama(n_kv_heads=kv, dtype=torch.bfloat16)
    counts = [8, 1, 2, 5]
    set_chai(model, ChaiConfig(clusters=counts))
    B, T, D = 3, 40, model.config.head_dim
    model.setup_caches(B, T)
    measured = model.kv_cache_bytes()
    k_heads = sum(kv if k == 8 else (k if k < kv else kv) for k in counts)
    assert measured["k"] == k_heads * B * T * D * 2
    assert measured["v"] == 4 * kv * B * T * D * 2  # V stays whole
    allocated_k = sum(a.kv_cache.k.untyped_storage().nbytes() for a in model.attention_layers)
    assert allocated_k == measured["k"]
    clustered = [k for k in counts if k < 8]
    # window K only where the cache drops K (else the window's K is the cache's own), the window features (fp32),
    # and the int64 membership indices
    slots = [k if k < kv else kv for k in clustered]
    assert measured["chai_state"] == sum((B * kv * W * D * 2 if n < kv else 0) + B * 8 * W * W * 4
                                         + 8 * B * (2 * k + 8 + n) for k, n in zip(clustered, slots))
    set_chai(model, None)
    assert model.kv_cache_bytes()["k"] == 4 * kv * B * T * D * 2


@pytest.mark.parametrize("bad, msg", [
    (dict(clusters=[8, 0, 8, 8]), "clusters\\[1\\] = 0"),
    (dict(clusters=[8, 9, 8, 8]), "clusters\\[1\\] = 9"),
    (dict(clusters=[8, 8, 8]), "3 cluster counts but the model has 4"),
    (dict(clusters=[8] * 4, window=0), "window"),
    (dict(clusters=[8] * 4, representative="centroid"), "representative"),
    (dict(clusters=[8] * 4, algorithm="dbscan"), "algorithm"),
    (dict(clusters=[8, 2, 8, 8], static_membership=[None, [0, 1, 0], None, None]), "static_membership\\[1\\]"),
    (dict(clusters=[8, 2, 8, 8], static_membership=[None] * 3), "static_membership has 3"),
])
def test_bad_chai_config(bad, msg):
    model = tiny_llama()
    with pytest.raises(ValueError, match=msg):
        set_chai(model, ChaiConfig(**bad))


def test_specs_and_presets():
    cfg = ChaiConfig.from_spec("llama-7b", 32, 32)
    assert cfg.clusters == [32] * 18 + [4] * 14
    assert ChaiConfig.from_spec("llama-33b", 60, 52).clusters[-1] == 6
    assert ChaiConfig.from_spec("2:3", 4, 8).clusters == [8, 8, 3, 3]
    assert ChaiConfig.from_spec("4", 3, 8).clusters == [4, 4, 4]
    with pytest.raises(ValueError, match="preset 'llama-7b' is for 32 layers"):
        ChaiConfig.from_spec("llama-7b", 30, 32)
    with pytest.raises(ValueError, match="not understood"):
        ChaiConfig.from_spec("lots", 4, 8)


@pytest.mark.parametrize("kv", [8, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("spec", ["dense", "chai"])
def test_prefill_in_chunks_equals_full_forward(kv, spec):
    """Multi-token chunks after position 0 attend causally to the cache's first start+S slots only (the SDPA
    causal kernels, lower-right aligned); chunk boundaries before, inside and after CHAI's window (5)."""
    model = tiny_llama(n_kv_heads=kv, seed=3)
    if spec == "chai":
        set_chai(model, ChaiConfig(clusters=[8, 3, 1, 2]))
    x = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 40)  # more slots than positions: the unused tail must not be attended to
        chai.reset(model)
        bounds = [0, 3, 7, 8, 19, 20, 30]  # chunks of 3, 4, 1, 11, 1, 10 tokens
        parts = [model(x[:, a:b], torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


def test_prefill_positions_must_be_consecutive_and_fit():
    model = tiny_llama()
    model.setup_caches(1, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="consecutive"):
            model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0, 2, 3]))
        with pytest.raises(ValueError, match="positions 14..16 do not fit the cache's 16 slots"):
            model(torch.zeros(1, 3, dtype=torch.long), torch.arange(14, 17))


@pytest.mark.parametrize("spec", ["dense", "chai"])
def test_last_only_logits(spec):
    """forward(..., last_only=True): the last position's logits alone, cached (prefill) and uncached."""
    model = tiny_llama(n_kv_heads=2, seed=5)
    if spec == "chai":
        set_chai(model, ChaiConfig(clusters=[8, 3, 1, 2]))
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(x)
        last = model(x, last_only=True)
        model.setup_caches(2, 16)
        chai.reset(model)
        cached = model(x, torch.arange(12), last_only=True)
    assert last.shape == cached.shape == (2, 1, 96)
    assert rel_err(last, full[:, -1:]) < 1e-5 and rel_err(cached, full[:, -1:]) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Membership from the prompt


@pytest.mark.parametrize("kv", [8, 2], ids=["mha", "gqa"])
def test_prompt_membership_cached_equals_scored_and_reference(kv):
    model = tiny_llama(n_kv_heads=kv, seed=kv)
    P, B, S = 9, 2, 20
    cfg = ChaiConfig(clusters=[8, 3, 1, 2], membership="prompt", prompt_rows=4)
    set_chai(model, cfg)
    x = torch.randint(0, 96, (B, S), generator=torch.Generator().manual_seed(kv))
    cached = run_cached(model, x, P)  # the prompt in one call, then one token at a time
    member = membership_of(model, B)
    with torch.no_grad():
        ref = reference_forward(model, x, member, start=P)
        with chai.scoring_prompt(model, P):
            scored = model(x)
        dense_like = model(x)  # no prompt length: the whole sequence is the prompt, i.e. dense
        set_chai(model, None)
        dense = model(x)
    assert rel_err(cached, ref) < 1e-5 and rel_err(scored, ref) < 1e-5
    assert rel_err(dense_like, dense) < 1e-6
    # the membership is the clustering of the prompt's last 4 rows over its P keys
    set_chai(model, cfg)
    attn = model.attention_layers[1]
    feats = {}
    hook = attn.register_forward_pre_hook(lambda m, args: feats.setdefault("x", args))
    with torch.no_grad():
        model(x[:, :P])
        hook.remove()
        q, k, _ = attn.project(*feats["x"][:2])
    want = chai.cluster_heads(chai.attention.prompt_probs(q, k, 4, attn.scale).flatten(2), 3)
    assert torch.equal(member[1][0], want[0]) and torch.equal(member[1][1], want[1])


def test_prompt_membership_keeps_no_window_state_and_refuses_a_late_start():
    model = tiny_llama(n_kv_heads=2)
    set_chai(model, ChaiConfig(clusters=[8, 1, 2, 5], membership="prompt"))
    model.setup_caches(2, 32)
    b = model.kv_cache_bytes()
    # no window K or features: only the int64 membership indices beside K and V
    assert b["chai_state"] == sum(8 * 2 * (2 * c + 8 + s) for c, s in ((1, 1), (2, 2), (5, 2)))
    assert all(a.k_win is None and a.p_win is None for a in chai.chai_layers(model))
    with torch.no_grad(), pytest.raises(RuntimeError, match="position 0"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.arange(5, 8))
    with pytest.raises(ValueError, match="membership"):
        ChaiConfig(clusters=[8] * 4, membership="prefix").validate(4, 8)


def test_static_representatives_follow_the_rule():
    """chai_static.json says representative 'medoid': the code picks each fixed cluster's medoid on the request's
    window (and the lowest index with 'first')."""
    model = tiny_llama(n_kv_heads=8, seed=3)
    static = [None, [0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 0, 1, 0, 1, 0, 1], None]
    counts = [8, 3, 2, 8]
    x = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(3))
    reps = {}
    for rule in ("medoid", "first"):
        set_chai(model, ChaiConfig(clusters=counts, static_membership=static, representative=rule))
        run_cached(model, x, 12)
        for i in (1, 2):
            attn = model.attention_layers[i]
            h2c = attn.head_to_cluster[:4]
            assert h2c.tolist() == [static[i]] * 4
            want = chai.representatives(chai.cosine_distance(attn.p_win[:4].flatten(2)), h2c, counts[i], rule)
            assert torch.equal(attn.rep_idx[:4], want)
            reps[rule, i] = attn.rep_idx[:4].clone()
    assert reps["first", 1].tolist() == [[0, 3, 7]] * 4
    assert any(not torch.equal(reps["medoid", i], reps["first", i]) for i in (1, 2))  # the rule matters here


def test_no_k_dropped_costs_only_small_state_and_says_so():
    model = tiny_llama(n_kv_heads=2)
    set_chai(model, ChaiConfig(clusters=[8, 2, 3, 8]))  # counts >= the 2 KV heads: K stays whole
    model.setup_caches(2, 128)
    b = model.kv_cache_bytes()
    assert b["k"] == b["v"]  # the dense K, no window K beside it
    assert all(a.k_win is None for a in chai.chai_layers(model))
    assert 0 < -b["saved"] == b["chai_state"] < 0.05 * b["dense_total"]
    line = chai.summary(model)
    assert "no K dropped" in line and "scores skipped 34.4%" in line
    set_chai(model, ChaiConfig(clusters=[8, 1, 1, 8]))
    model.setup_caches(2, 32)
    assert model.kv_cache_bytes()["saved"] > 0 and "saved" in chai.summary(model)
    model.setup_caches(2, 8)  # K dropped, but at 8 positions the state outweighs it: the line says so
    assert model.kv_cache_bytes()["saved"] < 0 and "outweighs the K it drops" in chai.summary(model)
