"""Noise where the microscope sets it: render at the acquisition box, Fourier-crop to the working box
(no Ray; the stores are in test_simulate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.config import load_config
from cryoorient_ray.core.density.phantom import pseudo_protein
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.forward import fourier_crop_volume, render_projections
from cryoorient_ray.core.imaging.fourier import fourier_crop
from cryoorient_ray.errors import CryoOrientError

OPTICS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}


@pytest.fixture(scope="module")
def acquired():
    """The pseudo-protein at 64³ × 3 Å (acquisition) and its 32³ × 6 Å Fourier crop (working)."""
    v64 = pseudo_protein(seed=0, box_size=64, voxel_size=3.0).data
    return v64, fourier_crop_volume(v64, 32)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_output_size_unset_or_equal_changes_nothing(acquired):
    _, v32 = acquired
    q = sample_orientations(6, seed=0)
    kw = {"snr_db": -3.0, "backend": "torch"}
    ref, nv = render_projections(v32, q, generator=torch.Generator().manual_seed(1), **kw)
    same, nv2 = render_projections(v32, q, generator=torch.Generator().manual_seed(1), output_size=32, **kw)
    np.testing.assert_array_equal(ref, same)
    np.testing.assert_array_equal(nv, nv2)


def test_cropped_projections_are_projections_of_the_cropped_map(acquired):
    v64, v32 = acquired
    q = sample_orientations(12, seed=1)
    shifts = np.random.default_rng(0).uniform(-2.5, 2.5, (12, 2))  # working pixels
    cropped, _ = render_projections(v64, q, shifts * 2, pixel_size=3.0, backend="torch", output_size=32)
    working, _ = render_projections(v32, q, shifts, pixel_size=6.0, backend="torch")
    assert cropped.shape == (12, 32, 32) and cropped.dtype == np.float32
    assert _rel(cropped, working) < 0.05  # the projectors' interpolation differs at the two boxes
    # with the CTF applied at the acquisition pixel size
    d = {"defocus_u": np.full(12, 9000.0), "defocus_v": np.full(12, 8600.0), "defocus_angle": np.full(12, 30.0)}
    c_ctf, _ = render_projections(v64, q, shifts * 2, pixel_size=3.0, ctf=OPTICS, backend="torch", output_size=32, **d)
    w_ctf, _ = render_projections(v32, q, shifts, pixel_size=6.0, ctf=OPTICS, backend="torch", **d)
    assert _rel(c_ctf, w_ctf) < 0.1
    assert _rel(c_ctf, working) > 0.5  # the CTF did something


def test_snr_is_set_at_acquisition_and_rises_by_the_binning(acquired):
    v64, _ = acquired
    q = sample_orientations(64, seed=2)
    clean, zero = render_projections(v64, q, pixel_size=3.0, backend="torch", output_size=32)
    noisy, nv = render_projections(
        v64, q, pixel_size=3.0, snr_db=0.0, generator=torch.Generator().manual_seed(3), backend="torch", output_size=32
    )
    assert not zero.any() and (nv > 0).all()
    noise = (noisy - clean).reshape(64, -1).var(axis=1)
    # σ² is per acquisition pixel; white noise per working pixel has σ² · (32/64)²
    np.testing.assert_allclose(noise / (nv * 0.25), 1.0, rtol=0.2)
    gain = 10 * np.log10(clean.reshape(64, -1).var(axis=1) / noise).mean()
    assert 5.0 < gain < 7.0, gain  # 10·log10(64²/32²) = 6.02 dB for white noise


def test_fourier_crop_volume_commutes_with_projection(acquired):
    v64, v32 = acquired
    assert v32.shape == (32, 32, 32) and v32.dtype == np.float32
    assert v32.sum() * 8 == pytest.approx(float(v64.sum()), rel=1e-5)  # values, not sums, are kept
    # the projection along z is the kz = 0 plane: crop then project == project then crop
    top = fourier_crop(v64.sum(0)[None], 32).numpy()[0] * (32 / 64)
    np.testing.assert_allclose(v32.sum(0), top, atol=1e-4 * np.abs(top).max())
    np.testing.assert_array_equal(fourier_crop_volume(v32, 32), v32)
    with pytest.raises(CryoOrientError, match="cubic"):
        fourier_crop_volume(np.zeros((4, 4, 5)), 2)
    with pytest.raises(CryoOrientError, match="output_size"):
        render_projections(v32, sample_orientations(1), output_size=64)


def test_acquisition_config_resolves_and_refuses_nonsense():
    base = ["simulate.image_size=32", "simulate.voxel_size=6"]
    sim = load_config(None, None, [*base, "simulate.acquisition.image_size=64"]).simulate
    assert sim.acquisition_size == 64 and sim.acquisition_pixel_size() == 3.0 and not sim.acquisition_unset
    assert sim.working_pixel_size(3.0) == 6.0
    by_pixel = load_config(
        None,
        None,
        ["simulate.image_size=32", "simulate.acquisition.image_size=64", "simulate.acquisition.pixel_size=2"],
    ).simulate
    assert by_pixel.acquisition_pixel_size() == 2.0 and by_pixel.working_pixel_size(2.0) == 4.0
    default = load_config(None, None, base).simulate
    assert default.acquisition_unset and default.acquisition_size == 32 and default.acquisition_pixel_size() == 6.0
    same = load_config(None, None, [*base, "simulate.acquisition.image_size=32"]).simulate
    assert same.acquisition_unset
    bad = {
        "simulate.acquisition.image_size=16": "smaller than simulate.image_size 32",
        "simulate.acquisition.pixel_size=2.5": "disagrees with simulate.voxel_size 6",
        "simulate.acquisition.image_size=.inf": "finite",
        "simulate.acquisition.pixel_size=.nan": "finite",
        "simulate.acquisition.pixel_size=0": "greater than 0",
        "simulate.noise.snr_db=.nan": "finite",
        "simulate.noise.snr_db=400": "less than or equal to 100",
        "simulate.acquisition.image_size=true": "boolean",
    }
    for override, match in bad.items():
        with pytest.raises(CryoOrientError, match=match) as info:
            load_config(None, None, [*base, override])
        assert "\n" not in str(info.value)
    with pytest.raises(CryoOrientError, match="needs a pixel size"):
        load_config(None, None, ["simulate.image_size=32", "simulate.acquisition.image_size=64"])


def test_stores_made_before_the_record_report_the_working_box(tmp_path):
    from tests.helpers import make_store

    store = make_store(tmp_path / "old.zarr")
    assert "acquisition" not in store.manifest
    assert store.acquisition == {
        "image_size": 8,
        "pixel_size": 2.5,
        "snr_db": None,
        "noise_variance_box": "acquisition",
        "noise_variance_to_working": 1.0,
    }
    assert store.summary()["acquisition"] == store.acquisition


def test_the_pseudo_protein_fills_an_acquisition_box_finer_than_its_default():
    """116² at 1.66 Å/px (the paper's pixel count, the demo's 192 Å box): 64 default voxels would
    hold only 106 Å, less than the pseudo-protein's 104 Å diameter plus its margin."""
    from cryoorient_ray.distributed.simulate_tasks import _prepare_map_task

    prepare = _prepare_map_task._function  # the task's body, without Ray
    fine, voxel = prepare("pseudo:0", 192.0 / 116, None, 116, None)
    assert fine.shape == (116,) * 3 and voxel == pytest.approx(192.0 / 116)
    coarse, _ = prepare("pseudo:0", 3.0, None, 64, None)  # the default box: as before
    # the same molecule: its mass (sum × voxel volume) agrees between the two samplings
    assert float(fine.sum()) * voxel**3 == pytest.approx(float(coarse.sum()) * 27.0, rel=0.05)
