"""Global refinement on Ray actors gives the poses of the in-process search (same batches, same numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from cryoorient_ray.core.imaging.ctf import apply_ctf
from cryoorient_ray.core.imaging.particles import CTFParams, ParticleStack
from cryoorient_ray.core.refinement.global_search import GlobalRefineSettings, global_refine
from cryoorient_ray.distributed.refine_actors import RayScorer
from cryoorient_ray.errors import CryoOrientError
from tests.test_global_search import COARSE, far_off_start
from tests.test_refine import VOXEL, make_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.timeout(240)
def test_actors_give_the_same_poses_as_in_process(ray_local):
    n = 160
    rng = np.random.default_rng(0)
    shifts = rng.uniform(-1.5, 1.5, (n, 2)).astype(np.float32)
    _, q, images = make_data(n, seed=3, shifts=shifts)
    ctf = CTFParams(defocus_u=rng.uniform(1e4, 2e4, n), defocus_v=rng.uniform(1e4, 2e4, n), defocus_angle=np.zeros(n))
    images = np.asarray(apply_ctf(images, VOXEL, **ctf.to_dict()), dtype=np.float32)
    stack = ParticleStack(images, ctf=ctf, pixel_size_A=VOXEL)
    start, _ = far_off_start(q, seed=4)
    settings = GlobalRefineSettings(
        **{**COARSE, "batch_size": 32},
        iterations=2,
        patience=3,
        max_shift_px=1.5,
        local_polish_rounds=0,
        ab_initio="off",  # the ab initio phase runs in-process either way; this compares the search
    )
    here = global_refine(stack, start, settings)
    scorer = RayScorer(n_actors=2)
    labels = []
    there = global_refine(stack, start, settings, scorer=scorer, progress=lambda lab, d, t: labels.append((lab, d, t)))
    assert np.array_equal(there.quaternions, here.quaternions)
    assert np.array_equal(there.shifts, here.shifts)
    assert np.array_equal(there.volume, here.volume)
    assert [e["resolution_0143_A"] for e in there.history] == [e["resolution_0143_A"] for e in here.history]
    assert labels[-1] == ("iteration 2", 6, 6)  # 160 images in halves of 80: 3 batches of 32 each
    assert scorer.actors == []  # closed at the end
    with pytest.raises(CryoOrientError, match="not prepared"):
        scorer.score(np.zeros((2, 32, 32, 32), np.float32), None)
