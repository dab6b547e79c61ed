"""The oracle: exhaustive assignment against the true map is exact on its own grid, about the grid's
spacing off it, uses the CTF and the shifts, and degrades with noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core.density.phantom import pseudo_protein
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.forward import render_projections
from cryoorient_ray.core.imaging.parameters import sample_projection_parameters
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.recovery import oracle
from cryoorient_ray.core.recovery.oracle import oracle_assignment, oracle_error
from cryoorient_ray.errors import CryoOrientError

OPTICS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1}
N_CANDIDATES = 3000
# Mean distance from a random rotation to the nearest of n random ones: Γ(4/3) · (6π / n)^(1/3).
SPACING = 0.893 * (6 * np.pi / N_CANDIDATES) ** (1 / 3)  # 0.165 rad for 3000


@pytest.fixture(scope="module")
def volume():
    return pseudo_protein(seed=0, box_size=24, voxel_size=8.0).data


def _images(volume, q, snr_db=None, seed=1):
    imgs, _ = render_projections(
        volume, q, snr_db=snr_db, generator=torch.Generator().manual_seed(seed), backend="torch"
    )
    return imgs


def test_the_truth_among_the_candidates_is_found_exactly(volume):
    # the candidates are the draw oracle_assignment makes; render the first 40 of them
    cands = sample_orientations(N_CANDIDATES, seed=np.random.default_rng([3, oracle._STREAM]))
    q = cands[[0, 7, 100, 2999, *range(500, 536)]]
    found = oracle_assignment(_images(volume, q), volume, n_candidates=N_CANDIDATES, seed=3, batch=700)
    np.testing.assert_array_equal(found, q)


def test_noiseless_error_is_about_the_grid_spacing_and_noise_raises_it(volume):
    # a coarse grid sometimes prefers a far candidate (an in-plane flip of the blob-like map)
    # to a near one 0.2 rad off, so the median is the measure of the spacing here
    q = sample_orientations(120, seed=11)
    fine = 4 * N_CANDIDATES
    spacing = 0.893 * (6 * np.pi / fine) ** (1 / 3)  # 0.104 rad
    clean = oracle_error(ParticleStack(_images(volume, q)), volume, q, n_candidates=fine)
    assert 0.8 * spacing < clean[1] < 2.2 * spacing, (clean, spacing)
    coarse = oracle_error(ParticleStack(_images(volume, q)), volume, q, n_candidates=N_CANDIDATES)
    assert coarse[1] > 1.3 * clean[1] and coarse[0] > clean[0]  # the floor falls with the spacing
    noisy = oracle_error(ParticleStack(_images(volume, q, snr_db=-15.0)), volume, q, n_candidates=fine)
    assert noisy[0] > 2.5 * clean[0] and noisy[1] > 2.5 * clean[1], (noisy, clean)


def test_candidates_never_repeat_the_simulators_draw(volume):
    # a store made with seed s draws protein 0 from default_rng([s, 0]) == default_rng(s)
    truth = sample_projection_parameters(60, 0, 0)["quaternion"]
    err = oracle_error(ParticleStack(_images(volume, truth)), volume, truth, n_candidates=N_CANDIDATES, seed=0)
    assert err[1] > 0.5 * SPACING


def test_ctf_and_shifts_of_the_stack_are_used(volume):
    p = sample_projection_parameters(
        100, 4, 0, max_shift=3.0, ctf={"defocus_min": 8000, "defocus_max": 20000, "astigmatism_max": 400}
    )
    ctf = {k: p[k] for k in ("defocus_u", "defocus_v", "defocus_angle")}
    imgs, _ = render_projections(
        volume, p["quaternion"], p["shift"], pixel_size=8.0, ctf=OPTICS, backend="torch", **ctf
    )
    shifts = p["shift"].astype(np.float32)
    full = ParticleStack(imgs, shifts=shifts, ctf={**ctf, **OPTICS}, pixel_size_A=8.0)
    blind = ParticleStack(imgs, shifts=shifts, pixel_size_A=8.0)
    unshifted = ParticleStack(imgs, ctf={**ctf, **OPTICS}, pixel_size_A=8.0)
    err = {
        name: oracle_error(st, volume, p["quaternion"], n_candidates=N_CANDIDATES)[1]  # medians
        for name, st in [("full", full), ("blind", blind), ("unshifted", unshifted)]
    }
    assert err["full"] < 2.2 * SPACING, err
    assert err["blind"] > 1.3 * err["full"] and err["unshifted"] > 2 * err["full"], err


def test_symmetry_aware_error(volume):
    # a C2 map (2-fold about z: (z, y, x) → (z, −y, −x) about voxel D//2): the oracle picks either mate
    c2map = (volume + np.roll(volume[:, ::-1, ::-1], (1, 1), axis=(1, 2))) / 2
    q = sample_orientations(60, seed=2)
    imgs = _images(c2map, q)
    c1 = oracle_error(imgs, c2map, q, n_candidates=N_CANDIDATES)
    c2 = oracle_error(imgs, c2map, q, symmetry="C2", n_candidates=N_CANDIDATES)
    assert c1[0] > 1.0 and c2[0] < 0.25 * c1[0] and c2[1] < 2.2 * SPACING, (c1, c2)  # about half are the mate


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_candidates": 0}, "n_candidates"),
        ({"lowpass_sigma": float("nan")}, "lowpass_sigma"),
        ({"lowpass_sigma": -1.0}, "lowpass_sigma"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_arguments_are_one_error(volume, kwargs, match):
    with pytest.raises(CryoOrientError, match=match):
        oracle_assignment(np.zeros((2, 24, 24), np.float32), volume, **kwargs)


def test_bad_shapes_are_one_error(volume):
    with pytest.raises(CryoOrientError, match="smaller than the images"):
        oracle_assignment(np.zeros((2, 32, 32), np.float32), volume)
    with pytest.raises(CryoOrientError, match="q_true"):
        oracle_error(np.zeros((2, 24, 24), np.float32), volume, np.zeros((3, 4)))
