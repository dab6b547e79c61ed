"""Sparse pair graphs: kNN against brute force, random edges, components."""

from __future__ import annotations

import numpy as np
import pytest

from cryoorient_ray.core.geometry.quaternion import pairwise_quat_distance
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.recovery.graph import build_pair_graph, graph_components, knn_edges, random_edges, unique_edges
from cryoorient_ray.errors import CryoOrientError


def _brute_knn(score: np.ndarray, k: int) -> set[tuple[int, int]]:
    s = score.copy()
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    return {(min(a, b), max(a, b)) for a in range(len(s)) for b in nn[a]}


@pytest.mark.parametrize("metric", ["angle", "euclidean", "quaternion"])
def test_knn_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    x = sample_orientations(150, seed=1) if metric == "quaternion" else rng.normal(size=(150, 6))
    if metric == "quaternion":
        score = -pairwise_quat_distance(x)
    elif metric == "angle":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        score = xn @ xn.T
    else:
        score = -((x[:, None] - x[None]) ** 2).sum(-1)
    i, j = knn_edges(x, 5, metric, chunk_size=37)  # chunks that do not divide P
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == _brute_knn(score, 5)
    assert (i < j).all()


def test_random_edges_have_no_self_pairs_or_duplicates():
    i, j = random_edges(50, 10, np.random.default_rng(0))
    assert (i < j).all()
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == len(i)
    assert np.bincount(np.concatenate([i, j]), minlength=50).min() >= 10  # every node keeps its partners


def test_unique_edges_folds_directions():
    i, j = unique_edges(np.array([3, 1, 1, 2]), np.array([1, 3, 1, 0]))
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 2), (1, 3)]


def test_two_clusters_are_two_components_until_random_edges_join_them():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 3)) + 50, rng.normal(size=(30, 3)) - 50])
    g = build_pair_graph(x, k=4, n_random=0, metric="euclidean")
    assert g.n_components == 2
    assert np.bincount(g.component).tolist() == [40, 30]  # label 0 = the largest
    g2 = build_pair_graph(x, k=4, n_random=3, metric="euclidean")
    assert g2.n_components == 1
    assert g2.n_edges > g.n_edges


def test_graph_size_is_linear_in_p():
    g = build_pair_graph(sample_orientations(2000, seed=0), k=10, n_random=20, metric="quaternion")
    assert g.n_edges <= 2000 * 30
    assert g.degrees().min() >= 10
    n, labels = graph_components(g.n_nodes, g.i, g.j)
    assert n == 1 and (labels == 0).all()


def test_bad_graph_input():
    with pytest.raises(CryoOrientError, match="at least 3"):
        build_pair_graph(np.zeros((2, 3)))
    with pytest.raises(CryoOrientError, match="NaN"):
        knn_edges(np.full((5, 3), np.nan), 2)
    with pytest.raises(CryoOrientError, match="metric"):
        knn_edges(np.zeros((5, 3)), 2, "cosine")
