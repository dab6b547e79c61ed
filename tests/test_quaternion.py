"""Quaternion conversions and the orientation distance d_q: invariants, not snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoorient_ray.core import (
    pairwise_quat_distance,
    quat_canonicalize,
    quat_conjugate,
    quat_distance,
    quat_normalize,
    quat_product,
    quat_wxyz_to_xyzw,
    quat_xyzw_to_wxyz,
    rotation_angle,
    rotmat_to_unitquat,
    sample_orientations,
    unitquat_to_rotmat,
)
from cryoorient_ray.errors import CryoOrientError

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _rand(n, seed=0, dtype=np.float64):
    return sample_orientations(n, seed=seed).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotmat_roundtrip(dtype):
    q = _rand(500, 1, dtype)
    r = unitquat_to_rotmat(q)
    assert r.dtype == dtype and r.shape == (500, 3, 3)
    # proper rotations
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=10 * TOL[dtype])
    np.testing.assert_allclose(np.linalg.det(r.astype(np.float64)), 1.0, atol=10 * TOL[dtype])
    q2 = rotmat_to_unitquat(r)
    assert q2.dtype == dtype
    np.testing.assert_allclose(q2, quat_canonicalize(q), atol=10 * TOL[dtype])
    assert np.all(q2[:, 0] >= 0)


def test_matches_scipy_matrix():
    q = _rand(200, 2)
    ours = unitquat_to_rotmat(q)
    ref = Rotation.from_quat(quat_wxyz_to_xyzw(q)).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_reordering_roundtrip():
    q = _rand(10, 3)
    np.testing.assert_array_equal(quat_xyzw_to_wxyz(quat_wxyz_to_xyzw(q)), q)


def test_product_composes_rotations():
    a, b = _rand(100, 4), _rand(100, 5)
    np.testing.assert_allclose(
        unitquat_to_rotmat(quat_product(a, b)), unitquat_to_rotmat(a) @ unitquat_to_rotmat(b), atol=1e-12
    )
    # conjugate is the inverse
    ident = quat_canonicalize(quat_product(a, quat_conjugate(a)))
    np.testing.assert_allclose(ident, np.tile([1.0, 0, 0, 0], (100, 1)), atol=1e-12)


def test_torch_in_torch_out_and_numpy_in_numpy_out():
    q = _rand(4, 6)
    assert isinstance(quat_distance(q, q[::-1]), np.ndarray)
    t = torch.from_numpy(q).float()
    out = quat_distance(t, t.flip(0))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_is_a_metric(dtype):
    a, b, c = _rand(2000, 7, dtype), _rand(2000, 8, dtype), _rand(2000, 9, dtype)
    dab, dba = quat_distance(a, b), quat_distance(b, a)
    np.testing.assert_array_equal(dab, dba)
    assert np.all(dab >= 0) and np.all(dab <= math.pi + 1e-6)
    slack = 1e-5 if dtype == np.float32 else 1e-12
    assert np.all(quat_distance(a, c) <= dab + quat_distance(b, c) + slack)
    np.testing.assert_allclose(quat_distance(a, a), 0.0, atol=slack)
    np.testing.assert_allclose(quat_distance(a, -a), 0.0, atol=slack)  # double cover
    np.testing.assert_allclose(quat_distance(a, -b), dab, atol=slack)


def test_distance_equals_arccos_form_and_rotation_angle():
    a, b = _rand(1000, 10), _rand(1000, 11)
    ref = 2 * np.arccos(np.clip(np.abs(np.sum(a * b, -1)), 0, 1))
    np.testing.assert_allclose(quat_distance(a, b), ref, atol=1e-7)
    # d(a, b) is the angle of the relative rotation b* ⊗ a, which scipy also knows
    rel = quat_product(quat_conjugate(b), a)
    np.testing.assert_allclose(rotation_angle(rel), quat_distance(a, b), atol=1e-12)
    scipy_angle = Rotation.from_quat(quat_wxyz_to_xyzw(rel)).magnitude()
    np.testing.assert_allclose(quat_distance(a, b), scipy_angle, atol=1e-12)


def test_distance_bi_invariant():
    a, b = _rand(500, 12), _rand(500, 13)
    left, right = _rand(1, 14), _rand(1, 15)
    d = quat_distance(a, b)
    np.testing.assert_allclose(quat_distance(quat_product(left, a), quat_product(left, b)), d, atol=1e-12)
    np.testing.assert_allclose(quat_distance(quat_product(a, right), quat_product(b, right)), d, atol=1e-12)


def test_distance_accurate_for_small_angles_in_float32():
    # arccos loses everything below ~5e-4 rad in float32; the atan2 form must not.
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    for angle in (1e-5, 1e-4, 1e-3):
        rot = np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * axis])
        q = _rand(50, 16)
        q2 = quat_product(q, rot)
        d = quat_distance(q.astype(np.float32), q2.astype(np.float32))
        np.testing.assert_allclose(d, angle, rtol=0.05, atol=2e-6)


def test_distance_gradients_are_finite_at_0_and_pi():
    q = torch.tensor(_rand(3, 17), requires_grad=True)
    # identical, antipodal (same rotation), and at distance exactly π
    pi_partner = quat_product(q.detach(), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    partners = torch.stack([q.detach()[0], -q.detach()[1], pi_partner[2]])
    d = quat_distance(q, partners)
    np.testing.assert_allclose(d.detach().numpy(), [0.0, 0.0, math.pi], atol=1e-7)
    d.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_distance_gradient_matches_finite_differences():
    a = torch.tensor(_rand(5, 18), requires_grad=True)
    b = torch.tensor(_rand(5, 19))
    assert torch.autograd.gradcheck(lambda x: quat_distance(x, b), (a,))


def test_normalize_and_pairwise():
    q = _rand(30, 20)
    np.testing.assert_allclose(quat_normalize(3.0 * q), q, atol=1e-12)
    dm = pairwise_quat_distance(q)
    assert dm.shape == (30, 30)
    np.testing.assert_allclose(dm, dm.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(dm), 0.0, atol=1e-7)
    np.testing.assert_allclose(dm[3, 7], quat_distance(q[3], q[7]), atol=1e-12)


def test_canonicalize_tie_breaking():
    q = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0], [-0.5, 0.5, 0.5, 0.5]])
    c = quat_canonicalize(q)
    np.testing.assert_array_equal(c, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.5, -0.5, -0.5, -0.5]])


@pytest.mark.parametrize(
    "fn,arg",
    [
        (quat_normalize, np.zeros((3, 3))),
        (unitquat_to_rotmat, np.zeros(5)),
        (rotmat_to_unitquat, np.zeros((4, 4))),
        (pairwise_quat_distance, np.zeros(4)),
    ],
)
def test_bad_shapes_raise_clear_errors(fn, arg):
    with pytest.raises(CryoOrientError, match="shape|takes"):
        fn(arg)
