"""The shared Fourier toolbox: frequency grids in their units, the centred volume FT, ramps, filters."""

from __future__ import annotations

import numpy as np
import torch

from cryoorient_ray.core.imaging.fourier import (
    centred_volume_ft,
    fft_index,
    freq_grid_2d,
    freq_grid_2d_per_A,
    gridding_correction_3d,
    index_grid_2d,
    lowpass_gaussian,
    lowpass_hard,
    pad_volume_centred,
    phase_ramp,
)


def test_grids_in_their_units():
    for n in (7, 8, 15, 16):
        np.testing.assert_allclose(fft_index(n).numpy(), np.fft.fftfreq(n) * n, atol=1e-12)
        ky, kx = index_grid_2d(n)
        assert kx.shape == (n, n // 2 + 1) and ky.shape == kx.shape
        fy, fx = freq_grid_2d(n, dtype=torch.float64)
        np.testing.assert_allclose(fx.numpy(), kx.numpy() / n, atol=1e-12)
        np.testing.assert_allclose(fy.numpy(), ky.numpy() / n, atol=1e-12)
        sy, sx = freq_grid_2d_per_A(n, 2.5, rfft=False)
        assert sx.shape == (n, n)
        np.testing.assert_allclose(sx.numpy(), np.fft.fftfreq(n, 2.5)[None, :].repeat(n, 0), atol=1e-12)


def test_centred_volume_ft():
    vol = torch.rand(6, 6, 6, dtype=torch.float64)
    padded = pad_volume_centred(vol, 12)
    assert padded.shape == (12, 12, 12) and padded[6, 6, 6] == vol[3, 3, 3]
    ft = centred_volume_ft(vol, 12)
    assert ft.shape == (1, 2, 12, 12, 12)
    # The zero frequency (index N//2) is the sum of the gridding-corrected padded map.
    corrected = padded / gridding_correction_3d(12, dtype=torch.float64)
    assert torch.isclose(ft[0, 0, 6, 6, 6], corrected.sum())
    assert torch.isclose(centred_volume_ft(vol, 12, kernel=None)[0, 0, 6, 6, 6], vol.sum())


def test_phase_ramp_moves_by_whole_pixels():
    img = torch.zeros(1, 8, 8, dtype=torch.float64)
    img[0, 4, 4] = 1.0
    fy, fx = freq_grid_2d(8, dtype=torch.float64)
    moved = torch.fft.irfft2(torch.fft.rfft2(img) * phase_ramp(torch.tensor([[2.0, -1.0]]), fx, fy), s=(8, 8))
    assert torch.isclose(moved[0, 3, 6], torch.tensor(1.0, dtype=torch.float64))  # x + 2, y − 1
    back = phase_ramp(torch.tensor([[2.0, -1.0]]), fx * 8, fy * 8, sign=1.0, period=8)
    np.testing.assert_allclose((torch.fft.rfft2(moved) * back).numpy(), torch.fft.rfft2(img).numpy(), atol=1e-12)


def test_lowpasses():
    x = torch.randn(2, 16, 16)
    smooth = lowpass_gaussian(x, 0.1)
    assert smooth.shape == x.shape and smooth.std() < x.std()
    assert torch.allclose(smooth.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5)
    hard = lowpass_hard(x, 0.25)
    ft = torch.fft.rfft2(hard)
    fy, fx = freq_grid_2d(16)
    assert ft[:, (fy**2 + fx**2) > 0.25**2].abs().max() < 1e-4
    assert torch.allclose(lowpass_hard(x, 1.0), x, atol=1e-5)
