"""The shipped general distance (`--model pretrained`, docs/MODEL_CARD.md): found, loadable, never
trained on the unseen benchmark's held-out proteins, and used by `recover` and `run` without training."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.pretrained import is_pretrained, pretrained_model_path, resolve_model_path
from tests.helpers import make_projection_store

runner = CliRunner()
FAST = ["--no-progress", "--set", "recover.gauge.phi_steps=6", "--set", "recover.gauge.polish_rounds=1"]


def test_the_shipped_model_loads_and_never_saw_the_held_out_proteins():
    from benchmarks.suite.unseen import HELD_OUT, held_out
    from cryoorient_ray.core.learning.model import load_distance_model

    path = pretrained_model_path("pretrained")
    assert path == pretrained_model_path("pretrained:general") and path.stat().st_size < 8e6
    model, meta = load_distance_model(path)
    training = meta["training"]
    assert training["image_size"] == 32 and training["pixel_size"] == pytest.approx(6.0)
    seen = set(training["proteins_seen"])
    assert len(seen) > 100 and not seen & set(HELD_OUT) and list(HELD_OUT) == held_out()
    assert "pseudo_0" not in seen  # the demo's protein is held out too
    assert meta.get("calibration")  # σ(d̂) for recover.weights: confidence
    assert model.preprocess is not None  # its Wiener filter travels with it


def test_names_resolve_and_unknown_names_are_one_error():
    assert is_pretrained("pretrained") and is_pretrained("pretrained:general") and not is_pretrained("m.pt")
    assert resolve_model_path("m.pt") == "m.pt" and resolve_model_path(None) is None
    with pytest.raises(CryoOrientError, match="unknown pretrained model 'pretrained:nope'.*pretrained:general"):
        pretrained_model_path("pretrained:nope")


@pytest.fixture(scope="module")
def store_32(tmp_path_factory):
    path = tmp_path_factory.mktemp("pre") / "proj.zarr"
    make_projection_store(path, n=150, size=32, voxel_size=6.0)
    return str(path)


@pytest.mark.timeout(300)
def test_recover_uses_the_shipped_model_when_asked_or_when_none_was_trained(store_32, tmp_path):
    for extra, out in ((["--model", "pretrained"], tmp_path / "a"), ([], tmp_path / "b")):
        res = runner.invoke(app, ["recover", store_32, *extra, "-o", str(out), *FAST])
        assert res.exit_code == 0, res.output
        rep = json.loads((out / "recovered.json").read_text())
        assert rep["estimator"] == "model" and rep["model"].endswith("general_32px.pt"), rep.get("model")
        assert rep["recovered"] == 150 and rep["e_or_o4"] < 2.5
    res = runner.invoke(app, ["recover", store_32, "--model", "pretrained:nope", "-o", str(tmp_path / "c")])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown pretrained model" in lines[0], res.output
    assert not (tmp_path / "c" / "recovered.json").exists()


@pytest.mark.timeout(600)
def test_run_with_the_pretrained_model_trains_nothing(ray_local, tmp_path):
    out = tmp_path / "run"
    small = [
        "simulate.n_per_map=120",
        "simulate.shard_size=60",
        "recover.gauge.phi_steps=6",
        "recover.gauge.polish_rounds=1",
        "recover.max_steps=200",
        "reconstruct.refine_rounds=0",
    ]
    args = ["run", "configs/demo.yaml", "--model", "pretrained", "--out", str(out), "--no-progress"]
    res = runner.invoke(app, args + [a for s in small for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert "train" not in stages and not (out / "model.pt").exists()
    assert stages["recover"]["status"] == "done" and (out / "report.html").is_file()
