"""The spectral start on SO(3)/D2 (core/recovery/spectral.py) and its use in recover_symmetric."""

from __future__ import annotations

import numpy as np
import pytest

from cryoorient_ray.core.geometry.quaternion import quat_product, unitquat_to_rotmat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance, symmetry_group
from cryoorient_ray.core.recovery.align import align_o4
from cryoorient_ray.core.recovery.graph import build_pair_graph
from cryoorient_ray.core.recovery.solver import RecoverySettings, check_distances
from cryoorient_ray.core.recovery.spectral import (
    d2_features,
    spectral_embedding,
    spectral_start,
    spectral_supported,
)
from cryoorient_ray.core.recovery.symmetric import recover_symmetric
from cryoorient_ray.errors import CryoOrientError


def _d2_matrix(q: np.ndarray) -> np.ndarray:
    p = len(q)
    i, j = np.repeat(np.arange(p), p), np.tile(np.arange(p), p)
    return np.asarray(symmetric_quat_distance(q[i], q[j], "D2"), dtype=np.float64).reshape(p, p)


def test_d2_features_are_invariant_under_the_group_and_give_the_diagonal_kernel():
    q = sample_orientations(50, seed=3)
    r = np.asarray(unitquat_to_rotmat(q))
    f = d2_features(r)
    np.testing.assert_allclose((f * f).sum(1), 2.0, atol=1e-12)
    for g in symmetry_group("D2").quaternions:
        mates = quat_product(q, np.broadcast_to(g, q.shape))
        np.testing.assert_allclose(d2_features(np.asarray(unitquat_to_rotmat(mates))), f, atol=1e-12)
    m = np.einsum("pji,qjk->pqik", r, r)  # R_pᵀ R_q
    diag = (np.diagonal(m, axis1=2, axis2=3) ** 2).sum(-1)
    np.testing.assert_allclose(f @ f.T, diag - 1.0, atol=1e-12)
    # not invariant under a rotation outside the group: the features do tell the mates of D2 apart
    other = quat_product(q, np.broadcast_to(np.array([np.cos(0.4), np.sin(0.4), 0.0, 0.0]), q.shape))
    assert np.abs(d2_features(np.asarray(unitquat_to_rotmat(other))) - f).max() > 0.1


def test_the_embedding_of_exact_d2_distances_spans_the_features():
    q = sample_orientations(400, seed=0)
    v, ev = spectral_embedding(_d2_matrix(q), k=12)
    f = d2_features(np.asarray(unitquat_to_rotmat(q)))
    basis = np.linalg.qr(f)[0]
    cosines = np.linalg.svd(basis.T @ v[:, :10] / np.linalg.norm(v[:, :10], axis=0), compute_uv=False)
    assert cosines.min() > 0.98
    assert ev[9] > 3.0 * ev[10]  # a gap after the band's 10


@pytest.mark.timeout(240)
def test_spectral_start_recovers_noisy_d2_distances_up_to_the_gauge():
    # exact distances through the spectral start: the recover_symmetric test below
    q = sample_orientations(400, seed=1)
    d = _d2_matrix(q)
    noisy = np.clip(d + np.random.default_rng(0).normal(0.0, 0.2, d.shape), 0.0, np.pi)
    start = spectral_start(0.5 * (noisy + noisy.T), "D2", dims=(10,), starts=16, steps=200, seed=0)
    assert start.dims == 10 and start.quaternions.shape == (400, 4)
    # measured 0.055 (exact distances: 0.044); random orientations score 1.24
    assert align_o4(q, start.quaternions, symmetry="D2").mean < 0.15
    assert 0.015 < start.residual < 0.04  # the symmetrised noise alone: 0.02 rad²


def test_spectral_start_refuses_what_it_cannot_do():
    assert spectral_supported("D2") and not spectral_supported("C1") and not spectral_supported("D3")
    with pytest.raises(CryoOrientError, match="no feature map"):
        spectral_start(np.zeros((80, 80)), "C2")
    with pytest.raises(CryoOrientError, match="square"):
        spectral_start(np.zeros((80, 40)), "D2")
    with pytest.raises(CryoOrientError, match="spectral must be"):
        recover_symmetric(80, [0], [1], [0.1], lambda a, b: np.zeros(len(a)), "D2", spectral="yes")
    with pytest.raises(CryoOrientError, match="needs point group D2"):
        recover_symmetric(80, [0], [1], [0.1], lambda a, b: np.zeros(len(a)), "C2", spectral="only")


@pytest.mark.timeout(300)
def test_recover_symmetric_from_the_spectral_start_with_a_subset_and_trilateration():
    p = 300
    q = sample_orientations(p, seed=2)
    g = build_pair_graph(q, k=8, n_random=10, metric="quaternion", seed=2)
    d = check_distances(np.asarray(symmetric_quat_distance(q[g.i], q[g.j], "D2")))

    def dist(a, b):
        return np.asarray(symmetric_quat_distance(q[a], q[b], "D2"))

    # 200 of the 300 in the spectral start; the other 100 trilaterated from 32 of them
    res, start = recover_symmetric(
        p, g.i, g.j, d, dist, "D2", RecoverySettings(seed=0), spectral="only", spectral_nodes=200
    )
    assert start.kind == "spectral" and start.spectral.quaternions.shape == (200, 4)
    assert np.isfinite(start.spectral_graph_residual) and np.isnan(start.graph_residual)
    assert align_o4(q, res.quaternions, symmetry="D2").mean < 0.01
