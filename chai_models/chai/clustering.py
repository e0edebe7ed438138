"""Clustering a layer's heads on their window features: batched over sequences, on the model's device, in torch,
with no host synchronisation (so it can run inside a prefill without stalling it).

features [B, H, F] -> cosine distances [B, H, H] -> labels (average-linkage agglomerative clustering, or spherical
n_clusters-means) -> canonical cluster ids (numbered by their lowest member) -> one representative per cluster (the medoid,
or the lowest index). Ties always go to the lowest index, so results are deterministic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALGORITHMS = ("agglomerative", "kmeans")
REPRESENTATIVES = ("medoid", "first")


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """features [B, H, F] -> [B, H, H] cosine distances (1 - cosine similarity), in fp32 (fp64 stays)."""
    f = features if features.dtype == torch.float64 else features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = (1 - f @ f.transpose(1, 2)).clamp_min(0)
    d = (d + d.transpose(1, 2)) / 2  # exactly symmetric, so equal costs tie exactly and the lowest index wins
    return d * (1 - torch.eye(f.shape[1], device=f.device, dtype=f.dtype))


def agglomerative_average(dist: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Average-linkage agglomerative clustering of H items into n_clusters clusters, per batch row.

    dist [B, H, H] symmetric -> labels [B, H], each label the lowest index of its cluster. H - n_clusters merges of the
    closest pair of clusters (ties: the lowest pair in row-major order), with the Lance-Williams update
    d(i+j, m) = (n_i d(i, m) + n_j d(j, m)) / (n_i + n_j), which is exactly average linkage.
    """
    B, H, _ = dist.shape
    dev = dist.device
    inf = torch.tensor(float("inf"), device=dev, dtype=dist.dtype)
    d = dist.clone()
    eye = torch.eye(H, device=dev, dtype=torch.bool)
    d = d.masked_fill(eye, float("inf"))
    size = torch.ones(B, H, device=dev, dtype=dist.dtype)
    labels = torch.arange(H, device=dev).expand(B, H).clone()
    rows = torch.arange(B, device=dev)
    for _ in range(H - n_clusters):
        flat = d.view(B, H * H).argmin(dim=1)
        i, j = flat // H, flat % H  # i < j: the matrix is symmetric, row-major finds (i, j) before (j, i)
        ni, nj = size[rows, i], size[rows, j]
        merged = (ni[:, None] * d[rows, i] + nj[:, None] * d[rows, j]) / (ni + nj)[:, None]  # [B, H]
        d[rows, i] = merged
        d[rows, :, i] = merged
        d[rows, j] = inf
        d[rows, :, j] = inf
        d[rows, i, i] = inf
        size[rows, i] = ni + nj
        labels = torch.where(labels == j[:, None], i[:, None], labels)
    return labels


def kmeans(features: torch.Tensor, n_clusters: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means (cosine) per batch row, deterministic farthest-point init from head 0.

    features [B, H, F] -> labels [B, H] (arbitrary ids in 0..n_clusters-1; relabel with canonical_labels).
    Exactly n_clusters clusters: an emptied cluster takes the point farthest from its own centre.
    """
    B, H, _ = features.shape
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = torch.arange(B, device=f.device)
    centre_idx = torch.zeros(B, n_clusters, dtype=torch.long, device=f.device)
    min_d = 1 - (f * f[:, :1]).sum(-1)  # [B, H]
    for c in range(1, n_clusters):
        nxt = min_d.argmax(dim=1)
        centre_idx[:, c] = nxt
        min_d = torch.minimum(min_d, 1 - (f * f[rows, nxt][:, None]).sum(-1))
    centres = f[rows[:, None], centre_idx]  # [B, C, F]
    labels = None
    for _ in range(iters):
        sim = f @ centres.transpose(1, 2)  # [B, H, C]
        labels = sim.argmax(dim=2)
        onehot = F.one_hot(labels, n_clusters).to(f.dtype)  # [B, H, C]
        counts = onehot.sum(1)  # [B, C]
        new = onehot.transpose(1, 2) @ f  # [B, C, F]
        new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        centres = torch.where(counts[:, :, None] > 0, new, centres)
    for c in range(n_clusters):  # repair empty clusters without a host sync
        counts = F.one_hot(labels, n_clusters).sum(1)  # [B, C]
        own = (f * centres[rows[:, None], labels]).sum(-1)  # [B, H] similarity to own centre
        movable = counts[rows[:, None], labels] > 1
        far = torch.where(movable, own, torch.full_like(own, float("inf"))).argmin(dim=1)  # [B]
        empty = counts[:, c] == 0
        labels[rows, far] = torch.where(empty, torch.full_like(far, c), labels[rows, far])
    return labels


def canonical_labels(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Relabels clusters 0..n_clusters-1 in the order of their lowest member.

    labels [B, H] (ids in 0..H-1) -> [B, H]."""
    B, H = labels.shape
    idx = torch.arange(H, device=labels.device).expand(B, H)
    # lowest member of each head's cluster
    lowest = torch.full((B, H), H, device=labels.device, dtype=torch.long)
    lowest = lowest.scatter_reduce(1, labels, idx, reduce="amin")  # [B, H] indexed by old label
    root = lowest.gather(1, labels)  # [B, H]
    is_root = root == idx
    rank = is_root.long().cumsum(1) - 1  # rank of each root among roots
    return rank.gather(1, root)


def representatives(dist: torch.Tensor, head_to_cluster: torch.Tensor, n_clusters: int, rule: str) -> torch.Tensor:
    """One representative query head per cluster -> rep_idx [B, n_clusters].

    medoid: the member with the least total cosine distance to its cluster's members; first: the lowest index.
    Ties go to the lowest index (argmin returns the first minimum).
    """
    B, H = head_to_cluster.shape
    member = head_to_cluster[:, None, :] == torch.arange(n_clusters, device=dist.device)[None, :, None]  # [B, C, H]
    if rule == "first":
        cost = torch.arange(H, device=dist.device, dtype=dist.dtype).expand(B, n_clusters, H)
    else:
        same = head_to_cluster[:, :, None] == head_to_cluster[:, None, :]  # [B, H, H]
        cost = (dist * same).sum(-1)[:, None, :].expand(B, n_clusters, H)  # [B, C, H]
    return torch.where(member, cost, torch.full_like(cost, float("inf"))).argmin(dim=2)


def cluster_heads(features: torch.Tensor, n_clusters: int, algorithm: str = "agglomerative", rule: str = "medoid"):
    """features [B, H, F] -> (rep_idx [B, n_clusters], head_to_cluster [B, H]); clusters ordered by lowest member."""
    dist = cosine_distance(features)
    if algorithm == "agglomerative":
        labels = agglomerative_average(dist, n_clusters)
    elif algorithm == "kmeans":
        labels = kmeans(features, n_clusters)
    else:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; use one of {ALGORITHMS}")
    head_to_cluster = canonical_labels(labels, n_clusters)
    return representatives(dist, head_to_cluster, n_clusters, rule), head_to_cluster


def cluster_groups(features: torch.Tensor, counts: list[int], algorithm: str = "agglomerative", rule: str = "medoid"):
    """The heads split into len(counts) equal contiguous groups, group g clustered among itself into counts[g]
    clusters (what each rank does under tensor parallelism). features [B, H, F] -> (rep_idx [B, sum(counts)],
    head_to_cluster [B, H]): head and cluster ids global, clusters still ordered by lowest member."""
    if len(counts) == 1:
        return cluster_heads(features, counts[0], algorithm, rule)
    h = features.shape[1] // len(counts)
    reps, labels, c0 = [], [], 0
    for g, k in enumerate(counts):
        rep_idx, head_to_cluster = cluster_heads(features[:, g * h:(g + 1) * h], k, algorithm, rule)
        reps.append(rep_idx + g * h)
        labels.append(head_to_cluster + c0)
        c0 += k
    return torch.cat(reps, dim=1), torch.cat(labels, dim=1)
