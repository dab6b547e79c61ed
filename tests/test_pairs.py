"""Pair candidates and the uniform resampling of distances (paper, Appendix A)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from cryoorient_ray.core import quat_distance, sample_orientations
from cryoorient_ray.core.imaging.parameters import assign_splits, sample_projection_parameters, sample_shifts
from cryoorient_ray.core.learning.pairs import candidate_pairs, uniform_resample


def test_candidates_stay_within_groups():
    groups = np.array([0, 0, 1, 1, 1, 2])
    i, j = candidate_pairs(groups)
    assert len(i) == 1 + 3  # C(2,2) + C(3,2); a singleton makes no pair
    assert np.all(groups[i] == groups[j]) and np.all(i < j)
    i2, _ = candidate_pairs(np.zeros(100), max_pairs=50, rng=np.random.default_rng(0))
    assert len(i2) == 50


def test_uniform_resampling_flattens_skewed_distances():
    q = sample_orientations(600, seed=1)
    i, j = candidate_pairs(np.zeros(600))
    d = quat_distance(q[i], q[j])
    # the natural histogram is far from uniform...
    assert stats.kstest(d / np.pi, "uniform").pvalue < 1e-10
    pick = uniform_resample(d, 20000, n_bins=32, rng=np.random.default_rng(2))
    counts, _ = np.histogram(d[pick], bins=32, range=(0, np.pi))
    # ...and the resampled one is flat: every bin within 1 % of the mean count
    assert counts.min() >= 0.99 * counts.mean() and counts.max() <= 1.01 * counts.mean()
    # and flat on bins it was not stratified on (10 bins, edges not aligned with the 32)
    coarse, _ = np.histogram(d[pick], bins=10, range=(0, np.pi))
    assert np.abs(coarse / coarse.mean() - 1).max() < 0.05, coarse


def test_resampling_edge_cases():
    assert uniform_resample(np.array([]), 10).size == 0
    pick = uniform_resample(np.array([0.1, 0.1, 3.0]), 10, n_bins=4, rng=np.random.default_rng(0))
    assert len(pick) == 10 and set(pick) <= {0, 1, 2}


def test_parameters_are_deterministic_and_split_as_asked():
    a = sample_projection_parameters(300, seed=3, protein=1, max_shift=4, ctf={"defocus_min": 1e4, "defocus_max": 2e4})
    b = sample_projection_parameters(300, seed=3, protein=1, max_shift=4, ctf={"defocus_min": 1e4, "defocus_max": 2e4})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["quaternion"], sample_projection_parameters(300, seed=3, protein=2)["quaternion"])
    assert np.abs(a["shift"]).max() <= 4
    assert np.all(a["defocus_u"] >= a["defocus_v"]) and a["defocus_u"].min() >= 1e4 - 250
    counts = np.bincount(a["split"], minlength=3)
    np.testing.assert_array_equal(counts, [150, 51, 99])
    codes = assign_splits(10, (1.0, 0.0, 0.0), np.random.default_rng(0))
    assert np.all(codes == 0)


def test_triangular_shifts_have_the_triangular_law():
    s = sample_shifts(20000, 5.0, "triangular", np.random.default_rng(0))
    assert stats.kstest(s[:, 0], stats.triang(c=0.5, loc=-5, scale=10).cdf).pvalue > 0.01
