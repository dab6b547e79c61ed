"""Nothing lost, nothing half-written (issue 21): store integrity, early input checks, config numbers.

Each test works on real files (stores made with the real writer, damaged by deleting or
truncating their files); the Ray tests at the end simulate and resume for real.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import load_config
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.maps import load_density
from cryoorient_ray.io.store import ProjectionStore
from tests.helpers import make_store

runner = CliRunner()
SMALL = ["-n", "12", "--image-size", "16", "--voxel-size", "8", "--shard-size", "8", "--seed", "3", "--no-progress"]


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output and "internal error" not in lines[0], lines[0]
    return lines[0]


def _shard_file(path: Path, shard: int) -> Path:
    return Path(path) / "images" / "c" / str(shard) / "0" / "0"


# ----------------------------------------------------------------------------- store integrity


def test_deleted_shard_data_is_damage_not_complete(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    assert ProjectionStore.open(path).is_complete
    _shard_file(path, 3).unlink()
    with pytest.raises(CryoOrientError, match=r"damaged: shard 3 \(rows 48-63\) lost image data") as info:
        ProjectionStore.open(path)
    assert "\n" not in str(info.value)
    store = ProjectionStore.open(path, verify=False)
    summary = store.summary()
    assert summary["damaged_shards"] == [3] and not summary["complete"] and summary["shards_done"] == 4
    assert not np.isin(np.arange(48, 64), store.done_rows()).any()


def test_truncated_shard_file_is_damage(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    data = _shard_file(path, 1).read_bytes()
    _shard_file(path, 1).write_bytes(data[:-16])
    with pytest.raises(CryoOrientError, match="shard 1 "):
        ProjectionStore.open(path)


def test_store_without_size_records_still_checks_presence(tmp_path):
    """Stores written before sizes were recorded: a done shard without its file is damage."""
    import shutil

    path = tmp_path / "s.zarr"
    make_store(path)
    shutil.rmtree(path / "shard_nbytes")
    assert ProjectionStore.open(path).is_complete
    _shard_file(path, 0).unlink()
    with pytest.raises(CryoOrientError, match="shard 0 "):
        ProjectionStore.open(path)


def test_deleted_array_metadata_names_the_file(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    (path / "images" / "zarr.json").unlink()
    with pytest.raises(CryoOrientError, match=r"damaged: missing array metadata .*images/zarr\.json"):
        ProjectionStore.open(path)


def test_memory_url_store_is_checked_too(tmp_path):
    import fsspec

    url = f"memory://integrity-{os.getpid()}.zarr"
    make_store(url)
    assert ProjectionStore.open(url).is_complete
    fsspec.filesystem("memory").rm(f"/integrity-{os.getpid()}.zarr/images/c/2/0/0")
    with pytest.raises(CryoOrientError, match="shard 2 "):
        ProjectionStore.open(url)


def test_verification_is_cheap(tmp_path):
    """A 5,000-image store in 20 shards: verified in well under a tenth of a second."""
    path = tmp_path / "big.zarr"
    make_store(path, n_per_protein=2500, size=16, shard_size=250)
    ProjectionStore.open(path)
    t0 = time.perf_counter()
    for _ in range(5):
        ProjectionStore.open(path)
    verified = (time.perf_counter() - t0) / 5
    assert verified < 0.1, f"verified open took {verified * 1e3:.0f} ms"


def test_store_info_and_export_report_damage(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    _shard_file(path, 2).unlink()
    info = runner.invoke(app, ["store", "info", str(path), "--png", str(tmp_path / "p.png")])
    assert info.exit_code == 0, info.output
    assert "DAMAGED: shard 2" in info.stdout and "(complete)" not in info.stdout
    line = _error_line(runner.invoke(app, ["export-star", str(path), str(tmp_path / "relion")]))
    assert "damaged: shard 2" in line
    assert not (tmp_path / "relion").exists()
    (path / "images" / "zarr.json").unlink()
    assert "images/zarr.json" in _error_line(runner.invoke(app, ["store", "info", str(path)]))


# ----------------------------------------------------------------------------- output folders


def test_output_inside_a_store_is_refused(tmp_path):
    from cryoorient_ray.stages.base import check_output_dir

    path = tmp_path / "s.zarr"
    make_store(path)
    for out in (path, path / "relion", path / "images" / "x"):
        with pytest.raises(CryoOrientError, match="inside the projection store"):
            check_output_dir(out)
    line = _error_line(runner.invoke(app, ["export-star", str(path), str(path / "relion")]))
    assert "inside the projection store" in line and not (path / "relion").exists()
    line = _error_line(runner.invoke(app, ["recover", str(path), "--exact", "-o", str(path / "rec")]))
    assert "inside the projection store" in line and not (path / "rec").exists()
    line = _error_line(runner.invoke(app, ["simulate", "-i", "pseudo", *SMALL, "-o", str(path / "sim")]))
    assert "inside the projection store" in line and not (path / "sim").exists()


def test_unwritable_output_is_bad_input(tmp_path):
    line = _error_line(runner.invoke(app, ["simulate", "-i", "pseudo", *SMALL, "-o", "/sys/cryoorient_issue21"]))
    assert "cannot write" in line


def test_store_errors_leave_no_folder(tmp_path):
    out = tmp_path / "rec"
    line = _error_line(runner.invoke(app, ["recover", str(tmp_path / "nope.zarr"), "--exact", "-o", str(out)]))
    assert "not found" in line and not out.exists()
    path = tmp_path / "s.zarr"
    make_store(path)
    _shard_file(path, 0).unlink()
    _error_line(runner.invoke(app, ["recover", str(path), "--exact", "-o", str(out)]))
    assert not out.exists()
    line = _error_line(runner.invoke(app, ["recover", str(path), "--model", str(tmp_path / "m.pt"), "-o", str(out)]))
    assert "damaged" in line and not out.exists()


def test_missing_input_fails_before_ray_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    line = _error_line(runner.invoke(app, ["simulate", "-i", str(tmp_path / "nope.mrc"), *SMALL, "-o", str(out)]))
    assert "nope.mrc" in line and not out.exists()
    assert time.perf_counter() - t0 < 10  # checked before Ray starts (19-83 s before)


def test_check_source():
    from cryoorient_ray.io.maps import check_source

    check_source("pseudo:3")
    check_source("5j0n")  # an id: not looked up here
    for bad, pattern in (("nope.cif", "file not found"), ("pseudo:x", "seed"), ("what is this", "cannot tell")):
        with pytest.raises(CryoOrientError, match=pattern):
            check_source(bad)


# ----------------------------------------------------------------------------- config numbers


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"simulate.noise.snr_db": math.nan}, "finite"),
        ({"simulate.noise.snr_db": math.inf}, "finite"),
        ({"simulate.shifts.max_shift": -math.inf}, "finite"),
        ({"recover.perturb_sigma2": math.nan}, "finite"),
        ({"simulate.n_per_map": True}, "boolean"),
        ({"simulate.voxel_size": False}, "boolean"),
    ],
)
def test_non_finite_and_boolean_numbers_are_refused(override, pattern):
    with pytest.raises(CryoOrientError, match=pattern):
        load_config(None, override)


def test_nan_snr_on_the_command_line_writes_nothing(tmp_path):
    out = tmp_path / "run"
    for value in ("nan", "inf", "-inf"):
        assert "finite" in _error_line(runner.invoke(app, ["simulate", *SMALL, "--snr-db", value, "-o", str(out)]))
    assert "boolean" in _error_line(
        runner.invoke(app, ["simulate", "--set", "simulate.n_per_map=true", "-o", str(out)])
    )
    assert not out.exists()


def test_real_numbers_and_booleans_still_load():
    cfg = load_config(None, {"simulate.noise.snr_db": -12.0, "simulate.ctf.enabled": True, "simulate.n_per_map": 5})
    assert cfg.simulate.noise.snr_db == -12.0 and cfg.simulate.ctf.enabled and cfg.simulate.n_per_map == 5


# ----------------------------------------------------------------------------- nonsense inputs


def _write_mrc(path: Path, data: np.ndarray) -> Path:
    with mrcfile.new(path) as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = 6.0
    return path


def test_maps_without_structure_are_refused(tmp_path):
    tiny = _write_mrc(tmp_path / "tiny.mrc", np.ones((1, 1, 1)))
    with pytest.raises(CryoOrientError, match=r"1×1×1 voxels has no structure"):
        load_density(tiny)
    flat = _write_mrc(tmp_path / "flat.mrc", np.full((16, 16, 16), 2.0))
    with pytest.raises(CryoOrientError, match="constant"):
        load_density(flat)
    fine = np.zeros((16, 16, 16))
    fine[6:10, 6:10, 6:10] = 1
    assert load_density(_write_mrc(tmp_path / "fine.mrc", fine)).data.shape == (16, 16, 16)


def test_single_atom_model_is_refused(tmp_path):
    one = tmp_path / "one.pdb"
    one.write_text("ATOM      1  CA  ALA A   1      10.000  10.000  10.000  1.00 20.00           C\nEND\n")
    with pytest.raises(CryoOrientError, match="only 1 polymer atom"):
        load_density(one, voxel_size=3.0)


def test_model_trained_elsewhere_is_named(tmp_path):
    from cryoorient_ray.stages.base import training_mismatch

    store = make_store(tmp_path / "s.zarr", size=8)  # 8² px at 2.5 Å/px
    assert training_mismatch({"image_size": 8, "pixel_size": 2.5}, store) is None
    text = training_mismatch({"image_size": 32, "pixel_size": 6.0}, store)
    assert "32² px images, not 8²" in text and "6 Å/px, not 2.5" in text and "\n" not in text
    store.update_manifest(config={"noise": {"snr_db": -12.0}})
    assert "SNR noiseless, not -12 dB" in training_mismatch({"image_size": 8, "snr_db": [None]}, store)
    assert training_mismatch({"image_size": 8, "snr_db": [-12.0, 0.0]}, store) is None
    # fresh noise: the range the model was trained at counts, not its store's SNR
    fresh = {"image_size": 8, "snr_db": [-12.0], "fresh_noise": {"snr_db": [-3.0, 0.0]}}
    assert "SNR -12 dB, not" not in (training_mismatch(fresh, store) or "") and "SNR" in training_mismatch(fresh, store)
    fresh["fresh_noise"]["snr_db"] = [-15.0, 0.0]
    assert training_mismatch(fresh, store) is None


# ----------------------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_damaged_shard_is_rendered_again_bitwise(ray_local, tmp_path):
    out = tmp_path / "run"
    args = ["simulate", "-i", "pseudo:2", *SMALL, "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    path = out / "projections.zarr"
    reference = ProjectionStore.open(path).read_images(slice(None))
    _shard_file(path, 1).unlink()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    said = "".join(again.stderr.split())  # the log line without rich's wrapping
    assert "shard1(rows8-11)lostimagedata" in said and "renderingthemagain" in said, again.stderr
    store = ProjectionStore.open(path)
    assert store.is_complete
    np.testing.assert_array_equal(store.read_images(slice(None)), reference)


@pytest.mark.ray
def test_refused_rerun_keeps_the_config(ray_local, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["simulate", "-i", "pseudo:2", *SMALL, "-o", str(out)]).exit_code == 0
    before = (out / "config.yaml").read_text()
    other = [*SMALL[:1], "10", *SMALL[2:]]
    line = _error_line(runner.invoke(app, ["simulate", "-i", "pseudo:2", *other, "-o", str(out)]))
    assert "different config" in line
    assert (out / "config.yaml").read_text() == before


@pytest.mark.ray
def test_failed_first_render_leaves_nothing(ray_local, tmp_path):
    """A render that fails before any shard is done removes the new store and the new folder."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine where the ASTRA backend is refused (no CUDA)")
    out = tmp_path / "run"
    _error_line(runner.invoke(app, ["simulate", "-i", "pseudo:2", *SMALL, "--backend", "astra", "-o", str(out)]))
    assert not out.exists()


@pytest.mark.ray
def test_ray_banner_stays_out_of_normal_output(tmp_path):
    """A fresh process starting its own Ray prints our table only (no start-up or token banner)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cryoorient_ray.cli", "simulate", "-i", "pseudo", *SMALL, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    for banner in ("Token authentication", "Started a local Ray", "ray-security"):
        assert banner not in done.stderr + done.stdout
    assert "simulate" in done.stdout


def test_reconstruct_store_errors_leave_no_folder(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    _shard_file(path, 0).unlink()
    star = tmp_path / "o.star"
    star.write_text("data_particles\n\nloop_\n_rlnAngleRot #1\n_rlnAngleTilt #2\n_rlnAnglePsi #3\n0 0 0\n")
    out = tmp_path / "vol"
    assert "damaged" in _error_line(runner.invoke(app, ["reconstruct", str(path), str(star), "-o", str(out)]))
    assert not out.exists()


def test_run_does_not_reuse_a_damaged_simulate_stage(tmp_path):
    """`cryoorient run` re-runs (so repairs) a finished simulate stage whose store lost a shard."""
    from cryoorient_ray.pipeline import _cached_stage, _mark_stage
    from cryoorient_ray.stages.base import StageResult

    out = tmp_path / "run"
    out.mkdir()
    make_store(out / "projections.zarr")
    done = StageResult("simulate", "done", outputs={"store": "projections.zarr"})
    _mark_stage(out, "simulate", "k", done)
    assert _cached_stage(out, "simulate", "k").status == "cached"
    _shard_file(out / "projections.zarr", 4).unlink()
    assert _cached_stage(out, "simulate", "k") is None


def test_distances_store_errors_leave_no_folder(tmp_path):
    out = tmp_path / "dist"
    line = _error_line(runner.invoke(app, ["distances", str(tmp_path / "nope.zarr"), "--euclidean", "-o", str(out)]))
    assert "not found" in line and not out.exists()
