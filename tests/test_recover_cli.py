"""`cryoorient recover` and `cryoorient align` end to end on a small store of real projections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.core.learning.model import SiameseDistance, save_distance_model
from cryoorient_ray.io.star import read_orientations_star, write_orientations_star
from tests.helpers import make_projection_store

runner = CliRunner()
FAST_GAUGE = ["--set", "recover.gauge.phi_steps=12", "--set", "recover.gauge.polish_rounds=2"]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "proj.zarr"
    make_projection_store(path, n=300, size=24)
    return str(path)


def _one_error_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.output


@pytest.mark.timeout(300)
def test_recover_exact_writes_star_and_finds_the_physical_solution(store_path, tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["recover", store_path, "--exact", "--no-progress", "-o", str(out), *FAST_GAUGE])
    assert res.exit_code == 0, res.output
    assert "E_OR" in res.output and "physical solution" in res.output
    for name in (
        "recovered.star",
        "recovered.mrcs",
        "recovered_orientations.npz",
        "recovered_loss.png",
        "recovered_errors.png",
        "recovered_directions.png",
        "recovered.json",
        "summary.json",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    rep = json.loads((out / "recovered.json").read_text())
    assert rep["e_or_o4"] < 0.01 and rep["gauge_physical"] and rep["registration"] < 0.05
    # the neighbour quality of the graph: with exact distances its kNN are the true ones
    nq = rep["neighbour_quality"]
    assert nq["k"] == 10 and nq["median_knn_dq"] == pytest.approx(nq["ideal_median_knn_dq"], abs=1e-3)
    assert 0 < nq["graph_near_fraction"] < 1 and nq["graph_near_per_node"] > 1
    assert rep["graph"] == {
        "k": 10,
        "n_random": 20,
        "mutual_knn": False,
        "n_random_unreliable": 0,
        "weights": "none",
        "loss": "l2",
        "loss_scale": 0.2,
    }
    summary = json.loads((out / "summary.json").read_text())
    rec = next(st for st in summary["stages"] if st["name"] == "recover")
    assert rec["metrics"]["knn_median_dq"] == nq["median_knn_dq"]
    q_star = read_orientations_star(out / "recovered.star")
    arr = np.load(out / "recovered_orientations.npz")
    assert q_star.shape == (300, 4)
    # the .star carries the gauge-fixed orientations (RELION Euler angles round-trip)
    d = np.abs(np.abs((q_star * arr["quaternions"]).sum(1)) - 1)
    assert d.max() < 1e-6

    # `align` on the truth and the written .star gives the same registration error
    truth = tmp_path / "truth.star"
    write_orientations_star(truth, arr["quaternions_true"])
    res = runner.invoke(app, ["align", str(truth), str(out / "recovered.star"), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    rep2 = json.loads((tmp_path / "a" / "align.json").read_text())
    assert rep2["e_or_o4"] < 0.01 and abs(rep2["registration"] - rep["registration"]) < 1e-3
    assert (tmp_path / "a" / "align_errors.png").is_file()


@pytest.mark.timeout(300)
def test_recover_perturbed_on_two_actors(ray_local, store_path, tmp_path):
    out = tmp_path / "p"
    args = ["recover", store_path, "--perturb", "0.05", "--actors", "2", "--no-gauge", "--no-progress", "-o", str(out)]
    res = runner.invoke(app, [*args, "--set", "recover.cpus_per_actor=0.5"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "recovered.json").read_text())
    assert rep["actors"] == 2 and 0.02 < rep["e_or_o4"] < 0.2


def test_store_without_orientations_still_recovers(tmp_path):
    path = tmp_path / "nolabels.zarr"
    make_projection_store(path, n=120, size=24, has_orientations=False)
    model = tmp_path / "model.pt"
    save_distance_model(model, SiameseDistance({"channels": [8, 8], "n_features": 8}))
    out = tmp_path / "r"
    res = runner.invoke(
        app, ["recover", str(path), "--model", str(model), "--no-progress", "-o", str(out), *FAST_GAUGE]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "recovered.json").read_text())
    assert "e_or_o4" not in rep and rep["recovered"] == 120
    assert (out / "recovered.star").is_file() and not (out / "recovered_errors.png").exists()
    # but the exact distances need the truth
    _one_error_line(runner.invoke(app, ["recover", str(path), "--exact", "-o", str(out)]), "no true orientations")


def test_recover_bad_input_is_one_line(store_path, tmp_path):
    _one_error_line(runner.invoke(app, ["recover", store_path, "--exact", "--euclidean"]), "choose one")
    _one_error_line(runner.invoke(app, ["recover", store_path, "-o", str(tmp_path / "x")]), "model file not found")
    _one_error_line(runner.invoke(app, ["recover", store_path, "--exact", "--protein", "nope"]), "not in")
    _one_error_line(runner.invoke(app, ["recover", store_path, "--exact", "--split", "train"]), "recovery needs")
    _one_error_line(runner.invoke(app, ["recover", str(tmp_path / "missing.zarr"), "--exact"]), "")
    a, b = tmp_path / "a.star", tmp_path / "b.star"
    write_orientations_star(a, np.tile([1.0, 0, 0, 0], (5, 1)))
    write_orientations_star(b, np.tile([1.0, 0, 0, 0], (4, 1)))
    _one_error_line(runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "al")]), "has 5 orientations")


@pytest.mark.timeout(300)
def test_reconstruct_from_recovered_orientations_with_refinement(store_path, tmp_path):
    rec = tmp_path / "r"
    res = runner.invoke(app, ["recover", store_path, "--exact", "--no-progress", "-o", str(rec), *FAST_GAUGE])
    assert res.exit_code == 0, res.output
    out = tmp_path / "v"
    res = runner.invoke(
        app, ["reconstruct", store_path, str(rec / "recovered_orientations.npz"), "--refine", "1", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    for name in (
        "reconstruction.mrc",
        "reconstruction_aligned.mrc",
        "fsc.png",
        "volumes.png",
        "refined.star",
        "refinement.png",
        "fsc.json",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "summary.json").read_text())["stages"][0]["metrics"]
    # exact orientations: as good as the true ones, far better than random
    assert metrics["recovered_fsc05_A"] <= metrics["true_fsc05_A"] + 2.0 < metrics["random_fsc05_A"]
    # a .star that does not match the stack is one clear line
    bad = tmp_path / "bad.star"
    write_orientations_star(bad, np.tile([1.0, 0, 0, 0], (7, 1)))
    _one_error_line(runner.invoke(app, ["reconstruct", store_path, str(bad), "-o", str(tmp_path / "b")]), "has 7")


@pytest.mark.timeout(300)
def test_confidence_weights_robust_loss_and_mutual_graph_from_a_calibrated_model(store_path, tmp_path):
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.stages.train import calibrate_distance

    model = tmp_path / "model.pt"
    save_distance_model(model, SiameseDistance({"channels": [8, 8], "n_features": 8}), {"training": {"x": 1}})
    fast = ["--no-gauge", "--no-progress", "--set", "recover.init_steps=30", "--set", "recover.max_steps=30"]
    conf = ["--set", "recover.weights=confidence"]
    args = ["recover", store_path, "--model", str(model), *fast]
    # an uncalibrated model cannot give confidence weights: one clear line
    _one_error_line(runner.invoke(app, [*args, *conf, "-o", str(tmp_path / "u")]), "calibrated model")
    assert calibrate_distance(store_path, model, split="val") is None  # this store has no val split
    cal = calibrate_distance(store_path, model, split="test", n_pairs=500)
    assert cal is not None and len(cal["sigma"]) >= 2 and sum(cal["counts"]) == 500
    _, meta = load_distance_model(model)
    assert meta["calibration"] == cal and meta["training"] == {"x": 1}  # the rest of the file is kept
    more = [
        "--set",
        "recover.loss=cauchy",
        "--set",
        "recover.mutual_knn=true",
        "--set",
        "recover.n_random_unreliable=5",
    ]
    out = tmp_path / "c"
    res = runner.invoke(app, [*args, *conf, *more, "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "recovered.json").read_text())
    assert rep["graph"]["weights"] == "confidence" and rep["graph"]["loss"] == "cauchy" and rep["graph"]["mutual_knn"]
    nq = rep["neighbour_quality"]
    # an untrained network's neighbours are far worse than the true ones
    assert nq["median_knn_dq"] > nq["ideal_median_knn_dq"] + 0.2
    _one_error_line(runner.invoke(app, [*args, "--set", "recover.loss=tukey", "-o", str(out)]), "recover.loss")
