"""CHAI's offline phase: calibrate each layer's cluster count from the elbow of its k-means error curve.

The method on a model and token batches (calibrate_model); chai_models/calibration.py runs it on a checkpoint folder
with its data, writes chai.json and draws the elbows (`python tools/calibrate.py weights/MODEL`).

What it does, layer by layer, on the dense model:
  1. Features. N calibration sequences go through the model; for each attention layer a forward pre-hook
     re-projects the layer's input with the attention's own project() and records the causal softmax
     probabilities of the first W query rows over the first W keys, per head: [H, W*W] per sequence. These
     are exactly the features the online clustering sees (window_probs, as in ChaiAttention). The model is
     causal, so only the first W tokens of each sequence are run.
  2. Error curves. Each sequence's H head features are clustered by k-means for k = 1..H; the error (sum of
     squared distances to the nearest centre) is summed over sequences -> one curve per layer, e_1..e_H.
  3. Counts. Each layer's count is read at the elbow of its curve (pick_clusters: the rule and why).
  4. chai.json beside the checkpoint: the counts and how they were obtained (ChaiConfig.calibration), plus
     chai_static.json for the CHAI-static ablation (the most common membership per layer).

Geometry. Online clustering compares heads by cosine distance. Here every feature vector is L2-normalised
before k-means, so the squared Euclidean distance between two heads is exactly 2 * their cosine distance;
k-means then runs in plain Euclidean form (centres are means of unit vectors, not re-normalised), which is
what "k-means clustering error" means in the paper, measured in the same geometry the online clustering uses.
"""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..progress import progress
from .attention import ChaiAttention, n_k_slots, swap_class, window_probs
from .clustering import cluster_heads
from .config import ChaiConfig

CHAI_JSON = "chai.json"
CHAI_STATIC_JSON = "chai_static.json"
PLOT_NAME = "chai_elbows.png"
DEFAULT_TOLERANCE = 0.05
# A curve whose total drop e_1 - e_H is below this, per head and sequence (squared distance of unit vectors,
# at most 4), is flat: the heads are identical up to rounding.
FLAT_ATOL = 1e-7
RULE = ("k = smallest k with r(k) = (e_k - e_H) / (e_1 - e_H) <= tolerance; the layer stays dense (k = H) "
        "unless r(k) lies more than tolerance below the same ratio for the features shuffled across heads "
        "(permutation null: no group structure); a flat curve (e_1 - e_H ~ 0: identical heads) gives k = 1")


class CalibrationError(UserError):
    """Bad calibration input (data, counts, options). The message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# 1. Features: window probabilities per layer, captured by forward pre-hooks


class _StopForward(Exception):
    """Raised by the last layer's hook: nothing after the last attention input is needed."""


@contextlib.contextmanager
def _dense(model):
    """Runs the model densely (CHAI layers detached, eval mode) and restores it afterwards."""
    layers = model.attention_layers
    saved = [type(attn) for attn in layers]
    training = model.training
    for attn in layers:
        if isinstance(attn, ChaiAttention):
            swap_class(attn)  # the plain class: dense attention (uncached calls touch no CHAI state)
    model.eval()
    try:
        yield
    finally:
        for attn, cls in zip(layers, saved):
            attn.__class__ = cls
        model.train(training)


def _window_hook(store: list, window: int, stop: bool):
    """A forward pre-hook that appends the layer's window probabilities [B, H, W*W] (fp32) to store."""

    def hook(attn, args, kwargs):
        x = args[0] if args else kwargs["x"]  # [B, W, hidden], the attention's (normalised) input
        rope = args[1] if len(args) > 1 else kwargs.get("rope")
        q, k, _ = attn.project(x, rope)  # [B, H, W, D], [B, Hkv, W, D], RoPE applied
        probs = window_probs(q, k, 0, attn.scale)  # [B, H, W, W], causal, fp32
        store.append(probs.flatten(2))  # [B, H, W*W]
        if stop:
            raise _StopForward

    return hook


def as_batches(tokens, batch_size: int):
    """tokens: a [N, S] tensor (split into batches) or an iterable of [B, S] tensors (used as given)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2:
            raise CalibrationError(f"calibration tokens must be [N, S] (N sequences of S tokens), got shape "
                                   f"{tuple(tokens.shape)}")
        return list(tokens.split(batch_size))
    return list(tokens)


def collect_features(model, token_batches, window: int = 5, show_progress: bool = True) -> torch.Tensor:
    """Window probabilities of every layer and sequence -> [L, N, H, W*W] fp32 on the model's device.

    token_batches: iterable of [B, S] int64 tensors with S >= window; only the first `window` tokens are run.
    """
    layers = model.attention_layers
    device = next(model.parameters()).device
    stores = [[] for _ in layers]
    token_batches = list(token_batches)
    n = sum(int(b.shape[0]) for b in token_batches)
    bar = progress(total=n, desc="window features", unit="seq", disable=None if show_progress else True)
    hooks = [attn.register_forward_pre_hook(_window_hook(stores[i], window, i == len(layers) - 1),
                                            with_kwargs=True) for i, attn in enumerate(layers)]
    try:
        with _dense(model), torch.inference_mode():
            for batch in token_batches:
                if batch.dim() != 2 or batch.shape[1] < window:
                    raise CalibrationError(f"a calibration batch has shape {tuple(batch.shape)}; every sequence "
                                           f"needs at least window={window} tokens ([B, S] with S >= {window})")
                with contextlib.suppress(_StopForward):
                    model(batch[:, :window].to(device=device, dtype=torch.long))
                bar.update(int(batch.shape[0]))
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return torch.stack([torch.cat(s) for s in stores])  # [L, N, H, W*W]


# ----------------------------------------------------------------------------------------------------
# 2. k-means error curves, batched over sequences (and layers) on the device


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a [B, n, F], b [B, m, F] -> [B, n, m]; differences, not |a|^2 + |b|^2 - 2ab, so duplicates give exactly 0
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


def _kmeanspp(x: torch.Tensor, d2: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: k distinct centre indices per row [B, k], each drawn with weight d^2 to the nearest
    chosen centre. Once every point is covered (all weights 0: duplicates) the rest are drawn uniformly from
    the unchosen points, so k = H always seeds every point and reaches error 0."""
    B, H, _ = x.shape
    rows = torch.arange(B, device=x.device)
    first = torch.randint(H, (B,), generator=gen, device=x.device)
    idx = [first]
    chosen = torch.zeros(B, H, dtype=torch.bool, device=x.device)
    chosen[rows, first] = True
    near = d2[rows, first]  # [B, H] squared distance to the nearest chosen centre
    for _ in range(1, k):
        w = near.masked_fill(chosen, 0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, (~chosen).to(w.dtype))
        nxt = torch.multinomial(w, 1, generator=gen).squeeze(1)  # [B]
        idx.append(nxt)
        chosen[rows, nxt] = True
        near = torch.minimum(near, d2[rows, nxt])
    return torch.stack(idx, dim=1)


def _lloyd_error(x: torch.Tensor, centres: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations from the given centres; x [B, H, F], centres [B, k, F] -> final error [B].

    An emptied cluster keeps its old centre. Stops early once no label changes (one host read per
    iteration; this is the offline phase, the online path never syncs).
    """
    k = centres.shape[1]
    labels = None
    for _ in range(iters):
        new = _sqdist(x, centres).argmin(2)  # [B, H]
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [B, H, k]
        counts = onehot.sum(1)[:, :, None]  # [B, k, 1]
        means = onehot.transpose(1, 2) @ x / counts.clamp_min(1)  # [B, k, F]
        centres = torch.where(counts > 0, means, centres)
    return _sqdist(x, centres).amin(2).sum(1)  # [B]


def kmeans_errors(features: torch.Tensor, n_init: int = 4, iters: int = 30, seed: int = 0,
                  chunk: int = 8192, show_progress: bool = False) -> torch.Tensor:
    """k-means error for k = 1..H of each row's H points -> [M, H] (column k-1: k clusters), float64.

    features [M, H, F], any device; rows are independent (sequences, or layers x sequences). Points are
    L2-normalised first (cosine geometry, see the module docstring). Each k: n_init seeded k-means++ starts,
    the best kept per row. The curve is then made non-increasing by a running minimum over k: a clustering
    into k clusters can always be split into k+1 without raising its error, so this is still the error of a
    real clustering at each k, and it removes bumps from unlucky local minima.
    """
    M, H, _ = features.shape
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = torch.empty(M, H, dtype=torch.float64, device=x.device)
    bar = progress(total=H * ((M + chunk - 1) // chunk), desc="k-means", unit="k",
                   disable=None if show_progress else True)
    for lo in range(0, M, chunk):
        xc = x[lo:lo + chunk].repeat_interleave(n_init, dim=0)  # [m * n_init, H, F]: inits side by side
        rows = torch.arange(xc.shape[0], device=x.device)
        d2 = _sqdist(xc, xc)  # [m * n_init, H, H]
        for k in range(1, H + 1):
            centres = xc[rows[:, None], _kmeanspp(xc, d2, k, gen)]  # [m * n_init, k, F]
            err = _lloyd_error(xc, centres, iters).view(-1, n_init)  # [m, n_init]
            out[lo:lo + chunk, k - 1] = err.amin(1).double()
            bar.update(1)
    bar.close()
    return out.cummin(dim=1).values


# ----------------------------------------------------------------------------------------------------
# 3. The elbow rule


def pick_clusters(curve, tolerance: float = DEFAULT_TOLERANCE, atol: float = 0.0, reference=None) -> int:
    """A layer's cluster count from its error curve e_1..e_H (k = 1..H).

    Rule (RULE above):
      - Normalise: r(k) = (e_k - e_H) / (e_1 - e_H), the share of the total spread that k clusters leave
        unexplained (1 at k = 1, 0 at k = H). k* = the smallest k with r(k) <= tolerance: the fewest clusters
        that keep all but `tolerance` of what separates the heads. It is scale-free (no dependence on the
        number of sequences or W) and exact on planted structure (duplicate heads give r = 0 at their count).
      - No elbow, stay dense: heads with no group structure still give a falling curve (k-means of random
        points is convex; 8 random heads leave ~4% at k = 7, 32 leave 5% at k = 24), so the threshold alone
        would merge heads that are merely the closest of a random cloud. k* is kept only if the curve there
        lies more than `tolerance` below a reference curve r0 of structureless heads: r0(k*) - r(k*) >
        tolerance, else k = H. calibrate_model passes as reference the curve of the same features with each
        coordinate shuffled across heads (a permutation null: same values, group structure destroyed);
        without one the reference is the chord r0(k) = (H - k)/(H - 1) (equidistant heads), and the test is
        Kneedle's difference curve at k*.
      - Flat curve (e_1 - e_H <= atol: every head identical, or a degenerate constant curve): more clusters
        explain nothing, so k = 1.
    """
    e = [float(v) for v in curve]
    H = len(e)
    if H == 0:
        raise CalibrationError("an error curve needs at least one point (k = 1)")
    if not 0 <= tolerance < 1:
        raise CalibrationError(f"tolerance = {tolerance}: use a share of the k=1 error in [0, 1), e.g. 0.05")
    spread = e[0] - e[-1]
    if H == 1 or spread <= atol:
        return 1
    r = [(v - e[-1]) / spread for v in e]
    k = next(i + 1 for i, v in enumerate(r) if v <= tolerance)
    if reference is None:
        r0 = (H - k) / (H - 1)
    else:
        ref = [float(v) for v in reference]
        r0 = (ref[k - 1] - ref[-1]) / max(ref[0] - ref[-1], 1e-300)
    return k if r0 - r[k - 1] > tolerance else H


def null_features(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """features [M, H, F] with each coordinate shuffled across the heads of its row, independently: the same
    values without group structure (the reference of pick_clusters)."""
    gen = torch.Generator(device=features.device).manual_seed(seed)
    perm = torch.rand(features.shape, generator=gen, device=features.device).argsort(dim=1)  # [M, H, F]
    return features.gather(1, perm)



# ----------------------------------------------------------------------------------------------------
# CHAI-static membership


def static_membership(features: torch.Tensor, k: int, algorithm: str = "agglomerative") -> tuple[list[int], float]:
    """The most common canonical head->cluster labelling over sequences, and the share of sequences that have it.

    features [N, H, F] of one layer. Each sequence is clustered like the online phase does (chai.cluster_heads,
    labels canonical: clusters numbered by their lowest head), then the mode of the labellings is taken (ties:
    the lexicographically smallest labelling).
    """
    _, h2c = cluster_heads(features, k, algorithm)  # [N, H]
    rows, counts = torch.unique(h2c, dim=0, return_counts=True)
    best = int(counts.argmax())
    return rows[best].tolist(), float(counts[best]) / h2c.shape[0]


# ----------------------------------------------------------------------------------------------------
# The whole phase on a model object


@dataclass
class CalibrationResult:
    errors: torch.Tensor  # [L, H] float64 on the CPU: k-means error summed over sequences, column k-1
    null_errors: torch.Tensor | None  # [L, H] the same for the features shuffled across heads (reference)
    clusters: list[int]
    n_heads: int
    n_kv_heads: int
    window: int
    n_sequences: int
    tolerance: float
    static_membership: list[list[int] | None] | None = None
    static_agreement: list[float | None] | None = None
    settings: dict = field(default_factory=dict)  # n_init, iters, seed, algorithm
    flat_atol: float = 0.0  # curves with e_1 - e_H below this are flat

    def residual(self, errors: torch.Tensor | None = None) -> torch.Tensor:
        """[L, H] r(k) = (e_k - e_H) / (e_1 - e_H) of errors (default: self.errors); 0 for a flat curve."""
        e = self.errors if errors is None else errors
        spread = e[:, :1] - e[:, -1:]
        r = (e - e[:, -1:]) / spread.clamp_min(1e-300)
        return torch.where(spread > self.flat_atol, r, torch.zeros_like(r))

    def k_saving(self) -> list[float]:
        """Share of each layer's K cache that CHAI drops."""
        return [1 - n_k_slots(k, self.n_heads, self.n_kv_heads) / self.n_kv_heads for k in self.clusters]

    def calibration_info(self, **extra) -> dict:
        info = {"rule": RULE, "tolerance": self.tolerance, "n_sequences": self.n_sequences,
                "tokens_per_sequence": self.window, "tokens": self.n_sequences * self.window,
                "window": self.window, "feature": "causal softmax probabilities, first W rows over first W keys",
                "geometry": "L2-normalised features, squared distance = 2 * cosine distance",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **self.settings, **extra,
                "errors": _rounded(self.errors)}
        if self.null_errors is not None:
            info["null_errors"] = _rounded(self.null_errors)
        if self.static_membership is not None:  # kept here too: chai.json itself must stay dynamic CHAI
            info["static_membership"] = self.static_membership
            info["static_agreement"] = self.static_agreement
        return info

    def chai_config(self, static: bool = False, **extra) -> ChaiConfig:
        """The ChaiConfig to save: dynamic CHAI (static=False) or the CHAI-static ablation."""
        algorithm = self.settings.get("algorithm", "agglomerative")
        membership = self.static_membership if static else None
        if static and membership is None:
            raise CalibrationError("no static membership was computed; run calibrate_model(..., static=True)")
        return ChaiConfig(clusters=list(self.clusters), window=self.window, algorithm=algorithm,
                          static_membership=membership, calibration=self.calibration_info(**extra))

    def table(self) -> str:
        """Per-layer table: chosen k, residual error at k, K-cache saving; totals at the end."""
        r = self.residual()
        lines = [f"{'layer':>5} {'k':>4} {'of H':>5} {'err@k':>7} {'K saved':>8}"]
        for i, (k, s) in enumerate(zip(self.clusters, self.k_saving())):
            lines.append(f"{i:>5} {k:>4} {self.n_heads:>5} {100 * float(r[i, k - 1]):>6.1f}% {100 * s:>7.1f}%")
        k_saved = sum(self.k_saving()) / len(self.clusters)
        lines.append(f"K cache saved {100 * k_saved:.1f}% of K, {50 * k_saved:.1f}% of K+V "
                     f"(err@k: share of the k=1 error left at k; tolerance {self.tolerance})")
        return "\n".join(lines)


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in t.tolist()]


def calibrate_model(model, tokens, window: int = 5, tolerance: float = DEFAULT_TOLERANCE, batch_size: int = 64,
                    n_init: int = 4, iters: int = 30, seed: int = 0, static: bool = True,
                    algorithm: str = "agglomerative", show_progress: bool = True) -> CalibrationResult:
    """The offline phase on a model object: features, error curves, counts (and CHAI-static membership).

    model: a chai_models model (anything with .attention_layers following the attention interface).
    tokens: [N, S] int64 (split into batch_size batches) or an iterable of [B, S] batches; S >= window.
    Runs on the model's device. Returns per-layer error curves (errors [L, H]) and chosen counts.
    """
    if window < 2:
        raise CalibrationError(f"window = {window}: use at least 2 (with one token every head's probabilities "
                               "are [1], so all heads look identical)")
    if batch_size < 1:
        raise CalibrationError(f"batch_size = {batch_size}: use at least 1")
    batches = as_batches(tokens, batch_size)
    n = sum(int(b.shape[0]) for b in batches)
    if n == 0:
        raise CalibrationError("no calibration sequences given (N = 0); pass at least one sequence of "
                               f">= {window} tokens")
    H, Hkv = model.attention_layers[0].n_heads, model.attention_layers[0].n_kv_heads
    feats = collect_features(model, batches, window, show_progress)  # [L, N, H, W*W]
    L = feats.shape[0]
    flat = feats.flatten(0, 1)  # [L*N, H, W*W]: layers and sequences are independent rows
    errors = kmeans_errors(flat, n_init, iters, seed, show_progress=show_progress).view(L, n, H).sum(1).cpu()
    null = kmeans_errors(null_features(flat, seed), n_init, iters, seed, show_progress=show_progress)
    null = null.view(L, n, H).sum(1).cpu()  # [L, H]
    atol = FLAT_ATOL * n * H
    clusters = [pick_clusters(e, tolerance, atol, ref) for e, ref in zip(errors, null)]
    membership = agreement = None
    if static:
        membership, agreement = [], []
        for i, k in enumerate(clusters):
            m, a = static_membership(feats[i], k, algorithm) if k < H else (None, None)
            membership.append(m)
            agreement.append(a)
    settings = {"n_init": n_init, "iters": iters, "seed": seed, "algorithm": algorithm}
    return CalibrationResult(errors, null, clusters, H, Hkv, window, n, tolerance, membership, agreement, settings,
                             atol)
