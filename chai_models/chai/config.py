"""CHAI's configuration: per-layer cluster counts, the window, the clustering rule; presets; chai.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .clustering import ALGORITHMS, REPRESENTATIVES

# Where a request's membership comes from: "window", the paper's first W tokens (prefill clustered after them), or
# "prompt", the last `prompt_rows` rows of the whole prompt over all its keys (prefill dense, decode clustered).
MEMBERSHIPS = ("window", "prompt")

# Published per-layer cluster counts of the CHAI reference code (LLaMA, MHA). See shared/CHAI.md.
PRESETS = {
    "llama-7b": dict(n_heads=32, clusters=[32] * 18 + [4] * 14),
    "llama-7b-aggressive": dict(n_heads=32, clusters=[28] * 3 + [18] * 11 + [8] * 2 + [4] * 16),
    "llama-33b": dict(n_heads=52, clusters=[48] * 18 + [36] * 8 + [24] * 6 + [8] * 2 + [6] * 26),
}


class ChaiConfigError(UserError):
    """A CHAI spec, preset or chai.json that does not fit the model; the message names the source and the fix."""


@dataclass
class ChaiConfig:
    """Per-layer cluster counts (k == n_heads: that layer stays dense) and how to cluster.

    static_membership: CHAI-static, one head->cluster list per layer (None for a dense layer), fixed
    offline instead of decided per request; each cluster's representative is still chosen by `representative`
    (the medoid on the request's window features, or the lowest index).
    membership: "window" (the paper: the first `window` tokens decide) or "prompt" (the prompt's last
    `prompt_rows` rows over all of its keys decide, once, after a dense prefill).
    groups: the heads of a layer are split into this many equal, contiguous groups, each clustered among itself
    into its share of the layer's count (group_counts). It is what tensor parallelism does (each rank clusters
    its own heads, chai_models.parallel), so one process with groups = tp reproduces a tp-rank run exactly.
    """

    clusters: list[int]
    window: int = 5
    representative: str = "medoid"
    algorithm: str = "agglomerative"
    static_membership: list[list[int] | None] | None = None
    membership: str = "window"
    prompt_rows: int = 16
    calibration: dict | None = None  # how the counts were obtained (written by calibrate)
    groups: int = 1

    def validate(self, n_layers: int, n_heads: int) -> "ChaiConfig":
        if len(self.clusters) != n_layers:
            raise ChaiConfigError(f"ChaiConfig has {len(self.clusters)} cluster counts but the model has {n_layers} "
                                  f"layers; give one count per layer ({n_heads} keeps a layer dense)")
        for i, n in enumerate(self.clusters):
            if not isinstance(n, int) or not 1 <= n <= n_heads:
                raise ChaiConfigError(f"ChaiConfig.clusters[{i}] = {n!r}: a layer's cluster count must be an int in "
                                      f"1..{n_heads} (n_heads; {n_heads} means dense)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ChaiConfigError(f"ChaiConfig.window = {self.window!r}: the clustering window must be an int >= 1")
        if self.representative not in REPRESENTATIVES:
            raise ChaiConfigError(f"ChaiConfig.representative = {self.representative!r}; use one of {REPRESENTATIVES}")
        if self.membership not in MEMBERSHIPS:
            raise ChaiConfigError(f"ChaiConfig.membership = {self.membership!r}; use one of {MEMBERSHIPS}")
        if not isinstance(self.prompt_rows, int) or self.prompt_rows < 1:
            raise ChaiConfigError(f"ChaiConfig.prompt_rows = {self.prompt_rows!r}: the prompt rows that decide the "
                                  "membership must be an int >= 1")
        if self.membership == "prompt" and self.static_membership is not None:
            raise ChaiConfigError("ChaiConfig: static_membership is fixed offline, so membership='prompt' has "
                                  "nothing to decide; use membership='window' with a static config")
        if self.algorithm not in ALGORITHMS:
            raise ChaiConfigError(f"ChaiConfig.algorithm = {self.algorithm!r}; use one of {ALGORITHMS}")
        if not isinstance(self.groups, int) or self.groups < 1 or n_heads % self.groups:
            raise ChaiConfigError(f"ChaiConfig.groups = {self.groups!r}: the clustering groups must be an int >= 1 "
                                  f"that divides n_heads ({n_heads})")
        for i, n in enumerate(self.clusters):
            if n < n_heads and n < self.groups:
                raise ChaiConfigError(f"ChaiConfig.clusters[{i}] = {n} but the heads are clustered in {self.groups} "
                                      f"groups (each needs a cluster); use counts >= {self.groups} or fewer groups")
        if self.static_membership is not None:
            if self.groups > 1:
                raise ChaiConfigError("ChaiConfig.static_membership (CHAI-static) lists one membership for all "
                                      "heads; it cannot be combined with clustering groups > 1 (or tensor parallelism)")
            if len(self.static_membership) != n_layers:
                raise ChaiConfigError(f"ChaiConfig.static_membership has {len(self.static_membership)} entries for "
                                      f"{n_layers} layers")
            for i, (n, m) in enumerate(zip(self.clusters, self.static_membership)):
                if n == n_heads:
                    continue
                if m is None or len(m) != n_heads or sorted(set(m)) != list(range(n)):
                    raise ChaiConfigError(f"ChaiConfig.static_membership[{i}] must list a cluster id in 0..{n - 1} "
                                          f"for each of the {n_heads} heads, every id used; got {m}")
        return self

    @classmethod
    def from_spec(cls, spec: str, n_layers: int, n_heads: int, **kw) -> "ChaiConfig":
        """A config from a short string: a preset name, 'k' (every layer k clusters), 'N:k' (first N layers
        dense, the rest k), or a comma list of n_layers counts."""
        spec = spec.strip()
        if spec in PRESETS:
            p = PRESETS[spec]
            if p["n_heads"] != n_heads or len(p["clusters"]) != n_layers:
                raise ChaiConfigError(f"preset {spec!r} is for {len(p['clusters'])} layers of {p['n_heads']} heads; "
                                      f"this model has {n_layers} layers of {n_heads} heads")
            return cls(clusters=list(p["clusters"]), **kw).validate(n_layers, n_heads)
        try:
            if "," in spec:
                counts = [int(c) for c in spec.split(",")]
            elif ":" in spec:
                n_dense, n_clusters = (int(c) for c in spec.split(":"))
                counts = [n_heads] * n_dense + [n_clusters] * (n_layers - n_dense)
            else:
                counts = [int(spec)] * n_layers
        except ValueError:
            raise ChaiConfigError(f"CHAI spec {spec!r} not understood: use a preset ({', '.join(PRESETS)}), 'k', "
                                  "'N:k' or a comma list of per-layer counts") from None
        if ":" in spec and "," not in spec and not 0 <= n_dense <= n_layers:
            raise ChaiConfigError(f"CHAI spec {spec!r}: {n_dense} is the number of leading dense layers (N in N:k) but "
                                  f"the model has {n_layers} layers; use N in 0..{n_layers}")
        return cls(clusters=counts, **kw).validate(n_layers, n_heads)

    def group_counts(self, layer: int, n_heads: int, groups: int | None = None) -> list[int]:
        """The cluster counts of a layer's head groups (groups: default self.groups), as even as possible, the first
        groups taking one more: 7 clusters in 3 groups -> [3, 2, 2]."""
        g = self.groups if groups is None else groups
        n = self.clusters[layer]
        return [n // g + (i < n % g) for i in range(g)]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "chai.json") -> "ChaiConfig":
        if not isinstance(d, dict):
            raise ChaiConfigError(f"{where}: expected a JSON object with 'clusters' (one count per layer), got "
                                  f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ChaiConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "clusters" not in d:
            raise ChaiConfigError(f"{where}: missing 'clusters' (one cluster count per layer)")
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "ChaiConfig":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ChaiConfigError(f"{path} is not valid JSON ({e}); re-run calibration") from e


def resolve(chai, model, path=None, required: bool = False) -> ChaiConfig | None:
    """Turns a `chai` argument (load, the CLI, evaluate, bench) into a validated ChaiConfig, or None for dense.

    chai: None | "auto" (chai.json in the checkpoint folder `path`) | a preset name or spec string | a chai.json
    path | a ChaiConfig. "auto" without a chai.json means dense, unless `required`, where it is an error.
    """
    cfg = model.config
    if chai is None:
        return None
    if isinstance(chai, ChaiConfig):
        return chai.validate(cfg.n_layers, cfg.n_heads)
    if not isinstance(chai, str):
        raise TypeError(f"chai must be None, 'auto', a preset or spec string, a chai.json path or a ChaiConfig; "
                        f"got {type(chai).__name__}")
    if chai == "auto":
        if path is None:
            raise ChaiConfigError("chai='auto' needs the checkpoint folder (chai.json beside config.json)")
        f = Path(path) / "chai.json"
        if not f.is_file():
            if required:
                raise ChaiConfigError(f"{f} does not exist; calibrate first (python tools/calibrate.py {path}) or give "
                                      "a spec such as 15:4")
            return None
        return _load_file(f, cfg)
    if chai.endswith(".json"):
        if not Path(chai).is_file():
            raise ChaiConfigError(f"CHAI config {chai} does not exist")
        return _load_file(chai, cfg)
    return ChaiConfig.from_spec(chai, cfg.n_layers, cfg.n_heads)


def _load_file(path, cfg) -> ChaiConfig:
    """A chai.json, validated against the model; every error names the file."""
    try:
        return ChaiConfig.load(path).validate(cfg.n_layers, cfg.n_heads)
    except ChaiConfigError as e:
        if str(path) in str(e):
            raise
        raise ChaiConfigError(f"{path}: {e}; fix the file or calibrate again (python tools/calibrate.py "
                              "MODEL_DIR --force)") from None
    except TypeError as e:  # a field of the wrong type reached ChaiConfig(...)
        raise ChaiConfigError(f"{path}: {e}; fix the file or calibrate again") from None
