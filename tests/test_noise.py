"""Gaussian noise: the requested variance / SNR is what comes out, reproducibly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.imaging.noise import add_gaussian_noise, ratio_to_snr_db, snr_db_to_ratio
from cryoorient_ray.errors import CryoOrientError


def clean_images(b=8, size=64, seed=0):
    """Smooth random images with different signal variances per image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, size, size, generator=g, dtype=torch.float64)
    k = torch.fft.fftfreq(size, dtype=torch.float64)
    smooth = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(-50 * (k[:, None] ** 2 + k[None, :] ** 2))).real
    return smooth * torch.linspace(0.5, 3.0, b, dtype=torch.float64)[:, None, None]


def test_db_helpers():
    assert snr_db_to_ratio(0.0) == 1.0
    assert snr_db_to_ratio(10.0) == pytest.approx(10.0)
    assert snr_db_to_ratio(-20.0) == pytest.approx(0.01)
    assert ratio_to_snr_db(100.0) == pytest.approx(20.0)
    # the paper: σ² = 16 against a signal variance ≈ 1.04
    assert ratio_to_snr_db(1.04 / 16) == pytest.approx(-11.87, abs=0.01)
    arr = np.array([-12.0, 0.0, 3.0])
    np.testing.assert_allclose(ratio_to_snr_db(snr_db_to_ratio(arr)), arr)
    assert isinstance(snr_db_to_ratio(torch.tensor([1.0])), torch.Tensor)
    with pytest.raises(CryoOrientError, match="positive"):
        ratio_to_snr_db(0.0)
    with pytest.raises(CryoOrientError, match="positive"):
        ratio_to_snr_db(np.array([1.0, -1.0]))


def test_fixed_variance_is_measured_back():
    imgs = clean_images()
    g = torch.Generator().manual_seed(1)
    noisy, var = add_gaussian_noise(imgs, variance=16.0, generator=g)
    assert noisy.shape == imgs.shape and noisy.dtype == imgs.dtype
    torch.testing.assert_close(var, torch.full((8,), 16.0, dtype=torch.float64))
    measured = (noisy - imgs).reshape(8, -1).var(dim=1)
    # 4096 pixels: the sample variance has a relative spread of sqrt(2/4096) ≈ 2.2 % per image
    assert torch.all((measured / 16.0 - 1).abs() < 0.11)
    assert abs(float(measured.mean()) / 16.0 - 1) < 0.04
    assert abs(float((noisy - imgs).mean())) < 0.1  # zero mean


def test_per_image_variances():
    imgs = clean_images(b=4)
    v = np.array([0.0, 1.0, 4.0, 9.0])
    noisy, var = add_gaussian_noise(imgs.numpy(), variance=v, generator=torch.Generator().manual_seed(2))
    assert isinstance(noisy, np.ndarray) and isinstance(var, np.ndarray)
    np.testing.assert_allclose(var, v)
    np.testing.assert_array_equal(noisy[0], imgs.numpy()[0])  # zero variance: untouched
    measured = (noisy - imgs.numpy()).reshape(4, -1).var(axis=1)
    np.testing.assert_allclose(measured[1:], v[1:], rtol=0.11)


@pytest.mark.parametrize("snr_db", [-12.0, 0.0, 6.0])
def test_snr_in_db_is_measured_back(snr_db):
    imgs = clean_images()
    noisy, var = add_gaussian_noise(imgs, snr_db=snr_db, generator=torch.Generator().manual_seed(3))
    signal = imgs.reshape(8, -1).var(dim=1, unbiased=False)
    torch.testing.assert_close(var, signal / 10 ** (snr_db / 10))
    noise_var = (noisy - imgs).reshape(8, -1).var(dim=1)
    measured_db = 10 * torch.log10(signal / noise_var)
    assert torch.all((measured_db - snr_db).abs() < 0.5)  # 0.5 dB ≈ 12 %, > 5 standard deviations
    assert abs(float(measured_db.mean()) - snr_db) < 0.15


def test_paper_noise_level():
    # images of variance ≈ 1.04 at -11.87 dB get σ² ≈ 16
    g = torch.Generator().manual_seed(4)
    imgs = torch.randn(4, 32, 32, generator=g) * math.sqrt(1.04)
    _, var = add_gaussian_noise(imgs, snr_db=ratio_to_snr_db(1.04 / 16))
    signal = imgs.reshape(4, -1).var(dim=1, unbiased=False)
    torch.testing.assert_close(var, signal * 16 / 1.04)
    assert torch.all((var - 16).abs() < 2.5)


def test_seeded_generator_is_deterministic():
    imgs = clean_images(b=3, size=16)
    a, _ = add_gaussian_noise(imgs, snr_db=-5.0, generator=torch.Generator().manual_seed(7))
    b, _ = add_gaussian_noise(imgs, snr_db=-5.0, generator=torch.Generator().manual_seed(7))
    c, _ = add_gaussian_noise(imgs, snr_db=-5.0, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    f32, _ = add_gaussian_noise(imgs.float(), variance=1.0)
    assert f32.dtype == torch.float32


def test_bad_arguments():
    imgs = torch.zeros(2, 8, 8)
    with pytest.raises(CryoOrientError, match="exactly one"):
        add_gaussian_noise(imgs)
    with pytest.raises(CryoOrientError, match="exactly one"):
        add_gaussian_noise(imgs, snr_db=0.0, variance=1.0)
    with pytest.raises(CryoOrientError, match=">= 0"):
        add_gaussian_noise(imgs, variance=-1.0)
    with pytest.raises(CryoOrientError, match="variance must be a scalar"):
        add_gaussian_noise(imgs, variance=[1.0, 2.0, 3.0])
    with pytest.raises(CryoOrientError, match="finite"):
        add_gaussian_noise(imgs, snr_db=float("inf"))
    with pytest.raises(CryoOrientError, match="number"):
        add_gaussian_noise(imgs, snr_db="loud")
    with pytest.raises(CryoOrientError, match=r"\(B, L, L\)"):
        add_gaussian_noise(torch.zeros(8, 8), variance=1.0)
