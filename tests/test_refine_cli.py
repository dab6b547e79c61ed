"""`cryoorient refine` and the pipeline's refine stage, end to end on a small store of real projections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.core.geometry.quaternion import quat_canonicalize, quat_distance, quat_product, rotvec_to_unitquat
from cryoorient_ray.io.files import atomic_savez
from cryoorient_ray.io.relion import export_relion
from cryoorient_ray.io.star import read_orientations_star
from cryoorient_ray.io.store import ProjectionStore
from tests.helpers import make_projection_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
P = 150
SMALL = ["--no-progress", "--keep", "4", "--final-deg", "5", "--set", "refine.local_polish_rounds=0"]
OUTPUTS = (
    "refined.star",
    "refined.mrcs",
    "refined_orientations.npz",
    "map.mrc",
    "half_map_1.mrc",
    "half_map_2.mrc",
    "fsc_iterations.png",
    "resolution_iterations.png",
    "refined.json",
    "report.html",
    "summary.json",
    "config.yaml",
    "state/state.npz",
)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("refine") / "proj.zarr"
    make_projection_store(path, n=P, size=24)
    return str(path)


@pytest.fixture(scope="module")
def recovered_run(store_path, tmp_path_factory):
    """A run folder as `cryoorient recover` leaves it: the truth turned by a global object rotation
    (the gauge a recovery cannot fix) and 4° of noise per image, in recovered_orientations.npz and
    recovered.star + .mrcs."""
    store = ProjectionStore.open(store_path)
    rows = store.done_rows()
    q_true = store.read_metadata(rows, names=["quaternion"])["quaternion"].astype(np.float64)
    rng = np.random.default_rng(3)
    g = rotvec_to_unitquat(np.array([0.4, -0.7, 1.1]))
    noise = rotvec_to_unitquat(rng.normal(size=(len(rows), 3)) * np.radians(4.0) / np.sqrt(3))
    q = quat_canonicalize(quat_product(noise, quat_product(q_true, g)))
    run = tmp_path_factory.mktemp("rec")
    atomic_savez(run / "recovered_orientations.npz", rows=rows, quaternions=q, quaternions_true=q_true)
    export_relion(store, run, rows=rows, name="recovered", quaternions=q)
    return run


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _one_error_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.output


def _iterations(report: dict) -> list[dict]:
    return [h for h in report["history"] if h["iteration"] not in (0, "polish")]  # 0: the start


@pytest.mark.timeout(300)
def test_refine_from_a_recovered_run_writes_every_output(store_path, recovered_run, tmp_path):
    out = tmp_path / "r"
    res = _ok(
        runner.invoke(app, ["refine", store_path, str(recovered_run), "--iterations", "2", "-o", str(out), *SMALL])
    )
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert "iteration 1/2" in res.output and "half-map FSC0.143" in res.output and "error" in res.output
    rep = json.loads((out / "refined.json").read_text())
    assert rep["start"]["kind"] == "recovered" and rep["projections"] == P
    its = _iterations(rep)
    assert [h["iteration"] for h in its] == list(range(1, len(its) + 1)) and 1 <= len(its) <= 2
    assert all(h["resolution_0143_A"] > 0 and "error_rad" in h for h in its)
    err = rep["errors"]
    assert {"e_or_o4", "registration", "start_e_or_o4", "start_registration"} <= set(err)
    # the errors are those of the refined poses of these rows against their truth: the search's own
    # measure of its last iteration, and of the start (4° of noise). Poses matched to the wrong images
    # would be ~2 rad off; this coarse, fast search (5°) stays within a few grid steps.
    assert abs(err["registration"] - its[-1]["error_rad"]) < 1e-3
    assert abs(err["start_registration"] - rep["history"][0]["error_rad"]) < 1e-3
    assert np.radians(2.0) < err["start_registration"] < np.radians(6.0) and err["registration"] < np.radians(20.0)
    assert err["hand"] == "same" and err["e_or_o4"] <= err["registration"] + 1e-9
    assert rep["final"]["halfmap_fsc0143_A"] > 0
    # refined.star carries the refined orientations of the same particles, in the store's row order
    arr = np.load(out / "refined_orientations.npz")
    np.testing.assert_array_equal(arr["rows"], np.arange(P))
    q_star = read_orientations_star(out / "refined.star")
    assert np.asarray(quat_distance(q_star, arr["quaternions"])).max() < 1e-5
    html = (out / "report.html").read_text()
    assert "Global refinement" in html and html.count("<img") >= 2 and "half maps FSC0.143" in html


@pytest.mark.timeout(300)
def test_refine_resumes_from_the_last_finished_iteration(store_path, recovered_run, tmp_path):
    out = tmp_path / "r"
    base = ["refine", store_path, str(recovered_run), "-o", str(out), *SMALL, "--set", "refine.patience=5"]
    _ok(runner.invoke(app, [*base, "--iterations", "1"]))
    first = json.loads((out / "refined.json").read_text())
    assert [h["iteration"] for h in _iterations(first)] == [1]
    res = _ok(runner.invoke(app, [*base, "--iterations", "2"]))
    assert "resuming from iteration 1" in res.output and "iteration 1/2" not in res.output
    again = json.loads((out / "refined.json").read_text())
    assert [h["iteration"] for h in _iterations(again)] == [1, 2]
    assert _iterations(again)[0] == _iterations(first)[0]  # iteration 1 was not redone
    # a setting that changes what an iteration means: one clear line, the folder untouched
    before = (out / "refined.json").read_text()
    _one_error_line(runner.invoke(app, [*base, "--iterations", "2", "--start-deg", "20"]), "--restart")
    assert (out / "refined.json").read_text() == before
    res = _ok(runner.invoke(app, [*base, "--iterations", "1", "--start-deg", "20", "--restart"]))
    assert "resuming" not in res.output
    assert json.loads((out / "refined.json").read_text())["settings"]["start_deg"] == 20


@pytest.mark.timeout(300)
def test_refine_from_random_orientations_is_the_control(store_path, tmp_path):
    out = tmp_path / "r"
    _ok(runner.invoke(app, ["refine", store_path, "random", "--iterations", "1", "-o", str(out), *SMALL]))
    rep = json.loads((out / "refined.json").read_text())
    assert rep["start"]["kind"] == "random" and rep["projections"] == P
    assert rep["initial_model"]["start"] == "ab initio" and rep["final"]["initial_model"] == "ab initio"
    # random orientations are about as far from the truth as orientations can be (≈ 2 rad after rotation + hand)
    assert rep["errors"]["start_registration"] > 1.5
    for name in ("map.mrc", "refined.star", "fsc_iterations.png"):
        assert (out / name).is_file(), name


@pytest.mark.timeout(300)
def test_refine_from_a_star_matches_its_particles_to_the_store(store_path, recovered_run, tmp_path):
    out = tmp_path / "s"
    star = recovered_run / "recovered.star"
    _ok(runner.invoke(app, ["refine", store_path, str(star), "--iterations", "1", "-o", str(out), *SMALL]))
    rep = json.loads((out / "refined.json").read_text())
    assert rep["start"] == {"kind": "star", "source": str(star)} and rep["projections"] == P
    np.testing.assert_array_equal(np.load(out / "refined_orientations.npz")["rows"], np.arange(P))
    start = np.load(out / "refined_orientations.npz")["quaternions_start"]
    expected = np.load(recovered_run / "recovered_orientations.npz")["quaternions"]
    assert np.asarray(quat_distance(start, expected)).max() < 1e-5
    # the particles of another store's .star are not this store's: one line, no output folder
    other = tmp_path / "other.zarr"
    make_projection_store(other, n=40, size=24, seed=5)
    export_relion(ProjectionStore.open(other), tmp_path / "other", name="other")
    bad = tmp_path / "bad"
    res = runner.invoke(app, ["refine", store_path, str(tmp_path / "other" / "other.star"), "-o", str(bad)])
    _one_error_line(res, "40 of the 40 particles")
    assert not bad.exists()


def test_refine_bad_input_is_one_line_and_writes_nothing(store_path, recovered_run, tmp_path):
    out = tmp_path / "x"
    cases = [
        ([str(tmp_path / "missing")], "START not found"),
        ([str(tmp_path)], "has no recovered_orientations.npz"),
        ([str(recovered_run / "recovered.mrcs")], "is neither a run folder"),
        ([str(tmp_path / "missing.star")], "star file not found"),
        (["random", "--iterations", "0"], "refine.iterations"),
        (["random", "--start-deg", "-1"], "refine.start_deg"),
        (["random", "--final-deg", "20"], "final_deg 20 is larger than start_deg 15"),
        (["random", "--mode", "fuzzy"], "refine.mode"),
        (["random", "--set", "refine.keep=nan"], "refine.keep"),
        (["random", "--split", "train"], "refinement needs at least 3"),
        (["random", "--protein", "nope"], "not in"),
    ]
    if not torch.cuda.is_available():
        cases.append((["random", "--gpu"], "no CUDA device"))
    for args, pattern in cases:
        _one_error_line(runner.invoke(app, ["refine", store_path, *args, "-o", str(out)]), pattern)
        assert not out.exists(), args
    _one_error_line(runner.invoke(app, ["refine", str(tmp_path / "none.zarr"), "random", "-o", str(out)]), "not found")
    # orientations of rows the store does not have
    bad = tmp_path / "bad_rows"
    bad.mkdir()
    atomic_savez(
        bad / "recovered_orientations.npz", rows=np.arange(P + 5), quaternions=np.tile([1.0, 0, 0, 0], (P + 5, 1))
    )
    _one_error_line(runner.invoke(app, ["refine", store_path, str(bad), "-o", str(out)]), "does not have")
    assert not out.exists()
    # `cryoorient run` finds a missing start file before its first stage
    sets = ["--set", "refine.enabled=true", "--set", "refine.start=star", "--set", f"refine.start_file={bad}/x.star"]
    _one_error_line(runner.invoke(app, ["run", "configs/demo.yaml", "-o", str(out), *sets]), "star file not found")
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_refine_on_ray_actors_gives_the_in_process_poses(ray_local, store_path, recovered_run, tmp_path):
    args = ["refine", store_path, str(recovered_run), "--iterations", "1", *SMALL]
    _ok(runner.invoke(app, [*args, "-o", str(tmp_path / "local")]))
    res = _ok(
        runner.invoke(app, [*args, "--actors", "2", "--set", "refine.cpus_per_actor=0.5", "-o", str(tmp_path / "ray")])
    )
    assert "2 actors" in res.output
    a = np.load(tmp_path / "local" / "refined_orientations.npz")["quaternions"]
    b = np.load(tmp_path / "ray" / "refined_orientations.npz")["quaternions"]
    assert np.asarray(quat_distance(a, b)).max() < 1e-4


SMALL_RUN = [
    "simulate.n_per_map=120",
    "simulate.image_size=24",
    "simulate.voxel_size=8",
    "simulate.shard_size=40",
    "simulate.backend=torch",
    "train.epochs=1",
    "train.model.channels=[4,8]",
    "train.model.n_features=8",
    "train.val_pairs_per_shard=20",
    "recover.estimator=exact",
    "recover.gauge.phi_steps=6",
    "recover.gauge.polish_rounds=1",
    "reconstruct.refine_rounds=0",
    "refine.iterations=1",
    "refine.local_polish_rounds=0",
]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_with_refine_enabled_runs_the_stage_and_reconstructs_from_it(ray_local, tmp_path):
    out = tmp_path / "run"
    sets = [a for s in [*SMALL_RUN, "refine.enabled=true"] for a in ("--set", s)]
    _ok(runner.invoke(app, ["run", "configs/demo.yaml", "-o", str(out), "--no-progress", *sets]))
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert list(stages) == ["simulate", "train", "recover", "refine", "reconstruct"]
    refine = stages["refine"]
    assert refine["status"] == "done" and refine["outputs"]["star"] == "refine/refined.star"
    for rel in refine["outputs"].values():
        assert (out / rel).is_file(), rel
    # reconstruct started from the refined orientations (the same registration error)
    assert abs(stages["reconstruct"]["metrics"]["registration_rad"] - refine["metrics"]["registration"]) < 2e-3
    html = (out / "report.html").read_text()
    assert "Global refinement" in html and "global refinement (from recovered)" in html
    # off: the stage is skipped and reconstruct goes back to the recovered orientations
    sets = [a for s in [*SMALL_RUN, "refine.enabled=false"] for a in ("--set", s)]
    _ok(runner.invoke(app, ["run", "configs/demo.yaml", "-o", str(out), "--no-progress", *sets]))
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert "refine" not in stages and stages["reconstruct"]["status"] == "done"
    assert stages["recover"]["status"] == "cached"
    recovered = json.loads((out / "recovered.json").read_text())["registration"]
    assert abs(stages["reconstruct"]["metrics"]["registration_rad"] - recovered) < 2e-3


@pytest.mark.timeout(300)
def test_refine_killed_after_an_iteration_resumes_from_it(store_path, recovered_run, tmp_path):
    """A refinement killed (SIGKILL, no clean-up) once its first state file is written goes on from there."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "r"
    args = ["refine", store_path, str(recovered_run), "--iterations", "3", "-o", str(out), *SMALL]
    args += ["--set", "refine.patience=5"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cryoorient_ray.cli", *args], env=env, cwd=root)
    state = out / "state" / "state.npz"
    deadline = time.monotonic() + 240
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.is_file()
    res = _ok(runner.invoke(app, args))
    assert "resuming from iteration" in res.output
    k = int(res.output.split("resuming from iteration")[1].split()[0])
    assert 1 <= k <= 3 and f"iteration {k}/3" not in res.output
    rep = json.loads((out / "refined.json").read_text())
    assert [h["iteration"] for h in _iterations(rep)] == [1, 2, 3]
