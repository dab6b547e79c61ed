"""Orientation recovery: exact distances recover the truth (up to O(4)), in-process and on Ray actors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.geometry.quaternion import quat_distance, quat_product
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.recovery.align import align_o4
from cryoorient_ray.core.recovery.graph import build_pair_graph
from cryoorient_ray.core.recovery.solver import (
    EdgeObjective,
    RecoverySettings,
    check_distances,
    random_unit_quaternions,
    recover_orientations,
)
from cryoorient_ray.errors import CryoOrientError


def _exact_problem(p=300, seed=0, k=10, n_random=20):
    q = sample_orientations(p, seed=seed)
    g = build_pair_graph(q, k=k, n_random=n_random, metric="quaternion", seed=seed)
    return q, g, quat_distance(q[g.i], q[g.j])


def test_gradient_matches_finite_differences():
    q, g, d = _exact_problem(40)
    obj = EdgeObjective(g.i, g.j, d + 0.1)
    x = random_unit_quaternions(40, seed=3).double()
    for loss in ("paper", "cosine"):
        _, _, grad = obj.loss_and_grad(x.float(), loss)

        def f(y, loss=loss):
            return obj.loss_and_grad(y.float(), loss)[1]

        eps = 1e-3
        for node, comp in [(0, 0), (5, 2), (17, 3)]:
            e = torch.zeros_like(x)
            e[node, comp] = eps
            fd = (f(x + e) - f(x - e)) / (2 * eps)
            assert fd == pytest.approx(float(grad[node, comp]), rel=2e-2, abs=2e-2)


def test_exact_distances_recover_to_zero_error_in_process():
    q, g, d = _exact_problem(300)
    res = recover_orientations(300, EdgeObjective(g.i, g.j, d), settings=RecoverySettings(seed=0))
    assert res.final_loss < 1e-6
    assert align_o4(q, res.quaternions).mean < 0.01
    # L_OR is a proxy of the error: it went down by orders of magnitude
    assert res.loss[0] > 1e3 * res.final_loss


@pytest.mark.timeout(120)
def test_exact_distances_on_two_ray_actors_match_in_process(ray_local):
    from cryoorient_ray.distributed.recover_actors import recover_on_actors

    q, g, d = _exact_problem(300)
    settings = RecoverySettings(seed=0, max_steps=400)
    local = recover_on_actors(300, g.i, g.j, d, n_actors=0, settings=settings)
    remote = recover_on_actors(300, g.i, g.j, d, n_actors=2, settings=settings, cpus_per_actor=0.5)
    assert align_o4(q, remote.quaternions).mean < 0.01
    assert align_o4(q, local.quaternions).mean < 0.01
    # synchronous data parallelism: the same trajectory whatever the number of actors (up to the
    # float32 summation order of the partitions)
    n = min(len(remote.loss), len(local.loss), 300)
    assert np.allclose(remote.loss[:n], local.loss[:n], rtol=1e-3, atol=1e-6)


def test_recovery_is_invariant_to_a_transformed_truth():
    q, g, d = _exact_problem(200, seed=2)
    a, b = sample_orientations(2, seed=9)
    q2 = quat_product(quat_product(np.broadcast_to(a, q.shape), q), np.broadcast_to(b, q.shape))
    assert np.allclose(quat_distance(q2[g.i], q2[g.j]), d, atol=1e-6)  # same distances, same problem


def test_noisy_distances_give_error_near_noise_level():
    q, g, d = _exact_problem(300, seed=1)
    rng = np.random.default_rng(0)
    dn = check_distances(d + rng.normal(0, math.sqrt(0.05), d.shape))
    res = recover_orientations(300, EdgeObjective(g.i, g.j, dn), settings=RecoverySettings(seed=0))
    err = align_o4(q, res.quaternions).mean
    assert 0.0 < err < 0.15  # the paper's Figure 7: E_OR grows smoothly with σ² (0.10 at σ² = 0.05)


def test_random_init_with_restarts_still_available():
    q, g, d = _exact_problem(300)
    res = recover_orientations(
        300, EdgeObjective(g.i, g.j, d), settings=RecoverySettings(init="random", restarts=4, seed=0)
    )
    assert len(res.restart_losses) == 4
    assert res.final_loss <= min(res.restart_losses) + 1e-9


def test_nan_distances_are_a_clear_error():
    with pytest.raises(CryoOrientError, match="NaN"):
        check_distances(np.array([0.1, np.nan, 0.3]))
    with pytest.raises(CryoOrientError, match="no edges"):
        recover_orientations(5, EdgeObjective(np.zeros(0), np.zeros(0), np.zeros(0)))


@pytest.mark.timeout(180)
def test_ray_data_embeddings_match_in_process(ray_local, tmp_path):
    from cryoorient_ray.core.learning.model import SiameseDistance, load_distance_model, save_distance_model
    from cryoorient_ray.distributed.recover_actors import embed_with_ray_data
    from cryoorient_ray.stages.evaluate import embed_rows
    from tests.helpers import make_store

    store = make_store(tmp_path / "s.zarr", n_per_protein=40, proteins=("a", "b"), size=16, shard_size=16)
    save_distance_model(tmp_path / "m.pt", SiameseDistance({"channels": [4, 8], "n_features": 6}))
    model, _ = load_distance_model(tmp_path / "m.pt")
    meta = store.read_metadata(names=["split", "protein"])
    rows = np.flatnonzero((meta["split"] == 2) & (meta["protein"] == 1))[::-1]  # any order
    got = embed_with_ray_data(str(store.path), "test", str(tmp_path / "m.pt"), rows, concurrency=1)
    want = embed_rows(model, store, rows).numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
