"""Sparse pair graphs for orientation recovery: k nearest neighbours plus random long-range pairs.

Recovery never forms the dense ``P × P`` distance matrix. Each projection is joined to its ``k``
nearest neighbours in a feature space where nearness predicts a small orientation distance (the
learned embeddings, the flattened images for the Euclidean baseline, or — in experiments with
exact distances — the quaternions themselves), plus ``n_random`` random partners that tie distant
parts of the sphere together. Edges are undirected, stored once as ``(i, j)`` with ``i < j``:
``O(P·(k + n_random))`` of them.

Neighbour search is exact and chunked (``chunk × P`` scores at a time), so memory stays bounded
and the cost is one matrix product per chunk: ~P²·n flops for ``(P, n)`` features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cryoorient_ray.core._array import as_tensor
from cryoorient_ray.errors import CryoOrientError

__all__ = ["METRICS", "PairGraph", "build_pair_graph", "graph_components", "knn_edges", "random_edges", "unique_edges"]

METRICS = ("angle", "euclidean", "quaternion")


@dataclass
class PairGraph:
    """Undirected edges of a pair graph on ``n_nodes`` projections.

    Attributes:
        n_nodes: number of projections ``P``.
        i, j: ``(E,)`` int64 node indices with ``i < j``, sorted, without duplicates.
        n_components: connected components of the graph (1 when every node is reachable).
        component: ``(P,)`` component label of each node (labels ordered by decreasing size).
    """

    n_nodes: int
    i: np.ndarray
    j: np.ndarray
    n_components: int
    component: np.ndarray

    @property
    def n_edges(self) -> int:
        """Number of edges ``E``."""
        return int(len(self.i))

    def degrees(self) -> np.ndarray:
        """``(P,)`` edges at each node."""
        return np.bincount(self.i, minlength=self.n_nodes) + np.bincount(self.j, minlength=self.n_nodes)


def _scores(chunk: torch.Tensor, feats: torch.Tensor, metric: str, sq_norms: torch.Tensor | None) -> torch.Tensor:
    """Similarity (bigger = nearer) of each chunk row to every feature row."""
    dots = chunk @ feats.T
    if metric == "quaternion":
        return dots.abs()
    if metric == "angle":
        return dots
    # euclidean: -‖a − b‖² = 2ab − ‖a‖² − ‖b‖² (the row's own ‖a‖² does not change its ranking)
    return 2.0 * dots - sq_norms[None, :]


def knn_edges(features, k: int, metric: str = "angle", chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows, as undirected edges ``(i, j)``, ``i < j``.

    Args:
        features: ``(P, n)`` numpy or torch features.
        k: neighbours per node (``1 ≤ k < P``; smaller P clips it).
        metric: ``"angle"`` (angle between feature vectors: the learned distance head),
            ``"euclidean"`` (the Euclidean baseline on flattened images) or ``"quaternion"``
            (``(P, 4)`` quaternions, nearness ``|⟨q_i, q_j⟩|``: exact-distance experiments).
        chunk_size: rows scored at once (bounds memory to ``chunk_size × P`` floats).
    """
    if metric not in METRICS:
        raise CryoOrientError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    feats = as_tensor(features)[0].detach().to(torch.float32)
    if feats.ndim != 2:
        raise CryoOrientError(f"features must be (P, n); got shape {tuple(feats.shape)}")
    p = feats.shape[0]
    if not torch.isfinite(feats).all():
        raise CryoOrientError("features contain NaN or infinite values")
    if p < 2 or k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = min(int(k), p - 1)
    if metric in ("angle", "quaternion"):
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sq = (feats * feats).sum(1) if metric == "euclidean" else None
    rows, cols = [], []
    for a in range(0, p, chunk_size):
        b = min(p, a + chunk_size)
        s = _scores(feats[a:b], feats, metric, sq)
        s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")  # not its own neighbour
        nn_idx = s.topk(k, dim=1).indices
        rows.append(np.repeat(np.arange(a, b), k))
        cols.append(nn_idx.reshape(-1).numpy())
    return unique_edges(np.concatenate(rows), np.concatenate(cols))


def random_edges(n_nodes: int, per_node: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_node`` random partners for each node (undirected, ``i < j``, no self-pairs)."""
    if n_nodes < 2 or per_node < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.repeat(np.arange(n_nodes), per_node)
    off = rng.integers(1, n_nodes, size=len(i))  # never 0, so j != i
    j = (i + off) % n_nodes
    return unique_edges(i, j)


def unique_edges(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges ``(min, max)``, sorted, duplicates and self-pairs dropped."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    width = int(hi.max(initial=0)) + 1
    key = np.unique(lo[keep] * width + hi[keep])
    return key // width, key % width


def graph_components(n_nodes: int, i: np.ndarray, j: np.ndarray) -> tuple[int, np.ndarray]:
    """``(n_components, labels)``, labels renumbered so that 0 is the largest component."""
    adj = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n_nodes, n_nodes))
    n, labels = connected_components(adj, directed=False)
    sizes = np.bincount(labels, minlength=n)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return int(n), rank[labels]


def build_pair_graph(
    features,
    k: int = 10,
    n_random: int = 20,
    metric: str = "angle",
    seed: int = 0,
) -> PairGraph:
    """kNN edges in feature space plus ``n_random`` random edges per node.

    Args:
        features: ``(P, n)`` features (see :func:`knn_edges` for ``metric``), or the number of
            projections ``P`` (an int) when ``k == 0`` (random edges only).
        k: nearest neighbours per node (0: none).
        n_random: random long-range partners per node (0: none).
        seed: of the random edges.

    Returns:
        the :class:`PairGraph`; check ``n_components`` (random edges make it connected with
        overwhelming probability, a pure kNN graph may fall apart in clusters).
    """
    if isinstance(features, (int, np.integer)):
        p = int(features)
        if k:
            raise CryoOrientError("k nearest neighbours need features")
        feats = None
    else:
        feats = features
        p = int(np.shape(features)[0])
    if p < 3:
        raise CryoOrientError(f"orientation recovery needs at least 3 projections; got {p}")
    if k < 0 or n_random < 0 or (k == 0 and n_random == 0):
        raise CryoOrientError(
            f"need k >= 0, n_random >= 0 and at least one of them > 0; got k={k}, n_random={n_random}"
        )
    rng = np.random.default_rng(seed)
    parts_i, parts_j = [], []
    if k and feats is not None:
        a, b = knn_edges(feats, k, metric)
        parts_i.append(a)
        parts_j.append(b)
    if n_random:
        a, b = random_edges(p, n_random, rng)
        parts_i.append(a)
        parts_j.append(b)
    i, j = unique_edges(np.concatenate(parts_i), np.concatenate(parts_j))
    n_comp, labels = graph_components(p, i, j)
    return PairGraph(n_nodes=p, i=i, j=j, n_components=n_comp, component=labels)
