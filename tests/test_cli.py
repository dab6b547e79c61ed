"""The CLI through typer's CliRunner: version, help, bad input, the orientations tool, run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray import __version__
from cryoorient_ray.cli import app
from cryoorient_ray.core import quat_distance
from cryoorient_ray.io.star import read_orientations_star

runner = CliRunner()
STAGES = ["simulate", "train", "tune", "recover", "align", "reconstruct", "run"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cryoorient_ray {__version__}"


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.stdout


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "cryoorient_ray.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def _one_error_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:") and pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_unknown_config_key_is_one_line_exit_1(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nsimulate:\n  n_per_map: 5\n  noise_varience: 16\n")
    result = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out")])
    _one_error_line(result, "unknown key 'simulate.noise_varience'")
    assert not (tmp_path / "out").exists()  # nothing written for a bad config


def test_missing_config_and_bad_option(tmp_path):
    _one_error_line(runner.invoke(app, ["run", str(tmp_path / "nope.yaml")]), "config file not found")
    _one_error_line(runner.invoke(app, ["orientations", "--sampler", "gaussian", "-o", str(tmp_path)]), "sampler")
    _one_error_line(runner.invoke(app, ["config", "show", "--set", "seed=-1"]), "seed")


def test_orientations_writes_star_npy_png(tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["orientations", "-n", "300", "--coverage", "half", "--seed", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("orientations.star", "orientations.npy", "orientations.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    q = np.load(out / "orientations.npy")
    assert q.shape == (300, 4)
    np.testing.assert_allclose(quat_distance(read_orientations_star(out / "orientations.star"), q), 0, atol=1e-6)
    assert (out / "orientations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coverage: half" in (out / "config.yaml").read_text()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_run_demo_config_writes_summary(ray_local, tmp_path):
    out = tmp_path / "demo"
    small = [
        "simulate.n_per_map=90",
        "simulate.image_size=32",
        "simulate.voxel_size=6",
        "simulate.shard_size=20",
        "train.epochs=1",
        "train.model.channels=[4,8]",
        "train.model.n_features=8",
        "train.val_pairs_per_shard=20",
        "recover.gauge.phi_steps=6",
        "recover.gauge.polish_rounds=1",
        "recover.max_steps=200",
    ]
    args = ["run", "configs/demo.yaml", "--out", str(out)] + [a for s in small for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["simulate"]["status"] == "done" and stages["simulate"]["metrics"]["projections"] == 90
    assert stages["train"]["status"] == "done" and stages["train"]["metrics"]["epochs"] == 1
    assert stages["recover"]["status"] == "done" and stages["recover"]["metrics"]["recovered"] >= 20
    assert stages["reconstruct"]["status"] == "done"
    assert "e_or_o4" in stages["recover"]["metrics"] and "halfmap_fsc05_A" in stages["reconstruct"]["metrics"]
    assert "n_per_map: 90" in (out / "config.yaml").read_text()
    for name in (
        "projections.png",
        "model.pt",
        "training.png",
        "distances.png",
        "history.json",
        "recovered.star",
        "recovered_loss.png",
        "reconstruction.mrc",
        "reconstruction_aligned.mrc",
        "fsc.png",
        "volumes.png",
        "report.html",
    ):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 8 and "Orientation recovery" in html
    # re-running the same config skips every finished stage
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert all(s["status"] == "cached" for s in stages.values())


def test_config_show_prints_resolved_yaml():
    result = runner.invoke(app, ["config", "show", "configs/demo.yaml", "--set", "seed=9"])
    assert result.exit_code == 0
    assert "seed: 9" in result.stdout and "sampler: uniform" in result.stdout


@pytest.mark.parametrize("args", [["--verbose", "run", "configs/demo.yaml", "--set", "ray.num_cpus=0"]])
def test_verbose_still_reports_bad_input_in_one_line(args):
    _one_error_line(runner.invoke(app, args), "ray.num_cpus")


def test_options_override_the_config_keys_they_name():
    """Each command's typed options become the same {dotted.key: value} overrides as before the ConfigKey tags."""
    from pathlib import Path

    from cryoorient_ray import cli

    sim = dict(inputs=["pseudo:3"], n=5, image_size=32, voxel_size=6.0, snr_db=-12.0, max_shift=2.0, ctf=False)
    sim |= dict(symmetry="D2", shard_size=8, backend="torch", seed=3, address="auto")
    assert cli.config_overrides(cli.simulate, sim | dict(config=None, out=None, sets=None, progress=True)) == {
        "seed": 3,
        "simulate.inputs": ["pseudo:3"],
        "simulate.n_per_map": 5,
        "simulate.image_size": 32,
        "simulate.voxel_size": 6.0,
        "simulate.noise.snr_db": -12.0,
        "simulate.shifts.max_shift": 2.0,
        "simulate.ctf.enabled": False,  # a given False is kept, not dropped
        "simulate.orientations.symmetry": "D2",
        "simulate.shard_size": 8,
        "simulate.backend": "torch",
        "ray.address": "auto",
    }
    names = ("stores", "workers", "gpu", "epochs", "batch_size", "lr", "n_features", "init_model", "seed")
    unset = {name: None for name in names}
    got = cli.config_overrides(cli.train, unset | dict(stores=[], config=None, out=None, sets=None, address=None))
    assert all(value is None for value in got.values()) and len(got) == 10  # empty --store list: the config's
    assert cli.config_overrides(cli.train, unset | dict(init_model=Path("m.pt"), address=None))["train.init_model"] == (
        "m.pt"
    )
    rec = dict(model=Path("m.pt"), perturb=0.1, protein="0", split="val", n=50, k=4, n_random=6, actors=2, gauge=True)
    assert cli.config_overrides(cli.recover, rec | dict(seed=1, address=None)) == {
        "recover.model": "m.pt",
        "recover.perturb_sigma2": 0.1,
        "recover.protein": "0",
        "recover.split": "val",
        "recover.max_projections": 50,
        "recover.k": 4,
        "recover.n_random": 6,
        "recover.actors": 2,
        "recover.gauge.enabled": True,
        "seed": 1,
        "ray.address": None,
    }
    tune = dict(space=Path("s.yaml"), stores=["a.zarr"], samples=4, max_concurrent=2, workers=1, cpus_per_worker=0.5)
    tune |= dict(gpu=None, epochs=3, grace_period=1, seed=2)
    assert cli.config_overrides(cli.tune, tune | dict(ctx=None, config=None, resume=None, out=None)) == {
        "tune.space": "s.yaml",
        "train.stores": ["a.zarr"],
        "tune.num_samples": 4,
        "tune.max_concurrent_trials": 2,
        "train.num_workers": 1,
        "train.cpus_per_worker": 0.5,
        "train.use_gpu": None,
        "train.epochs": 3,
        "tune.grace_period": 1,
        "seed": 2,
    }
    ori = dict(n=7, sampler="euler", coverage="half", symmetry="C2", seed=0)
    assert cli.config_overrides(cli.orientations, ori) == {
        "simulate.n_per_map": 7,
        "simulate.orientations.sampler": "euler",
        "simulate.orientations.coverage": "half",
        "simulate.orientations.symmetry": "C2",
        "seed": 0,
    }
    assert cli.config_overrides(cli.reconstruct, dict(refine=2, method="cg")) == {
        "reconstruct.refine_rounds": 2,
        "reconstruct.method": "cg",
    }
    assert cli.config_overrides(cli.run, dict(seed=5, address="h:6379", bootstrap=None, model=None)) == {
        "seed": 5,
        "ray.address": "h:6379",
        "bootstrap.rounds": None,
        "recover.model": None,
    }
    got = cli.config_overrides(cli.run, dict(seed=None, address=None, bootstrap=2, model=None))
    assert got["bootstrap.rounds"] == 2
    got = cli.config_overrides(cli.run, dict(seed=None, address=None, bootstrap=None, model="pretrained"))
    assert got["recover.model"] == "pretrained"
    assert cli.config_overrides(cli.cluster_check, dict(address=None)) == {"ray.address": None}
    assert cli.config_overrides(cli.config_show, {}) == {}


def test_recover_rejects_two_estimators_in_one_line(tmp_path):
    args = ["recover", str(tmp_path / "s.zarr"), "--euclidean", "--model", str(tmp_path / "m.pt"), "-o", str(tmp_path)]
    _one_error_line(runner.invoke(app, args), "choose one distance estimator; got --model and --euclidean")
    args = ["tune", "--resume", str(tmp_path), "--space", "s.yaml", "--set", "seed=1"]
    _one_error_line(runner.invoke(app, args), "drop --space, --set")
