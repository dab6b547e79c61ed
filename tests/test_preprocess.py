"""The preprocessing the network sees (core/imaging/preprocess.py), saved with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core.density.phantom import pseudo_protein
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.ctf import ctf_2d
from cryoorient_ray.core.imaging.forward import render_projections
from cryoorient_ray.core.imaging.preprocess import (
    Preprocess,
    estimate_ctf_wiener,
    estimate_preprocess,
    n_shells,
    phase_flip,
    radial_power,
)
from cryoorient_ray.core.learning.model import SiameseDistance, load_distance_model, save_distance_model
from cryoorient_ray.errors import CryoOrientError

OPTICS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}


@pytest.fixture(scope="module")
def projections():
    vol = pseudo_protein(seed=0, box_size=32, voxel_size=6.0).data.astype(np.float32)
    q = sample_orientations(200, "uniform", "full", seed=np.random.default_rng(0))
    images, _ = render_projections(vol, q, pixel_size=6.0, backend="torch")
    return torch.from_numpy(images)


def test_phase_flip_makes_every_frequency_the_sign_of_the_clean_image(projections):
    x = projections[:8]
    defocus = torch.tensor([9000.0, 12000, 15000, 18000, 21000, 24000, 10000, 20000])
    ctf = {"defocus_u": defocus, "defocus_v": defocus - 300, "defocus_angle": torch.linspace(0, 170, 8), **OPTICS}
    c = ctf_2d(32, 6.0, ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle"], **OPTICS)
    with_ctf = torch.fft.irfft2(torch.fft.rfft2(x) * c, s=(32, 32))
    flipped = phase_flip(with_ctf, 6.0, ctf)
    want = torch.fft.irfft2(torch.fft.rfft2(x) * c.abs(), s=(32, 32))
    torch.testing.assert_close(flipped, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    pre = Preprocess(32, 6.0, phase_flip=True)
    torch.testing.assert_close(pre.apply(with_ctf, ctf), flipped)
    with pytest.raises(CryoOrientError, match="CTF parameters are needed"):
        pre.apply(with_ctf)


def test_ctf_wiener_correction_undoes_the_ctf_as_far_as_the_snr_allows(projections):
    x = projections[:8]
    defocus = torch.tensor([9000.0, 12000, 15000, 18000, 21000, 24000, 10000, 20000])
    ctf = {"defocus_u": defocus, "defocus_v": defocus - 300, "defocus_angle": torch.linspace(0, 170, 8), **OPTICS}
    c = ctf_2d(32, 6.0, ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle"], **OPTICS)
    with_ctf = torch.fft.irfft2(torch.fft.rfft2(x) * c, s=(32, 32))
    # with little noise the correction gives back the projection wherever the CTF is not near a zero
    quiet = estimate_ctf_wiener(projections, 1e-6 * float(projections.var()), 6.0)
    assert quiet.needs_ctf and not quiet.identity and len(quiet.ctf_wiener) == n_shells(32)
    restored = torch.fft.rfft2(quiet.apply(with_ctf, ctf))
    good = c.abs() > 0.3
    err = (restored - torch.fft.rfft2(x)).abs()[good].max()
    assert float(err) < 0.05 * float(torch.fft.rfft2(x).abs().max())
    # the corrected images of one projection at two defoci are closer than the uncorrected ones
    pair = x[:1].expand(2, 32, 32)
    two = {
        "defocus_u": torch.tensor([9000.0, 24000.0]),
        "defocus_v": torch.tensor([9000.0, 24000.0]),
        "defocus_angle": torch.zeros(2),
        **OPTICS,
    }
    c2 = ctf_2d(32, 6.0, two["defocus_u"], two["defocus_v"], two["defocus_angle"], **OPTICS)
    raw = torch.fft.irfft2(torch.fft.rfft2(pair) * c2, s=(32, 32))
    noisy = estimate_ctf_wiener(projections, 0.5 * float(projections.var()), 6.0)
    fixed = noisy.apply(raw, two)
    assert float((fixed[0] - fixed[1]).norm() / fixed[0].norm()) < 0.5 * float((raw[0] - raw[1]).norm() / raw[0].norm())
    # more noise, more damping: the correction's gain never grows with N
    assert all(a <= b for a, b in zip(quiet.ctf_wiener, noisy.ctf_wiener, strict=True))
    with pytest.raises(CryoOrientError, match="CTF parameters are needed"):
        noisy.apply(raw)
    assert Preprocess.from_dict(noisy.to_dict()) == noisy
    with pytest.raises(CryoOrientError, match="neither a phase flip"):
        Preprocess(32, 6.0, phase_flip=True, ctf_wiener=noisy.ctf_wiener)


def test_wiener_gain_is_signal_over_signal_plus_noise():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(400, 32, 32, generator=g) * 2.0  # white, power 4 per pixel
    pre = estimate_preprocess(signal, noise_variance_working=12.0, pixel_size=6.0, filter="wiener")
    gain = np.array(pre.gain[1:16])
    np.testing.assert_allclose(gain, 4.0 / 16.0, rtol=0.05)
    # estimated from noisy images (the known noise power subtracted): the same filter
    noisy = signal + torch.randn(400, 32, 32, generator=g) * 12.0**0.5
    from_noisy = estimate_preprocess(noisy, 12.0, 6.0, "wiener", noisy=True)
    np.testing.assert_allclose(np.array(from_noisy.gain[1:16]), gain, atol=0.04)


def test_wiener_filter_brings_noisy_projections_closer_to_clean(projections):
    g = torch.Generator().manual_seed(1)
    x = projections
    sigma2 = float(x.var(dim=(-2, -1)).mean()) / 10 ** (-12 / 10)  # -12 dB
    noisy = x + torch.randn(x.shape, generator=g) * sigma2**0.5
    pre = estimate_preprocess(x, sigma2, 6.0, "wiener", snr_db=-12.0)
    gain = np.array(pre.gain)
    assert gain[1] > 0.5 and gain[14] < 0.1  # passes the low frequencies, stops the noise-dominated ones
    filtered = pre.apply(noisy)
    err_none = float(((noisy - x) ** 2).mean())
    err_wiener = float(((filtered - x) ** 2).mean())
    assert err_wiener < 0.2 * err_none
    low = estimate_preprocess(x, sigma2, 6.0, "lowpass")
    lg = np.array(low.gain)
    cut = int(np.argmin(lg))
    assert set(lg.tolist()) == {0.0, 1.0} and lg[:cut].all() and not lg[cut:].any()
    assert float(((low.apply(noisy) - x) ** 2).mean()) < err_none


def test_radial_power_of_white_noise_is_flat():
    x = torch.randn(300, 32, 32, generator=torch.Generator().manual_seed(2)) * 3.0
    p = radial_power(x)
    assert len(p) == n_shells(32)
    np.testing.assert_allclose(p[1:16].numpy(), 9.0 * 32 * 32, rtol=0.06)


def test_preprocess_travels_with_the_model(tmp_path, projections):
    pre = estimate_preprocess(projections, 5.0, 6.0, "wiener", snr_db=-12.0)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    torch.manual_seed(0)
    net = SiameseDistance({"channels": [8, 16], "n_features": 16, "grid": 2, "hidden": 16}, preprocess=pre).eval()
    path = tmp_path / "model.pt"
    save_distance_model(path, net)
    loaded, meta = load_distance_model(path)
    assert loaded.preprocess == pre and meta["preprocess"]["filter"] == "wiener"
    x = projections[:6]
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), net.embed(x))
        # the model filters what it embeds: the same as embedding filtered images without preprocessing
        plain = SiameseDistance(net.spec).eval()
        plain.load_state_dict(net.state_dict())
        torch.testing.assert_close(loaded.embed(x), plain.embed(pre.apply(x)))
    # files written before preprocessing existed load without any
    payload = torch.load(path, weights_only=False)
    del payload["preprocess"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_distance_model(tmp_path / "old.pt")[0].preprocess is None


def test_bad_preprocessing_is_one_clear_error():
    with pytest.raises(CryoOrientError, match="filter must be one of"):
        Preprocess(32, 6.0, filter="median")
    with pytest.raises(CryoOrientError, match="shell gains"):
        Preprocess(32, 6.0, filter="wiener", gain=(1.0, 0.5))
    with pytest.raises(CryoOrientError, match="is for"):
        Preprocess(32, 6.0, filter="lowpass", gain=(1.0,) * n_shells(32)).apply(torch.zeros(2, 16, 16))
    with pytest.raises(CryoOrientError, match="finite"):
        estimate_preprocess(torch.zeros(2, 8, 8), float("nan"), 6.0)
