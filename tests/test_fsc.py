"""Fourier shell correlation: exact self-correlation, noise, resolution crossing, masks, hand, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.reconstruction.fsc import FSCResult, best_hand, fsc, fsc_resolution, mirror_volume, soft_mask
from cryoorient_ray.errors import CryoOrientError


def blob_volume(d, seed=0):
    """A few Gaussian blobs (σ 1–2.5 voxels) off centre: no symmetry, so the mirror differs."""
    rng = np.random.default_rng(seed)
    ax = np.arange(d) - d // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((d, d, d))
    for _ in range(5):
        c = rng.uniform(-d / 5, d / 5, 3)
        s = rng.uniform(1.0, 2.5)
        vol += rng.uniform(0.5, 1.0) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol


def test_fsc_of_a_volume_with_itself_is_exactly_one():
    rng = np.random.default_rng(0)
    for vol in (rng.standard_normal((32, 32, 32)), blob_volume(33), np.zeros((8, 8, 8))):
        res = fsc(vol, vol, pixel_size=1.7)
        assert isinstance(res, FSCResult)
        d = vol.shape[0]
        assert res.fsc.shape == res.frequency.shape == (d // 2 + 1,)
        assert np.all(res.fsc == 1.0)
        assert res.frequency[0] == 0 and res.frequency[-1] == pytest.approx((d // 2) / (d * 1.7))
        assert res.resolution(0.5) == pytest.approx(1 / res.frequency[-1])  # never crosses: last shell
    assert fsc(np.ones((16, 16, 16)), np.ones((16, 16, 16))).fsc.tolist() == [1.0] * 9  # empty shells count as 1


def test_fsc_frequency_axis_and_shell_counts():
    res = fsc(np.random.default_rng(1).random((32, 32, 32)), np.random.default_rng(2).random((32, 32, 32)), 2.0)
    np.testing.assert_allclose(res.frequency, np.arange(17) / 64.0)
    assert res.frequency[-1] == pytest.approx(1 / (2 * 2.0))  # Nyquist = 1 / (2 · pixel size)
    assert res.n_voxels[0] == 1 and res.n_voxels[1] == 6 + 12  # |k| rounds to 1: 6 axes + 12 edges (√2 → 1)
    assert res.resolution_05 >= 4.0 and res.resolution_0143 >= 4.0
    summary = res.to_dict()
    assert summary["resolution_0.5"] == res.resolution(0.5) and len(summary["fsc"]) == 17


def test_fsc_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 32, 32, 32))
    res = fsc(a, b)
    assert abs(res.fsc[1:].mean()) < 0.1
    assert np.abs(res.fsc[4:]).max() < 0.25  # shells of ≥ 200 voxels: |FSC| ~ 1/√n
    # Correlated: a + small noise keeps the FSC high where the signal is.
    assert fsc(a, a + 0.1 * b).fsc.min() > 0.95


def test_fsc_sign_scale_and_torch_input():
    vol = blob_volume(24)
    assert np.allclose(fsc(vol, 3.0 * vol).fsc, 1.0)  # scale invariant
    assert np.allclose(fsc(vol, -vol).fsc, -1.0)
    res_t = fsc(torch.from_numpy(vol).float(), torch.from_numpy(vol).float())
    assert np.all(res_t.fsc == 1.0)


def test_fsc_rejects_bad_input():
    with pytest.raises(CryoOrientError, match="same size"):
        fsc(np.zeros((16, 16, 16)), np.zeros((18, 18, 18)))
    with pytest.raises(CryoOrientError, match="cubic"):
        fsc(np.zeros((16, 16, 15)), np.zeros((16, 16, 15)))
    with pytest.raises(CryoOrientError, match="pixel_size"):
        fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), pixel_size=0)
    with pytest.raises(CryoOrientError, match="NaN"):
        fsc(np.full((8, 8, 8), np.nan), np.zeros((8, 8, 8)))
    with pytest.raises(CryoOrientError, match="mask"):
        fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), mask=np.ones((4, 4, 4)))


def test_resolution_interpolates_the_first_crossing():
    freqs = np.arange(11) / 20.0  # pixel 1 Å, D = 20: shells 0 … 0.5 1/Å
    curve = np.array([1.0, 0.98, 0.9, 0.7, 0.6, 0.4, 0.3, 0.6, 0.1, 0.05, 0.0])
    # 0.5 is crossed between shells 4 (0.6) and 5 (0.4): halfway, f = 4.5 / 20.
    assert fsc_resolution(curve, freqs, 0.5) == pytest.approx(20 / 4.5)
    # 0.143 first crossed between shells 7 (0.6) and 8 (0.1): f = (7 + 0.457 / 0.5) / 20 — the
    # bump at shell 7 does not matter, the first fall below does.
    assert fsc_resolution(curve, freqs, 0.143) == pytest.approx(20 / (7 + (0.6 - 0.143) / 0.5))
    assert fsc_resolution(curve, freqs, 0.35) == pytest.approx(20 / 5.5)
    assert fsc_resolution(np.ones(11), freqs, 0.5) == pytest.approx(2.0)  # never crosses: Nyquist, 2 · pixel
    assert fsc_resolution(np.full(11, 0.1), freqs, 0.5) == math.inf  # below from the start
    assert fsc_resolution(torch.tensor(curve), torch.tensor(freqs), 0.5) == pytest.approx(20 / 4.5)
    with pytest.raises(CryoOrientError):
        fsc_resolution(curve[:-1], freqs, 0.5)
    with pytest.raises(CryoOrientError, match="increasing"):
        fsc_resolution(curve, freqs[::-1], 0.5)


def test_soft_mask():
    m = soft_mask(32, 8.0, 4.0)
    assert m.shape == (32, 32, 32) and m.dtype == np.float32
    assert m[16, 16, 16] == 1.0 and m[16, 16, 16 + 8] == 1.0 and m[16, 16, 16 + 12] == 0.0
    assert m[16, 16, 16 + 10] == pytest.approx(0.5)  # halfway down the cosine edge
    assert m[0, 0, 0] == 0.0
    hard = soft_mask(16, 4.0, 0.0)
    assert set(np.unique(hard)) == {0.0, 1.0} and hard[8, 8, 12] == 1.0 and hard[8, 8, 13] == 0.0
    with pytest.raises(CryoOrientError):
        soft_mask(16, -1.0)
    # A mask radius in fsc: noise outside the mask no longer counts.
    vol = blob_volume(32)
    noisy = vol.copy()
    noisy[:4] += np.random.default_rng(0).standard_normal((4, 32, 32))
    assert fsc(vol, noisy, mask=10.0).mean > fsc(vol, noisy).mean


def test_mirror_volume_keeps_the_centre_voxel():
    for d in (8, 9):
        vol = np.random.default_rng(d).random((d, d, d))
        mir = mirror_volume(vol)
        c = d // 2
        np.testing.assert_array_equal(mir[c], vol[c])  # the plane z = 0 stays
        np.testing.assert_array_equal(mir[c + 2], vol[c - 2])  # z → -z
        np.testing.assert_array_equal(mirror_volume(mir), vol)
        if d % 2:
            np.testing.assert_array_equal(mir, vol[::-1])
    t = torch.rand(6, 6, 6)
    assert isinstance(mirror_volume(t), torch.Tensor)


def test_best_hand_picks_the_mirror_when_the_hand_is_wrong():
    vol = blob_volume(32)
    mirrored = mirror_volume(vol)
    assert fsc(mirrored, vol).mean < 0.9
    np.testing.assert_array_equal(best_hand(mirrored, vol), vol)
    assert best_hand(vol, vol) is vol


def test_plot_fsc_and_volume_slices(tmp_path):
    from cryoorient_ray.plots import plot_fsc, plot_volume_slices

    vol = blob_volume(16)
    noisy = vol + 0.05 * np.random.default_rng(0).standard_normal(vol.shape)
    res = fsc(vol, noisy, pixel_size=2.0)
    out = plot_fsc(
        {"noisy": (res.frequency, res.fsc), "self": (res.frequency, np.ones(9))}, tmp_path / "f.png", title="t"
    )
    assert out == tmp_path / "f.png" and out.stat().st_size > 1000
    out = plot_volume_slices({"truth": vol, "noisy": noisy}, tmp_path / "sub" / "v.png")
    assert out.exists() and out.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f.png", "sub", "v.png"]  # no temporaries left
