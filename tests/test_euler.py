"""RELION Euler angles: the ZYZ convention checked against RELION's formula and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoorient_ray.core import (
    euler_relion_to_rotmat,
    euler_relion_to_unitquat,
    quat_distance,
    rotmat_to_euler_relion,
    sample_orientations,
    unitquat_to_euler_relion,
    unitquat_to_rotmat,
    viewing_direction,
)


def relion_euler_angles2matrix(rot, tilt, psi):
    """Line-by-line transcription of RELION's Euler_angles2matrix (src/euler.cpp)."""
    alpha, beta, gamma = np.radians([rot, tilt, psi])
    ca, sa = np.cos(alpha), np.sin(alpha)
    cb, sb = np.cos(beta), np.sin(beta)
    cg, sg = np.cos(gamma), np.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    a = np.empty((3, 3))
    a[0, 0] = cg * cc - sg * sa
    a[0, 1] = cg * cs + sg * ca
    a[0, 2] = -cg * sb
    a[1, 0] = -sg * cc - cg * sa
    a[1, 1] = -sg * cs + cg * ca
    a[1, 2] = sg * sb
    a[2, 0] = sc
    a[2, 1] = ss
    a[2, 2] = cb
    return a


def _angles(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-180, 180, n), rng.uniform(1, 179, n), rng.uniform(-180, 180, n)], -1)


def test_matrix_matches_relion_and_scipy():
    ang = _angles(300)
    ours = euler_relion_to_rotmat(ang)
    relion = np.stack([relion_euler_angles2matrix(*a) for a in ang])
    np.testing.assert_allclose(ours, relion, atol=1e-12)
    scipy_ref = Rotation.from_euler("ZYZ", ang, degrees=True).inv().as_matrix()
    np.testing.assert_allclose(ours, scipy_ref, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 2e-3)])
def test_angles_roundtrip(dtype, tol):
    ang = _angles(300, 1).astype(dtype)
    back = rotmat_to_euler_relion(euler_relion_to_rotmat(ang))
    assert back.dtype == dtype
    diff = (back - ang + 180) % 360 - 180  # wrap rot/psi
    np.testing.assert_allclose(diff, 0, atol=tol)


def test_output_ranges_and_quaternion_roundtrip():
    q = sample_orientations(1000, seed=2)
    ang = unitquat_to_euler_relion(q)
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] <= 180))
    assert np.all(np.abs(ang[:, [0, 2]]) <= 180)
    np.testing.assert_allclose(quat_distance(euler_relion_to_unitquat(ang), q), 0, atol=1e-7)


def test_gimbal_lock_keeps_the_rotation():
    ang = np.array([[30.0, 0.0, 40.0], [30.0, 180.0, 40.0], [-75.0, 0.0, 10.0]])
    back = rotmat_to_euler_relion(euler_relion_to_rotmat(ang))
    assert np.all(back[:, 0] == 0)  # RELION puts the in-plane angle in psi
    np.testing.assert_allclose(euler_relion_to_rotmat(back), euler_relion_to_rotmat(ang), atol=1e-12)


def test_viewing_direction_is_relion_direction():
    ang = _angles(100, 3)
    rot, tilt = np.radians(ang[:, 0]), np.radians(ang[:, 1])
    expected = np.stack([np.cos(rot) * np.sin(tilt), np.sin(rot) * np.sin(tilt), np.cos(tilt)], -1)
    np.testing.assert_allclose(viewing_direction(euler_relion_to_unitquat(ang)), expected, atol=1e-12)
    # and the rotated map's beam axis: R(q) maps the viewing direction onto +z
    r = unitquat_to_rotmat(euler_relion_to_unitquat(ang))
    np.testing.assert_allclose(np.einsum("nij,nj->ni", r, expected), np.tile([0, 0, 1.0], (100, 1)), atol=1e-12)
