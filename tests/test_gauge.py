"""The physical gauge: from the images alone, undo an extra left rotation / conjugation of the estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.density.phantom import pseudo_protein
from cryoorient_ray.core.geometry.quaternion import quat_conjugate, quat_distance, quat_product, unitquat_to_rotmat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.fourier import fourier_crop
from cryoorient_ray.core.imaging.projection import FourierSliceProjector
from cryoorient_ray.core.recovery.align import align_o4, align_rotation
from cryoorient_ray.core.recovery.gauge import crossval_score_fn, inplane_angles, resolve_gauge
from cryoorient_ray.core.recovery.graph import build_pair_graph


@pytest.fixture(scope="module")
def noiseless_set():
    torch.set_num_threads(1)
    vol = pseudo_protein(box_size=24, voxel_size=8.0, shape="dumbbell").data.astype(np.float32)
    q = sample_orientations(360, seed=3)
    imgs = FourierSliceProjector(vol)(unitquat_to_rotmat(q).astype(np.float32))
    g = build_pair_graph(q, k=8, n_random=0, metric="quaternion")
    return q, imgs, (g.i, g.j, quat_distance(q[g.i], q[g.j]))


def test_inplane_angle_of_rotated_images():
    vol = pseudo_protein(box_size=24, voxel_size=8.0, shape="dumbbell").data.astype(np.float32)
    q = sample_orientations(6, seed=1)
    psi = np.radians([-30.0, -12.5, 0.0, 7.0, 20.0, 33.0])
    rz = np.stack([np.cos(psi / 2), 0 * psi, 0 * psi, np.sin(psi / 2)], 1)  # Rz(ψ), left = in-plane
    proj = FourierSliceProjector(vol)
    a = proj(unitquat_to_rotmat(q).astype(np.float32))
    b = proj(unitquat_to_rotmat(quat_product(rz, q)).astype(np.float32))
    both = np.concatenate([a, b])
    est, peak = inplane_angles(both, np.arange(6), np.arange(6) + 6)
    assert np.degrees(np.abs(est - psi)).max() < 1.0
    assert (peak > 0.9).all()


@pytest.mark.parametrize("conjugate", [False, True])
def test_gauge_recovers_a_known_left_rotation(noiseless_set, conjugate):
    q, imgs, pairs = noiseless_set
    rng = np.random.default_rng(5)
    a, b = sample_orientations(2, seed=rng)
    est = quat_conjugate(q) if conjugate else q
    est = quat_product(quat_product(np.broadcast_to(a, q.shape), est), np.broadcast_to(b, q.shape))
    # distances cannot tell: O(4) error 0, but not a physical solution (registration error large)
    assert align_o4(q, est).mean < 1e-6
    assert align_rotation(q, est).mean > 0.3
    res = resolve_gauge(imgs, est, pairs, score_fn=crossval_score_fn(imgs), phi_steps=12, polish_rounds=3)
    assert res.conjugate == conjugate
    assert res.axis_residual < res.axis_residual_other
    fixed = res.apply(est)
    reg = align_rotation(q, fixed)
    assert reg.mean < 0.03  # physical up to object rotation and hand


def test_fourier_crop_keeps_low_frequencies():
    x = torch.randn(3, 32, 32)
    y = fourier_crop(x, 16)
    assert y.shape == (3, 16, 16)
    assert torch.allclose(y.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5)
    assert fourier_crop(x, 40) is x or torch.equal(fourier_crop(x, 40), x)


def test_gauge_refuses_too_few_pairs(noiseless_set):
    from cryoorient_ray.errors import CryoOrientError

    q, imgs, _ = noiseless_set
    with pytest.raises(CryoOrientError, match="too few"):
        resolve_gauge(imgs, q, (np.array([0]), np.array([1]), np.array([0.1])))
    with pytest.raises(CryoOrientError, match="images"):
        resolve_gauge(imgs, q[:10], (np.array([0]), np.array([1]), np.array([0.1])))
    assert math.isfinite(float(np.sum(imgs)))


def test_phi_candidates_one_when_clear_all_close_peaks_otherwise():
    from cryoorient_ray.core.recovery.gauge import _phi_candidates

    grid = np.arange(8) * (math.pi / 8)
    clear = np.array([0.1, 0.2, 0.9, 0.3, 0.1, 0.2, 0.4, 0.1])
    assert _phi_candidates(grid, clear, margin=0.05) == [float(grid[2])]
    close = np.array([0.1, 0.2, 0.9, 0.3, 0.1, 0.2, 0.88, 0.1])
    assert _phi_candidates(grid, close, margin=0.05) == [float(grid[2]), float(grid[6])]
    wrap = np.array([0.8, 0.2, 0.1, 0.1, 0.1, 0.1, 0.3, 0.85])  # circular: 7 and 0 are neighbours
    assert _phi_candidates(grid, wrap, margin=0.1) == [float(grid[7])]


def test_crossval_score_subset_takes_all_rotations_and_checks_options(noiseless_set):
    from cryoorient_ray.errors import CryoOrientError

    q, imgs, _ = noiseless_set
    r = unitquat_to_rotmat(q)
    small = crossval_score_fn(imgs, image_size=12, max_images=120)
    right = small(r)
    wrong = small(unitquat_to_rotmat(quat_product(np.broadcast_to(sample_orientations(1, seed=9)[0], q.shape), q)))
    assert right > 0.9 and right > wrong + 0.05
    with pytest.raises(CryoOrientError, match="max_images"):
        crossval_score_fn(imgs, max_images=2)
    with pytest.raises(CryoOrientError, match="image_size"):
        crossval_score_fn(imgs, image_size=4)


def test_gauge_with_a_cheap_coarse_search(noiseless_set):
    q, imgs, pairs = noiseless_set
    a, b = sample_orientations(2, seed=np.random.default_rng(7))
    est = quat_product(quat_product(np.broadcast_to(a, q.shape), q), np.broadcast_to(b, q.shape))
    search = crossval_score_fn(imgs, image_size=12, max_images=150)
    score = crossval_score_fn(imgs, image_size=16, max_images=300)
    res = resolve_gauge(imgs, est, pairs, score_fn=score, phi_steps=12, polish_rounds=2, search_score_fn=search)
    assert not res.conjugate
    assert align_rotation(q, res.apply(est)).mean < 0.03
