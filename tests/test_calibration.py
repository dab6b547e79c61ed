"""σ(d̂): binned spread of the true distance, monotone, saved with the model; confidence weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core.learning.calibration import (
    MIN_SIGMA,
    DistanceCalibration,
    fit_calibration,
    monotone_increasing,
)
from cryoorient_ray.errors import CryoOrientError


def test_pool_adjacent_violators_against_brute_force():
    v = torch.tensor([1.0, 3.0, 2.0, 2.5, 0.5, 4.0], dtype=torch.float64)
    c = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    out = monotone_increasing(v, c)
    assert torch.all(out[1:] >= out[:-1])
    # the weighted least-squares optimum: no non-decreasing perturbation does better
    best = float((c * (out - v) ** 2).sum())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        cand = torch.cummax(out + 0.3 * torch.randn(6, generator=gen, dtype=torch.float64), 0).values
        assert float((c * (cand - v) ** 2).sum()) >= best - 1e-9
    np.testing.assert_array_equal(monotone_increasing(torch.arange(4.0), torch.ones(4)).numpy(), [0, 1, 2, 3])


def test_spread_grows_where_the_estimate_is_noisier():
    rng = np.random.default_rng(0)
    d_true = rng.uniform(0, np.pi, 6000)
    noise = 0.05 + 0.3 * d_true / np.pi  # σ from 0.05 to 0.35 rad
    d_hat = np.clip(d_true + rng.normal(size=d_true.shape) * noise, 0, np.pi)
    cal = fit_calibration(d_hat, d_true, n_bins=10)
    assert len(cal.centers) == 10 and sum(cal.counts) == 6000
    assert np.all(np.diff(cal.sigma) >= 0) and min(cal.sigma) >= MIN_SIGMA
    s = cal.spread(np.array([0.3, 1.5, 2.8]))
    assert 0.03 < s[0] < 0.15 and 0.15 < s[1] < 0.3 and s[2] > 0.25
    w = cal.weights(np.array([0.3, 1.5, 2.8]))
    assert w[0] > w[1] > w[2] and w.mean() == pytest.approx(1.0)
    # numpy in, numpy out; torch in, torch out; beyond the bins: constant
    t = cal.spread(torch.tensor([-1.0, 10.0]))
    assert isinstance(t, torch.Tensor) and float(t[0]) == pytest.approx(cal.sigma[0])
    assert float(t[1]) == pytest.approx(cal.sigma[-1])
    back = DistanceCalibration.from_dict(cal.to_dict())
    assert back == cal


def test_spread_may_fall_with_the_estimate_when_small_ones_are_false_neighbours():
    rng = np.random.default_rng(1)
    d_true = rng.uniform(0, np.pi, 6000)
    d_hat = d_true + rng.normal(size=d_true.shape) * 0.05
    false = rng.random(6000) < 0.3  # 30 % false neighbours: small d̂ for any true distance
    d_hat = np.where(false, rng.uniform(0, 1.0, 6000), d_hat).clip(0, np.pi)
    cal = fit_calibration(d_hat, d_true, n_bins=10)
    assert np.all(np.diff(cal.sigma) <= 0) and cal.sigma[0] > 1.0 and cal.sigma[-1] < 0.1
    w = cal.weights(np.array([0.2, 2.5]))
    assert w[1] > 20 * w[0]


def test_an_exact_estimate_gets_the_floor_and_bad_input_is_an_error():
    d = np.linspace(0, 3, 100)
    cal = fit_calibration(d, d, n_bins=50)  # 100 pairs: 5 bins of 20
    assert len(cal.sigma) == 5 and set(cal.sigma) == {MIN_SIGMA}
    with pytest.raises(CryoOrientError, match="at least 20"):
        fit_calibration(d[:10], d[:10])
    with pytest.raises(CryoOrientError, match="NaN"):
        fit_calibration(np.full(30, np.nan), np.zeros(30))
    with pytest.raises(CryoOrientError, match="differ"):
        fit_calibration(d, d[:50])
    with pytest.raises(CryoOrientError, match="malformed"):
        DistanceCalibration.from_dict({"centers": [0.1], "sigma": [0.0], "counts": [3]})
