"""RELION's CTF: hand-computed values, symmetries, zeros, and its application to images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.imaging.ctf import apply_ctf, ctf_2d, ctf_at, electron_wavelength
from cryoorient_ray.errors import CryoOrientError

LAMBDA_300KV = 0.019687  # Å, the textbook relativistic wavelength at 300 kV


def hand_ctf(sx, sy, du, dv, angle_deg, kv=300.0, cs_mm=2.7, q0=0.1, phase_deg=0.0, bfac=0.0):
    """CTF = sin(χ)·exp(-B s²/4), χ = π λ Δf s² − (π/2) Cs λ³ s⁴ + asin(Q0) + phase (RELION's -sin(γ), γ = -χ)."""
    v = kv * 1e3
    lam = 12.2643247 / math.sqrt(v * (1 + v * 0.978466e-6))
    s2 = sx * sx + sy * sy
    phi = math.atan2(sy, sx)
    df = (du + dv) / 2 + (du - dv) / 2 * math.cos(2 * (phi - math.radians(angle_deg)))
    chi = (
        math.pi * lam * df * s2 - math.pi / 2 * cs_mm * 1e7 * lam**3 * s2 * s2 + math.asin(q0) + math.radians(phase_deg)
    )
    return math.sin(chi) * math.exp(-bfac * s2 / 4)


def test_wavelength():
    assert electron_wavelength(300) == pytest.approx(LAMBDA_300KV, abs=1e-6)
    assert electron_wavelength(200) == pytest.approx(0.025079, abs=1e-6)


def test_value_at_a_chosen_frequency_matches_the_formula_by_hand():
    size, px = 64, 1.3
    params = dict(defocus_u=15000.0, defocus_v=12000.0, defocus_angle=30.0, bfactor=40.0, phase_shift=10.0)
    grid = ctf_2d(size, px, **params, dtype=torch.float64)
    row, col = 3, 5  # y frequency 3/(64·1.3), x frequency 5/(64·1.3)
    sx, sy = col / (size * px), row / (size * px)
    expected = hand_ctf(sx, sy, 15000.0, 12000.0, 30.0, bfac=40.0, phase_deg=10.0)
    assert float(grid[0, row, col]) == pytest.approx(expected, abs=1e-12)
    # a negative y frequency sits at row L - 3; the full grid's column L - 5 is x = -5
    full = ctf_2d(size, px, **params, rfft=False, dtype=torch.float64)
    assert float(full[0, size - row, col]) == pytest.approx(
        hand_ctf(sx, -sy, 15000.0, 12000.0, 30.0, 300, 2.7, 0.1, 10.0, 40.0)
    )
    assert float(full[0, row, size - col]) == pytest.approx(
        hand_ctf(-sx, sy, 15000.0, 12000.0, 30.0, 300, 2.7, 0.1, 10.0, 40.0)
    )
    # and a literal number, so that a shared mistake in both formulas cannot pass unseen
    value = ctf_at(0.05, 0.0, 10000.0, 10000.0, 0.0, cs=0.0, amplitude_contrast=0.0)
    assert float(value[0]) == pytest.approx(math.sin(math.pi * LAMBDA_300KV * 10000.0 * 0.0025), abs=1e-4)


def test_dc_value_is_sin_k3_plus_k5_and_rises_with_underfocus():
    # RELION: CTF(0) = -sin(-K3 - K5) = sin(K3 + K5) with K3 = atan(Q0/sqrt(1 - Q0²)), so sin(K3) = Q0.
    for q0 in (0.07, 0.1, 0.3):
        assert float(ctf_2d(16, 1.0, 20000.0, 20000.0, 0.0, amplitude_contrast=q0)[0, 0, 0]) == pytest.approx(
            q0, abs=1e-6
        )
    dc = float(ctf_2d(16, 1.0, 20000.0, 20000.0, 0.0, phase_shift=30.0)[0, 0, 0])
    assert dc == pytest.approx(math.sin(math.asin(0.1) + math.radians(30.0)), abs=1e-6)
    # underfocus: positive and increasing before the first peak
    s = np.linspace(0.0, 0.004, 9)
    low = ctf_at(s, 0.0 * s, 20000.0, 20000.0, 0.0)[0]
    assert np.all(low > 0) and np.all(np.diff(low) > 0)


def test_equal_defoci_give_a_rotationally_symmetric_ctf():
    size = 48
    ctf = ctf_2d(size, 1.1, 18000.0, 18000.0, 37.0, rfft=False, dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(ctf, ctf.T, atol=1e-12)  # x ↔ y
    np.testing.assert_allclose(ctf, np.roll(ctf[::-1, :], 1, axis=0), atol=1e-12)  # y → -y
    k = np.fft.fftfreq(size)
    s2 = np.round((k[:, None] ** 2 + k[None, :] ** 2) * size**2).astype(int)
    for value in np.unique(s2)[:50]:
        ring = ctf[s2 == value]
        assert np.ptp(ring) < 1e-12


def test_swapping_defoci_and_turning_the_angle_by_90_degrees_is_the_same_ctf():
    a = ctf_2d(40, 1.0, [15000.0, 9000.0], [11000.0, 14000.0], [20.0, -75.0], dtype=torch.float64)
    b = ctf_2d(40, 1.0, [11000.0, 14000.0], [15000.0, 9000.0], [110.0, 15.0], dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    c = ctf_2d(40, 1.0, 15000.0, 11000.0, 200.0, dtype=torch.float64)  # the angle is mod 180
    torch.testing.assert_close(a[:1], c, atol=1e-12, rtol=0)


def test_zeros_of_the_isotropic_ctf():
    lam, df = electron_wavelength(300.0), 15000.0
    n = np.arange(1, 8)
    s = np.sqrt(n / (lam * df))  # sin(π λ Δf s²) = 0 ⇔ s² = n / (λ Δf)
    for angle in (0.0, 1.0, 2.5):  # any direction
        vals = ctf_at(s * np.cos(angle), s * np.sin(angle), df, df, 0.0, cs=0.0, amplitude_contrast=0.0)[0]
        np.testing.assert_allclose(vals, 0.0, atol=1e-9)
    mid = ctf_at(np.sqrt((n - 0.5) / (lam * df)), 0.0 * n, df, df, 0.0, cs=0.0, amplitude_contrast=0.0)[0]
    np.testing.assert_allclose(mid, -((-1.0) ** n), atol=1e-9)  # +1, -1, +1, ... between the zeros


def test_astigmatism_axis_is_measured_from_x_towards_y():
    lam, du, dv = electron_wavelength(300.0), 20000.0, 10000.0
    iso = dict(cs=0.0, amplitude_contrast=0.0)
    s_u, s_v = math.sqrt(1 / (lam * du)), math.sqrt(1 / (lam * dv))  # first zeros for defU and defV
    for angle, (ux, uy) in [(0.0, (1, 0)), (90.0, (0, 1)), (45.0, (2**-0.5, 2**-0.5))]:
        vx, vy = -uy, ux
        along_u = ctf_at(s_u * ux, s_u * uy, du, dv, angle, **iso)[0]
        along_v = ctf_at(s_v * vx, s_v * vy, du, dv, angle, **iso)[0]
        assert abs(along_u) < 1e-9 and abs(along_v) < 1e-9
        assert abs(ctf_at(s_u * vx, s_u * vy, du, dv, angle, **iso)[0]) > 0.1


def test_bfactor_envelope():
    a = ctf_2d(32, 1.5, 12000.0, 12000.0, 0.0, dtype=torch.float64)
    b = ctf_2d(32, 1.5, 12000.0, 12000.0, 0.0, bfactor=100.0, dtype=torch.float64)
    fy = torch.fft.fftfreq(32, d=1.5, dtype=torch.float64)
    fx = torch.fft.rfftfreq(32, d=1.5, dtype=torch.float64)
    s2 = fy[:, None] ** 2 + fx[None, :] ** 2
    torch.testing.assert_close(b[0], a[0] * torch.exp(-100.0 * s2 / 4), atol=1e-12, rtol=0)


def test_shapes_dtypes_and_layouts():
    half = ctf_2d(33, 1.0, [1e4, 2e4, 3e4], 1.5e4, 0.0)
    assert half.shape == (3, 33, 17) and half.dtype == torch.float32
    full = ctf_2d(33, 1.0, [1e4, 2e4, 3e4], 1.5e4, 0.0, rfft=False, dtype=torch.float64)
    assert full.shape == (3, 33, 33) and full.dtype == torch.float64
    torch.testing.assert_close(full[..., :17].float(), half)
    assert ctf_2d(8, 1.0, 1e4, 1e4, 0.0).shape == (1, 8, 5)


def test_apply_ctf_with_unit_ctf_returns_the_image():
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((3, 24, 24))
    # zero defocus, Cs = 0, Q0 = 1: γ = -π/2 everywhere, CTF = 1
    same = apply_ctf(imgs, 1.0, 0.0, 0.0, 0.0, cs=0.0, amplitude_contrast=1.0)
    assert isinstance(same, np.ndarray) and same.shape == imgs.shape
    np.testing.assert_allclose(same, imgs, atol=1e-10)
    # a 90° phase plate without amplitude contrast is also CTF = 1
    np.testing.assert_allclose(
        apply_ctf(imgs, 1.0, 0.0, 0.0, 0.0, cs=0.0, amplitude_contrast=0.0, phase_shift=90.0), imgs, atol=1e-10
    )
    # Q0 = 1 and π phase shift flips the contrast
    np.testing.assert_allclose(
        apply_ctf(imgs, 1.0, 0.0, 0.0, 0.0, cs=0.0, amplitude_contrast=1.0, phase_shift=180.0), -imgs, atol=1e-10
    )


def test_apply_ctf_is_a_fourier_multiplication_per_image():
    rng = np.random.default_rng(1)
    imgs = torch.from_numpy(rng.standard_normal((2, 20, 20)))
    params = dict(defocus_u=[8000.0, 20000.0], defocus_v=[7000.0, 21000.0], defocus_angle=[10.0, 50.0])
    out = apply_ctf(imgs, 2.0, **params, pad_factor=1)
    ctf = ctf_2d(20, 2.0, **params, dtype=torch.float64)
    manual = torch.fft.irfft2(torch.fft.rfft2(imgs) * ctf, s=(20, 20))
    torch.testing.assert_close(out, manual)
    # each image gets its own parameters
    single = apply_ctf(imgs[1:], 2.0, 20000.0, 21000.0, 50.0)
    torch.testing.assert_close(apply_ctf(imgs, 2.0, **params)[1:], single)
    # padding keeps a centred point's response centred and symmetric
    point = torch.zeros(1, 21, 21, dtype=torch.float64)
    point[0, 10, 10] = 1.0
    psf = apply_ctf(point, 1.5, 15000.0, 15000.0, 0.0)[0]
    torch.testing.assert_close(psf, psf.flip(0).flip(1))
    torch.testing.assert_close(psf, psf.T)


def test_bad_input():
    with pytest.raises(CryoOrientError, match="pixel_size"):
        ctf_2d(16, -1.0, 1e4, 1e4, 0.0)
    with pytest.raises(CryoOrientError, match="pixel_size"):
        apply_ctf(np.zeros((1, 8, 8)), 0.0, 1e4, 1e4, 0.0)
    with pytest.raises(CryoOrientError, match="image_size"):
        ctf_2d(0, 1.0, 1e4, 1e4, 0.0)
    with pytest.raises(CryoOrientError, match="mismatched batch sizes"):
        ctf_2d(16, 1.0, [1e4, 2e4], [1e4, 2e4, 3e4], 0.0)
    with pytest.raises(CryoOrientError, match="amplitude_contrast"):
        ctf_2d(16, 1.0, 1e4, 1e4, 0.0, amplitude_contrast=1.5)
    with pytest.raises(CryoOrientError, match="voltage"):
        ctf_2d(16, 1.0, 1e4, 1e4, 0.0, voltage=0.0)
    with pytest.raises(CryoOrientError, match="NaN"):
        ctf_2d(16, 1.0, float("nan"), 1e4, 0.0)
    with pytest.raises(CryoOrientError, match="batch size 3 but there are 2 images"):
        apply_ctf(np.zeros((2, 8, 8)), 1.0, [1e4, 2e4, 3e4], 1e4, 0.0)
    with pytest.raises(CryoOrientError, match=r"\(B, L, L\)"):
        apply_ctf(np.zeros((8, 8)), 1.0, 1e4, 1e4, 0.0)
    with pytest.raises(CryoOrientError, match="scalar or a 1-D"):
        ctf_2d(16, 1.0, np.ones((2, 2)), 1e4, 0.0)
