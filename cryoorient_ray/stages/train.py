"""The train stage: the distance learned with Ray Train, its curves and its test-pair evaluation."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from cryoorient_ray.config import RunConfig
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text
from cryoorient_ray.plots import (
    plot_distance_scatter,
    plot_training_curves,
)
from cryoorient_ray.stages.base import (
    MODEL_NAME,
    StageResult,
    _ray_nodes_metric,
    run_standalone,
    store_path_for,
)
from cryoorient_ray.stages.simulate import check_simulate, stage_simulate

log = logging.getLogger(__name__)


def evaluate_distances(
    store_path: str,
    out: Path,
    model_path: str | os.PathLike | None = None,
    euclidean: bool = False,
    split: str = "test",
    n_pairs: int = 1000,
    seed: int = 0,
    proteins: str = "all",
) -> dict[str, dict]:
    """d̂ vs d_q on the same ``n_pairs`` pairs for the learned model and/or the Euclidean baseline.

    Writes ``distances.png`` (scatter, one panel per estimator) and ``distances.json``.
    """
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.evaluate import distance_report, fit_euclidean, predict_pairs, sample_pairs

    if model_path is None and not euclidean:
        raise CryoOrientError("give a trained model (--model) and/or --euclidean")
    store = ProjectionStore.open(store_path)
    estimators = {}
    if model_path is not None:
        model, meta = load_distance_model(model_path)
        if store.image_size < model.spec.min_image_size:
            raise CryoOrientError(
                f"{store_path} has {store.image_size}² images; {model_path} needs at least {model.spec.min_image_size}²"
            )
        estimators["learned"] = model
    if euclidean:
        estimators["euclidean"] = fit_euclidean(store, n_pairs=max(500, n_pairs), seed=seed + 1)
    row_i, row_j, true = sample_pairs(store, split, n_pairs, seed, proteins)
    panels, reports = {}, {}
    for name, est in estimators.items():
        pred = predict_pairs(est, store, row_i, row_j)
        reports[name] = distance_report(pred, true)
        panels[name] = (true, pred, reports[name])
    if "euclidean" in estimators:
        reports["euclidean"]["scale"] = float(estimators["euclidean"].scale)
    plot_distance_scatter(panels, out / "distances.png")
    atomic_write_text(
        out / "distances.json", json.dumps({"split": split, "proteins": proteins, **reports}, indent=2) + "\n"
    )
    return reports


def calibrate_distance(
    store_path: str, model_path: str | os.PathLike, split: str = "val", n_pairs: int = 4000, seed: int = 0
) -> dict | None:
    """σ(d̂) of the model on random same-protein pairs of ``split`` (the prior recovery's edges are
    drawn from), saved into the model file (its ``calibration``); ``None`` (with a warning) when
    the split has too few pairs or no true orientations."""
    import numpy as np

    from cryoorient_ray.core.learning.calibration import fit_calibration
    from cryoorient_ray.core.learning.model import load_distance_model, save_distance_model
    from cryoorient_ray.core.learning.pairs import candidate_pairs, pair_distances
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.evaluate import predict_pairs

    store = ProjectionStore.open(store_path)
    rows = store.select_rows(split=split)
    if not store.manifest.get("has_orientations", True) or len(rows) < 2:
        log.warning("no calibration of the distance: split '%s' has no true orientations or too few projections", split)
        return None
    meta = store.read_metadata(rows, names=["protein", "quaternion"])
    i, j = candidate_pairs(meta["protein"], max_pairs=n_pairs, rng=np.random.default_rng(seed + 5))
    if len(i) < 20:
        log.warning("no calibration of the distance: split '%s' has %d pairs", split, len(i))
        return None
    true = pair_distances(meta["quaternion"], i, j, meta["protein"], store.symmetries())
    model, info = load_distance_model(model_path)
    cal = fit_calibration(predict_pairs(model, store, rows[i], rows[j]), true).to_dict()
    tmp = Path(f"{model_path}.tmp")
    save_distance_model(
        tmp, model, {**{k: v for k, v in info.items() if k not in ("format", "spec")}, "calibration": cal}
    )
    os.replace(tmp, model_path)
    return cal


def stage_train(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """Train the distance on Ray Train; export model.pt; plot L_DE curves; compare with the Euclidean baseline."""
    from cryoorient_ray.distributed import runtime
    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance
    from cryoorient_ray.io.store import absolute_store_path

    t0 = time.perf_counter()
    stores = [absolute_store_path(s) for s in cfg.train.stores] or [store_path_for(cfg, out)]
    runtime.clear_nodes_used("train")
    with runtime.ray_runtime(cfg.ray):
        groups_before = runtime.placement_group_ids()
        summary = train_distance(TrainJob(cfg.train, stores, out, seed=cfg.seed), progress=progress)
        runtime.record_nodes("train", runtime.placement_group_nodes(exclude=groups_before))
    history = json.loads((out / "history.json").read_text())
    plot_training_curves(history, out / "training.png")
    reports = evaluate_distances(stores[0], out, out / MODEL_NAME, euclidean=True, seed=cfg.seed)
    calibrate_distance(stores[0], out / MODEL_NAME, seed=cfg.seed)  # σ(d̂) for recover.weights: confidence
    metrics = {
        "best_val_L_DE": round(summary["best_val_loss"], 4),
        "test_L_DE": round(reports["learned"]["L_DE"], 4),
        "euclidean_test_L_DE": round(reports["euclidean"]["L_DE"], 4),
        "epochs": summary["epochs_run"],
        "fresh_noise": summary.get("fresh_noise") is not None,
        "preprocess": _preprocess_label(summary.get("preprocess")),
        **_ray_nodes_metric("train"),
    }
    if "heldout_loss" in summary["final"]:
        metrics["heldout_val_L_DE"] = round(summary["final"]["heldout_loss"], 4)
    return StageResult.done(
        "train",
        t0,
        outputs={
            "model": MODEL_NAME,
            "curves": "training.png",
            "scatter": "distances.png",
            "tensorboard": "tensorboard/",
        },
        metrics=metrics,
    )


def _preprocess_label(pre: dict | None) -> str:
    """``"phase flip + wiener"``, ``"lowpass"``, ``"none"``: what the model does to its images."""
    if not pre:
        return "none"
    parts = (["phase flip"] if pre.get("phase_flip") else []) + (["CTF Wiener"] if pre.get("ctf_wiener") else [])
    parts += [pre["filter"]] if pre.get("filter") != "none" else []
    return " + ".join(parts) or "none"


def run_train(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None, progress: bool = True
) -> tuple[Path, list[StageResult]]:
    """`cryoorient train`: simulate first when no store is given, then train."""
    stages = [] if cfg.train.stores else [lambda o: stage_simulate(cfg, o, progress=progress)]
    stages.append(lambda o: stage_train(cfg, o, progress=progress))
    return run_standalone(cfg, out_dir, argv, stages, checks=[lambda o: check_train_inputs(cfg, o)])


def check_init_model(cfg: RunConfig) -> None:
    """Before Ray starts: ``train.init_model`` (fine-tuning), when set, is a readable model file.

    Raises:
        CryoOrientError: one line, e.g. ``train.init_model: model file not found: runs/x/model.pt``.
    """
    from cryoorient_ray.core.learning.model import load_distance_model

    if cfg.train.init_model:
        try:
            load_distance_model(cfg.train.init_model)
        except CryoOrientError as exc:
            raise CryoOrientError(f"train.init_model: {exc}") from None


def check_train_inputs(cfg: RunConfig, out: Path) -> None:
    """Before Ray starts: the given stores open intact, or (none given) the simulation's inputs exist,
    and the init model (fine-tuning) reads."""
    from cryoorient_ray.io.store import ProjectionStore

    check_init_model(cfg)

    for path in cfg.train.stores:
        store = ProjectionStore.open(path)
        if cfg.train.noise.fresh:  # fresh noise needs the clean projections: say so before Ray starts
            store.require_clean()
    if not cfg.train.stores:
        check_simulate(cfg, out)
