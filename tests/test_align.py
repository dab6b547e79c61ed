"""Orientation alignment: E_OR over O(4) (the paper's metric) and the peers' registration."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cryoorient_ray.core import (
    quat_conjugate,
    quat_distance,
    quat_product,
    sample_orientations,
    symmetric_quat_distance,
    symmetry_group,
)
from cryoorient_ray.core.recovery.align import align_o4, align_rotation, orientation_errors
from cryoorient_ray.errors import CryoOrientError

Z = np.array([0.0, 0.0, 0.0, 1.0])  # Rz(π)


def _random_o4(q: np.ndarray, conjugate: bool, rng: np.random.Generator) -> np.ndarray:
    """``c ⊗ q ⊗ d`` or ``c ⊗ q* ⊗ d`` for random unit ``c, d``, with a random sign per row."""
    c, d = sample_orientations(2, seed=rng)
    src = quat_conjugate(q) if conjugate else q
    out = quat_product(quat_product(c, src), d)
    return out * rng.choice([-1.0, 1.0], size=(len(q), 1))


def _perturb(q: np.ndarray, deg: float, rng: np.random.Generator) -> np.ndarray:
    """``q_i ⊗ n_i`` with ``n_i`` a rotation by ``deg`` degrees about a random axis."""
    axis = rng.standard_normal((len(q), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = np.radians(deg) / 2
    noise = np.concatenate([np.full((len(q), 1), np.cos(half)), np.sin(half) * axis], axis=1)
    return quat_product(q, noise)


def _noisy(q: np.ndarray, rng: np.random.Generator, deg: float = 10.0, outliers: float = 0.1) -> np.ndarray:
    out = _perturb(q, deg, rng)
    bad = rng.random(len(q)) < outliers
    out[bad] = sample_orientations(int(bad.sum()), seed=rng)
    return out


@pytest.mark.parametrize("conjugate", [False, True])
def test_o4_recovers_exact_transform(conjugate):
    rng = np.random.default_rng(1)
    truth = sample_orientations(500, seed=rng)
    est = _random_o4(truth, conjugate, rng)
    res = align_o4(truth, est)
    assert res.mean < 1e-4 and res.errors.shape == (500,)
    assert res.conjugate is conjugate
    assert np.max(quat_distance(res.apply(est), truth)) < 1e-4
    # the closed form alone is already exact on exact data
    assert align_o4(truth, est, refine=False).mean < 1e-4


def test_registration_removes_object_rotation_and_hand():
    rng = np.random.default_rng(2)
    truth = sample_orientations(500, seed=rng)
    g = sample_orientations(1, seed=rng)[0]
    # R̂_i = R_i G: the estimates of a rotated map
    est = quat_product(truth, g) * rng.choice([-1.0, 1.0], size=(500, 1))
    res = align_rotation(truth, est)
    assert res.mean < 1e-6 and res.hand == "same"
    assert np.max(quat_distance(res.apply(est), truth)) < 1e-6
    assert quat_distance(res.g, quat_conjugate(g)) < 1e-6  # R_i = R̂_i G⁻¹
    # the mirrored hand: R̂ = J (R G) J, J = diag(1, 1, -1), i.e. q̂ = z ⊗ q ⊗ g ⊗ z
    mirrored = quat_product(quat_product(Z, quat_product(truth, g)), Z)
    res = align_rotation(truth, mirrored)
    assert res.mean < 1e-6 and res.hand == "mirrored" and res.mirrored
    assert np.max(quat_distance(res.apply(mirrored), truth)) < 1e-6
    assert align_rotation(truth, mirrored, allow_mirror=False).mean > 0.3
    # registration is a special case of O(4)
    assert align_o4(truth, mirrored).mean < 1e-4


def test_registration_cannot_remove_a_left_rotation():
    rng = np.random.default_rng(3)
    truth = sample_orientations(500, seed=rng)
    tilt = np.array([np.cos(np.pi / 4), np.sin(np.pi / 4), 0.0, 0.0])  # 90° about x: tilts every view
    est = quat_product(tilt, truth)
    assert align_rotation(truth, est).mean > 0.3
    assert align_o4(truth, est).mean < 1e-4
    report = orientation_errors(truth, est)
    assert report["e_or_o4"] < 1e-4 < 0.3 < report["registration"]


@pytest.mark.parametrize("conjugate", [False, True])
def test_o4_robust_to_noise_and_outliers(conjugate):
    rng = np.random.default_rng(4 + conjugate)
    truth = sample_orientations(500, seed=rng)
    noisy = _noisy(truth, rng)  # 10° per image, 10 % uniform outliers
    err_true_transform = quat_distance(truth, noisy).mean()  # what the true O(4) leaves
    res = align_o4(truth, _random_o4(noisy, conjugate, rng))
    assert res.conjugate is conjugate
    assert res.mean < err_true_transform + 0.01
    assert res.median < np.radians(12)
    # registration of a rotated map with the same noise
    reg = align_rotation(truth, quat_product(noisy, sample_orientations(1, seed=rng)[0]))
    assert reg.mean < err_true_transform + 0.01 and reg.hand == "same"


@pytest.mark.parametrize("name", ["C2", "D2", "T"])
@pytest.mark.parametrize("conjugate", [False, True])
def test_o4_with_point_group(name, conjugate):
    rng = np.random.default_rng(6)
    truth = sample_orientations(400, seed=rng)
    group = symmetry_group(name).quaternions
    g_i = group[rng.integers(0, len(group), len(truth))]
    est = _random_o4(quat_product(truth, g_i), conjugate, rng)
    res = align_o4(truth, est, symmetry=name)
    assert res.mean < 1e-4 and res.symmetry == name
    assert np.max(symmetric_quat_distance(truth, res.apply(est), name)) < 1e-4
    assert align_o4(truth, est, symmetry="C1").mean > 0.3  # the g_i are not removable without the group


def test_o4_with_point_group_and_noise():
    rng = np.random.default_rng(7)
    truth = sample_orientations(400, seed=rng)
    group = symmetry_group("D2").quaternions
    noisy = _noisy(truth, rng, deg=20.0)
    est = _random_o4(quat_product(noisy, group[rng.integers(0, 4, len(truth))]), False, rng)
    res = align_o4(truth, est, symmetry="D2")
    assert res.mean < symmetric_quat_distance(truth, noisy, "D2").mean() + 0.01


def test_o4_error_is_invariant_under_transforming_the_truth():
    rng = np.random.default_rng(8)
    truth = sample_orientations(300, seed=rng)
    est = _random_o4(_noisy(truth, rng), False, rng)
    base = align_o4(truth, est).mean
    g, h = sample_orientations(2, seed=rng)
    assert abs(align_o4(quat_product(quat_product(g, truth), h), est).mean - base) < 1e-6
    assert abs(align_o4(quat_conjugate(truth), est).mean - base) < 1e-6
    # with a point group only left multiplications (and the group's normaliser) act on the truth
    group = symmetry_group("C2").quaternions
    est = _random_o4(quat_product(_noisy(truth, rng), group[rng.integers(0, 2, len(truth))]), True, rng)
    base = align_o4(truth, est, symmetry="C2").mean
    assert abs(align_o4(quat_product(g, truth), est, symmetry="C2").mean - base) < 1e-6


def test_torch_input_and_report():
    rng = np.random.default_rng(9)
    truth = sample_orientations(200, seed=rng)
    est = _random_o4(_noisy(truth, rng), True, rng)
    res = align_o4(torch.tensor(truth, dtype=torch.float32), torch.tensor(est, dtype=torch.float32))
    assert isinstance(res.errors, np.ndarray) and res.errors.dtype == np.float64
    mapped = res.apply(torch.tensor(est))
    assert isinstance(mapped, torch.Tensor) and mapped.shape == (200, 4)
    report = orientation_errors(truth, est)
    assert set(report) >= {
        "e_or_o4",
        "e_or_o4_median",
        "registration",
        "registration_median",
        "hand",
        "o4_component",
    }
    assert report["o4_component"] == "conjugate" and report["hand"] in ("same", "mirrored")
    assert report["e_or_o4"] <= report["registration"] + 1e-9
    assert abs(report["e_or_o4"] - res.mean) < 1e-4  # float32 input vs float64


def test_timing_n1650():
    rng = np.random.default_rng(10)
    truth = sample_orientations(1650, seed=rng)
    est = _random_o4(_noisy(truth, rng, deg=20.0), False, rng)
    start = time.perf_counter()
    res = align_o4(truth, est)
    elapsed = time.perf_counter() - start
    print(f"align_o4, N=1650: {elapsed:.3f} s, E_OR = {np.degrees(res.mean):.2f}°")
    assert elapsed < 20.0


@pytest.mark.parametrize(
    "q_true,q_est,match",
    [
        (np.ones((5, 4)), np.ones((6, 4)), "same length"),
        (np.ones((5, 4)), np.ones((5, 3)), r"shape \(N, 4\)"),
        (np.ones((2, 4)), np.ones((2, 4)), "at least 3"),
        (np.ones((5, 4)), np.where(np.eye(5, 4) > 0, np.nan, 1.0), "NaN"),
        (np.zeros((5, 4)), np.ones((5, 4)), "zero"),
    ],
)
def test_bad_input(q_true, q_est, match):
    for fn in (align_o4, align_rotation):
        with pytest.raises(CryoOrientError, match=match):
            fn(q_true, q_est)


def test_plot_error_histogram(tmp_path):
    from cryoorient_ray.plots import plot_error_histogram

    rng = np.random.default_rng(11)
    out = plot_error_histogram(
        {"E_OR": rng.uniform(0, 0.3, 100), "registration": rng.uniform(0, 1, 100)}, tmp_path / "err.png", "test"
    )
    assert out == tmp_path / "err.png" and out.stat().st_size > 1000
