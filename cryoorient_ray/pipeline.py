"""Stage orchestration: what each CLI command runs, in which order, writing what.

Direction of imports: cli → pipeline → distributed → {io, core}. This module validates
inputs, runs stages, and writes their outputs atomically into the run's output folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cryoorient_ray import __version__
from cryoorient_ray.config import RunConfig, write_stamped_config
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path, atomic_savez, atomic_write_text
from cryoorient_ray.io.star import write_orientations_star
from cryoorient_ray.plots import (
    plot_distance_scatter,
    plot_image_grid,
    plot_orientations,
    plot_training_curves,
    random_pair_distances,
)

log = logging.getLogger(__name__)

# The end-to-end order of `cryoorient run`. Stages not yet in this version are listed as such.
PIPELINE_STAGES: tuple[str, ...] = ("simulate", "train", "recover", "reconstruct")
MODEL_NAME = "model.pt"
SUMMARY_NAME = "summary.json"
STORE_NAME = "projections.zarr"


@dataclass
class StageResult:
    """What a stage did: status, wall time, files written (relative to the run folder), numbers."""

    name: str
    status: str  # "done" | "not available"
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | int | str] = field(default_factory=dict)


def prepare_output_dir(cfg: RunConfig, out_dir: str | os.PathLike | None, argv: list[str] | None) -> Path:
    """Create the run folder and write the stamped config into it. Returns the folder."""
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise CryoOrientError(f"output path exists and is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CryoOrientError(f"cannot create output folder {out}: {exc.strerror}") from None
    write_stamped_config(cfg, out, argv)
    return out


def stage_orientations(cfg: RunConfig, out: Path) -> StageResult:
    """Draw ``simulate.n_per_map`` orientations; write .star, .npy and a PNG summary."""
    t0 = time.perf_counter()
    ocfg = cfg.simulate.orientations
    q = sample_orientations(cfg.simulate.n_per_map, ocfg.sampler, ocfg.coverage, seed=cfg.seed)
    with atomic_path(out / "orientations.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, q)
    write_orientations_star(out / "orientations.star", q)
    title = f"{len(q)} orientations: sampler={ocfg.sampler}, coverage={ocfg.coverage}, symmetry={ocfg.symmetry}"
    plot_orientations(q, out / "orientations.png", title=title, symmetry=ocfg.symmetry)
    d = random_pair_distances(q, symmetry=ocfg.symmetry, seed=cfg.seed)
    metrics: dict[str, float | int | str] = {"n": int(len(q)), "sampler": ocfg.sampler, "coverage": ocfg.coverage}
    if len(d):
        metrics["median_pair_distance_rad"] = round(float(np.median(d)), 4)
    return StageResult(
        name="orientations",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs={"star": "orientations.star", "array": "orientations.npy", "plot": "orientations.png"},
        metrics=metrics,
    )


def store_path_for(cfg: RunConfig, out: Path) -> str:
    """Where the simulated store goes: ``simulate.store`` if set, else ``<out>/projections.zarr``.

    Local paths come back absolute (Ray workers do not share the driver's working directory);
    URLs (``s3://``, ``gs://``) unchanged.
    """
    from cryoorient_ray.io.store import absolute_store_path

    return absolute_store_path(cfg.simulate.store or out / STORE_NAME)


def check_ray_address(cfg: RunConfig) -> None:
    """Fail before writing anything when the configured Ray cluster does not answer (one clear error)."""
    from cryoorient_ray.distributed.runtime import check_address, resolve_address

    address = resolve_address(cfg.ray)
    if address is not None:
        check_address(address, timeout=cfg.ray.connect_timeout)


def _ray_nodes_metric(stage: str) -> dict[str, int]:
    """``{"nodes": k}``: how many Ray nodes ran the stage's tasks/actors (empty when none recorded)."""
    from cryoorient_ray.distributed.runtime import nodes_used

    used = nodes_used(stage)
    return {"nodes": len(used)} if used else {}


def _sample_titles(meta: dict, proteins: list[dict]) -> list[str]:
    titles = []
    for p, e, s in zip(meta["protein"], meta["euler"], meta["shift"], strict=True):
        name = proteins[p]["name"] if 0 <= p < len(proteins) else "?"
        angles = "no angles" if np.isnan(e).any() else f"{e[0]:.0f},{e[1]:.0f},{e[2]:.0f}"
        titles.append(f"{name[:14]}\n{angles} t={s[0]:+.1f},{s[1]:+.1f}")
    return titles


def write_store_preview(store, path: str | os.PathLike, n: int = 24, seed: int = 0) -> Path:
    """PNG grid of ``n`` random completed projections with protein, angles and shift."""
    rows = store.done_rows()
    if len(rows) == 0:
        raise CryoOrientError(f"{store.path} has no completed shard to show")
    pick = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))
    meta = store.read_metadata(pick, names=["protein", "euler", "shift"])
    title = (
        f"{Path(store.path).name}: {store.n_samples} projections of {store.image_size}² at {store.pixel_size:.3g} Å/px"
    )
    return plot_image_grid(store.read_images(pick), path, _sample_titles(meta, store.proteins), title=title)


def stage_simulate(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """Simulate (or finish) the projection store on Ray; write a preview PNG and its summary."""
    from cryoorient_ray.distributed.runtime import clear_nodes_used, ray_runtime
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    t0 = time.perf_counter()
    path = store_path_for(cfg, out)
    clear_nodes_used("simulate")
    with ray_runtime(cfg.ray):
        store = simulate_store(cfg.simulate, cfg.seed, path, progress=progress, cache_dir=out / "cache")
    write_store_preview(store, out / "projections.png", seed=cfg.seed)
    summary = store.summary()
    atomic_write_text(out / "store_summary.json", json.dumps(summary, indent=2) + "\n")
    return StageResult(
        name="simulate",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs={"store": os.path.relpath(path, out) if "://" not in path else path, "preview": "projections.png"},
        metrics={
            "proteins": len(summary["proteins"]),
            "projections": summary["samples"],
            "shards": summary["shards"],
            **_ray_nodes_metric("simulate"),
        },
    )


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


def stage_train(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """Train the distance on Ray Train; export model.pt; plot L_DE curves; compare with the Euclidean baseline."""
    from cryoorient_ray.distributed import runtime
    from cryoorient_ray.distributed.train_workers import train_distance
    from cryoorient_ray.io.store import absolute_store_path

    t0 = time.perf_counter()
    stores = [absolute_store_path(s) for s in cfg.train.stores] or [store_path_for(cfg, out)]
    runtime.clear_nodes_used("train")
    with runtime.ray_runtime(cfg.ray):
        groups_before = runtime.placement_group_ids()
        summary = train_distance(cfg.train, stores, out, seed=cfg.seed, progress=progress)
        runtime.record_nodes("train", runtime.placement_group_nodes(exclude=groups_before))
    history = json.loads((out / "history.json").read_text())
    plot_training_curves(history, out / "training.png")
    reports = evaluate_distances(stores[0], out, out / MODEL_NAME, euclidean=True, seed=cfg.seed)
    metrics = {
        "best_val_L_DE": round(summary["best_val_loss"], 4),
        "test_L_DE": round(reports["learned"]["L_DE"], 4),
        "euclidean_test_L_DE": round(reports["euclidean"]["L_DE"], 4),
        "epochs": summary["epochs_run"],
        **_ray_nodes_metric("train"),
    }
    if "heldout_loss" in summary["final"]:
        metrics["heldout_val_L_DE"] = round(summary["final"]["heldout_loss"], 4)
    return StageResult(
        name="train",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs={
            "model": MODEL_NAME,
            "curves": "training.png",
            "scatter": "distances.png",
            "tensorboard": "tensorboard/",
        },
        metrics=metrics,
    )


def _recovery_progress(show: bool):
    """A rich progress bar driven by ``progress(phase, step, total, L_OR)``; ``(bar, callback)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.fields[phase]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not show,
        transient=True,
    )
    task = bar.add_task("recover", total=1, phase="recover", status="")
    state = {"phase": None}

    def callback(phase: str, step: int, total: int, value: float) -> None:
        if phase != state["phase"]:
            state["phase"] = phase
            bar.reset(task, total=total, phase=phase, status="")
        if step % 10 == 0 or step == total:
            bar.update(task, completed=step, status=f"L_OR {value:.4f}")

    def status(text: str) -> None:
        bar.update(task, status=text)

    return bar, callback, status


def write_recovery_outputs(outcome, store_path: str, out: Path, prefix: str = "recovered") -> dict[str, str]:
    """.star + .mrcs (RELION), .npz, L_OR curve, directions and (truth known) error histogram."""
    from cryoorient_ray.io.relion import export_relion
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.plots import plot_error_histogram, plot_recovery_loss

    sel, nodes = outcome.selection, outcome.nodes
    rows = sel.rows[nodes]
    store = ProjectionStore.open(store_path)
    star, mrcs = export_relion(store, out, rows=rows, name=prefix, quaternions=outcome.q_final)
    q_true = sel.q_true[nodes] if sel.q_true is not None else np.full((len(rows), 4), np.nan)
    atomic_savez(
        out / f"{prefix}_orientations.npz",
        rows=rows,
        quaternions=outcome.q_final,
        quaternions_before_gauge=outcome.q_raw,
        quaternions_true=q_true,
        loss=np.asarray(outcome.result.loss),
    )
    m = outcome.metrics
    files = {
        "star": star.name,
        "stack": mrcs.name,
        "array": f"{prefix}_orientations.npz",
        "loss_curve": f"{prefix}_loss.png",
        "directions": f"{prefix}_directions.png",
    }
    title = f"{m['protein']}: {m['recovered']} projections, {m['edges']} edges, {m['estimator']} distances"
    plot_recovery_loss(outcome.result.loss, outcome.result.phase, out / files["loss_curve"], title=title)
    q_plot = outcome.q_final
    if outcome.errors:
        q_plot = outcome.errors["registration"].apply(outcome.q_final)
        plot_error_histogram(
            {
                "after O(4) alignment (E_OR)": outcome.errors["o4"].errors,
                "after rotation + hand (physical)": outcome.errors["registration"].errors,
            },
            out / f"{prefix}_errors.png",
            title=f"{m['protein']}: E_OR {m['e_or_o4']:.3f} rad, registration {m['registration']:.3f} rad",
        )
        files["errors"] = f"{prefix}_errors.png"
    plot_orientations(q_plot, out / files["directions"], title=f"recovered orientations ({m['protein']})")
    atomic_write_text(out / f"{prefix}.json", json.dumps(m, indent=2) + "\n")
    files["report"] = f"{prefix}.json"
    return files


def stage_recover(
    cfg: RunConfig,
    out: Path,
    progress: bool = True,
    store_path: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> StageResult:
    """Recover orientations of one protein's projections (pair graph, L_OR on actors, gauge, errors)."""
    from contextlib import nullcontext

    from cryoorient_ray.distributed.runtime import clear_nodes_used
    from cryoorient_ray.io.store import absolute_store_path
    from cryoorient_ray.stages.recover import recover_store

    t0 = time.perf_counter()
    rcfg = cfg.recover
    store_path = absolute_store_path(store_path) if store_path else store_path_for(cfg, out)
    clear_nodes_used("recover")
    if model_path is None and rcfg.estimator == "model":
        model_path = rcfg.model or str(out / MODEL_NAME)
        if not Path(model_path).is_file():
            raise CryoOrientError(f"model file not found: {model_path} (train first, or set recover.model)")
    if model_path is not None:  # Ray Data embedding workers do not share the driver's working directory
        model_path = os.path.abspath(model_path)
    if rcfg.actors > 0:
        from cryoorient_ray.distributed.runtime import ray_runtime

        runtime = ray_runtime(cfg.ray)
    else:
        runtime = nullcontext()
    bar, callback, status = _recovery_progress(progress)
    with runtime, bar:
        outcome = recover_store(
            store_path, rcfg, None if model_path is None else str(model_path), cfg.seed, callback, status
        )
    files = write_recovery_outputs(outcome, store_path, out)
    m = outcome.metrics
    keep = ("recovered", "edges", "L_OR", "e_or_o4", "registration", "gauge_physical", "recovery_s", "gauge_s")
    metrics = {k: (round(m[k], 4) if isinstance(m[k], float) else m[k]) for k in keep if k in m}
    metrics.update(_ray_nodes_metric("recover"))
    return StageResult(
        name="recover",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs=files,
        metrics=metrics,
    )


def run_recover(
    cfg: RunConfig,
    store_path: str,
    model_path: str | None = None,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
) -> tuple[Path, StageResult]:
    """`cryoorient recover`: the recovery stage alone, on a given store."""
    if cfg.recover.actors > 0:
        check_ray_address(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    result = stage_recover(cfg, out, progress=progress, store_path=store_path, model_path=model_path)
    write_summary(out, cfg, [result])
    return out, result


def run_align(
    truth_star: str,
    estimate_star: str,
    out_dir: str | os.PathLike,
    symmetry: str = "C1",
) -> dict:
    """`cryoorient align`: E_OR (O(4)) and registration error between two .star files of one stack."""
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation, error_report
    from cryoorient_ray.io.star import read_orientations_star
    from cryoorient_ray.plots import plot_error_histogram

    qt = read_orientations_star(truth_star)
    qe = read_orientations_star(estimate_star)
    if len(qt) != len(qe):
        raise CryoOrientError(f"{truth_star} has {len(qt)} orientations but {estimate_star} has {len(qe)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    o4 = align_o4(qt, qe, symmetry=symmetry)
    reg = align_rotation(qt, qe, symmetry=symmetry, allow_mirror=True)
    seconds = time.perf_counter() - t0
    report = {"n": int(len(qt)), **error_report(o4, reg), "seconds": round(seconds, 3)}
    plot_error_histogram(
        {"after O(4) alignment (E_OR)": o4.errors, "after rotation + hand": reg.errors},
        out / "align_errors.png",
        title=f"E_OR {report['e_or_o4']:.3f} rad, registration {reg.mean:.3f} rad ({len(qt)} orientations)",
    )
    atomic_write_text(out / "align.json", json.dumps(report, indent=2) + "\n")
    return report


def stage_reconstruct(cfg: RunConfig, out: Path, progress: bool = True, store_path: str | None = None) -> StageResult:
    """Volumes from the recovered orientations (and, with the truth, the Figure 11 comparison); FSC."""
    from cryoorient_ray.core.density.volume import DensityMap
    from cryoorient_ray.io.mrc import write_map
    from cryoorient_ray.plots import plot_fsc, plot_refinement, plot_volume_slices
    from cryoorient_ray.stages.reconstruct import load_recovered, reconstruct_from_recovery

    t0 = time.perf_counter()
    store_path = store_path or store_path_for(cfg, out)
    recovered = load_recovered(out / "recovered_orientations.npz")
    outcome = reconstruct_from_recovery(store_path, recovered, cfg)
    files: dict[str, str] = {}
    names = {
        "recovered": "reconstruction.mrc",
        "recovered (aligned)": "reconstruction_aligned.mrc",
        "true orientations": "reconstruction_true_orientations.mrc",
        "random orientations": "reconstruction_random_orientations.mrc",
    }
    for key, fname in names.items():
        if key in outcome.volumes:
            write_map(out / fname, DensityMap(outcome.volumes[key], outcome.pixel_size, name=key))
            files[key.split(" ")[0] + "_map"] = fname
    curves = {name: (res.frequency, res.fsc) for name, res in outcome.fsc.items()}
    plot_fsc(curves, out / "fsc.png", title=f"{outcome.metrics['projections']} projections")
    files["fsc"] = "fsc.png"
    shown = {k: v for k, v in outcome.volumes.items() if k != "recovered (aligned)" or "true map" in outcome.volumes}
    if "true map" in outcome.volumes:
        shown.pop("recovered", None)
    plot_volume_slices(shown, out / "volumes.png")
    files["slices"] = "volumes.png"
    fsc_json = {name: res.to_dict() for name, res in outcome.fsc.items()}
    atomic_write_text(out / "fsc.json", json.dumps(fsc_json, indent=2) + "\n")
    files["fsc_data"] = "fsc.json"
    if outcome.refined is not None:
        from cryoorient_ray.io.relion import export_relion
        from cryoorient_ray.io.store import ProjectionStore

        star, mrcs = export_relion(
            ProjectionStore.open(store_path), out, rows=outcome.rows, name="refined", quaternions=outcome.refined
        )
        files["refined_star"] = star.name
        files["refined_stack"] = mrcs.name
    if outcome.refine_history:
        plot_refinement(outcome.refine_history, out / "refinement.png")
        files["refinement"] = "refinement.png"
        atomic_write_text(out / "refinement.json", json.dumps(outcome.refine_history, indent=2) + "\n")
    return StageResult(
        name="reconstruct",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs=files,
        metrics={k: v for k, v in outcome.metrics.items() if v is not None},
    )


def run_reconstruct(
    cfg: RunConfig,
    store_path: str,
    orientations: str,
    out_dir: str | os.PathLike,
    argv: list[str] | None = None,
) -> tuple[Path, StageResult]:
    """`cryoorient reconstruct`: from a store and recovered orientations (.npz) or a .star of the whole store."""
    import shutil

    from cryoorient_ray.io.star import read_orientations_star
    from cryoorient_ray.io.store import ProjectionStore

    src = Path(orientations)
    if not src.is_file():
        raise CryoOrientError(f"orientations file not found: {src}")
    out = prepare_output_dir(cfg, out_dir, argv)
    target = out / "recovered_orientations.npz"
    if src.suffix == ".npz":
        if src.resolve() != target.resolve():
            shutil.copyfile(src, target)
    else:
        q = read_orientations_star(src)
        store = ProjectionStore.open(store_path)
        rows = store.done_rows()
        if len(rows) != len(q):
            raise CryoOrientError(f"{src} has {len(q)} orientations but {store_path} has {len(rows)} images")
        atomic_savez(target, rows=rows, quaternions=q, quaternions_true=np.full_like(q, np.nan))
    result = stage_reconstruct(cfg, out, store_path=store_path)
    write_summary(out, cfg, [result])
    return out, result


def write_summary(out: Path, cfg: RunConfig, results: list[StageResult], head: dict | None = None) -> Path:
    """``summary.json``: version, run name, the headline numbers and every stage's result."""
    summary = {
        "cryoorient_ray": __version__,
        "name": cfg.name,
        "headline": head or {},
        "stages": [asdict(r) for r in results],
    }
    return atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def run_orientations(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None
) -> tuple[Path, StageResult]:
    """`cryoorient orientations`: only the orientation-sampling stage."""
    out = prepare_output_dir(cfg, out_dir, argv)
    return out, stage_orientations(cfg, out)


def run_simulate(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None, progress: bool = True
) -> tuple[Path, StageResult]:
    """`cryoorient simulate`: the simulation stage alone."""
    check_ray_address(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    result = stage_simulate(cfg, out, progress=progress)
    write_summary(out, cfg, [result])
    return out, result


def run_train(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None, progress: bool = True
) -> tuple[Path, list[StageResult]]:
    """`cryoorient train`: simulate first when no store is given, then train."""
    check_ray_address(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    results = []
    if not cfg.train.stores:
        results.append(stage_simulate(cfg, out, progress=progress))
    results.append(stage_train(cfg, out, progress=progress))
    write_summary(out, cfg, results)
    return out, results


def run_tune(
    cfg: RunConfig | None,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> tuple[Path, dict, dict]:
    """`cryoorient tune`: search the distance's hyper-parameters with Ray Tune; ``(folder, search summary, report)``.

    A new search checks the search space (``cfg.tune.space``) before anything starts, simulates
    the store when ``train.stores`` is empty, stamps the config with the stores it searched on
    (so ``cryoorient tune report`` can write a config that trains on them) and keeps a copy of the
    space. With ``resume`` the experiment in ``out_dir`` goes on from its own config and space.
    Ends with the report (:func:`cryoorient_ray.distributed.tune_trials.write_tune_report`).
    """
    import shutil

    from cryoorient_ray.config import STAMPED_CONFIG_NAME, load_config
    from cryoorient_ray.distributed.runtime import ray_runtime
    from cryoorient_ray.distributed.tune_trials import (
        SPACE_NAME,
        check_space_fits_store,
        is_experiment,
        load_search_space,
        run_search,
        write_tune_report,
    )
    from cryoorient_ray.io.store import ProjectionStore

    if resume:
        if out_dir is None:
            raise CryoOrientError("--resume needs the experiment folder")
        out = Path(out_dir)
        if not (out / STAMPED_CONFIG_NAME).is_file() or not (out / SPACE_NAME).is_file():
            raise CryoOrientError(
                f"{out} is not a `cryoorient tune` experiment (no {STAMPED_CONFIG_NAME}/{SPACE_NAME})"
            )
        cfg = load_config(out / STAMPED_CONFIG_NAME)
        space = load_search_space(out / SPACE_NAME, cfg.train)
        with ray_runtime(cfg.ray):
            summary = run_search(cfg, list(cfg.train.stores), out, space, resume=True, verbose=1 if progress else 0)
        return out, summary, write_tune_report(out)

    assert cfg is not None
    space = load_search_space(cfg.tune.space, cfg.train)  # bad input stops here, before anything is written
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir)
    if is_experiment(out):
        raise CryoOrientError(f"{out} already holds a Tune experiment; resume it with --resume or use another -o")
    stores = list(cfg.train.stores)
    image_size = ProjectionStore.open(stores[0]).image_size if stores else cfg.simulate.image_size
    check_space_fits_store(space, cfg.train, image_size)
    out = prepare_output_dir(cfg, out, argv)
    if not stores:
        stage_simulate(cfg, out, progress=progress)
        stores = [store_path_for(cfg, out)]
    stores = [s if "://" in s else str(Path(s).resolve()) for s in stores]
    if cfg.tune.metric == "heldout_loss" and not any(
        p.get("heldout") for s in stores for p in ProjectionStore.open(s).proteins
    ):
        raise CryoOrientError("tune.metric heldout_loss needs a store with held-out proteins; these have none")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stores": stores})})
    write_stamped_config(cfg, out, argv)
    shutil.copyfile(cfg.tune.space, out / SPACE_NAME)
    with ray_runtime(cfg.ray):
        summary = run_search(cfg, stores, out, space, verbose=1 if progress else 0)
    return out, summary, write_tune_report(out)


STAGE_SECTIONS = {
    "simulate": ("seed", "simulate"),
    "train": ("seed", "simulate", "train"),
    "recover": ("seed", "simulate", "train", "recover"),
    "reconstruct": ("seed", "simulate", "train", "recover", "reconstruct"),
}


def stage_key(cfg: RunConfig, name: str) -> str:
    """Hash of the config sections a stage's result depends on (its own and every earlier one)."""
    import hashlib

    data = cfg.model_dump(mode="json")
    picked = {k: data.get(k) for k in STAGE_SECTIONS[name]}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _cached_stage(out: Path, name: str, key: str) -> StageResult | None:
    marker = out / ".stages" / f"{name}.json"
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    result = StageResult(**data["result"])
    for rel in result.outputs.values():
        if "://" not in rel and not (out / rel.rstrip("/")).exists():
            return None
    result.status = "cached"
    return result


def _mark_stage(out: Path, name: str, key: str, result: StageResult) -> None:
    (out / ".stages").mkdir(exist_ok=True)
    atomic_write_text(out / ".stages" / f"{name}.json", json.dumps({"key": key, "result": asdict(result)}) + "\n")


def headline(results: list[StageResult]) -> dict[str, str]:
    """The numbers a user looks at first, in words."""
    m: dict = {}
    for r in results:
        m.update({f"{r.name}.{k}": v for k, v in r.metrics.items()})
    lines = {}
    if "train.test_L_DE" in m:
        lines["learned distance L_DE (test)"] = (
            f"{m['train.test_L_DE']} rad² (Euclidean baseline {m.get('train.euclidean_test_L_DE')})"
        )
    if "recover.e_or_o4" in m:
        lines["orientation error E_OR (O(4), as the paper)"] = f"{m['recover.e_or_o4']} rad"
        lines["orientation error after rotation + hand only"] = (
            f"{m.get('recover.registration')} rad "
            f"(gauge {'physical' if m.get('recover.gauge_physical') else 'NOT physical'})"
        )
    if "reconstruct.recovered_fsc05_A" in m:
        lines["resolution FSC0.5 vs true map"] = (
            f"recovered {m['reconstruct.recovered_fsc05_A']} Å, true orientations "
            f"{m.get('reconstruct.true_fsc05_A')} Å, random {m.get('reconstruct.random_fsc05_A')} Å"
        )
    if "reconstruct.halfmap_fsc0143_A" in m:
        lines["half-map resolution (no ground truth)"] = (
            f"FSC0.143 {m['reconstruct.halfmap_fsc0143_A']} Å, FSC0.5 {m.get('reconstruct.halfmap_fsc05_A')} Å"
        )
    lines["wall time"] = f"{sum(r.seconds for r in results):.0f} s"
    return lines


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> tuple[Path, list[StageResult]]:
    """`cryoorient run`: every stage of :data:`PIPELINE_STAGES`, skipping those already done.

    A stage is skipped when ``<out>/.stages/<stage>.json`` records the same hash of the config
    sections it depends on and its outputs still exist (``force`` re-runs everything). Ends with
    ``summary.json`` and ``report.html``.
    """
    from cryoorient_ray.report import write_report

    check_ray_address(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    runners = {
        "simulate": stage_simulate,
        "train": stage_train,
        "recover": stage_recover,
        "reconstruct": stage_reconstruct,
    }
    results = []
    for name in PIPELINE_STAGES:
        if name not in runners:
            continue
        key = stage_key(cfg, name)
        cached = None if force else _cached_stage(out, name, key)
        if cached is not None:
            log.info("stage %s: already done (cached), skipping", name)
            results.append(cached)
            continue
        log.info("stage %s", name)
        result = runners[name](cfg, out, progress=progress)
        _mark_stage(out, name, key, result)
        results.append(result)
    summary = write_summary(out, cfg, results, headline(results))
    write_report(out, json.loads(summary.read_text()))
    return out, results
