"""Bootstrap rounds (stages/bootstrap.py): the map → store step, bad input, and one round of a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import BootstrapConfig, load_config
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore

runner = CliRunner()


def _pseudo_map(path, size=24, voxel=8.0):
    from cryoorient_ray.core.density.volume import prepare_map
    from cryoorient_ray.io.maps import load_density
    from cryoorient_ray.io.mrc import write_map

    density = prepare_map(load_density("pseudo:0", voxel_size=voxel), box_size=size, voxel_size=voxel)
    write_map(path, density)
    return density.data


def _shell_power(vol: np.ndarray, lo: float, hi: float) -> float:
    """Power of ``vol`` between ``lo`` and ``hi`` cycles per box."""
    size = vol.shape[0]
    k = np.fft.fftfreq(size) * size
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    ft = np.abs(np.fft.fftn(vol)) ** 2
    return float(ft[(r >= lo) & (r < hi)].sum())


def test_map_is_low_passed_to_its_resolution_and_projected_as_the_data(tmp_path):
    from cryoorient_ray.io.mrc import read_map
    from cryoorient_ray.stages.bootstrap import map_resolution, project_map, round_simulation
    from tests.helpers import make_store

    original = _pseudo_map(tmp_path / "map.mrc")
    with pytest.raises(CryoOrientError, match="no half maps beside it"):
        map_resolution(tmp_path / "map.mrc")
    # half maps beside it: their FSC0.143 (two copies of one map agree to Nyquist, 2 × 8 Å)
    from cryoorient_ray.io.mrc import write_map

    for name in ("half_map_1.mrc", "half_map_2.mrc"):
        write_map(tmp_path / name, read_map(tmp_path / "map.mrc"))
    assert map_resolution(tmp_path / "map.mrc") == 16.0
    info = project_map(tmp_path / "map.mrc", 32.0, tmp_path / "low.mrc", mask_radius=None)
    low = read_map(tmp_path / "low.mrc")
    assert info["lowpass_A"] == 32.0 and low.voxel_size == 8.0 and (low.data >= 0).all()
    # 24 px × 8 Å / 32 Å = 6 cycles per box: what lies beyond is gone (but for what the clip at zero
    # and the mask bring back), below it stays
    assert _shell_power(low.data, 8, 12) < 0.05 * _shell_power(original, 8, 12)
    assert _shell_power(low.data, 1, 4) > 0.5 * _shell_power(original, 1, 4)
    # the simulation settings come from the data store's manifest: box, pixel size, CTF, shifts
    store = make_store(tmp_path / "data.zarr", n_per_protein=40, size=24, ctf=True)
    sim = round_simulation(store, 1, tmp_path / "low.mrc", BootstrapConfig(rounds=1), "b")
    assert (sim.image_size, sim.voxel_size, sim.n_per_map) == (24, store.pixel_size, 40)
    assert sim.ctf.enabled and sim.ctf.voltage == 300.0 and sim.noise.snr_db is None
    assert 1.0 < sim.shifts.max_shift <= 2.0 and sim.splits.test == 0.0
    assert sim.inputs[0].source == str(tmp_path / "low.mrc")


def test_bad_bootstrap_input_is_one_line(tmp_path):
    out = tmp_path / "run"
    for args, why in (
        (["--bootstrap", "-1"], "'bootstrap.rounds'"),
        (["--bootstrap", "1", "--set", "bootstrap.map=refined"], "bootstrap.map refined needs the refine stage"),
        (["--bootstrap", "1", "--set", "recover.estimator=exact"], "recover.estimator is 'exact'"),
        (["--set", f"train.init_model={tmp_path / 'none.pt'}"], "train.init_model: model file not found"),
    ):
        result = runner.invoke(app, ["run", "configs/demo.yaml", "-o", str(out), *args])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and why in lines[0], result.stderr
        assert not out.exists()
    cfg = load_config("configs/demo.yaml")
    from cryoorient_ray.stages.bootstrap import bootstrap_rounds

    with pytest.raises(CryoOrientError, match="at least 1 round"):
        bootstrap_rounds(str(tmp_path / "s.zarr"), "m.pt", "map.mrc", cfg, tmp_path / "b", rounds=0)


TINY_RUN = [
    "simulate.n_per_map=300",
    "simulate.image_size=24",
    "simulate.voxel_size=8",
    "simulate.acquisition.image_size=48",
    "simulate.noise.snr_db=0",
    "simulate.shard_size=100",
    "simulate.backend=torch",
    "train.epochs=1",
    "train.passes_per_epoch=2",
    "train.batch_size=32",
    "train.model.channels=[4,8]",
    "train.model.n_features=8",
    "train.val_pairs_per_shard=20",
    "recover.gauge.phi_steps=6",
    "recover.gauge.polish_rounds=1",
    "recover.max_steps=200",
    "reconstruct.refine_rounds=0",
    "refine.enabled=true",
    "refine.iterations=1",
    "refine.local_polish_rounds=0",
    "refine.keep=4",
    "refine.final_deg=7.5",
    "refine.ab_initio='off'",
    "bootstrap.n_images=200",
    "bootstrap.epochs=1",
    "bootstrap.passes_per_epoch=1",
]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_with_one_bootstrap_round(ray_local, tmp_path):
    out = tmp_path / "run"
    sets = [a for s in TINY_RUN for a in ("--set", s)]
    args = ["run", "configs/demo.yaml", "-o", str(out), "--no-progress", "--bootstrap", "1", *sets]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["simulate", "train", "recover", "refine", "reconstruct", "bootstrap"]
    boot = stages["bootstrap"]
    assert boot["status"] == "done" and boot["metrics"]["rounds"] == 1
    assert "refined_registration" in boot["metrics"] and "recovered_registration" in boot["metrics"]
    assert any(k.startswith("bootstrap (after round 1)") for k in summary["headline"])
    folder = out / "bootstrap" / "round_1"
    for name in ("start_map.mrc", "model.pt", "recovered_orientations.npz", "refined_orientations.npz", "map.mrc"):
        assert (folder / name).is_file(), name
    assert (folder / "half_map_1.mrc").is_file() and (folder / "half_map_2.mrc").is_file()
    report = json.loads((out / "bootstrap" / "bootstrap.json").read_text())
    (rec,) = report["rounds"]
    assert report["start"]["map"] == str(out / "refine" / "map.mrc") and "registration" in report["start"]["recover"]
    for key in ("lowpass_A", "n_images", "fine_tune", "recover", "refine", "simulate_s", "fine_tune_s", "total_s"):
        assert key in rec, key
    for key in ("halfmap_fsc0143_A", "halfmap_fsc05_A", "registration", "e_or_o4"):
        assert key in rec["refine"], key
    assert {"registration", "e_or_o4"} <= set(rec["recover"])
    # the round kept the better poses of its own and the pipeline's, by the half maps' FSC area
    assert rec["kept"] in ("this round", "previous") and rec["start_halfmap_area"] is not None
    better = rec["halfmap_area"] >= rec["start_halfmap_area"]
    assert (rec["kept"] == "this round") == better
    assert rec["final"] == (rec["refine"] if better else report["start"]["refine"])
    # the fine-tune started from the run's model, on a store made as the data
    assert rec["fine_tune"]["start_val_L_DE"] is not None and rec["n_images"] == 200
    training = json.loads((folder / "train_summary.json").read_text())
    assert training["init_model"] == str((out / "model.pt").resolve())
    data, made = ProjectionStore.open(out / "projections.zarr"), ProjectionStore.open(folder / "projections.zarr")
    assert (made.image_size, made.pixel_size) == (data.image_size, data.pixel_size) == (24, 8.0)
    assert made.acquisition["image_size"] == 48 and made.acquisition["snr_db"] == 0 == data.acquisition["snr_db"]
    assert made.n_samples == 200 and (out / "bootstrap" / "bootstrap.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "Bootstrap" in html and "0 (pipeline)" in html
    # a second run: every stage cached
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads((out / "summary.json").read_text())["stages"]
    assert all(s["status"] == "cached" for s in again), [(s["name"], s["status"]) for s in again]


def test_halfmap_area_scores_true_poses_above_perturbed_and_random_ones(tmp_path):
    """The no-ground-truth score the bootstrap keeps the better poses by: the truth > the truth turned
    0.3 rad per image > random orientations."""
    from cryoorient_ray.core import quat_product, sample_orientations
    from cryoorient_ray.stages.bootstrap import halfmap_area
    from tests.helpers import make_projection_store

    path = tmp_path / "s.zarr"
    make_projection_store(path, n=400, size=24)
    store = ProjectionStore.open(path)
    rows = store.done_rows()
    q = np.asarray(store.read_metadata(rows, names=["quaternion"])["quaternion"], dtype=np.float64)
    rng = np.random.default_rng(0)
    axis = rng.standard_normal((len(q), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    turn = np.concatenate([np.full((len(q), 1), np.cos(0.15)), np.sin(0.15) * axis], 1)
    scores = []
    candidates = (("true", q), ("turned", quat_product(turn, q)), ("random", sample_orientations(len(q), seed=1)))
    for name, quats in candidates:
        np.savez(tmp_path / f"{name}.npz", rows=rows, quaternions=quats)
        scores.append(halfmap_area(str(path), tmp_path / f"{name}.npz"))
    assert scores[0] > scores[1] > scores[2] and scores[0] > 0.8 * (24 // 2), scores


def test_cluster_check_plans_the_bootstrap_as_training():
    from cryoorient_ray.distributed.cluster import NodeInfo, plan_stages

    nodes = [NodeInfo("a", "10.0.0.1", True, 4, 0, 8, 2)]
    assert "bootstrap" not in {p.stage for p in plan_stages(load_config("configs/demo.yaml"), nodes)}
    plans = {p.stage: p for p in plan_stages(load_config("configs/demo.yaml", sets=["bootstrap.rounds=2"]), nodes)}
    assert plans["bootstrap"].per_unit == plans["train"].per_unit and "2 round(s)" in plans["bootstrap"].note
