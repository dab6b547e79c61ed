"""Global, coarse-to-fine projection matching: the SO(3) grid, one batch's search, the iterations.

Data: the pseudo-protein (box 32, 6 Å voxels) projected with FourierSliceProjector at uniform
orientations (tests/test_refine.py's ``make_data``). The searches stop early (15° → 3.75°, 4 candidates kept)
so the whole module stays well under a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core import quat_distance, sample_orientations, unitquat_to_rotmat
from cryoorient_ray.core.geometry.grids import (
    grid_children,
    grid_level_for_step,
    grid_rotmats,
    grid_size,
    grid_step_deg,
    so3_grid,
)
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.reconstruction.inversion import reconstruct_fourier
from cryoorient_ray.core.recovery.align import align_rotation
from cryoorient_ray.core.refinement.global_search import (
    GlobalRefineResult,
    GlobalRefineSettings,
    GlobalRefineState,
    InProcessScorer,
    _plan,
    global_refine,
    make_batches,
)
from cryoorient_ray.core.refinement.matching import SliceMatcher
from cryoorient_ray.errors import CryoOrientError
from tests.test_refine import VOXEL, make_data, perturb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COARSE = {"start_deg": 15.0, "final_deg": 3.75, "keep": 4, "batch_size": 128}


# ----------------------------------------------------------------------------------------------
# the grid


def test_grid_is_rotations_with_its_viewing_direction_and_size():
    for n in (1, 2, 3):
        r = grid_rotmats(n, torch.arange(grid_size(n)))
        assert r.shape == (24 * n**3, 3, 3)
        assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=r.dtype).expand_as(r), atol=1e-12)
        assert torch.allclose(torch.linalg.det(r), torch.ones(len(r), dtype=r.dtype))
    assert grid_level_for_step(15.0) == 6 and grid_step_deg(6) == 15.0 and grid_size(6) == 5184
    assert grid_level_for_step(16.0) == 6 and grid_level_for_step(90.0) == 1
    q = so3_grid(3)
    assert q.shape == (648, 4) and np.allclose(np.linalg.norm(q, axis=1), 1)
    # every grid point distinct
    d = np.abs(q @ q.T) - 2 * np.eye(len(q))
    assert d.max() < math.cos(math.radians(5) / 2)
    with pytest.raises(CryoOrientError):
        grid_rotmats(0, torch.arange(3))
    with pytest.raises(CryoOrientError):
        grid_rotmats(1, torch.tensor([24]))


def test_grid_covers_so3_and_children_tile_their_parent():
    n = 3  # 30°
    q = torch.from_numpy(so3_grid(n))
    probe = torch.from_numpy(sample_orientations(3000, seed=4))
    nearest = 2 * torch.arccos((probe @ q.T).abs().amax(1).clamp(max=1))
    # near-uniform: every orientation within 0.8 steps of a grid point, half of them within 0.5
    assert float(nearest.max()) < math.radians(0.8 * grid_step_deg(n))
    assert float(nearest.median()) < math.radians(0.5 * grid_step_deg(n))
    children = grid_children(n, torch.arange(grid_size(n)))
    assert children.shape == (grid_size(n), 8)
    assert torch.equal(children.reshape(-1).sort().values, torch.arange(grid_size(2 * n)))
    qc = torch.from_numpy(so3_grid(2 * n))[children]
    dist = 2 * torch.arccos((qc * q[:, None]).sum(-1).abs().clamp(max=1))
    assert float(dist.max()) < math.radians(0.6 * grid_step_deg(n))


# ----------------------------------------------------------------------------------------------
# one batch


def _search(stack, vol, settings, edge=12.0):
    plan = _plan(settings.checked(), stack.image_size, edge, np.ones(stack.image_size // 2 + 1), 1)
    scorer = InProcessScorer()
    batches = make_batches(np.zeros(len(stack), np.int8), settings.batch_size)
    scorer.prepare(stack, batches, "cpu")
    return plan, scorer.score(np.stack([vol, np.zeros_like(vol)]).astype(np.float32), plan)


def test_search_finds_the_true_orientations_and_shifts_of_noiseless_images():
    n = 96
    rng = np.random.default_rng(3)
    shifts = rng.uniform(-2, 2, (n, 2)).astype(np.float32)
    vol, q, images = make_data(n, seed=2, shifts=shifts)
    settings = GlobalRefineSettings(**{**COARSE, "keep": 8}, max_shift_px=2.0, shift_step_px=0.25)
    plan, cands = _search(ParticleStack(images, pixel_size_A=VOXEL), vol, settings)
    assert plan.levels == 3 and plan.base == 6 and len(plan.level0_shifts()) >= 5 and plan.shift_step <= 1.5
    (c,) = cands
    assert c.quaternions.shape == (n, 8, 4) and c.shifts.shape == (n, 8, 2) and c.scores.shape == (n, 8)
    assert (np.diff(c.scores, axis=1) <= 0).all()  # best first
    err = np.degrees(np.asarray(quat_distance(c.quaternions[:, 0], q)))
    # within about one step of the last level (3.75°), none lost (the local polish does the rest)
    assert np.median(err) < 4.5 and np.mean(err < 10) > 0.9, np.sort(err)
    ok = err < 10
    assert np.median(np.abs(c.shifts[ok, 0] - shifts[ok])) < 0.3


def test_each_half_is_scored_against_its_own_map_only():
    vol, q, images = make_data(64, seed=5)
    stack = ParticleStack(images, pixel_size_A=VOXEL)
    settings = GlobalRefineSettings(**COARSE).checked()
    plan = _plan(settings, 32, 10.0, np.ones(17), 1)
    halves = np.array([0, 1] * 32, dtype=np.int8)
    batches = make_batches(halves, 16)
    scorer = InProcessScorer()
    scorer.prepare(stack, batches, "cpu")
    good = scorer.score(np.stack([vol, vol]).astype(np.float32), plan)
    noise = np.random.default_rng(0).standard_normal(vol.shape).astype(np.float32)
    bad = scorer.score(np.stack([vol, noise]).astype(np.float32), plan)
    for b, g, x in zip(batches, good, bad, strict=True):
        assert np.array_equal(g.index, b.index)
        if b.half == 0:
            assert np.array_equal(g.quaternions, x.quaternions) and np.array_equal(g.scores, x.scores)
        else:
            assert not np.array_equal(g.quaternions, x.quaternions)


# ----------------------------------------------------------------------------------------------
# the iterations


@pytest.fixture(scope="module")
def data():
    vol, q, images = make_data(240, seed=1)
    stack = ParticleStack(images, pixel_size_A=VOXEL)
    truth_map = reconstruct_fourier(stack, unitquat_to_rotmat(q).astype(np.float32))
    return stack, q, truth_map


def far_off_start(q: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every orientation 8° off, and a third of them replaced by random ones (far beyond the
    local refiner's ±12°): ``(start, which were replaced)``."""
    start = perturb(q, 8.0, seed=seed)
    lost = np.random.default_rng(seed).random(len(q)) < 1 / 3
    start[lost] = sample_orientations(int(lost.sum()), seed=seed + 1)
    return start, lost


def test_global_refine_repairs_starts_far_off(data):
    stack, q, truth_map = data
    start, lost = far_off_start(q, seed=7)
    calls = []
    states = []
    # the search itself from the given start (with ab_initio auto the ab initio map wins here: its
    # poses' half maps agree better than this start's)
    settings = GlobalRefineSettings(**COARSE, iterations=3, patience=3, local_polish_rounds=1, ab_initio="off")
    res = global_refine(
        stack,
        start,
        settings,
        q_true=q,
        reference=truth_map,
        progress=lambda *a: calls.append(a),
        on_iteration=lambda s, e: states.append((s.iteration, dict(e))),
    )
    assert isinstance(res, GlobalRefineResult)
    assert res.quaternions.shape == (240, 4) and (res.quaternions[:, 0] >= 0).all() and res.shifts is None
    assert res.volume.shape == (32,) * 3 and res.half_maps[0].shape == (32,) * 3
    first = res.history[0]
    assert first["iteration"] == 0 and first["error_rad"] > 0.5
    final = res.history[-1]
    assert final["iteration"] == "polish"
    # 0.79 rad → 0.13 measured (120 images per half map: the matches are noisy)
    assert final["error_rad"] < 0.2 and final["error_rad"] < first["error_rad"] / 4, res.history
    err = np.asarray(quat_distance(align_rotation(q, res.quaternions).apply(res.quaternions), q))
    assert np.mean(err[lost] < 0.2) > 0.8  # the lost ones found again (the local refiner cannot)
    assert final["resolution_05_true_A"] < 1.3 * 2 * VOXEL
    for e in res.history[1:-1]:
        for key in ("band_A", "resolution_0143_A", "resolution_05_A", "change_rad", "seconds", "n_candidates"):
            assert key in e
    assert [s[0] for s in states] == [e["iteration"] for e in res.history[1:-1]]
    assert calls and calls[-1][1] == calls[-1][2] and calls[0][0] == "iteration 1"
    assert set(np.unique(res.state.halves)) == {0, 1}


def test_resume_after_an_iteration_gives_the_same_poses(data, tmp_path):
    stack, q, _ = data
    start = perturb(q, 20.0, seed=8)
    settings = GlobalRefineSettings(**COARSE, iterations=2, patience=5, local_polish_rounds=0, ab_initio="off")
    saved = tmp_path / "state.npz"

    def save_first(state, entry):
        if state.iteration == 1:
            state.to_npz(saved)

    full = global_refine(stack, start, settings, on_iteration=save_first)
    state = GlobalRefineState.from_npz(saved)
    assert state.iteration == 1 and not state.done and len(state.history) == 2
    resumed = global_refine(stack, start, settings, resume=state)
    assert np.array_equal(resumed.quaternions, full.quaternions)
    assert [e["iteration"] for e in resumed.history] == [0, 1, 2]
    with pytest.raises(CryoOrientError, match="seed"):
        global_refine(stack, start, GlobalRefineSettings(**COARSE, iterations=2, seed=3), resume=state)
    with pytest.raises(CryoOrientError, match="cannot read"):
        GlobalRefineState.from_npz(tmp_path / "missing.npz")


def test_soft_mode_and_weighted_reconstruction(data):
    stack, q, _ = data
    rot = unitquat_to_rotmat(q).astype(np.float32)
    plain = reconstruct_fourier(stack, rot)
    assert np.allclose(reconstruct_fourier(stack, rot, weights=np.ones(len(q))), plain)
    # an image inserted twice at half weight is the image once
    twice = ParticleStack(np.concatenate([stack.images.numpy()] * 2), pixel_size_A=VOXEL)
    halfw = reconstruct_fourier(twice, np.concatenate([rot, rot]), weights=np.full(2 * len(q), 0.5))
    assert np.allclose(halfw, plain, atol=1e-5 * np.abs(plain).max())
    with pytest.raises(CryoOrientError):
        reconstruct_fourier(stack, rot, weights=-np.ones(len(q)))
    settings = GlobalRefineSettings(**COARSE, iterations=1, mode="soft", local_polish_rounds=0)
    res = global_refine(stack, far_off_start(q, seed=9)[0], settings, q_true=q)
    assert res.state.soft_weights.shape == (240, 4)
    assert np.allclose(res.state.soft_weights.sum(1), 1)
    assert res.history[-1]["error_rad"] < res.history[0]["error_rad"] / 2


def test_random_start_and_bad_settings(data):
    stack, q, _ = data
    off = GlobalRefineSettings(**COARSE, iterations=1, local_polish_rounds=0, ab_initio="off")
    res = global_refine(stack, None, off, q_true=q)
    assert res.history[0]["error_rad"] > 1.0  # random orientations: the control
    assert np.isfinite(res.history[1]["resolution_0143_A"])
    for bad in (
        {"mode": "fuzzy"},
        {"symmetry": "D0"},
        {"symmetry_mode": "x"},
        {"keep": 0},
        {"final_deg": 40.0},
        {"device": "tpu"},
    ):
        with pytest.raises(CryoOrientError):
            global_refine(stack, q, GlobalRefineSettings(**{**COARSE, **bad}))
    with pytest.raises(CryoOrientError):
        global_refine(stack, q[:10], GlobalRefineSettings(**COARSE))
    if not torch.cuda.is_available():
        with pytest.raises(CryoOrientError, match="CUDA"):
            global_refine(stack, q, GlobalRefineSettings(**COARSE, device="cuda"))


def test_matcher_band_points_are_sorted_by_radius(data):
    stack, _, _ = data
    m = SliceMatcher(stack)
    m.set_band(lambda r: np.ones_like(r), 10.0)
    assert (torch.diff(m.radius) >= 0).all() and m.radius.max() <= 10.0
    assert m.points_within(4.0) == int((m.radius <= 4.0).sum())
