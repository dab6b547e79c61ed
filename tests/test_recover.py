"""Orientation recovery: exact distances recover the truth (up to O(4)), in-process and on Ray actors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoorient_ray.core.geometry.quaternion import quat_distance, quat_product, random_unitquat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.recovery.align import align_o4
from cryoorient_ray.core.recovery.graph import build_pair_graph
from cryoorient_ray.core.recovery.solver import (
    EdgeObjective,
    RecoverySettings,
    check_distances,
    recover_orientations,
    round_to_rotations,
)
from cryoorient_ray.errors import CryoOrientError


def _exact_problem(p=300, seed=0, k=10, n_random=20):
    q = sample_orientations(p, seed=seed)
    g = build_pair_graph(q, k=k, n_random=n_random, metric="quaternion", seed=seed)
    return q, g, quat_distance(q[g.i], q[g.j])


def test_gradient_matches_finite_differences():
    q, g, d = _exact_problem(40)
    obj = EdgeObjective(g.i, g.j, d + 0.1)
    x = random_unitquat(40, seed=3).double()
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


def test_settings_are_frozen_and_checked():
    s = RecoverySettings(seed=3)
    with pytest.raises(AttributeError):
        s.lr = 1.0  # one typed hand-off: nobody edits it on the way
    for bad in ({"init": "nope"}, {"lr": 0.0}, {"max_steps": -1}, {"restarts": 0}, {"chunk_size": 0}):
        with pytest.raises(CryoOrientError):
            RecoverySettings(**bad)


def test_chunked_gradient_matches_one_pass():
    q, g, d = _exact_problem(60)
    x = random_unitquat(60, seed=1)
    for loss in ("paper", "cosine", "gram"):
        xx = torch.nn.functional.normalize(torch.randn(60, 9, generator=torch.Generator().manual_seed(0)), dim=1)
        xx = xx if loss == "gram" else x
        whole = EdgeObjective(g.i, g.j, d).loss_and_grad(xx, loss)
        chunked = EdgeObjective(g.i, g.j, d, chunk_size=37).loss_and_grad(xx, loss)
        assert whole[0] == pytest.approx(chunked[0], rel=1e-5) and whole[1] == pytest.approx(chunked[1], rel=1e-5)
        assert torch.allclose(whole[2], chunked[2], atol=1e-4)


def test_given_start_skips_the_initialisation_and_progress_reports_each_phase():
    q, g, d = _exact_problem(100)
    seen: dict[str, int] = {}

    def progress(phase, step, total, value):
        seen[phase] = max(seen.get(phase, 0), step)
        assert step <= total and np.isfinite(value)

    s = RecoverySettings(seed=0, max_steps=30, init_steps=20, min_steps=1000)
    res = recover_orientations(100, EdgeObjective(g.i, g.j, d), settings=s, progress=progress)
    assert seen == {"init (Gram)": 20, "L_OR": 30} and res.phase.count("init") == 20
    again = recover_orientations(100, EdgeObjective(g.i, g.j, d), settings=s, init=res.quaternions)
    assert again.restart_losses == [] and again.phase == ["paper"] * 31
    assert again.final_loss <= res.final_loss
    with pytest.raises(CryoOrientError, match="init must be"):
        recover_orientations(100, EdgeObjective(g.i, g.j, d), settings=s, init=res.quaternions[:5])


def test_rounding_to_rotations_of_an_exact_gram_solution():
    from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat

    rot = unitquat_to_rotmat(sample_orientations(80, seed=4))
    w, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    y = torch.as_tensor(rot.reshape(80, 9)) @ w / math.sqrt(3.0)  # vec(R)/√3 up to an O(9) map
    got, res = round_to_rotations(y, starts=8)
    assert res < 1e-12
    assert np.allclose(got.transpose(0, 2, 1) @ got, np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(got), 1)
    # the same Gram matrix ⟨vec R_i, vec R_j⟩ = 1 + 2 cos d_ij: rotations up to the distance-preserving maps
    gram = lambda r: np.einsum("iab,jab->ij", r, r)  # noqa: E731
    assert np.allclose(gram(got), gram(rot), atol=1e-9)


@pytest.mark.timeout(180)
def test_ray_data_embeddings_match_in_process(ray_local, tmp_path):
    from cryoorient_ray.core.imaging.preprocess import Preprocess, n_shells
    from cryoorient_ray.core.learning.model import SiameseDistance, load_distance_model, save_distance_model
    from cryoorient_ray.distributed.recover_actors import embed_with_ray_data
    from cryoorient_ray.stages.evaluate import embed_rows
    from tests.helpers import make_store

    store = make_store(tmp_path / "s.zarr", n_per_protein=40, proteins=("a", "b"), size=16, shard_size=16)
    assert store.manifest["ctf_applied"]
    # the model's preprocessing (phase flip by each image's CTF, a low-pass) is applied on both paths
    gain = tuple(1.0 if k < 5 else 0.0 for k in range(n_shells(16)))
    pre = Preprocess(16, store.pixel_size, phase_flip=True, filter="lowpass", gain=gain)
    save_distance_model(tmp_path / "m.pt", SiameseDistance({"channels": [4, 8], "n_features": 6}, preprocess=pre))
    model, _ = load_distance_model(tmp_path / "m.pt")
    assert model.needs_ctf
    meta = store.read_metadata(names=["split", "protein"])
    rows = np.flatnonzero((meta["split"] == 2) & (meta["protein"] == 1))[::-1]  # any order
    got = embed_with_ray_data(str(store.path), "test", str(tmp_path / "m.pt"), rows, concurrency=1)
    want = embed_rows(model, store, rows).numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)


def test_recover_section_hands_the_solver_its_settings_with_one_set_of_defaults():
    from dataclasses import fields

    from cryoorient_ray.config import RecoverConfig, SolverConfig, load_config

    solver_keys = set(SolverConfig.model_fields) - {"device"}
    assert solver_keys == {f.name for f in fields(RecoverySettings)} - {"seed", "device"}
    # the defaults are the solver's: nothing to drift
    assert RecoverConfig(device="cpu").settings(seed=4) == RecoverySettings(seed=4, device="cpu")
    # flat keys, as in every existing config and --set recover.max_steps=...
    cfg = load_config(None, sets=["recover.max_steps=123", "recover.init=random", "recover.lr=0.01", "seed=5"])
    s = cfg.recover.settings(seed=cfg.seed)
    assert (s.max_steps, s.init, s.lr, s.seed) == (123, "random", 0.01, 5)
    assert RecoverConfig().settings(0).device in ("cpu", "cuda")  # auto resolved
    with pytest.raises(CryoOrientError, match="recover.tol"):
        load_config(None, sets=["recover.tol=0"])


def test_a_disconnected_graph_recovers_its_largest_component(caplog):
    from cryoorient_ray.config import RecoverConfig
    from cryoorient_ray.stages.recover import Estimator, pair_graph, recovery_edges

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 3)) - 50, rng.normal(size=(40, 3)) + 50])
    calls = []

    def distance(i, j):
        calls.append((i.copy(), j.copy()))
        return np.linalg.norm(x[i] - x[j], axis=1) / 100

    est = Estimator("test", x, "euclidean", distance)
    graph = pair_graph(est, RecoverConfig(k=4, n_random=0), seed=0)
    edges = recovery_edges(graph, est)
    assert graph.n_components == 2 and "2 connected components" in caplog.text
    assert edges.nodes.tolist() == list(range(30, 70))  # the 40 of the second cluster
    assert edges.i.max() < 40 and edges.j.max() < 40 and edges.d.dtype == np.float32
    # d̂ is asked for the selection's indices, not the renumbered ones
    assert calls[0][0].min() >= 30
    assert np.allclose(edges.d, distance(edges.nodes[edges.i], edges.nodes[edges.j]))
