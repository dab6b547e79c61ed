"""Samplers checked statistically against their known distributions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cryoorient_ray.core import (
    quat_distance,
    rotation_angle,
    rotation_angle_cdf,
    rotation_angle_pdf,
    sample_orientations,
    unitquat_to_euler_relion,
    viewing_direction,
)
from cryoorient_ray.errors import CryoOrientError


def test_uniform_so3_rotation_angle_density():
    q = sample_orientations(20000, "uniform", "full", seed=0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    assert np.all(q[:, 0] >= 0)
    angles = rotation_angle(q)
    assert stats.kstest(angles, rotation_angle_cdf).pvalue > 0.01
    # and pair distances between independent draws follow the same law (bi-invariance)
    q2 = sample_orientations(20000, "uniform", "full", seed=1)
    assert stats.kstest(quat_distance(q, q2), rotation_angle_cdf).pvalue > 0.01


def test_the_test_can_fail():
    # Uniform Euler angles are *not* Haar: the same KS test must reject them.
    q = sample_orientations(20000, "euler", "full", seed=0)
    assert stats.kstest(rotation_angle(q), rotation_angle_cdf).pvalue < 1e-6


def test_pdf_integrates_to_one_and_matches_cdf():
    theta = np.linspace(0, np.pi, 20001)
    assert abs(np.trapezoid(rotation_angle_pdf(theta), theta) - 1) < 1e-6
    np.testing.assert_allclose(rotation_angle_cdf([0.0, np.pi]), [0.0, 1.0])


def test_restricted_uniform_has_uniform_directions_on_its_cap():
    q = sample_orientations(20000, "uniform", "half", seed=3)
    v = viewing_direction(q)
    assert np.all(v[:, 2] > 0)  # tilt < 90
    assert stats.kstest(v[:, 2], stats.uniform(0, 1).cdf).pvalue > 0.01  # cos(tilt) ~ U(0, 1)
    ang = unitquat_to_euler_relion(q)
    assert stats.kstest((ang[:, 2] + 180) / 360, stats.uniform(0, 1).cdf).pvalue > 0.01  # psi uniform


def test_quarter_coverage_and_euler_sampler():
    q = sample_orientations(20000, "euler", "quarter", seed=4)
    ang = unitquat_to_euler_relion(q)
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] < 90))
    assert np.all((ang[:, 0] >= -1e-9) & (ang[:, 0] < 180))
    assert stats.kstest(ang[:, 1] / 90, stats.uniform(0, 1).cdf).pvalue > 0.01  # tilt itself uniform


def test_seed_determinism_and_dtype():
    a = sample_orientations(10, seed=5)
    np.testing.assert_array_equal(a, sample_orientations(10, seed=5))
    assert not np.array_equal(a, sample_orientations(10, seed=6))
    assert sample_orientations(10, seed=5, dtype=np.float32).dtype == np.float32
    assert sample_orientations(0).shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs", [{"n": -1}, {"n": 3.5}, {"n": 5, "sampler": "gaussian"}, {"n": 5, "coverage": "third"}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(CryoOrientError):
        sample_orientations(**kwargs)
