"""Stochastic ab initio: a first map from noiseless projections of unknown orientation, and its hook
into global refinement.

Data: the pseudo-protein (box 32, 6 Å voxels) projected with FourierSliceProjector at uniform
orientations (tests/test_refine.py's ``make_data``), 300 images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cryoorient_ray.core import unitquat_to_rotmat
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.reconstruction.fsc import fsc
from cryoorient_ray.core.reconstruction.inversion import reconstruct_fourier
from cryoorient_ray.core.recovery.align import align_rotation
from cryoorient_ray.core.refinement.ab_initio import (
    AbInitioSettings,
    ab_initio,
    initial_model,
    lowpass_volume,
)
from cryoorient_ray.core.refinement.global_search import GlobalRefineSettings, GlobalRefineState, global_refine
from cryoorient_ray.errors import CryoOrientError
from tests.test_global_search import COARSE
from tests.test_refine import VOXEL, make_data, perturb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"steps": 40, "batch_size": 150}


@pytest.fixture(scope="module")
def data():
    vol, q, images = make_data(300, seed=4)
    stack = ParticleStack(images, pixel_size_A=VOXEL)
    truth_map = reconstruct_fourier(stack, unitquat_to_rotmat(q).astype(np.float32))
    return stack, q, truth_map


def test_ab_initio_finds_the_orientations_from_nothing(data):
    stack, q, truth_map = data
    res = ab_initio(stack, AbInitioSettings(**FAST), q_true=q, evaluate_every=8)
    errs = [e["error_rad"] for e in res.history if "error_rad" in e]
    # chance is ≈ 2 rad (rotation + hand of random orientations); 1.13 after 8 steps, 0.25 after 40 measured
    assert errs[0] > 0.9 and errs[-1] < 0.4, res.history
    assert align_rotation(q, res.quaternions).mean < 0.4
    assert res.volume.shape == (32,) * 3 and res.band_radius == pytest.approx(8.0)
    assert [e["step"] for e in res.history] == list(range(1, 41))
    assert res.history[0]["temperature"] == pytest.approx(4.0) and res.history[-1]["temperature"] == 1.0
    # the poses registered onto the truth (rotation + hand) reconstruct the protein: FSC 0.5 against the
    # true-orientation map well inside the random orientations' (> 60 Å)
    aligned = align_rotation(q, res.quaternions).apply(res.quaternions)
    vol = reconstruct_fourier(stack, unitquat_to_rotmat(np.asarray(aligned, dtype=np.float64)).astype(np.float32))
    assert fsc(vol, truth_map, VOXEL).resolution_05 < 40.0
    assert np.isfinite(res.volume).all() and np.abs(res.volume).max() > 0


def test_lowpass_keeps_the_band_and_drops_beyond():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((16, 16, 16)).astype(np.float32)
    lp = lowpass_volume(vol, 4.0)
    ft, ft0 = np.fft.fftn(lp), np.fft.fftn(vol)
    k = np.fft.fftfreq(16) * 16
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert np.allclose(ft[r <= 4.0], ft0[r <= 4.0], atol=1e-3)
    assert np.abs(ft[r >= 6.0]).max() < 1e-3


def test_settings_are_checked(data):
    stack, q, _ = data
    for bad in (
        {"steps": 0},
        {"batch_size": 1},
        {"grid_deg": 0.0},
        {"band_start": 0.5},
        {"band_end": 2.0},
        {"temperature_start": 0.5},
        {"anneal_fraction": 0.0},
        {"rise_fraction": 1.5},
        {"decay": 1.0},
        {"max_shift_px": -1.0},
        {"wiener": 0.0},
        {"mask_radius": -2.0},
        {"keep": True},
    ):
        with pytest.raises(CryoOrientError, match="ab initio"):
            ab_initio(stack, AbInitioSettings(**bad))
    for bad in ({"ab_initio": "maybe"}, {"ab_initio_steps": 0}, {"ab_initio_batch_size": 1}):
        with pytest.raises(CryoOrientError, match="ab_initio"):
            global_refine(stack, q, GlobalRefineSettings(**{**COARSE, **bad}))


def test_auto_keeps_clearly_good_starts_and_lets_the_fsc_area_decide_otherwise(data):
    stack, q, _ = data
    fast = GlobalRefineSettings(**COARSE, ab_initio_steps=2, ab_initio_batch_size=100)
    calls = []

    def area_of(*areas):  # the areas of successive calls: random orientations first, then ab initio's
        left = list(areas)

        def f(quats, shifts):
            calls.append(quats.shape)
            return left.pop(0)

        return f

    # 16 shells at 32²: with random orientations at 4, an area of 13 (≥ 4 + 0.75 × (16 − 4)) is a
    # good start, kept without running ab initio
    good = initial_model(stack, fast, start_area=13.0, area_of=area_of(4.0))
    assert good.kind == "given" and good.result is None and calls == [(300, 4)]
    assert good.summary()["random_fsc_area"] == 4.0 and "random orientations 4.00" in good.reason
    # the same area where random orientations already score 8 (noiseless images) is not enough
    calls.clear()
    fooled = initial_model(stack, fast, start_area=13.0, area_of=area_of(8.0, 15.0))
    assert fooled.kind == "ab initio" and calls == [(300, 4), (300, 4)] and "15.00 > the start's 13.00" in fooled.reason
    # below it, ab initio runs and the larger half-map FSC area wins
    calls.clear()
    bad = initial_model(stack, fast, start_area=5.0, area_of=area_of(4.5, 6.0), q_true=q, q_start=q)
    assert bad.kind == "ab initio" and bad.result is not None and bad.reference.shape == (32,) * 3
    assert calls == [(300, 4), (300, 4)] and "6.00 > the start's 5.00" in bad.reason
    summary = bad.summary()
    assert summary["start_error_rad"] < 1e-6 and summary["ab_initio_fsc_area"] == 6.0 and "ab_initio" in summary
    kept = initial_model(stack, fast, start_area=7.0, area_of=area_of(4.5, 6.0))
    assert kept.kind == "given" and kept.reference is None and kept.result is not None
    calls.clear()
    off = initial_model(stack, GlobalRefineSettings(**COARSE, ab_initio="off"), start_area=None, area_of=area_of())
    assert off.kind == "random" and off.result is None
    on = initial_model(stack, dataclasses.replace(fast, ab_initio="on"), start_area=15.0, area_of=area_of())
    assert on.kind == "ab initio" and calls == []  # "on" does not compare
    rand = initial_model(stack, fast, start_area=None, area_of=area_of())
    assert rand.kind == "ab initio" and rand.reason == "random start"


@pytest.mark.slow
def test_global_refine_from_random_starts_from_ab_initio_and_resumes(data, tmp_path):
    stack, q, _ = data
    settings = GlobalRefineSettings(
        **COARSE, iterations=2, patience=5, local_polish_rounds=0, ab_initio_steps=40, ab_initio_batch_size=150
    )
    saved = tmp_path / "state.npz"

    def save_first(state, entry):
        if state.iteration == 1:
            state.to_npz(saved)

    full = global_refine(stack, None, settings, q_true=q, on_iteration=save_first)
    first = full.history[0]
    assert first["start"] == "ab initio" and first["start_reason"] == "random start"
    assert first["start_error_rad"] > 1.0 and first["error_rad"] < 0.4
    assert full.history[-1]["error_rad"] < 0.15, full.history
    # the ab initio phase is not run again on resume: the state holds its outcome
    state = GlobalRefineState.from_npz(saved)
    resumed = global_refine(stack, None, settings, resume=state)
    assert np.array_equal(resumed.quaternions, full.quaternions)
    assert resumed.history[0]["start"] == "ab initio"
    # a good start is kept (auto), and the history says why
    given = global_refine(stack, perturb(q, 8.0, seed=2), dataclasses.replace(settings, iterations=1))
    assert given.history[0]["start"] == "given", given.history[0]  # kept outright, or it beat the ab initio poses


def test_band_limited_insertion_is_the_reconstruction_insertion_within_its_radius(data):
    from cryoorient_ray.core.imaging.particles import CTFParams
    from cryoorient_ray.core.reconstruction.inversion import _backproject, _ctf_source, _inputs, fourier_sums

    stack, q, _ = data
    n = 40
    shifts = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    ctf = CTFParams(defocus_u=np.full(n, 15000.0), defocus_v=np.full(n, 12000.0), defocus_angle=np.zeros(n))
    part = ParticleStack(stack.images[:n], pixel_size_A=VOXEL, shifts=shifts, ctf=ctf)
    imgs, r, t, _ = _inputs(part, unitquat_to_rotmat(q[:n]).astype(np.float32))
    ctf_fn = _ctf_source(part, None, 64, imgs.dtype, imgs.device)
    w = torch.rand(n, generator=torch.Generator().manual_seed(0))
    full = _backproject(imgs, r, t, ctf_fn, 64, None, 64, w)
    rot = unitquat_to_rotmat(q[:n]).astype(np.float32)
    for got, want in zip(fourier_sums(part, rot, weights=w, radius=1e9), full, strict=True):
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    low = fourier_sums(part, rot, weights=w, radius=10.0)[1]
    assert 0 < float(low.sum()) < 0.5 * float(full[1].sum())  # fewer points inserted
