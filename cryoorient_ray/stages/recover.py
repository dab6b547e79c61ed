"""Orientation recovery on a projection store: pair graph → L_OR on actors → physical gauge → errors.

What `cryoorient recover` runs (and the `recover` stage of `cryoorient run`):

1. pick the projections (one protein, one split, optionally a random subset);
2. the distance estimator gives features for the neighbour search and d̂ on the graph's edges:
   the trained model (embeddings computed once per image), the Euclidean baseline (flattened
   images) or — for experiments — the exact d_q, optionally perturbed by Gaussian noise;
3. the sparse pair graph (kNN + random edges); only its largest connected component is
   recovered when it falls apart (with a warning);
4. recovery (:mod:`cryoorient_ray.core.recovery.solver`, in-process or on Ray actors);
5. the physical gauge from the images (:mod:`cryoorient_ray.core.recovery.gauge`);
6. when the store knows the true orientations: E_OR (O(4), as the paper) and the registration
   error (global rotation + hand, as peers report), and whether the gauge found the physical
   solution.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoorient_ray.config import RecoverConfig, RunConfig
from cryoorient_ray.core.geometry.quaternion import quat_distance
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance
from cryoorient_ray.core.recovery.graph import PairGraph, build_pair_graph, knn_edges
from cryoorient_ray.core.recovery.solver import RecoveryResult, RecoverySettings, check_distances
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_savez, atomic_write_text
from cryoorient_ray.io.store import ProjectionStore
from cryoorient_ray.plots import (
    plot_orientations,
)
from cryoorient_ray.stages.base import (
    MODEL_NAME,
    StageResult,
    _ray_nodes_metric,
    run_standalone,
    store_path_for,
    training_mismatch,
)

log = logging.getLogger(__name__)

# Registration error may exceed E_OR (O(4)) by this much and still count as the physical solution.
GAUGE_TOLERANCE = 0.05


@dataclass
class Selection:
    """The projections one recovery works on."""

    rows: np.ndarray
    protein: int
    protein_name: str
    symmetry: str
    q_true: np.ndarray | None
    shifts: np.ndarray
    ctf: dict | None

    def subset(self, nodes: np.ndarray) -> Selection:
        """The projections ``nodes`` (indices into ``rows``) of this selection."""
        from cryoorient_ray.core.reconstruction.inversion import subset_ctf

        return Selection(
            rows=self.rows[nodes],
            protein=self.protein,
            protein_name=self.protein_name,
            symmetry=self.symmetry,
            q_true=None if self.q_true is None else self.q_true[nodes],
            shifts=self.shifts[nodes],
            ctf=subset_ctf(self.ctf, nodes),
        )


@dataclass
class Estimator:
    """Features for the neighbour search and d̂ for any edge list."""

    name: str
    features: np.ndarray | torch.Tensor
    metric: str
    distance: callable
    info: dict = field(default_factory=dict)


def select_projections(store: ProjectionStore, cfg: RecoverConfig, seed: int = 0) -> Selection:
    """Rows of one protein in ``cfg.split`` (a random subset of ``cfg.max_projections``)."""
    proteins = store.proteins
    if not proteins:
        raise CryoOrientError(f"{store.path} lists no proteins")
    pid = 0 if cfg.protein is None else store.protein_index(cfg.protein)
    rows = store.select_rows(split=cfg.split, protein=pid)
    if cfg.max_projections is not None and len(rows) > cfg.max_projections:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cfg.max_projections, replace=False))
    if len(rows) < 3:
        raise CryoOrientError(
            f"{store.path}: protein {proteins[pid]['name']!r} has {len(rows)} completed projections in split "
            f"'{cfg.split}'; recovery needs at least 3"
        )
    meta = store.read_metadata(rows)
    has_truth = bool(store.manifest.get("has_orientations", True)) and np.isfinite(meta["quaternion"]).all()
    ctf = store.ctf_parameters(meta)
    return Selection(
        rows=rows,
        protein=pid,
        protein_name=proteins[pid]["name"],
        symmetry=proteins[pid].get("symmetry", "C1") or "C1",
        q_true=meta["quaternion"].astype(np.float64) if has_truth else None,
        shifts=meta["shift"].astype(np.float64),
        ctf=ctf,
    )


def make_estimator(
    store: ProjectionStore, sel: Selection, cfg: RecoverConfig, model_path: str | None, seed: int = 0
) -> Estimator:
    """The distance estimator named by ``cfg.estimator``."""
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.stages.evaluate import embed_rows, fit_euclidean

    if cfg.estimator == "exact":
        if sel.q_true is None:
            raise CryoOrientError(f"{store.path} has no true orientations: --exact/--perturb need them")
        q = sel.q_true
        sigma = math.sqrt(cfg.perturb_sigma2)

        def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            d = np.asarray(symmetric_quat_distance(q[i], q[j], sel.symmetry), dtype=np.float64)
            if sigma > 0:
                # Deterministic per edge: the noise of (i, j) does not depend on which edges are asked.
                rng = np.random.default_rng([seed, 7919])
                noise_table = rng.normal(0.0, sigma, size=len(q) * 64)
                key = (np.minimum(i, j) * 2654435761 + np.maximum(i, j) * 40503) % len(noise_table)
                d = d + noise_table[key]
            return np.clip(d, 0.0, math.pi)

        return Estimator("exact", q, "quaternion", exact, {"perturb_sigma2": cfg.perturb_sigma2})
    if cfg.estimator == "euclidean":
        if not store.manifest.get("has_orientations", True):
            raise CryoOrientError("the Euclidean baseline is scaled on true distances, which this store does not have")
        model = fit_euclidean(store, n_pairs=2000, seed=seed + 1)
        images = store.read_images(sel.rows).reshape(len(sel.rows), -1).astype(np.float32)
        feats = torch.from_numpy(images)

        def euclid(i, j):
            with torch.no_grad():
                return model.distance(feats[i], feats[j]).double().numpy()

        return Estimator("euclidean", feats, "euclidean", euclid, {"scale": float(model.scale)})
    if model_path is None:
        raise CryoOrientError("no trained model: give --model, or --euclidean / --exact")
    model, meta = load_distance_model(model_path)
    mismatch = training_mismatch(meta.get("training") or {}, store)
    if mismatch:
        log.warning("%s: %s", model_path, mismatch)
    if store.image_size < model.spec.min_image_size:
        raise CryoOrientError(
            f"{store.path} has {store.image_size}² images; {model_path} needs at least {model.spec.min_image_size}²"
        )
    if cfg.actors > 0:  # Ray is running: stream the images through Ray Data workers
        from cryoorient_ray.distributed.recover_actors import embed_with_ray_data

        emb = torch.as_tensor(
            embed_with_ray_data(str(store.path), cfg.split, str(model_path), sel.rows, concurrency=cfg.actors)
        )
    else:
        emb = embed_rows(model, store, sel.rows)

    def learned(i, j):
        with torch.no_grad():
            return model.distance(emb[i], emb[j]).double().numpy()

    return Estimator("model", emb, "angle", learned, {"model": str(model_path), "n_features": model.spec.n_features})


def _restrict(graph: PairGraph, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges of ``graph`` inside the node subset ``keep`` (bool mask), renumbered."""
    new = np.full(graph.n_nodes, -1, np.int64)
    new[keep] = np.arange(int(keep.sum()))
    inside = keep[graph.i] & keep[graph.j]
    return new[graph.i[inside]], new[graph.j[inside]]


def gauge_inputs(store: ProjectionStore, sel: Selection, size: int):
    """Centred, Fourier-cropped images of ``sel``, their CTF and the cropped pixel size."""
    from cryoorient_ray.core.imaging.projection import shift_images
    from cryoorient_ray.core.recovery.gauge import fourier_crop

    imgs = torch.as_tensor(store.read_images(sel.rows), dtype=torch.float32)
    if np.abs(sel.shifts).max(initial=0.0) > 0:
        imgs = shift_images(imgs, torch.as_tensor(-sel.shifts, dtype=torch.float32))
    small = fourier_crop(imgs, size)
    pixel = store.pixel_size * imgs.shape[-1] / small.shape[-1]
    return small, sel.ctf, pixel


def run_gauge(store: ProjectionStore, sel: Selection, q_est: np.ndarray, cfg: RecoverConfig, seed: int):
    """Resolve the gauge on a random subset of the recovered projections; returns the GaugeResult."""
    from cryoorient_ray.core.recovery.gauge import crossval_score_fn, resolve_gauge

    rng = np.random.default_rng(seed + 11)
    p = len(q_est)
    nodes = np.sort(rng.choice(p, min(p, cfg.gauge.max_images), replace=False))
    # Neighbours by the recovered orientations: d_q(q̂_i, q̂_j) does not depend on the gauge, and
    # it is what the recovery settled on (it averages the estimator's errors over the graph).
    q_sub = q_est[nodes]
    i, j = knn_edges(q_sub, 8, "quaternion")
    d = np.asarray(quat_distance(q_sub[i], q_sub[j]))
    imgs, ctf, pixel = gauge_inputs(store, sel.subset(nodes), cfg.gauge.image_size)
    score = crossval_score_fn(imgs, ctf=ctf, pixel_size=pixel, seed=seed)
    res = resolve_gauge(
        q_sub,
        imgs,
        (i, j, d),
        score_fn=score,
        phi_steps=cfg.gauge.phi_steps,
        polish_rounds=cfg.gauge.polish_rounds,
        seed=seed,
    )
    return res


@dataclass
class RecoveryOutcome:
    """Everything a recovery produced (the pipeline writes the files)."""

    selection: Selection
    estimator: str
    graph: PairGraph
    nodes: np.ndarray  # indices into selection.rows that were recovered (the largest component)
    result: RecoveryResult
    q_raw: np.ndarray
    q_final: np.ndarray
    gauge: object | None
    metrics: dict
    errors: dict = field(default_factory=dict)  # "o4", "registration": AlignResult (truth known)


def recover_store(
    store_path: str,
    cfg: RecoverConfig,
    model_path: str | None = None,
    seed: int = 0,
    progress=None,
    status=None,
) -> RecoveryOutcome:
    """Run the whole recovery on ``store_path``. Ray must be running when ``cfg.actors > 0``."""
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation, error_report
    from cryoorient_ray.distributed.recover_actors import recover_on_actors

    def say(msg: str) -> None:
        if status is not None:
            status(msg)

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    store = ProjectionStore.open(store_path)
    sel = select_projections(store, cfg, seed)
    say(f"{len(sel.rows)} projections of {sel.protein_name}: distances ({cfg.estimator})")
    est = make_estimator(store, sel, cfg, model_path, seed)
    timings["estimator_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    say("pair graph")
    graph = build_pair_graph(est.features, k=cfg.k, n_random=cfg.n_random, metric=est.metric, seed=seed)
    nodes = np.arange(graph.n_nodes)
    gi, gj = graph.i, graph.j
    if graph.n_components > 1:
        keep = graph.component == 0
        log.warning(
            "the pair graph has %d connected components; recovering the largest (%d of %d projections) — "
            "raise recover.n_random to connect them",
            graph.n_components,
            int(keep.sum()),
            graph.n_nodes,
        )
        nodes = np.flatnonzero(keep)
        gi, gj = _restrict(graph, keep)
        if len(nodes) < 3:
            raise CryoOrientError("the pair graph's largest connected component has fewer than 3 projections")
    d_hat = check_distances(est.distance(nodes[gi], nodes[gj]))
    timings["graph_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    settings = RecoverySettings(
        init=cfg.init,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        restarts=cfg.restarts,
        tol=cfg.tol,
        seed=seed,
        device=("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device,
    )
    say(f"recovery: {len(nodes)} projections, {len(gi)} edges, {cfg.actors or 'no'} actors")
    result = recover_on_actors(
        len(nodes),
        gi,
        gj,
        d_hat,
        n_actors=cfg.actors,
        settings=settings,
        cpus_per_actor=cfg.cpus_per_actor,
        progress=progress,
    )
    timings["recovery_s"] = time.perf_counter() - t2
    q_raw = result.quaternions
    sub = sel.subset(nodes)  # the recovered projections

    gauge = None
    q_final = q_raw
    if cfg.gauge.enabled:
        t3 = time.perf_counter()
        say("gauge: in-plane fit and cross-validated reconstructions")
        gauge = run_gauge(store, sub, q_raw, cfg, seed)
        q_final = gauge.apply(q_raw)
        timings["gauge_s"] = time.perf_counter() - t3

    metrics: dict = {
        "protein": sel.protein_name,
        "symmetry": sel.symmetry,
        "estimator": est.name,
        "projections": int(len(sel.rows)),
        "recovered": int(len(nodes)),
        "edges": int(len(gi)),
        "components": int(graph.n_components),
        "L_OR": float(result.final_loss),
        "steps": int(result.steps),
        "converged": bool(result.converged),
        "restart_L_OR": [float(x) for x in result.restart_losses],
        "actors": int(cfg.actors),
        **{k: round(v, 3) for k, v in timings.items()},
        **est.info,
    }
    if gauge is not None:
        metrics["gauge"] = gauge.to_dict()
    if sel.q_true is not None:
        t4 = time.perf_counter()
        qt = sub.q_true
        o4 = align_o4(qt, q_final, symmetry=sel.symmetry, seed=seed)
        reg = align_rotation(qt, q_final, symmetry=sel.symmetry, allow_mirror=True, seed=seed)
        errors = {"o4": o4, "registration": reg}
        metrics.update(error_report(o4, reg))
        if gauge is not None:
            metrics["gauge_physical"] = bool(metrics["registration"] <= metrics["e_or_o4"] + GAUGE_TOLERANCE)
        metrics["align_s"] = round(time.perf_counter() - t4, 3)
    else:
        errors = {}
    metrics["total_s"] = round(time.perf_counter() - t0, 3)
    return RecoveryOutcome(sel, est.name, graph, nodes, result, q_raw, q_final, gauge, metrics, errors)


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
    return StageResult.done(
        "recover",
        t0,
        outputs=files,
        metrics=metrics,
    )


def check_recover_inputs(cfg: RunConfig, store_path: str, model_path: str | os.PathLike | None) -> None:
    """Before anything is written: the store opens intact and the model file (if one is needed) exists."""
    ProjectionStore.open(store_path)
    model = model_path or (cfg.recover.model if cfg.recover.estimator == "model" else None)
    if model is not None and not Path(model).is_file():
        raise CryoOrientError(f"model file not found: {model} (train first, or set recover.model)")


def run_recover(
    cfg: RunConfig,
    store_path: str,
    model_path: str | None = None,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
) -> tuple[Path, StageResult]:
    """`cryoorient recover`: the recovery stage alone, on a given store."""
    stage = lambda o: stage_recover(cfg, o, progress=progress, store_path=store_path, model_path=model_path)  # noqa: E731
    check = lambda o: check_recover_inputs(cfg, store_path, model_path)  # noqa: E731
    out, results = run_standalone(cfg, out_dir, argv, [stage], needs_ray=cfg.recover.actors > 0, checks=[check])
    return out, results[0]


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
