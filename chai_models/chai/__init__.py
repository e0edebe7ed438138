"""CHAI, the method, in plain torch: configuration (config.py), clustering (clustering.py), clustered attention and
its compact K cache (attention.py: start there), offline calibration of the cluster counts (calibrate.py)."""
from .attention import (ChaiAttention, batched_index, chai_layers, clustered_attention, install, n_k_slots,
                        open_windows, ready, reset, summary, swap_class, window_probs)
from .clustering import (ALGORITHMS, REPRESENTATIVES, agglomerative_average, canonical_labels, cluster_groups,
                         cluster_heads, cosine_distance, kmeans, representatives)
from .config import PRESETS, ChaiConfig, resolve

__all__ = ["ALGORITHMS", "PRESETS", "REPRESENTATIVES", "ChaiAttention", "ChaiConfig", "agglomerative_average",
           "batched_index", "canonical_labels", "chai_layers", "cluster_groups", "cluster_heads",
           "clustered_attention", "cosine_distance", "install", "kmeans", "n_k_slots", "open_windows", "ready",
           "representatives", "reset", "resolve", "summary", "swap_class", "window_probs"]
