"""Recovery on SO(3)/G (point groups), symmetric maps, and `recover --exact` on a D2 store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.core.geometry.quaternion import quat_product
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance, symmetry_group
from cryoorient_ray.core.reconstruction.symmetrise import (
    reconstruct_symmetric,
    symmetrise_volume,
    symmetry_residual,
)
from cryoorient_ray.core.recovery.align import align_o4
from cryoorient_ray.core.recovery.graph import build_pair_graph
from cryoorient_ray.core.recovery.solver import (
    EdgeObjective,
    RecoverySettings,
    check_distances,
    recover_orientations,
)
from cryoorient_ray.core.recovery.symmetric import (
    SymmetricEdgeObjective,
    anchor_solutions,
    beam_anchor_starts,
    choose_anchors,
    recover_symmetric,
    right_mult_matrices,
    trilaterate,
    with_anchor_edges,
)
from cryoorient_ray.errors import CryoOrientError
from tests.helpers import make_store


def _problem(p, sym, seed=0, k=8, n_random=10):
    q = sample_orientations(p, seed=seed)
    g = build_pair_graph(q, k=k, n_random=n_random, metric="quaternion", seed=seed)
    d = check_distances(np.asarray(symmetric_quat_distance(q[g.i], q[g.j], sym)))
    return q, g, d


def test_right_mult_matrices_are_the_hamilton_product():
    g = np.array(symmetry_group("D3").quaternions)
    q = sample_orientations(5, seed=1)
    m = right_mult_matrices(torch.tensor(g))
    for k in range(len(g)):
        np.testing.assert_allclose((m[k].numpy() @ q.T).T, quat_product(q, np.broadcast_to(g[k], q.shape)), atol=1e-12)


def test_symmetric_objective_gradient_is_that_of_the_min_over_mates():
    q, g, d = _problem(60, "D2", seed=2)
    d = np.clip(d + np.random.default_rng(0).normal(0, 0.1, d.shape), 0, np.pi).astype(np.float32)
    x = torch.tensor(sample_orientations(60, seed=9), dtype=torch.float64, requires_grad=True)
    dg = symmetric_quat_distance(x[g.i], x[g.j], "D2")
    loss = ((dg - torch.tensor(d, dtype=torch.float64)) ** 2).sum()
    loss.backward()
    l_or, _, grad = SymmetricEdgeObjective(g.i, g.j, d, "D2").loss_and_grad(x.detach().float())
    assert abs(l_or - loss.item()) < 1e-3 * loss.item()
    # the Riemannian (tangent) parts agree; the radial part differs by the parametrisation only
    xd = x.detach()
    tan = lambda v: v - (v * xd).sum(1, keepdim=True) * xd  # noqa: E731
    np.testing.assert_allclose(tan(grad.double()).numpy(), tan(x.grad).numpy(), atol=2e-3 * float(x.grad.abs().max()))


def test_c1_symmetric_objective_equals_the_c1_objective():
    q, g, d = _problem(80, "C1", seed=3)
    x = torch.tensor(sample_orientations(80, seed=4), dtype=torch.float32)
    a = EdgeObjective(g.i, g.j, d).loss_and_grad(x)
    b = SymmetricEdgeObjective(g.i, g.j, d, "C1").loss_and_grad(x)
    assert abs(a[0] - b[0]) < 1e-4 * a[0]
    torch.testing.assert_close(a[2], b[2], rtol=1e-4, atol=1e-5)
    with pytest.raises(CryoOrientError, match="Gram"):
        SymmetricEdgeObjective(g.i, g.j, d, "D2").loss_and_grad(x, "gram")


def test_trilateration_from_true_anchors_is_within_the_grid_spacing():
    q = sample_orientations(300, seed=5)
    anchors = choose_anchors(300, 12, seed=0)
    da = np.asarray(symmetric_quat_distance(q[:, None], q[anchors][None], "C3"))
    est = trilaterate(da, q[anchors], "C3", n_candidates=60000)
    err = np.asarray(symmetric_quat_distance(est, q, "C3"))
    assert np.median(err) < 0.1 and np.quantile(err, 0.95) < 0.2


def test_anchor_edges_are_added_once():
    i, j, d = np.array([0, 1]), np.array([1, 2]), np.array([0.1, 0.2], np.float32)
    da = np.full((4, 2), 0.5, np.float32)
    ei, ej, ed = with_anchor_edges(i, j, d, np.array([1, 3]), da)
    pairs = set(zip(ei.tolist(), ej.tolist(), strict=True))
    assert pairs == {(0, 1), (1, 2), (0, 3), (1, 3), (2, 3)}
    assert len(ei) == 5 and ed[(ei == 0) & (ej == 1)][0] == np.float32(0.1)  # the graph's own d̂ kept


@pytest.mark.slow  # ~2 min on 2 cores (the anchor start's 512 annealed starts)
@pytest.mark.timeout(300)
def test_exact_c2_distances_are_recovered_exactly_where_the_c1_start_fails():
    p = 150
    q, g, d = _problem(p, "C2", seed=0)
    c1 = recover_orientations(p, EdgeObjective(g.i, g.j, d), settings=RecoverySettings(seed=0))
    assert align_o4(q, c1.quaternions, symmetry="C2").mean > 0.3  # the Gram start assumes the full group

    def dist(a, b):
        return np.asarray(symmetric_quat_distance(q[a], q[b], "C2"))

    res, start = recover_symmetric(p, g.i, g.j, d, dist, "C2", RecoverySettings(seed=0))
    assert start.anchor_loss < 1e-4 and len(start.anchors) == 16
    assert align_o4(q, res.quaternions, symmetry="C2").mean < 0.01
    assert res.final_loss < 1e-5


# ----------------------------------------------------------------------------------------------- maps


def _smooth_volume(d=25, seed=0):
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).standard_normal((d, d, d)), 2.0)
    g = np.arange(d) - d // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    return v * (x * x + y * y + z * z < (d // 2 - 3) ** 2)


def test_symmetrise_volume_is_a_projection_onto_symmetric_maps():
    v = _smooth_volume()
    assert symmetry_residual(v, "D2") > 0.5
    vs = symmetrise_volume(v, "C4")
    # a quarter turn about z through voxel D // 2 (odd D: the array's own centre) leaves it unchanged
    np.testing.assert_allclose(np.rot90(vs, 1, axes=(1, 2)), vs, atol=1e-12)
    assert symmetry_residual(vs, "C4") < 1e-12
    vi = symmetrise_volume(v, "I")
    assert symmetry_residual(vi, "I") < 0.1  # trilinear resampling: idempotent up to its blur (0.06)
    np.testing.assert_array_equal(symmetrise_volume(v, "C1"), v)
    with pytest.raises(CryoOrientError, match="cube"):
        symmetrise_volume(v[:, :, :5], "C2")


def test_imposed_and_c1_then_symmetrised_maps_agree_with_the_symmetric_truth():
    from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
    from cryoorient_ray.core.imaging.projection import FourierSliceProjector

    vol = symmetrise_volume(_smooth_volume(d=24, seed=1), "D2").astype(np.float32)
    q = sample_orientations(600, seed=2)
    rot = unitquat_to_rotmat(q)
    imgs = np.asarray(FourierSliceProjector(vol)(rot))
    m = np.asarray(vol) != 0
    corr = {}
    for mode in ("impose", "c1_then_symmetrise"):
        rec = np.asarray(reconstruct_symmetric(imgs, rot, "D2", mode=mode, method="fourier"))
        corr[mode] = np.corrcoef(rec[m], vol[m])[0, 1]
        assert symmetry_residual(rec, "D2") < 0.05
    assert min(corr.values()) > 0.97, corr
    with pytest.raises(CryoOrientError, match="mode"):
        reconstruct_symmetric(imgs, rot, "D2", mode="both")


# ----------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow  # several minutes on 2 cores
@pytest.mark.timeout(900)
def test_recover_exact_on_a_d2_store_reports_the_symmetry_aware_error(tmp_path):
    path = tmp_path / "d2.zarr"
    make_store(path, n_per_protein=240, proteins=("d2",), size=8, symmetry="D2", ctf=False, split_fractions=(0, 0, 1))
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["recover", str(path), "--exact", "--no-gauge", "--no-progress", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "recovered.json").read_text())
    assert rep["symmetry"] == "D2"
    # E_OR is symmetry-aware (min over mates per image); without the gauge (no images here) the
    # registration error is that of an unresolved O(4) gauge, so only its presence is checked
    assert rep["e_or_o4"] < 0.01 and rep["L_OR"] < 1e-5 and "registration" in rep
    assert rep["start"] in ("anchors", "spectral")  # D2: both starts ran, the better one is named


def _exact_anchor_distances(k: int, symmetry: str):
    q = sample_orientations(k, seed=5)
    return q, np.asarray(symmetric_quat_distance(q[:, None], q[None], symmetry))


def test_beam_places_anchors_on_its_candidates_far_better_than_chance():
    _, d = _exact_anchor_distances(10, "I")
    iu = np.triu_indices(10, 1)
    starts = beam_anchor_starts(d, "I", starts=16, n_candidates=1500, beam=256)
    assert starts.shape == (16, 10, 4)
    assert torch.allclose(starts[:, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # anchor 0: the identity
    q = starts.double().numpy()

    def residual(x):
        return float(np.mean((np.asarray(symmetric_quat_distance(x[:, None], x[None], "I"))[iu] - d[iu]) ** 2))

    beam = [residual(x) for x in q]
    assert beam == sorted(beam) or np.allclose(beam, sorted(beam), atol=1e-6)  # best first
    chance = residual(sample_orientations(10, seed=9))
    assert beam[0] < 0.1 * chance, (beam[0], chance)


@pytest.mark.slow
def test_exact_icosahedral_anchors_are_solved_from_the_beam():
    q, d = _exact_anchor_distances(16, "I")
    (best, loss), *_ = anchor_solutions(d, "I", restarts=128, seed=0, top=1)
    assert loss < 1e-6  # measured 7e-8; 128 random starts reached no better than 2.6e-3
    assert align_o4(q, best, symmetry="I").mean < 1e-2
