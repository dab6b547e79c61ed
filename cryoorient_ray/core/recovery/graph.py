"""Sparse pair graphs for orientation recovery: k nearest neighbours plus random long-range pairs.

Recovery never forms the dense ``P × P`` distance matrix. Each projection is joined to its ``k``
nearest neighbours in a feature space where nearness predicts a small orientation distance (the
learned embeddings, the flattened images for the Euclidean baseline, or — in experiments with
exact distances — the quaternions themselves), plus ``n_random`` random partners that tie distant
parts of the sphere together. Edges are undirected, stored once as ``(i, j)`` with ``i < j``:
``O(P·(k + n_random))`` of them.

Two options (off by default) build the kNN part from *confident* neighbours: ``mutual`` keeps a
kNN edge only when each end is among the other's ``k`` nearest, and ``n_random_unreliable`` adds
up to that many extra random partners to each node in proportion to the share of its kNN that
are not mutual (a node whose neighbours do not name it back is one whose kNN are unreliable).

:func:`neighbour_quality` measures a graph's kNN against the truth: the median over images of
the mean true d_q of the ``k`` nearest by d̂, beside the same for the true ``k`` nearest (the
ideal) — what predicts whether recovery will succeed.

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

__all__ = [
    "METRICS",
    "PairGraph",
    "build_pair_graph",
    "graph_components",
    "knn_edges",
    "knn_indices",
    "mutual_knn_edges",
    "neighbour_quality",
    "random_edges",
    "unique_edges",
]

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


def knn_indices(features, k: int, metric: str = "angle", chunk_size: int = 1024) -> np.ndarray:
    """``(P, k)`` int64: each row's ``k`` nearest other rows, nearest first.

    Args:
        features: ``(P, n)`` numpy or torch features.
        k: neighbours per node (``1 ≤ k < P``; smaller P clips it; ``(P, 0)`` when ``k < 1``).
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
        return np.zeros((p, 0), np.int64)
    k = min(int(k), p - 1)
    if metric in ("angle", "quaternion"):
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sq = (feats * feats).sum(1) if metric == "euclidean" else None
    out = []
    for a in range(0, p, chunk_size):
        b = min(p, a + chunk_size)
        s = _scores(feats[a:b], feats, metric, sq)
        s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")  # not its own neighbour
        out.append(s.topk(k, dim=1).indices.numpy())
    return np.concatenate(out).astype(np.int64)


def knn_edges(features, k: int, metric: str = "angle", chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows (:func:`knn_indices`), as undirected edges ``(i, j)``, ``i < j``."""
    nn = knn_indices(features, k, metric, chunk_size)
    if nn.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return unique_edges(np.repeat(np.arange(len(nn)), nn.shape[1]), nn.reshape(-1))


def mutual_knn_edges(nn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mutual edges of a kNN table ``nn (P, k)``: ``(i, j)`` with ``j ∈ nn[i]`` and ``i ∈ nn[j]``.

    Returns ``(i, j, mutual)``: the undirected edges ``i < j`` and ``(P,)`` how many of each
    node's ``k`` neighbours name it back.
    """
    p, k = nn.shape
    src = np.repeat(np.arange(p, dtype=np.int64), k)
    dst = nn.reshape(-1).astype(np.int64)
    key = src * p + dst
    back = np.isin(dst * p + src, key)
    mutual = np.bincount(src[back], minlength=p)
    i, j = unique_edges(src[back], dst[back])
    return i, j, mutual


def random_edges(n_nodes: int, per_node: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_node`` random partners for each node (undirected, ``i < j``, no self-pairs)."""
    if n_nodes < 2 or per_node < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.repeat(np.arange(n_nodes), per_node)
    off = rng.integers(1, n_nodes, size=len(i))  # never 0, so j != i
    j = (i + off) % n_nodes
    return unique_edges(i, j)


def _random_partners(n_nodes: int, counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``counts[i]`` random partners for each node ``i`` (undirected, ``i < j``, no self-pairs)."""
    i = np.repeat(np.arange(n_nodes), counts)
    j = (i + rng.integers(1, n_nodes, size=len(i))) % n_nodes
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
    mutual: bool = False,
    n_random_unreliable: int = 0,
) -> PairGraph:
    """kNN edges in feature space plus ``n_random`` random edges per node.

    Args:
        features: ``(P, n)`` features (see :func:`knn_edges` for ``metric``), or the number of
            projections ``P`` (an int) when ``k == 0`` (random edges only).
        k: nearest neighbours per node (0: none).
        n_random: random long-range partners per node (0: none).
        seed: of the random edges.
        mutual: keep only the mutual kNN edges (:func:`mutual_knn_edges`).
        n_random_unreliable: extra random partners for a node whose kNN are all non-mutual;
            ``round(n_random_unreliable · (1 − mutual/k))`` for the others (0: none).

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
    if n_random_unreliable < 0:
        raise CryoOrientError(f"need n_random_unreliable >= 0; got {n_random_unreliable}")
    if k < 0 or n_random < 0 or (k == 0 and n_random == 0):
        raise CryoOrientError(
            f"need k >= 0, n_random >= 0 and at least one of them > 0; got k={k}, n_random={n_random}"
        )
    rng = np.random.default_rng(seed)
    parts_i, parts_j = [], []
    n_mutual = None
    if k and feats is not None:
        if mutual or n_random_unreliable:
            nn = knn_indices(feats, k, metric)
            a, b, n_mutual = mutual_knn_edges(nn)
            if not mutual:
                a, b = unique_edges(np.repeat(np.arange(p), nn.shape[1]), nn.reshape(-1))
        else:
            a, b = knn_edges(feats, k, metric)
        parts_i.append(a)
        parts_j.append(b)
    if n_random:
        a, b = random_edges(p, n_random, rng)
        parts_i.append(a)
        parts_j.append(b)
    if n_random_unreliable and n_mutual is not None:
        extra = np.rint(n_random_unreliable * (1.0 - n_mutual / min(k, p - 1))).astype(np.int64)
        a, b = _random_partners(p, extra, rng)
        parts_i.append(a)
        parts_j.append(b)
    i, j = unique_edges(np.concatenate(parts_i), np.concatenate(parts_j))
    n_comp, labels = graph_components(p, i, j)
    return PairGraph(n_nodes=p, i=i, j=j, n_components=n_comp, component=labels)


def _true_knn(q: np.ndarray, k: int, symmetry: str = "C1", chunk_size: int = 1024) -> np.ndarray:
    """``(P, k)``: the ``k`` nearest by the true (symmetry-aware) d_q of quaternions ``q (P, 4)``."""
    from cryoorient_ray.core.geometry.quaternion import quat_product
    from cryoorient_ray.core.geometry.symmetry import symmetry_group

    group = symmetry_group(symmetry).quaternions
    if len(group) == 1:
        return knn_indices(q, k, "quaternion", chunk_size)
    qt = torch.as_tensor(np.asarray(q), dtype=torch.float64)
    qt = qt / qt.norm(dim=1, keepdim=True)
    # d_G(q_i, q_j) = min_g d_q(q_i, q_j ⊗ g): nearness max_g |⟨q_i, q_j ⊗ g⟩|
    moved = [quat_product(qt, torch.tensor(g, dtype=torch.float64).expand_as(qt)) for g in group]
    p, k = len(qt), min(int(k), len(qt) - 1)
    out = []
    for a in range(0, p, chunk_size):
        b = min(p, a + chunk_size)
        s = torch.stack([(qt[a:b] @ m.T).abs() for m in moved]).amax(0)
        s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
        out.append(s.topk(k, dim=1).indices.numpy())
    return np.concatenate(out).astype(np.int64)


def neighbour_quality(
    features,
    q_true,
    k: int = 10,
    metric: str = "angle",
    symmetry: str = "C1",
    near: float = 0.5,
    nn: np.ndarray | None = None,
) -> dict:
    """How good the kNN of the estimated distance are, against the true orientations.

    Args:
        features: ``(P, n)`` features of the estimator (searched with ``metric``, as the graph is).
        q_true: ``(P, 4)`` true quaternions (wxyz).
        k: neighbours per image.
        symmetry: point group of the true distance d_q.
        near: the true d_q (rad) below which a kNN edge counts as a near one.
        nn: optional ``(P, k)`` kNN table already computed (skips the search in ``features``).

    Returns:
        ``{"k", "median_knn_dq"}``: the median over images of the mean true d_q of its ``k``
        nearest by d̂; ``"ideal_median_knn_dq"``: the same for its true ``k`` nearest;
        ``"near_fraction"``: the fraction of the (directed) kNN with true d_q < ``near``; and
        ``"mean_knn_dq"``. Radians.
    """
    from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance

    q = np.asarray(q_true, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4 or not np.isfinite(q).all():
        raise CryoOrientError(f"q_true must be (P, 4) finite quaternions; got shape {q.shape}")
    if nn is None:
        nn = knn_indices(features, k, metric)
    if len(nn) != len(q):
        raise CryoOrientError(f"{len(nn)} images have neighbours but {len(q)} have true orientations")
    k = nn.shape[1]
    if k == 0:
        raise CryoOrientError("neighbour quality needs k >= 1 and at least 2 images")
    ideal = _true_knn(q, k, symmetry)

    def dq(table: np.ndarray) -> np.ndarray:
        src = np.repeat(np.arange(len(q)), table.shape[1])
        return np.asarray(symmetric_quat_distance(q[src], q[table.reshape(-1)], symmetry)).reshape(table.shape)

    d_est, d_ideal = dq(nn), dq(ideal)
    return {
        "k": int(k),
        "median_knn_dq": float(np.median(d_est.mean(1))),
        "ideal_median_knn_dq": float(np.median(d_ideal.mean(1))),
        "near_fraction": float((d_est < near).mean()),
        "near_threshold": float(near),
        "mean_knn_dq": float(d_est.mean()),
    }
