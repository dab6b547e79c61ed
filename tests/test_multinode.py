"""Two Ray nodes on one machine: `cryoorient run --address` spreads every stage over both.

The cluster runs in its own process (tests/ray_test_cluster.py) and the CLI in another, so the
session's shared local Ray (``ray_local``) is untouched. Each node has 2 logical CPUs:
simulation tasks (1 CPU each, 8 shards) spill over to the second node, recovery actors are
spread (``SPREAD``), and Ray Train workers of 1.5 CPUs fit one per node. Every stage records the
nodes it used (``nodes`` in summary.json). The default run checks simulate and recover (~1 min);
the whole pipeline with training is marked slow (3.6 min on 2 shared cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "two_nodes",
    "seed": 0,
    "simulate": {
        "inputs": ["pseudo:0"],
        "n_per_map": 200,
        "image_size": 32,
        "voxel_size": 6.0,
        "noise": {"snr_db": -6},
        "shard_size": 25,
    },
    "train": {
        "epochs": 1,
        "batch_size": 32,
        "val_pairs_per_shard": 40,
        "num_workers": 2,
        "cpus_per_worker": 1.5,
        "model": {"channels": [8, 16], "n_features": 16},
    },
    "recover": {
        "actors": 2,
        "cpus_per_actor": 1.0,
        "k": 6,
        "n_random": 6,
        "max_steps": 60,
        "gauge": {"enabled": False},
    },
    "reconstruct": {"method": "fourier"},
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def two_nodes():
    """``{"address", "node_ids"}`` of a 2-node cluster (2 CPUs each) that lives for this module."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "ray_test_cluster.py"), "2", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the test cluster did not start (exit code {proc.wait(timeout=30)})")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cli(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoorient_ray.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


def test_cluster_check_sees_both_nodes(two_nodes):
    out = _cli("cluster", "check", "--address", two_nodes["address"], "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sorted(n["node_id"] for n in report["nodes"]) == sorted(two_nodes["node_ids"])
    assert report["totals"]["CPU"] == 4
    assert [s["stage"] for s in report["stages"]] == ["simulate", "train", "recover", "reconstruct"]
    assert any("shared filesystem" in w for w in report["warnings"])


def test_simulate_and_recover_with_address_use_both_nodes(two_nodes, tmp_path):
    address = ["--address", two_nodes["address"], "--no-progress"]
    sim = _cli(
        "simulate", "-i", "pseudo:0", "-n", "200", "--image-size", "32", "--voxel-size", "6", "--shard-size", "25",
        "-o", str(tmp_path / "sim"), *address,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-3000:]
    rec = _cli(
        "recover", str(tmp_path / "sim" / "projections.zarr"), "--exact", "--actors", "2", "--no-gauge",
        "--set", "recover.max_steps=60", "-o", str(tmp_path / "rec"), *address,
    )  # fmt: skip
    assert rec.returncode == 0, rec.stderr[-3000:]
    for folder, stage in (("sim", "simulate"), ("rec", "recover")):
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        metrics = {s["name"]: s for s in summary["stages"]}[stage]["metrics"]
        assert metrics["nodes"] == 2, (stage, metrics)


@pytest.mark.slow  # the whole pipeline with Ray Train: 3.6 min on 2 shared cores (train alone 150 s)
def test_run_with_address_spreads_every_stage_over_both_nodes(two_nodes, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out_dir = tmp_path / "run"
    # run from another folder with a relative output path: workers must get absolute paths
    proc = subprocess.run(
        [sys.executable, "-m", "cryoorient_ray.cli", "run", str(config), "-o", "run", "--no-progress"]
        + ["--address", two_nodes["address"]],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert all(stages[name]["status"] == "done" for name in ("simulate", "train", "recover", "reconstruct"))
    for name in ("simulate", "train", "recover"):
        assert stages[name]["metrics"]["nodes"] == 2, (name, stages[name]["metrics"])
    assert (out_dir / "model.pt").is_file() and (out_dir / "recovered.star").is_file()
