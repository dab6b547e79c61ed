"""`cryoorient simulate` on Ray: a valid sharded store, determinism, resume after a kill, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import load_config
from cryoorient_ray.io.store import ProjectionStore

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
runner = CliRunner()
SMALL = [
    "-n",
    "24",
    "--image-size",
    "32",
    "--voxel-size",
    "6",
    "--shard-size",
    "8",
    "--backend",
    "torch",
    "--no-progress",
]


def test_simulate_two_pseudo_proteins(ray_local, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "simulate",
            "-i",
            "pseudo:1",
            "-i",
            "pseudo:2",
            *SMALL,
            "--snr-db",
            "0",
            "--max-shift",
            "2",
            "--ctf",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    store = ProjectionStore.open(out / "projections.zarr")
    assert store.is_complete and store.n_samples == 48 and store.n_shards == 6
    meta = store.read_metadata()
    assert np.bincount(meta["protein"]).tolist() == [24, 24]
    images = store.read_images(slice(None))
    assert np.isfinite(images).all() and images.std() > 0
    assert (meta["noise_variance"] > 0).all()  # noisy, and recorded
    assert store.manifest["ctf_applied"] and (meta["defocus_u"] > 0).all()
    for name in ("projections.png", "config.yaml", "summary.json", "store_summary.json"):
        assert (out / name).is_file()
    # the maps went into the store and the store opens with dask
    assert store.read_volume(0).shape == (32, 32, 32)
    assert store.to_dask().shape == (48, 32, 32)


def test_same_config_is_deterministic_and_other_config_is_refused(ray_local, tmp_path):
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    cfg = load_config(
        None,
        None,
        [
            "simulate.inputs=[pseudo:3]",
            "simulate.n_per_map=16",
            "simulate.image_size=32",
            "simulate.voxel_size=6",
            "simulate.shard_size=8",
            "simulate.noise.snr_db=-6",
            "simulate.backend=torch",
        ],
    )
    a = simulate_store(cfg.simulate, 5, tmp_path / "a.zarr", progress=False)
    b = simulate_store(cfg.simulate, 5, tmp_path / "b.zarr", progress=False)
    np.testing.assert_array_equal(a.read_images(slice(None)), b.read_images(slice(None)))
    other = cfg.simulate.model_copy(update={"n_per_map": 17})
    from cryoorient_ray.errors import CryoOrientError

    with pytest.raises(CryoOrientError, match="different config"):
        simulate_store(other, 5, tmp_path / "a.zarr", progress=False)


def test_killed_run_resumes_to_exactly_n_per_map(ray_local, tmp_path):
    """Kill the whole process group mid-way, re-run the same command, compare to a clean run.

    Only the killed run is a subprocess (its own Ray, one CPU, so it is slow enough to kill); the
    re-run and the clean run are the same command in this process, on the session's Ray.
    """
    cmd = ["simulate", "-i", "pseudo:4", "-i", "pseudo:5", "-n", "40", "--image-size", "32", "--voxel-size", "4"]
    cmd += ["--shard-size", "4", "--backend", "real", "--no-progress", "--set", "ray.num_cpus=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryoorient_ray.cli", *cmd, "-o", str(out)],
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store_path = out / "projections.zarr"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if store_path.exists():
            try:
                done = int(ProjectionStore.open(store_path).done_shards().sum())
            except Exception:
                done = 0
            if done >= 2:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    partial = ProjectionStore.open(store_path)
    assert 0 < partial.done_shards().sum() < partial.n_shards

    again = runner.invoke(app, [*cmd, "-o", str(out)])
    assert again.exit_code == 0, again.output[-2000:]
    clean = runner.invoke(app, [*cmd, "-o", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output[-2000:]
    resumed, reference = ProjectionStore.open(store_path), ProjectionStore.open(tmp_path / "clean" / "projections.zarr")
    assert resumed.is_complete
    meta = resumed.read_metadata()
    assert np.bincount(meta["protein"]).tolist() == [40, 40]
    # no duplicates, nothing missing: every row equals the uninterrupted run's row
    np.testing.assert_array_equal(resumed.read_images(slice(None)), reference.read_images(slice(None)))
    np.testing.assert_array_equal(meta["quaternion"], reference.read_metadata()["quaternion"])
    assert not any(".creating" in p.name for p in out.iterdir())


def test_bad_inputs_fail_in_one_line_and_write_no_store(ray_local, tmp_path):
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a structure\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "-i", str(bad), *SMALL, "-o", str(out)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "bad.pdb" in lines[0], result.stderr
    assert not (out / "projections.zarr").exists()
    missing = runner.invoke(app, ["simulate", "-i", str(tmp_path / "nope.mrc"), *SMALL, "-o", str(out)])
    assert missing.exit_code == 1 and "nope.mrc" in missing.stderr


@pytest.mark.parametrize("case", ["nan", "zero", "too_small"])
def test_bad_maps_are_one_line_errors(ray_local, tmp_path, case):
    import mrcfile

    args = ["simulate", *SMALL, "-o", str(tmp_path / "run")]
    if case == "too_small":
        args += ["-i", "pseudo:1", "--image-size", "12"]
        expected = "does not fit"
    else:
        data = np.zeros((20, 20, 20), np.float32)
        if case == "nan":
            data[3, 4, 5] = np.nan
            data[8:12, 8:12, 8:12] = 1
        path = tmp_path / f"{case}.mrc"
        with mrcfile.new(path) as m:
            m.set_data(data)
            m.voxel_size = 6.0
        args += ["-i", str(path)]
        expected = "NaN" if case == "nan" else "zero"
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run" / "projections.zarr").exists()


def test_simulate_every_shared_model_into_one_store(ray_local, shared_data, tmp_path):
    models = sorted((shared_data / "models").iterdir())
    out = tmp_path / "all"
    args = [
        "simulate",
        "-i",
        str(shared_data / "models"),
        "-n",
        "4",
        "--image-size",
        "64",
        "--voxel-size",
        "6",
        "--set",
        "simulate.resolution=12",
        "--snr-db",
        "-12",
        "--ctf",
        "--shard-size",
        "16",
        "--no-progress",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    store = ProjectionStore.open(out / "projections.zarr")
    assert store.is_complete and len(store.proteins) == len(models)
    assert np.bincount(store.read_metadata(names=["protein"])["protein"]).tolist() == [4] * len(models)
    assert len({p["name"] for p in store.proteins}) == len(models)


def test_shard_render_settings_carry_the_optics_only_with_ctf(tmp_path):
    import dataclasses
    import pickle

    from cryoorient_ray.distributed.simulate_tasks import ShardRenderSettings, shard_render_settings
    from tests.helpers import make_store

    store = make_store(tmp_path / "s.zarr")
    plain = load_config(None, None, ["simulate.noise.snr_db=-6", "simulate.backend=torch"]).simulate
    s = shard_render_settings(plain, 5, store, "somewhere.zarr")
    assert s == ShardRenderSettings("somewhere.zarr", 5, store.pixel_size, "torch", -6.0, None)
    assert pickle.loads(pickle.dumps(s)) == s  # what Ray sends to each shard task
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 6  # type: ignore[misc]
    ctf = load_config(None, None, ["simulate.ctf.enabled=true", "simulate.ctf.voltage=200"]).simulate
    assert shard_render_settings(ctf, 0, store, "x").ctf == {"voltage": 200.0, "cs": 2.7, "amplitude_contrast": 0.1}


ACQ_BASE = [
    "simulate.inputs=[pseudo:3]",
    "simulate.n_per_map=16",
    "simulate.image_size=32",
    "simulate.voxel_size=6",
    "simulate.shard_size=8",
    "simulate.backend=torch",
    "simulate.shifts.max_shift=2",
]


def test_acquisition_at_the_working_box_is_the_store_made_without_it(ray_local, tmp_path):
    from cryoorient_ray.distributed.simulate_tasks import _settings_fingerprint, simulate_store

    noisy = [*ACQ_BASE, "simulate.noise.snr_db=-6", "simulate.ctf.enabled=true"]
    unset = load_config(None, None, noisy).simulate
    same = load_config(None, None, [*noisy, "simulate.acquisition.image_size=32"]).simulate
    assert "acquisition" not in _settings_fingerprint(unset, 2)[0]  # stores made before it keep their hash
    assert _settings_fingerprint(unset, 2) == _settings_fingerprint(same, 2)
    a = simulate_store(unset, 2, tmp_path / "a.zarr", progress=False)
    b = simulate_store(same, 2, tmp_path / "b.zarr", progress=False)
    np.testing.assert_array_equal(a.read_images(slice(None)), b.read_images(slice(None)))
    for name, values in a.read_metadata().items():
        np.testing.assert_array_equal(values, b.read_metadata()[name], err_msg=name)
    np.testing.assert_array_equal(a.read_volume(0), b.read_volume(0))
    assert not a.has_volume(0, acquisition=True)
    assert a.manifest["config_hash"] == b.manifest["config_hash"] and a.pixel_size == 6.0
    assert a.acquisition == {
        "image_size": 32,
        "pixel_size": 6.0,
        "snr_db": -6.0,
        "noise_variance_box": "acquisition",
        "noise_variance_to_working": 1.0,
    }


def test_a_64_to_32_store_has_the_working_geometry_and_a_higher_snr(ray_local, tmp_path):
    from cryoorient_ray.core.imaging.forward import render_projections
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    acq = [*ACQ_BASE, "simulate.acquisition.image_size=64"]
    noisy_cfg = load_config(None, None, [*acq, "simulate.noise.snr_db=0"]).simulate
    noisy = simulate_store(noisy_cfg, 4, tmp_path / "n.zarr", progress=False)
    clean = simulate_store(load_config(None, None, acq).simulate, 4, tmp_path / "c.zarr", progress=False)
    assert noisy.pixel_size == 6.0 and noisy.image_size == 32 and noisy.summary()["acquisition"] == noisy.acquisition
    assert noisy.read_images(slice(None)).shape == (16, 32, 32)
    assert noisy.read_volume(0).shape == (32, 32, 32) and noisy.read_volume(0, acquisition=True).shape == (64,) * 3
    assert noisy.acquisition == {
        "image_size": 64,
        "pixel_size": 3.0,
        "snr_db": 0.0,
        "noise_variance_box": "acquisition",
        "noise_variance_to_working": 0.25,
    }
    meta = noisy.read_metadata()
    assert np.abs(meta["shift"]).max() <= 2 and np.abs(meta["shift"]).max() > 0.5  # working pixels
    # the clean working images are projections of the stored working map at the stored shifts
    signal = clean.read_images(slice(None))
    again, _ = render_projections(clean.read_volume(0), meta["quaternion"], meta["shift"], backend="torch")
    assert np.linalg.norm(signal - again) / np.linalg.norm(again) < 0.05
    # the SNR measured on the working images is the acquisition's plus 10·log10(64²/32²) ≈ 6 dB
    noise = (noisy.read_images(slice(None)) - signal).reshape(16, -1).var(axis=1)
    gain = float(np.mean(10 * np.log10(signal.reshape(16, -1).var(axis=1) / noise)))
    assert 5.0 < gain < 7.0, gain
    np.testing.assert_allclose(noise / (meta["noise_variance"] * 0.25), 1.0, rtol=0.3)  # σ² per acquisition pixel
    # the reconstruction's Wiener constant follows the working images' SNR (0 dB + 6 dB), not the acquisition's
    from cryoorient_ray.config import ReconstructConfig
    from cryoorient_ray.stages.reconstruct import wiener_constant

    assert wiener_constant(ReconstructConfig(), noisy) == pytest.approx(0.25 * 0.25)
    # a lost shard is rendered again from the acquisition map, bit for bit
    before = noisy.read_images(slice(None))
    reopened = ProjectionStore.open(noisy.path, mode="r+")
    reopened.clear_shards([1])
    reopened.group["images"][8:16] = 0.0
    again = simulate_store(noisy_cfg, 4, tmp_path / "n.zarr", progress=False)
    np.testing.assert_array_equal(again.read_images(slice(None)), before)


def test_bad_acquisition_is_one_line_and_exit_1(tmp_path):
    out = tmp_path / "run"
    args = ["simulate", "-i", "pseudo:1", *SMALL, "--set", "simulate.acquisition.image_size=16", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "acquisition.image_size 16 is smaller" in lines[0], result.stderr
    assert not out.exists()


def test_each_input_can_have_its_own_number_of_projections(ray_local, tmp_path):
    """inputs[k].n_per_map: a pseudo range of 2 maps × 3 and one map × 7 is 13 rows, each protein's
    rows contiguous where the manifest says, with the same orientations a store of that map alone gets."""
    from cryoorient_ray.config import InputSpec
    from cryoorient_ray.distributed.cluster import _n_projections
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    base = [
        "simulate.n_per_map=3",
        "simulate.image_size=32",
        "simulate.voxel_size=6",
        "simulate.shard_size=4",
        "simulate.backend=torch",
    ]
    cfg = load_config(None, None, base)
    cfg.simulate.inputs = ["pseudo:1-2", InputSpec(source="pseudo:5", n_per_map=7)]
    assert _n_projections(cfg) == 13
    store = simulate_store(cfg.simulate, 0, tmp_path / "a.zarr", progress=False)
    assert store.n_samples == 13
    proteins = store.manifest["proteins"]
    assert [(p["name"], p["start"], p["count"]) for p in proteins] == [
        ("pseudo_1", 0, 3),
        ("pseudo_2", 3, 3),
        ("pseudo_5", 6, 7),
    ]
    meta = store.read_metadata()
    assert np.bincount(meta["protein"]).tolist() == [3, 3, 7]
    assert (meta["protein"][6:] == 2).all()
