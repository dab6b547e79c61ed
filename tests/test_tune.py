"""Ray Tune search: a tiny search with ASHA stopping trials early, the report, the best config
trained by `cryoorient train`, resuming a finished experiment, and bad input."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import SearchConfig, TrainConfig, load_config
from cryoorient_ray.errors import CryoOrientError
from tests.helpers import simulate_small_store

runner = CliRunner()

# Two trials, one per learning rate (n_f drawn from two values). 1e-7 cannot learn in 3 epochs,
# so ASHA (grace period 1, η = 2: rungs at epochs 1 and 2) must stop that trial at epoch 1, where
# the learning trial before it has set the bar. Trials run one at a time, in this order. (Each
# trial is a whole Ray Train run, start-up included: a third trial added a quarter of the test's
# time and checked nothing the two do not.)
TINY_SPACE = """\
parameters:
  train.lr: {grid: [0.005, 1.0e-7]}
  train.model.n_features: {choice: [8, 16]}
  train.model.channels: [4, 8]
"""


@pytest.fixture(scope="module")
def tiny_store(ray_local, tmp_path_factory):
    overrides = [
        "simulate.inputs=[pseudo:1, pseudo:2]",
        "simulate.n_per_map=120",
        "simulate.image_size=24",
        "simulate.voxel_size=7",
        "simulate.shard_size=60",
    ]
    return simulate_small_store(tmp_path_factory.mktemp("tune") / "store.zarr", overrides)


def _one_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


@pytest.mark.ray
@pytest.mark.timeout(900)  # a few minutes; more on a loaded shared machine
def test_tiny_search_stops_trials_early_and_best_config_trains(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE)
    exp = tmp_path / "exp"
    sets = [
        "train.batch_size=16",
        "train.val_pairs_per_shard=100",
        "train.lr_schedule=constant",
        "tune.reduction_factor=2",
    ]
    args = ["tune", "-s", tiny_store, "--space", str(space), "--epochs", "3", "--grace-period", "1"]
    args += ["--samples", "1", "--workers", "1", "--max-concurrent", "1", "-o", str(exp), "--no-progress"]
    result = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output

    report = json.loads((exp / "tune_report.json").read_text())
    assert report["trials"] == 2  # one sample of each grid value
    assert report["status"]["stopped early"] >= 1, report["status"]  # ASHA stopped at least one
    assert report["status"]["complete"] >= 1 and report["status"]["error"] == 0
    assert report["best"]["params"]["train.lr"] == 0.005  # the search finds the rate that learns
    trial_dirs = sorted(exp.glob("trial_*"))
    assert len(trial_dirs) == 2
    stopped = complete = 0
    for tdir in trial_dirs:
        rows = [json.loads(line) for line in (tdir / "result.json").read_text().splitlines() if line.strip()]
        # every epoch reached Tune: training_iteration is the epoch
        assert (
            [r["training_iteration"] for r in rows] == [r["epoch"] + 1 for r in rows] == list(range(1, len(rows) + 1))
        )
        assert all(r["val_loss"] > 0 for r in rows)
        if len(rows) < 3:
            stopped += 1
            assert not (tdir / "train" / "model.pt").exists()
        else:
            complete += 1
            assert (tdir / "train" / "model.pt").is_file() and (tdir / "train" / "history.json").is_file()
        # TensorBoard per trial: Tune's scalars and the Train run's own L_DE curves
        assert any(p.name.startswith("events") for p in tdir.iterdir())
        assert any(p.name.startswith("events") for p in (tdir / "train" / "tensorboard").iterdir())
    assert stopped >= 1 and complete >= 1
    assert (exp / "results.csv").read_text().count("\n") == 3  # Tune's result table: header + 2 trials

    # the report: figure, HTML table, CSV table, best config
    assert (exp / "tune_report.png").read_bytes()[:4] == b"\x89PNG"
    html = (exp / "tune_report.html").read_text()
    assert html.count("<tr>") == 3 and "<img" in html and "tensorboard --logdir" in html
    with open(exp / "trials.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {row["train.model.n_features"] for row in table} <= {"8", "16"}
    lr_low = next(row for row in table if float(row["train.lr"]) == 1e-7)
    assert lr_low["status"] == "stopped early" and lr_low["epochs"] == "1"
    assert float(table[0]["best_val_loss"]) == pytest.approx(report["best"]["best"])

    # `tune report` on the finished experiment writes the same into another folder
    again = runner.invoke(app, ["tune", "report", str(exp), "-o", str(tmp_path / "rep")])
    assert again.exit_code == 0, again.output
    assert "stopped early" in again.stdout and (tmp_path / "rep" / "tune_report.png").is_file()
    assert json.loads((tmp_path / "rep" / "tune_report.json").read_text())["best"] == report["best"]

    # resuming a finished experiment restores it and keeps its trials
    resumed = runner.invoke(app, ["tune", "--resume", str(exp), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((exp / "tune_report.json").read_text())["trials"] == 2

    # the best config is a full run config that `cryoorient train` takes as is
    best = load_config(exp / "best_config.yaml")
    assert (
        best.train.lr == report["best"]["params"]["train.lr"]
        and best.train.model.n_features == report["best"]["params"]["train.model.n_features"]
    )
    assert best.train.stores and best.train.epochs == 3 and best.train.num_workers == 1
    trained = runner.invoke(
        app, ["train", str(exp / "best_config.yaml"), "-o", str(tmp_path / "best"), "--no-progress"]
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads((tmp_path / "best" / "train_summary.json").read_text())
    assert summary["epochs_run"] == 3 and (tmp_path / "best" / "model.pt").is_file()


def test_search_space_checks_names_domains_and_values(tmp_path):
    from cryoorient_ray.distributed.tune_trials import load_search_space, n_trials, trial_concurrency

    def space(text):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        return p

    with pytest.raises(CryoOrientError, match="search space file not found"):
        load_search_space(tmp_path / "nope.yaml")
    with pytest.raises(
        CryoOrientError, match=r"unknown parameter 'train.model.n_feature' \(did you mean 'train.model.n_features'"
    ):
        load_search_space(space("parameters:\n  train.model.n_feature: {choice: [4, 8]}\n"))
    with pytest.raises(CryoOrientError, match="only train.. settings"):
        load_search_space(space("parameters:\n  simulate.n_per_map: {choice: [4, 8]}\n"))
    with pytest.raises(CryoOrientError, match="ASHA budget"):
        load_search_space(space("parameters:\n  train.epochs: {randint: [2, 8]}\n"))
    with pytest.raises(CryoOrientError, match="unknown domain 'logunifrom' .did you mean 'loguniform'"):
        load_search_space(space("parameters:\n  train.lr: {logunifrom: [1.0e-4, 1.0e-2]}\n"))
    with pytest.raises(CryoOrientError, match="positive low bound"):
        load_search_space(space("parameters:\n  train.lr: {loguniform: [0, 1.0e-2]}\n"))
    with pytest.raises(CryoOrientError, match="'train.model.norm' cannot be 'layer'"):
        load_search_space(space("parameters:\n  train.model.norm: {choice: [group, layer]}\n"))
    with pytest.raises(CryoOrientError, match="'train.model.kernel_size' cannot be 4"):
        load_search_space(space("parameters:\n  train.model.kernel_size: {choice: [3, 4]}\n"))
    with pytest.raises(CryoOrientError, match="one top-level key 'parameters'"):
        load_search_space(space("train.lr: {choice: [1]}\n"))
    ok = load_search_space(space("parameters:\n  train.lr: {grid: [0.1, 0.2, 0.3]}\n  train.optimizer: adam\n"))
    assert ok == {"train.lr": ("grid", [0.1, 0.2, 0.3]), "train.optimizer": ("value", "adam")}
    assert n_trials(ok, 2) == 6

    # concurrency: what the CPUs hold with one CPU kept for Ray Data, capped by config and trials
    train = TrainConfig(num_workers=2, cpus_per_worker=0.5)
    assert trial_concurrency(SearchConfig(driver_cpus=0.25), train, {"CPU": 4.0}, 10) == 2
    assert trial_concurrency(SearchConfig(driver_cpus=0.25), train, {"CPU": 16.0}, 10) == 10
    assert trial_concurrency(SearchConfig(max_concurrent_trials=3), train, {"CPU": 16.0}, 10) == 3
    gpu = TrainConfig(num_workers=2, use_gpu=True)
    assert trial_concurrency(SearchConfig(), gpu, {"CPU": 16.0, "GPU": 4.0}, 10) == 2
    with pytest.raises(CryoOrientError, match="one trial needs 2.25 CPUs"):
        trial_concurrency(SearchConfig(), TrainConfig(num_workers=4, cpus_per_worker=0.5), {"CPU": 2.0}, 4)


def test_shipped_search_space_is_valid():
    from cryoorient_ray.distributed.tune_trials import load_search_space

    space = load_search_space("configs/tune_space.yaml")
    assert space["train.model.n_features"] == ("choice", [4, 8, 16, 32, 64, 128, 256, 512])  # Appendix D's n_f


def test_bad_tune_input_is_one_line(tmp_path):
    _one_line(runner.invoke(app, ["tune", "--space", str(tmp_path / "nope.yaml")]), "search space file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  train.model.n_feature: {choice: [4, 8]}\n")
    _one_line(runner.invoke(app, ["tune", "--space", str(bad)]), "unknown parameter 'train.model.n_feature'")
    deep = tmp_path / "deep.yaml"
    deep.write_text("parameters:\n  train.model.channels: {choice: [[4, 8], [4, 4, 4, 4, 4, 4]]}\n")
    _one_line(
        runner.invoke(
            app, ["tune", "--space", str(deep), "--set", "simulate.image_size=32", "-o", str(tmp_path / "d")]
        ),
        "needs images of at least 64",
    )
    assert not (tmp_path / "d").exists()  # nothing written for bad input
    _one_line(runner.invoke(app, ["tune", "report", str(tmp_path / "missing")]), "experiment folder not found")
    (tmp_path / "plain").mkdir()
    _one_line(runner.invoke(app, ["tune", "report", str(tmp_path / "plain")]), "is not a `cryoorient tune` experiment")
    _one_line(
        runner.invoke(app, ["tune", "--resume", str(tmp_path / "plain")]), "is not a `cryoorient tune` experiment"
    )
    _one_line(runner.invoke(app, ["tune", "--resume", str(tmp_path / "plain"), "--space", str(bad)]), "drop --space")


def test_best_run_config_round_trips_through_yaml(tmp_path):
    from cryoorient_ray.config import RunConfig, dump_config
    from cryoorient_ray.stages.tune import best_run_config

    base = RunConfig(train=TrainConfig(epochs=7, lr=1e-3))
    trial = {"params": {"train.lr": 0.02, "train.model.channels": [8, 16], "train.model.head": "so3"}}
    best = best_run_config(base, trial, ["/data/store.zarr"], tmp_path / "best")
    (tmp_path / "b.yaml").write_text(dump_config(best))
    loaded = load_config(tmp_path / "b.yaml")
    assert loaded.train.lr == 0.02 and loaded.train.model.channels == [8, 16] and loaded.train.model.head == "so3"
    assert loaded.train.epochs == 7 and loaded.train.stores == ["/data/store.zarr"] and loaded.stamp is None
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["output_dir"] == str(tmp_path / "best")


def _fake_experiment(exp):
    """An experiment folder as Tune leaves it, written by hand: four trials, one per status."""
    from cryoorient_ray.config import write_stamped_config

    exp.mkdir()
    cfg = load_config(None, sets=["train.epochs=3", "train.stores=[/data/s.zarr]"])
    write_stamped_config(cfg, exp, ["cryoorient", "tune"])
    (exp / "tune_space.yaml").write_text("parameters:\n  train.lr: {grid: [0.1, 0.2]}\n")
    trials = {  # params, val_loss per epoch, Tune's status, exported model
        "a1": ({"train.lr": 0.005, "train.model.n_features": 8}, [0.9, 0.5, 0.4], "TERMINATED", True),
        "b2": ({"train.lr": 1e-7, "train.model.n_features": 16}, [1.2], "TERMINATED", False),
        "c3": ({"train.lr": 0.003, "train.model.n_features": 16}, [1.0, 0.45], "RUNNING", False),
        "d4": ({"train.lr": 0.3, "train.model.n_features": 8}, [], "ERROR", False),
    }
    state = {"trial_data": []}
    for tid, (params, curve, status, done) in trials.items():
        d = exp / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(params))
        lines = [json.dumps({"val_loss": v, "training_iteration": i + 1}) for i, v in enumerate(curve)]
        (d / "result.json").write_text("\n".join(lines) + '\n{"val_loss": 0.1, "trai')  # a line cut short
        if done:
            (d / "train").mkdir()
            (d / "train" / "model.pt").write_bytes(b"x")
        state["trial_data"].append([json.dumps({"trial_id": tid, "status": status}), "{}"])
    (exp / "experiment_state-2026.json").write_text(json.dumps(state))


def test_report_of_an_experiment_folder_needs_no_ray(tmp_path):
    from cryoorient_ray.stages.tune import write_tune_report

    _fake_experiment(tmp_path / "exp")
    report = write_tune_report(tmp_path / "exp", tmp_path / "rep")
    assert report["status"] == {"complete": 1, "stopped early": 1, "error": 1, "unfinished": 1}
    assert report["best"]["trial_id"] == "a1" and report["best"]["best"] == 0.4 and report["best"]["best_epoch"] == 3
    with open(tmp_path / "rep" / "trials.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [row["trial_id"] for row in table] == ["a1", "c3", "b2", "d4"]  # best first, no result last
    html = (tmp_path / "rep" / "tune_report.html").read_text()
    assert html.count("<tr>") == 5 and "data:image/png;base64," in html
    best = load_config(tmp_path / "rep" / "best_config.yaml")
    assert best.train.lr == 0.005 and best.train.model.n_features == 8 and best.train.stores == ["/data/s.zarr"]


def test_the_ray_layer_has_no_plotting_or_html():
    from pathlib import Path

    import cryoorient_ray.distributed as distributed

    pattern = re.compile(r"^\s*(from|import) (cryoorient_ray\.(plots|report)|matplotlib|html)\b", re.M)
    offenders = [p.name for p in Path(distributed.__file__).parent.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
