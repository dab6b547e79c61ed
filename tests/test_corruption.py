"""Fresh training noise/CTF (core/imaging/corruption.py) has the simulator's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core.density.phantom import pseudo_protein
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.corruption import FreshCorruption, shift_images
from cryoorient_ray.core.imaging.forward import render_projections
from cryoorient_ray.core.imaging.parameters import sample_defocus
from cryoorient_ray.core.imaging.preprocess import radial_power
from cryoorient_ray.errors import CryoOrientError

OPTICS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
ACQ, WORK, ACQ_PX = 64, 32, 3.0  # the acquisition box at 3 Å/px, cropped to 32² at 6 Å/px


@pytest.fixture(scope="module")
def acquisition_map():
    return pseudo_protein(seed=0, box_size=ACQ, voxel_size=ACQ_PX).data.astype(np.float32)


def _simulate(volume, n, snr_db, ctf, seed=0):
    """The simulator's images, their noiseless version (same CTF) and what return_clean gives."""
    rng = np.random.default_rng(seed)
    q = sample_orientations(n, "uniform", "full", seed=rng)
    kw = {"pixel_size": ACQ_PX, "backend": "torch", "output_size": WORK}
    if ctf:
        du, dv, da = sample_defocus(n, 8000, 25000, 500, rng)
        kw.update(ctf=OPTICS, defocus_u=du, defocus_v=dv, defocus_angle=da)
    gen = torch.Generator().manual_seed(seed)
    noisy, nv, clean, clean_var = render_projections(volume, q, snr_db=snr_db, generator=gen, return_clean=True, **kw)
    signal, _ = render_projections(volume, q, **kw)
    params = None if not ctf else {"defocus_u": du, "defocus_v": dv, "defocus_angle": da, **OPTICS}
    return noisy, nv, clean, clean_var, signal, params


def _corruption(snr_db, ctf):
    ranges = {"defocus_min": 8000.0, "defocus_max": 25000.0, "astigmatism_max": 500.0, **OPTICS} if ctf else None
    return FreshCorruption(WORK, ACQ_PX * ACQ / WORK, ACQ, ACQ_PX, snr_db=snr_db, ctf=ranges)


def test_clean_is_the_noiseless_projection_without_ctf(acquisition_map):
    noisy, nv, clean, clean_var, signal, _ = _simulate(acquisition_map, 16, -6.0, ctf=False)
    np.testing.assert_allclose(clean, signal, atol=1e-5 * np.abs(signal).max())
    # the SNR is relative to the clean variance over the acquisition box: σ² = var / 10^(SNR/10)
    np.testing.assert_allclose(nv, clean_var / 10 ** (-6.0 / 10), rtol=1e-4)


@pytest.mark.parametrize("ctf", [False, True])
def test_fresh_noise_matches_the_simulator(acquisition_map, ctf):
    """Same SNR, same per-image σ² and the same noise power spectrum as rendering at acquisition + crop."""
    snr = -12.0
    noisy, nv, clean, clean_var, signal, params = _simulate(acquisition_map, 96, snr, ctf)
    fresh = _corruption(snr, ctf).apply(
        torch.from_numpy(clean), torch.from_numpy(clean_var), generator=torch.Generator().manual_seed(5), ctf=params
    )
    crop = (WORK / ACQ) ** 2
    # σ² per working pixel, image by image: exact without CTF, the CTF's effect measured at the working box with it
    np.testing.assert_allclose(fresh.noise_variance_working.numpy(), nv * crop, rtol=0.01 if ctf else 1e-4)
    # the noiseless part is the simulator's (the CTF at the working pixel size ≈ at acquisition, then cropped)
    err = np.abs(fresh.signal.numpy() - signal).max() / np.abs(signal).max()
    assert err < (0.05 if ctf else 1e-4)
    # the noise: its variance and its radial power spectrum agree shell by shell
    sim_noise = torch.from_numpy(noisy - signal)
    fresh_noise = fresh.images - fresh.signal
    ratio = float(fresh_noise.var() / sim_noise.var())
    assert abs(ratio - 1) < 0.04, ratio
    ps_sim, ps_fresh = radial_power(sim_noise)[1 : WORK // 2], radial_power(fresh_noise)[1 : WORK // 2]
    assert float((ps_fresh / ps_sim - 1).abs().max()) < 0.12
    # the SNR measured on the working images: 10·log10(L_acq²/L²) dB above the acquisition SNR
    measured = 10 * np.log10(np.mean(signal.reshape(96, -1).var(1)) / float(sim_noise.var()))
    fresh_measured = 10 * np.log10(float(fresh.signal.reshape(96, -1).var(1).mean() / fresh_noise.var()))
    assert abs(fresh_measured - measured) < 0.2


def test_fresh_ctf_draws_the_simulators_ranges(acquisition_map):
    corr = _corruption(-6.0, ctf=True)
    params = corr.draw_ctf(4000, torch.Generator().manual_seed(0))
    mean = (params["defocus_u"] + params["defocus_v"]) / 2
    astig = params["defocus_u"] - params["defocus_v"]
    assert 8000 <= float(mean.min()) and float(mean.max()) <= 25000 and abs(float(mean.mean()) - 16500) < 300
    assert 0 <= float(astig.min()) and float(astig.max()) <= 500
    assert 0 <= float(params["defocus_angle"].min()) and float(params["defocus_angle"].max()) < 180


def test_new_noise_every_call_and_reproducible(acquisition_map):
    _, _, clean, clean_var, _, _ = _simulate(acquisition_map, 8, -12.0, ctf=False)
    corr = _corruption(-12.0, ctf=False)
    x, v = torch.from_numpy(clean), torch.from_numpy(clean_var)
    g = torch.Generator().manual_seed(1)
    a, b = corr.apply(x, v, generator=g).images, corr.apply(x, v, generator=g).images
    assert not torch.allclose(a, b)  # never the same noisy image twice
    again = corr.apply(x, v, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(a, again)


def test_snr_range_and_curriculum():
    corr = FreshCorruption(32, 6.0, 64, 3.0, snr_db=(-20.0, -12.0), curriculum_start_db=0.0, curriculum_fraction=0.5)
    assert corr.snr_range(0.0) == (-8.0, 0.0)
    assert corr.snr_range(0.25) == pytest.approx((-14.0, -6.0))
    assert corr.snr_range(0.5) == corr.snr_range(1.0) == (-20.0, -12.0)
    x = torch.randn(512, 32, 32)
    out = corr.apply(x, torch.ones(512), progress=1.0, generator=torch.Generator().manual_seed(0))
    assert -20.0 <= float(out.snr_db.min()) and float(out.snr_db.max()) <= -12.0
    assert abs(float(out.snr_db.mean()) + 16.0) < 0.5
    np.testing.assert_allclose(out.noise_variance_working, 10 ** (-out.snr_db / 10) * 0.25, rtol=1e-6)
    assert FreshCorruption.from_dict(corr.to_dict()) == corr


def test_shift_images_moves_content_without_wrapping():
    img = torch.zeros(1, 16, 16)
    img[0, 8, 8] = 1.0
    moved = shift_images(img, torch.tensor([[3.0, -2.0]]))
    assert torch.argmax(moved[0]).item() == 6 * 16 + 11  # (y, x) = (8 - 2, 8 + 3)
    edge = torch.zeros(1, 16, 16)
    edge[0, 8, 15] = 1.0
    assert float(shift_images(edge, torch.tensor([[4.0, 0.0]])).abs().max()) < 0.2  # cut, not wrapped round


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"acquisition_size": 16, "acquisition_pixel_size": 12.0}, "smaller than the working box"),
        ({"snr_db": float("nan")}, "finite"),
        ({"snr_db": float("inf")}, "finite"),
        ({"snr_db": (-6.0, -12.0)}, "lo > hi"),
        ({"working_pixel_size": 0.0}, "positive"),
        ({"acquisition_pixel_size": 4.0}, "field of view"),
        ({"curriculum_start_db": 0.0}, "target snr_db"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    base = {"working_size": 32, "working_pixel_size": 6.0, "acquisition_size": 64, "acquisition_pixel_size": 3.0}
    if "curriculum_start_db" not in kwargs:
        base["snr_db"] = -12.0
    with pytest.raises(CryoOrientError, match=message):
        FreshCorruption(**{**base, **kwargs})
