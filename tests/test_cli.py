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
