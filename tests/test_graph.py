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


def _brute_nn(score: np.ndarray, k: int) -> np.ndarray:
    s = score.copy()
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :k]


def test_mutual_knn_keeps_the_pairs_that_name_each_other():
    from cryoorient_ray.core.recovery.graph import knn_indices, mutual_knn_edges

    x = np.random.default_rng(3).normal(size=(120, 5))
    nn = knn_indices(x, 6, "euclidean", chunk_size=50)
    brute = _brute_nn(-((x[:, None] - x[None]) ** 2).sum(-1), 6)
    assert all(set(a) == set(b) for a, b in zip(nn.tolist(), brute.tolist(), strict=True))
    i, j, mutual = mutual_knn_edges(nn)
    sets = [set(r) for r in brute.tolist()]
    want = {(a, b) for a in range(120) for b in sets[a] if a < b and a in sets[b]}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want
    np.testing.assert_array_equal(mutual, [sum(a in sets[b] for b in sets[a]) for a in range(120)])
    all_i, _ = knn_edges(x, 6, "euclidean")
    assert 0 < len(i) < len(all_i)


def test_graph_options_default_off_and_extra_edges_go_to_unreliable_nodes():
    from cryoorient_ray.core.recovery.graph import knn_indices, mutual_knn_edges

    # a dense cluster (reliable: neighbours name each other back) and scattered outliers
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(150, 3)) * 0.1, rng.normal(size=(50, 3)) * 5.0])
    base = build_pair_graph(x, k=8, n_random=2, metric="euclidean", seed=4)
    same = build_pair_graph(x, k=8, n_random=2, metric="euclidean", seed=4, mutual=False, n_random_unreliable=0)
    np.testing.assert_array_equal(base.i, same.i)
    np.testing.assert_array_equal(base.j, same.j)
    mut = build_pair_graph(x, k=8, n_random=2, metric="euclidean", seed=4, mutual=True)
    assert mut.n_edges < base.n_edges
    more = build_pair_graph(x, k=8, n_random=2, metric="euclidean", seed=4, n_random_unreliable=20)
    added = more.degrees() - base.degrees()
    _, _, n_mutual = mutual_knn_edges(knn_indices(x, 8, "euclidean"))
    unreliable = n_mutual <= 4
    assert unreliable.any() and (~unreliable).any()
    # each node receives about n_random_unreliable·(1 - mutual/k) own partners (plus being picked by others)
    assert added[unreliable].mean() > added[~unreliable].mean() + 5
    with pytest.raises(CryoOrientError, match="n_random_unreliable"):
        build_pair_graph(x, k=8, n_random=2, metric="euclidean", n_random_unreliable=-1)


def test_neighbour_quality_of_exact_noisy_and_random_features():
    from cryoorient_ray.core.recovery.graph import neighbour_quality

    q = sample_orientations(400, seed=2)
    exact = neighbour_quality(q, q, k=10, metric="quaternion")
    assert exact["median_knn_dq"] == pytest.approx(exact["ideal_median_knn_dq"], rel=1e-6)
    assert exact["k"] == 10 and exact["near_fraction"] > 0.2
    # 400 uniform orientations: a ball of radius r holds (r − sin r)/π of SO(3), so the 10th nearest
    # lies ≈ 0.78 rad away and the 10 nearest ≈ 0.6 rad on average
    assert 0.45 < exact["ideal_median_knn_dq"] < 0.75
    noisy = neighbour_quality(
        q + np.random.default_rng(0).normal(scale=0.05, size=q.shape), q, k=10, metric="quaternion"
    )
    assert exact["median_knn_dq"] < noisy["median_knn_dq"] < 1.2
    assert noisy["near_fraction"] < exact["near_fraction"]
    assert noisy["ideal_median_knn_dq"] == pytest.approx(exact["ideal_median_knn_dq"])
    rand = neighbour_quality(np.random.default_rng(1).normal(size=(400, 8)), q, k=10)
    assert rand["median_knn_dq"] > 1.5 and rand["near_fraction"] < 0.05  # random: the mean d_q is ≈ 2.1 rad
    with pytest.raises(CryoOrientError, match="q_true"):
        neighbour_quality(q, q[:, :3], k=5, metric="quaternion")


def test_neighbour_quality_with_symmetry():
    """Under D2 an image and its symmetry mates are one view: the ideal neighbours are closer."""
    from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance
    from cryoorient_ray.core.recovery.graph import _true_knn, neighbour_quality

    q = sample_orientations(200, seed=5)
    c1 = neighbour_quality(q, q, k=6, metric="quaternion")
    d2 = neighbour_quality(q, q, k=6, metric="quaternion", symmetry="D2")
    assert d2["ideal_median_knn_dq"] < 0.8 * c1["ideal_median_knn_dq"]
    assert d2["median_knn_dq"] > d2["ideal_median_knn_dq"]  # the C1 search misses symmetry mates
    nn = _true_knn(q, 6, "D2")
    d = np.asarray(symmetric_quat_distance(q[:, None], q[None], "D2"))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(np.sort(d, 1)[:, :6], np.take_along_axis(d, nn, 1), atol=1e-6)
