"""Ray Train: data-parallel training on 2 CPU workers, a worker killed mid-run, resume, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from cryoorient_ray.cli import app
from cryoorient_ray.config import TrainConfig
from cryoorient_ray.core.learning.model import load_distance_model
from tests.helpers import simulate_small_store

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
runner = CliRunner()
TINY_MODEL = {"channels": [8, 16, 32], "n_features": 16}


@pytest.fixture(scope="module")
def two_protein_store(ray_local, tmp_path_factory):
    overrides = [
        "simulate.inputs=[pseudo:1, {source: 'pseudo:2', heldout: true}]",
        "simulate.n_per_map=240",
        "simulate.image_size=32",
        "simulate.voxel_size=6",
        "simulate.shard_size=60",
    ]
    return simulate_small_store(tmp_path_factory.mktemp("train") / "store.zarr", overrides)


def test_train_two_workers_kill_one_and_resume(two_protein_store, tmp_path):
    from cryoorient_ray.distributed.train_workers import FaultInjection, TrainJob, train_distance

    # small batches: the tiny store gives each worker only ~30 training images per shard
    cfg = TrainConfig(epochs=6, batch_size=16, lr=5e-3, val_pairs_per_shard=150, num_workers=2, model=TINY_MODEL)
    marker = tmp_path / "killed"
    # The worker waits delay_s before dying so the controller has collected epoch 1's report: it
    # polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (0.2 s in the tests, conftest.py); a dozen
    # polls (the hook's default 6 s is 3 polls at Ray's default 2 s).
    poll_s = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
    fault = FaultInjection(epoch=2, marker=str(marker), delay_s=max(2.5, 12 * poll_s))
    summary = train_distance(TrainJob(cfg, [two_protein_store], tmp_path, fault_injection=fault))
    history = json.loads((tmp_path / "history.json").read_text())
    assert marker.read_text().startswith("killed at epoch 2")  # a worker really died
    assert [h["epoch"] for h in history] == list(range(6))  # no epoch repeated or lost
    assert history[1]["resumed_from_epoch"] == -1 and history[2]["resumed_from_epoch"] == 1
    # learning: validation L_DE below that of the untrained model
    assert summary["best_val_loss"] < 0.8 * history[0]["initial_val_loss"]
    # held-out protein is reported separately and was not trained on
    assert "heldout_loss" in history[-1] and summary["proteins_heldout"] == ["pseudo_2"]
    assert summary["proteins_seen"] == ["pseudo_1"]
    # the exported model works without Ray
    model, meta = load_distance_model(tmp_path / "model.pt")
    import torch

    d = model(torch.randn(4, 32, 32), torch.randn(4, 32, 32))
    assert torch.isfinite(d).all() and meta["training"]["best_epoch"] == summary["best_epoch"]
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())


ONE_WORKER = TrainConfig(
    epochs=1, batch_size=16, val_pairs_per_shard=50, num_workers=1, cpus_per_worker=1, model=TINY_MODEL
)


@pytest.mark.slow  # two Ray Train fits, 43 s on 2 cores: determinism, run by `make test-all`
def test_one_worker_same_seed_same_model(two_protein_store, tmp_path):
    """Data in memory: the batch order and the initial weights follow the seed, so one worker
    trains the same model twice."""
    import torch

    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance

    runs = []
    for name in ("a", "b"):
        # run b keeps its checkpoints elsewhere (train.storage_path, shared storage on a cluster)
        cfg = ONE_WORKER.model_copy(update={"storage_path": str(tmp_path / "shared")} if name == "b" else {})
        train_distance(TrainJob(cfg, [two_protein_store], tmp_path / name, seed=3), progress=False)
        runs.append(json.loads((tmp_path / name / "history.json").read_text()))
    assert [h["train_loss"] for h in runs[0]] == [h["train_loss"] for h in runs[1]]
    assert (tmp_path / "a" / "ray_train").is_dir() and not (tmp_path / "b" / "ray_train").exists()
    assert any((tmp_path / "shared").rglob("checkpoint_*")) and (tmp_path / "b" / "model.pt").is_file()
    weights = [load_distance_model(tmp_path / name / "model.pt")[0].state_dict() for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    first = runs[0][0]
    assert first["data_seconds"] < first["seconds"] and first["threads"] == 1  # 1 CPU from Ray: 1 thread


def test_fine_tuning_starts_from_the_init_model(two_protein_store, tmp_path, caplog):
    """train.init_model: the run starts from that model's weights and architecture (its first
    validation L_DE is the init model's own on the store, far below a fresh model's), changes
    them, and records where it started."""
    import logging

    import torch

    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance

    base = ONE_WORKER.model_copy(update={"epochs": 3, "lr": 5e-3})
    first = train_distance(TrainJob(base, [two_protein_store], tmp_path / "a", seed=3), progress=False)
    fresh_start = json.loads((tmp_path / "a" / "history.json").read_text())[0]["initial_val_loss"]
    init = str(tmp_path / "a" / "model.pt")
    # another train.model: the init model's architecture wins, with a warning
    update = {"epochs": 1, "lr": 1e-3, "init_model": init, "model": {"channels": [4, 8]}}
    tune = TrainConfig(**{**base.model_dump(), **update})
    with caplog.at_level(logging.WARNING):
        summary = train_distance(TrainJob(tune, [two_protein_store], tmp_path / "b", seed=3), progress=False)
    assert any("its architecture" in r.getMessage() for r in caplog.records)
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    start = history[0]["initial_val_loss"]
    assert abs(start - first["best_val_loss"]) < 0.02 * first["best_val_loss"], (start, first["best_val_loss"])
    assert start < 0.8 * fresh_start, (start, fresh_start)
    (old, _), (new, meta) = load_distance_model(init), load_distance_model(tmp_path / "b" / "model.pt")
    assert new.spec == old.spec and meta["training"]["init_model"] == init == summary["init_model"]
    assert any(not torch.equal(old.state_dict()[k], new.state_dict()[k]) for k in old.state_dict())
    # a missing or unreadable init model: one line, before Ray trains anything
    (tmp_path / "junk.pt").write_text("not a model")
    for bad, why in ((tmp_path / "none.pt", "model file not found"), (tmp_path / "junk.pt", "cannot read")):
        args = ["train", "-s", two_protein_store, "--init-model", str(bad), "-o", str(tmp_path / "c"), "--no-progress"]
        _one_line(runner.invoke(app, args), f"train.init_model: {why}")
        assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_streamed_data_still_trains(two_protein_store, tmp_path):
    """Data stream (stream pairing): Ray Data reads and pairs the store every pass, as before; fresh
    noise at 0 dB is drawn on the (noiseless, so clean) train images of every streamed pair."""
    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance

    update = {"data": "stream", "pairing": "stream", "pairs_per_shard": 40, "epochs": 2, "noise": {"snr_db": 0.0}}
    streamed = TrainConfig(**{**ONE_WORKER.model_dump(), **update})
    summary = train_distance(TrainJob(streamed, [two_protein_store], tmp_path, seed=3), progress=False)
    assert summary["fresh_noise"]["snr_db"] == 0.0 and summary["preprocess"]["filter"] == "wiener"
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"]) and summary["steps_per_worker"] > 0
    assert history[-1]["train_pairs"] == history[0]["train_pairs"] > 0


def test_distances_command_plots_learned_and_euclidean(two_protein_store, tmp_path):
    from cryoorient_ray.core.learning.model import SiameseDistance, save_distance_model

    save_distance_model(tmp_path / "m.pt", SiameseDistance(TINY_MODEL))
    result = runner.invoke(
        app,
        [
            "distances",
            two_protein_store,
            "--model",
            str(tmp_path / "m.pt"),
            "--euclidean",
            "--pairs",
            "200",
            "-o",
            str(tmp_path / "d"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "distances.json").read_text())
    assert report["learned"]["pairs"] == 200 and report["euclidean"]["pairs"] == 200
    assert report["euclidean"]["scale"] > 0 and np.isfinite(report["learned"]["L_DE"])
    assert (tmp_path / "d" / "distances.png").read_bytes()[:4] == b"\x89PNG"
    # pairs of the held-out protein only
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.evaluate import sample_pairs

    store = ProjectionStore.open(two_protein_store)
    i, j, _ = sample_pairs(store, "test", 100, proteins="heldout")
    protein = store.read_metadata(names=["protein"])["protein"]
    assert set(protein[i]) == set(protein[j]) == {1}  # pseudo:2 is the held-out one
    held = runner.invoke(
        app,
        [
            "distances",
            two_protein_store,
            "--euclidean",
            "--proteins",
            "heldout",
            "--pairs",
            "50",
            "-o",
            str(tmp_path / "h"),
        ],
    )
    assert held.exit_code == 0 and json.loads((tmp_path / "h" / "distances.json").read_text())["proteins"] == "heldout"


def _one_line(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], result.stderr


def test_bad_training_input(two_protein_store, tmp_path):
    # images too small for the architecture
    _one_line(
        runner.invoke(
            app,
            [
                "train",
                "-s",
                two_protein_store,
                "--set",
                "train.model.channels=[4,4,4,4,4,4]",
                "-o",
                str(tmp_path / "a"),
                "--no-progress",
            ],
        ),
        "need at least 64",
    )
    # a model file from another architecture
    from cryoorient_ray.core.learning.model import SiameseDistance, save_distance_model

    save_distance_model(tmp_path / "m.pt", SiameseDistance(TINY_MODEL))
    import torch

    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    payload["spec"]["n_features"] = 99
    torch.save(payload, tmp_path / "m.pt")
    _one_line(runner.invoke(app, ["distances", two_protein_store, "--model", str(tmp_path / "m.pt")]), "do not match")
    # an unknown split, and a store without the split training needs
    _one_line(
        runner.invoke(app, ["distances", two_protein_store, "--euclidean", "--split", "holdout"]), "unknown split"
    )
    from tests.helpers import make_store

    make_store(tmp_path / "test_only.zarr", size=32, split_fractions=(0.0, 0.0, 1.0))
    _one_line(
        runner.invoke(
            app, ["train", "-s", str(tmp_path / "test_only.zarr"), "-o", str(tmp_path / "b"), "--no-progress"]
        ),
        "split(s) train",
    )


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from cryoorient_ray.distributed.train_workers import lr_factor

    total = 1000
    f = [lr_factor(s, total, "cosine") for s in range(total + 50)]
    warm = int(0.05 * total)
    assert f[0] < 0.05 and abs(f[warm - 1] - 1.0) < 1e-9  # linear warm-up to the base rate
    assert all(a >= b - 1e-12 for a, b in zip(f[warm:], f[warm + 1 :], strict=False))  # then never rises
    assert abs(f[total] - 0.01) < 1e-9 and abs(f[-1] - 0.01) < 1e-9  # floor, also past the estimate
    assert lr_factor(10, total, "constant") == 1.0 and lr_factor(10, 0, "cosine") == 1.0


def test_worker_settings_cross_to_the_worker_as_a_plain_dict(tmp_path):
    """The driver's WorkerSettings go through train_loop_config as plain data and come back equal."""
    import dataclasses
    import pickle

    from cryoorient_ray.core.learning.model import SiameseSpec
    from cryoorient_ray.distributed.train_workers import (
        Augmentation,
        FaultInjection,
        TrainJob,
        WorkerSettings,
        open_training_stores,
        worker_settings,
    )
    from cryoorient_ray.io.store import ProjectionStore
    from tests.helpers import make_store

    make_store(tmp_path / "a.zarr", n_per_protein=100, size=16, shard_size=50, heldout=("b",), symmetry="D2")
    make_store(tmp_path / "b.zarr", n_per_protein=60, proteins=("c",), size=16, shard_size=50)
    stores = [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    cfg = TrainConfig(epochs=3, batch_size=8, num_workers=2, model=TINY_MODEL, augment={"max_shift": 2})
    spec = SiameseSpec(**cfg.model.model_dump())
    job = TrainJob(cfg, stores, tmp_path / "run", seed=4, fault_injection=FaultInjection(epoch=1, marker="m"))
    settings = worker_settings(job, open_training_stores(stores, spec))
    plain = dataclasses.asdict(settings)
    assert not any(dataclasses.is_dataclass(v) for v in plain.values())  # nested settings as dicts too
    assert WorkerSettings(**pickle.loads(pickle.dumps(plain))) == settings
    assert settings.lr_schedule == "cosine" == TrainConfig().lr_schedule  # the config's default, not another
    assert settings.model == spec and settings.augment == Augmentation(max_shift=2)
    assert settings.fault_injection == FaultInjection(1, "m", rank=0, delay_s=6.0)
    assert settings.symmetry == {0: "D2", 1: "D2", 100_000: "C1"} and settings.has_heldout
    # train rows of the seen proteins (a: ~50, c: ~30) over batch 8 × 2 workers, per epoch
    seen = sum(len(ProjectionStore.open(s).select_rows(split="train", proteins="seen")) for s in stores)
    assert settings.total_steps == int(np.ceil(seen / 16)) * 3
    assert settings.data == "memory" and settings.pairs_per_shard is None  # auto: the images fit
    assert (
        worker_settings(
            dataclasses.replace(job, cfg=cfg.model_copy(update={"memory_gb": 1e-6})), open_training_stores(stores, spec)
        ).data
        == "stream"
    )
    assert settings.threads == 1 and settings.progress_file == str((tmp_path / "run" / "progress.jsonl").resolve())


def test_training_stores_are_checked_before_ray(tmp_path):
    from cryoorient_ray.core.learning.model import SiameseSpec
    from cryoorient_ray.distributed.train_workers import open_training_stores
    from cryoorient_ray.errors import CryoOrientError
    from tests.helpers import make_store

    make_store(tmp_path / "s.zarr", size=16)
    with pytest.raises(CryoOrientError, match="no projection store"):
        open_training_stores([], SiameseSpec(**TINY_MODEL))
    with pytest.raises(CryoOrientError, match="need at least 32"):
        open_training_stores([str(tmp_path / "s.zarr")], SiameseSpec(channels=[4, 4, 4, 4, 4]))
    make_store(tmp_path / "partial.zarr", size=16, write_shards=False)
    with pytest.raises(CryoOrientError, match="is incomplete"):
        open_training_stores([str(tmp_path / "partial.zarr")], SiameseSpec(**TINY_MODEL))


@pytest.fixture(scope="module")
def noisy_ctf_store(ray_local, tmp_path_factory):
    """Noise (-6 dB) and a CTF set at a 48² acquisition box, Fourier-cropped to 32² working."""
    overrides = [
        "simulate.inputs=[pseudo:1]",
        "simulate.n_per_map=240",
        "simulate.image_size=32",
        "simulate.voxel_size=6",
        "simulate.acquisition.image_size=48",
        "simulate.noise.snr_db=-6",
        "simulate.ctf.enabled=true",
        "simulate.shard_size=60",
    ]
    return simulate_small_store(tmp_path_factory.mktemp("noisy") / "store.zarr", overrides)


def test_fresh_noise_training(noisy_ctf_store, tmp_path):
    """Fresh noise/CTF on the clean train images every batch (memory and stream data), the fixed noisy
    images for validation, and the preprocessing (phase flip + Wiener filter) saved with the model."""
    import torch

    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.evaluate import predict_pairs, sample_pairs

    store = ProjectionStore.open(noisy_ctf_store)
    assert store.has_clean and store.manifest["ctf_ranges"]["defocus_max"] > 0
    clean, clean_var = store.read_clean(np.arange(4))
    assert np.all(clean_var > 0) and not np.allclose(clean, store.read_images(np.arange(4)))
    # data in memory (the stream path draws fresh noise in test_streamed_data_still_trains)
    cfg = TrainConfig(**{**ONE_WORKER.model_dump(), "noise": {"curriculum_start_db": 6.0}})
    summaries = {
        "memory": train_distance(TrainJob(cfg, [noisy_ctf_store], tmp_path / "memory", seed=1), progress=False)
    }
    history = json.loads((tmp_path / "memory" / "history.json").read_text())
    assert np.isfinite(history[-1]["train_loss"]) and np.isfinite(history[-1]["val_loss"])
    fresh = summaries["memory"]["fresh_noise"]
    assert fresh["snr_db"] == -6 and fresh["acquisition_size"] == 48 and fresh["ctf"]["defocus_min"] > 0
    assert summaries["memory"]["preprocess"] == {
        "image_size": 32,
        "pixel_size": 6.0,
        "phase_flip": True,
        "filter": "wiener",
        "snr_db": -6.0,
        "ctf_wiener": None,
    }
    model, _ = load_distance_model(tmp_path / "memory" / "model.pt")
    assert model.needs_ctf and model.preprocess.filter == "wiener"
    # recovery embeds the store's images through the same preprocessing, with each image's CTF
    i, j, d = sample_pairs(store, "test", 50)
    pred = predict_pairs(model, store, i, j)
    assert pred.shape == d.shape and np.isfinite(pred).all()
    with pytest.raises(Exception, match="CTF parameters are needed"):
        model.embed(torch.from_numpy(store.read_images(np.arange(2))))


def test_wiener_ctf_correction_is_estimated_from_the_clean_spectrum(noisy_ctf_store):
    """train.preprocess.ctf_correction: wiener gives N/S per shell from the clean projections (before
    the CTF) against the fresh noise's power, or the store's own noise; more noise, more damping."""
    import torch

    from cryoorient_ray.config import PreprocessConfig, TrainNoiseConfig
    from cryoorient_ray.distributed.train_workers import fresh_corruption, store_preprocess
    from cryoorient_ray.io.store import ProjectionStore

    store = ProjectionStore.open(noisy_ctf_store)
    rows = np.arange(120)
    wiener = PreprocessConfig(ctf_correction="wiener")
    fixed = store_preprocess(store, rows, None, wiener)
    fresh = store_preprocess(store, rows, fresh_corruption(store, TrainNoiseConfig()), wiener)
    harder = store_preprocess(store, rows, fresh_corruption(store, TrainNoiseConfig(snr_db=-12.0)), wiener)
    for pre in (fixed, fresh, harder):
        assert pre.needs_ctf and not pre.phase_flip and pre.filter == "none" and pre.ctf_wiener is not None
    # the store's noise and fresh noise at the store's SNR agree to the spread of the per-image SNR
    np.testing.assert_allclose(fixed.ctf_wiener[1:10], fresh.ctf_wiener[1:10], rtol=0.25)
    np.testing.assert_allclose(np.asarray(harder.ctf_wiener) / np.asarray(fresh.ctf_wiener), 10**0.6, rtol=0.25)
    meta = store.read_metadata(np.arange(4), names=["defocus_u", "defocus_v", "defocus_angle"])
    out = fresh.apply(torch.from_numpy(store.read_images(np.arange(4))), store.ctf_parameters(meta))
    assert out.shape == (4, 32, 32) and torch.isfinite(out).all()


def test_bad_noise_settings_are_one_line(noisy_ctf_store, tmp_path):
    from tests.helpers import make_store

    make_store(tmp_path / "old.zarr", size=32, split_fractions=(0.6, 0.2, 0.2))
    base = ["train", "--no-progress", "-o", str(tmp_path / "o")]
    _one_line(
        runner.invoke(app, [*base, "-s", str(tmp_path / "old.zarr"), "--set", "train.noise.fresh=true"]),
        "holds no clean projections",
    )
    _one_line(runner.invoke(app, [*base, "-s", noisy_ctf_store, "--set", "train.noise.snr_db=nan"]), "snr_db")
    _one_line(runner.invoke(app, [*base, "-s", noisy_ctf_store, "--set", "train.noise.snr_db=[-6,-12]"]), "lo > hi")
