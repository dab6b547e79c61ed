"""Point groups: order, closure, and the symmetry-aware distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core import (
    quat_canonicalize,
    quat_conjugate,
    quat_distance,
    quat_product,
    rotation_angle,
    sample_orientations,
    symmetric_quat_distance,
    symmetry_group,
)
from cryoorient_ray.errors import CryoOrientError

ORDERS = {"C1": 1, "C2": 2, "C5": 5, "C12": 12, "D1": 2, "D2": 4, "D3": 6, "D7": 14, "T": 12, "O": 24, "I": 60}


def _as_set(q):
    # round before canonicalising, so a w of ±1e-17 counts as 0 and cannot flip the sign
    return {tuple(np.round(x, 8)) for x in quat_canonicalize(np.round(q, 8) + 0.0)}


@pytest.mark.parametrize("name,order", ORDERS.items())
def test_order_identity_and_closure(name, order):
    g = symmetry_group(name).quaternions
    assert g.shape == (order, 4)
    assert (1.0, 0.0, 0.0, 0.0) in _as_set(g)
    elements = _as_set(g)
    assert len(elements) == order  # all distinct rotations
    products = quat_product(g[:, None, :], g[None, :, :]).reshape(-1, 4)
    assert _as_set(products) == elements  # closed under composition
    assert _as_set(quat_conjugate(g)) == elements  # closed under inverse


def test_axes_conventions():
    c4 = symmetry_group("c4").quaternions  # names are case-insensitive
    assert np.allclose(c4[:, 1:3], 0)  # rotations about z only
    d2 = symmetry_group("D2").quaternions
    assert any(np.allclose(np.abs(q), [0, 1, 0, 0]) for q in d2)  # 2-fold about x
    ico = symmetry_group("I").quaternions
    five_fold = ico[np.isclose(rotation_angle(ico), 2 * np.pi / 5)]
    axes = five_fold[:, 1:] / np.linalg.norm(five_fold[:, 1:], axis=1, keepdims=True)
    assert any(np.allclose(np.abs(a), [0.8507, 0, 0.5257], atol=1e-3) for a in axes)  # 5-fold in the xz plane


@pytest.mark.parametrize("name", ["C3", "D2", "T", "O", "I"])
def test_symmetric_distance_properties(name):
    grp = symmetry_group(name)
    a, b = sample_orientations(400, seed=1), sample_orientations(400, seed=2)
    d_g = symmetric_quat_distance(a, b, grp)
    d = quat_distance(a, b)
    assert np.all(d_g <= d + 1e-12)
    np.testing.assert_allclose(symmetric_quat_distance(a, b, name), symmetric_quat_distance(b, a, name), atol=1e-12)
    # q and q ⊗ g give the same projections: distance 0, and any partner sees them alike
    for g in grp.quaternions:
        np.testing.assert_allclose(symmetric_quat_distance(a, quat_product(a, g), grp), 0, atol=1e-7)
        np.testing.assert_allclose(symmetric_quat_distance(quat_product(a, g), b, grp), d_g, atol=1e-9)
    # the largest possible distance shrinks with the group
    assert d_g.max() < np.pi - 0.05 or name == "C3"


def test_c1_is_plain_distance_and_torch_grad():
    a, b = sample_orientations(50, seed=3), sample_orientations(50, seed=4)
    np.testing.assert_array_equal(symmetric_quat_distance(a, b, "C1"), quat_distance(a, b))
    t = torch.tensor(a, requires_grad=True)
    symmetric_quat_distance(t, torch.tensor(b), "O").sum().backward()
    assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("bad", ["C0", "X2", "D", "", "I2", "c-3"])
def test_unknown_groups(bad):
    with pytest.raises(CryoOrientError, match="unknown point group"):
        symmetry_group(bad)


@pytest.mark.parametrize(
    ("name", "normaliser", "outside"),
    [
        ("D2", (np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)), (np.cos(0.26), 0, 0, np.sin(0.26))),  # Rz(90°) / Rz(30°)
        ("C3", (np.cos(0.26), 0, 0, np.sin(0.26)), (np.cos(0.26), np.sin(0.26), 0, 0)),  # Rz(30°) / Rx(30°)
        ("I", (0, 0, 0, 1.0), (np.cos(0.26), 0, 0, np.sin(0.26))),  # Rz(180°) ∈ I / Rz(30°)
    ],
)
def test_what_symmetric_distances_leave_free(name, normaliser, outside):
    """The gauge with a point group (docs/SYMMETRY.md): left rotations and right ones by the
    normaliser keep every d_G; other right rotations and the conjugation do not."""
    from cryoorient_ray.core.geometry.quaternion import quat_conjugate

    q = sample_orientations(200, seed=11)
    i, j = np.arange(100), np.arange(100, 200)
    d = symmetric_quat_distance(q[i], q[j], name)

    def change(t):
        return float(np.abs(symmetric_quat_distance(t[i], t[j], name) - d).max())

    full = lambda x: np.broadcast_to(np.asarray(x, dtype=np.float64), q.shape)  # noqa: E731
    a = sample_orientations(1, seed=5)[0]
    assert change(quat_product(full(a), q)) < 1e-9
    assert change(quat_product(q, full(normaliser))) < 1e-9
    assert change(quat_product(q, full(outside))) > 0.1
    assert change(quat_conjugate(q)) > 0.1
