"""CHAI, the method, in plain torch: configuration (config.py), clustering (clustering.py), clustered attention and
its compact K cache (attention.py: start there), offline calibration of the cluster counts (calibrate.py)."""
from .attention import (ChaiAttention, batched_index, chai_layers, clustered_attention, install, n_k_slots,
                        open_windows, prompt_probs, ready, reset, scoring_prompt, summary, swap_class,
                        window_probs)
from .clustering import (ALGORITHMS, REPRESENTATIVES, agglomerative_average, canonical_labels, cluster_groups,
                         cluster_heads, cosine_distance, kmeans, representatives)
from .config import MEMBERSHIPS, PRESETS, ChaiConfig, resolve

__all__ = ["ALGORITHMS", "MEMBERSHIPS", "PRESETS", "REPRESENTATIVES", "ChaiAttention", "ChaiConfig",
           "agglomerative_average", "batched_index", "canonical_labels", "chai_layers", "cluster_groups",
           "cluster_heads", "clustered_attention", "cosine_distance", "install", "kmeans", "n_k_slots", "open_windows",
           "prompt_probs", "ready", "representatives", "reset", "resolve", "scoring_prompt", "summary", "swap_class",
           "window_probs"]
