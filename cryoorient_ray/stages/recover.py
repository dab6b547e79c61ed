"""The ``recover`` stage: orientations of one protein's projections from their estimated distances.

What `cryoorient recover` runs (and the `recover` stage of `cryoorient run`), in the order of
this module:

1. **selection** (:func:`select_projections`): one protein, one split, optionally a random subset;
2. **estimator** (:func:`make_estimator`): features for the neighbour search and d̂ for any edge —
   the trained model (embeddings computed once per image), the Euclidean baseline (flattened
   images) or, for experiments, the exact d_q, optionally perturbed by Gaussian noise;
3. **graph** (:func:`pair_graph`, :func:`recovery_edges`): the sparse pair graph (kNN + random
   edges; optionally mutual kNN and more random edges where the kNN are not mutual) and d̂ on its
   edges, with confidence weights ``1/σ²(d̂)`` from the model's calibration when
   ``recover.weights: confidence``; only its largest connected component is recovered when it
   falls apart (with a warning); with the truth known, the graph's neighbour quality
   (:func:`~cryoorient_ray.core.recovery.graph.neighbour_quality`: what predicts recovery);
4. **solve** (:func:`solve`): L_OR minimised by :mod:`cryoorient_ray.core.recovery.solver`, in
   process or with the edges on Ray actors (:mod:`cryoorient_ray.distributed.recover_actors`);
   for a protein with a point group, the symmetric L_OR from the anchor start
   (:mod:`cryoorient_ray.core.recovery.symmetric`, :func:`solve_symmetric`);
5. **gauge** (:func:`run_gauge`): the physical solution among the distance-equivalent ones, from
   the images (:mod:`cryoorient_ray.core.recovery.gauge`);
6. **errors** (:func:`measure_errors`, when the store knows the true orientations): E_OR (O(4),
   as the paper) and the registration error (global rotation + hand, as peers report), and
   whether the gauge found the physical solution;
7. **outputs** (:func:`write_recovery_outputs`): RELION .star + .mrcs, the orientations as .npz,
   the L_OR curve, the viewing directions, the error histogram and ``recovered.json``.

:func:`recover_store` runs steps 1–6 and returns a :class:`RecoveryOutcome`; :func:`stage_recover`
adds Ray, the progress bar and step 7; :func:`run_recover` and :func:`run_align` are the
`cryoorient recover` and `cryoorient align` commands.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoorient_ray.config import RecoverConfig, RunConfig
from cryoorient_ray.core.geometry.quaternion import quat_distance
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance
from cryoorient_ray.core.recovery.graph import PairGraph, build_pair_graph, knn_edges, neighbour_quality
from cryoorient_ray.core.recovery.solver import RecoveryResult, check_distances
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

DistanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent inside to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """The projections one recovery works on.

    Attributes:
        rows: ``(P,)`` store rows.
        protein, protein_name, symmetry: the protein's index in the store, its name and point group.
        q_true: ``(P, 4)`` float64 true quaternions (wxyz), or ``None`` when the store has none.

    The images, shifts and CTF of the rows come from ``store.particles(rows)`` where needed (the gauge).
    """

    rows: np.ndarray
    protein: int
    protein_name: str
    symmetry: str
    q_true: np.ndarray | None

    def subset(self, nodes: np.ndarray) -> Selection:
        """The projections ``nodes`` (indices into ``rows``) of this selection."""
        return Selection(
            rows=self.rows[nodes],
            protein=self.protein,
            protein_name=self.protein_name,
            symmetry=self.symmetry,
            q_true=None if self.q_true is None else self.q_true[nodes],
        )


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
    meta = store.read_metadata(rows, names=["quaternion"])
    has_truth = bool(store.manifest.get("has_orientations", True)) and np.isfinite(meta["quaternion"]).all()
    return Selection(
        rows=rows,
        protein=pid,
        protein_name=proteins[pid]["name"],
        symmetry=proteins[pid].get("symmetry", "C1") or "C1",
        q_true=meta["quaternion"].astype(np.float64) if has_truth else None,
    )


# ----------------------------------------------------------------------------------------------- estimator


@dataclass
class Estimator:
    """Features for the neighbour search and d̂ for any edge list.

    Attributes:
        name: ``"model"``, ``"euclidean"`` or ``"exact"``.
        features: ``(P, n)`` features of the selection's projections, searched with ``metric``
            (:func:`~cryoorient_ray.core.recovery.graph.knn_edges`).
        metric: ``"angle"``, ``"euclidean"`` or ``"quaternion"``.
        distance: ``distance(i (E,), j (E,)) -> d̂ (E,)`` float64 in radians, for indices into the selection.
        info: what the metrics report about the estimator.
        calibration: σ(d̂) of the trained model (:class:`~cryoorient_ray.core.learning.calibration.DistanceCalibration`),
            when its file has one.
    """

    name: str
    features: np.ndarray | torch.Tensor
    metric: str
    distance: DistanceFn
    info: dict = field(default_factory=dict)
    calibration: object | None = None


def _exact_estimator(store: ProjectionStore, sel: Selection, sigma2: float, seed: int) -> Estimator:
    """The true d_G (symmetry-aware), plus Gaussian noise of variance ``sigma2`` that is fixed per edge."""
    if sel.q_true is None:
        raise CryoOrientError(f"{store.path} has no true orientations: --exact/--perturb need them")
    q = sel.q_true
    sigma = math.sqrt(sigma2)

    def exact(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        d = np.asarray(symmetric_quat_distance(q[i], q[j], sel.symmetry), dtype=np.float64)
        if sigma > 0:
            # Deterministic per edge: the noise of (i, j) does not depend on which edges are asked.
            rng = np.random.default_rng([seed, 7919])
            noise_table = rng.normal(0.0, sigma, size=len(q) * 64)
            key = (np.minimum(i, j) * 2654435761 + np.maximum(i, j) * 40503) % len(noise_table)
            d = d + noise_table[key]
        return np.clip(d, 0.0, math.pi)

    return Estimator("exact", q, "quaternion", exact, {"perturb_sigma2": sigma2})


def _euclidean_estimator(store: ProjectionStore, sel: Selection, seed: int) -> Estimator:
    """The baseline: distances of flattened images, scaled on the store's true distances."""
    from cryoorient_ray.stages.evaluate import fit_euclidean

    if not store.manifest.get("has_orientations", True):
        raise CryoOrientError("the Euclidean baseline is scaled on true distances, which this store does not have")
    model = fit_euclidean(store, n_pairs=2000, seed=seed + 1)
    images = store.read_images(sel.rows).reshape(len(sel.rows), -1).astype(np.float32)
    feats = torch.from_numpy(images)

    def euclid(i, j):
        with torch.no_grad():
            return model.distance(feats[i], feats[j]).double().numpy()

    return Estimator("euclidean", feats, "euclidean", euclid, {"scale": float(model.scale)})


def _model_estimator(store: ProjectionStore, sel: Selection, cfg: RecoverConfig, model_path: str | None) -> Estimator:
    """The trained distance: embeddings once per image (on Ray Data workers when ``cfg.actors > 0``)."""
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.stages.evaluate import embed_rows

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

    calibration = None
    if meta.get("calibration"):
        from cryoorient_ray.core.learning.calibration import DistanceCalibration

        calibration = DistanceCalibration.from_dict(meta["calibration"])
    info = {"model": str(model_path), "n_features": model.spec.n_features}
    return Estimator("model", emb, "angle", learned, info, calibration)


def make_estimator(
    store: ProjectionStore, sel: Selection, cfg: RecoverConfig, model_path: str | None, seed: int = 0
) -> Estimator:
    """The distance estimator named by ``cfg.estimator``."""
    if cfg.estimator == "exact":
        return _exact_estimator(store, sel, cfg.perturb_sigma2, seed)
    if cfg.estimator == "euclidean":
        return _euclidean_estimator(store, sel, seed)
    return _model_estimator(store, sel, cfg, model_path)


# ----------------------------------------------------------------------------------------------- graph


@dataclass(frozen=True)
class RecoveryEdges:
    """The edges recovery runs on: the pair graph's largest component, renumbered, with their d̂.

    Attributes:
        nodes: ``(P',)`` indices into the selection of the projections recovered.
        i, j: ``(E,)`` int64 edges between them, as indices into ``nodes``.
        d: ``(E,)`` float32 estimated distances d̂_ij in radians, in ``[0, π]``.
        w: ``(E,)`` float32 edge weights (mean 1), or ``None`` (all 1).
    """

    nodes: np.ndarray
    i: np.ndarray
    j: np.ndarray
    d: np.ndarray
    w: np.ndarray | None = None


def pair_graph(est: Estimator, cfg: RecoverConfig, seed: int) -> PairGraph:
    """kNN (``cfg.k``, in the estimator's feature space, mutual ones only with ``cfg.mutual_knn``)
    plus ``cfg.n_random`` random edges per projection (and up to ``cfg.n_random_unreliable`` more
    where its kNN are not mutual)."""
    return build_pair_graph(
        est.features,
        k=cfg.k,
        n_random=cfg.n_random,
        metric=est.metric,
        seed=seed,
        mutual=cfg.mutual_knn,
        n_random_unreliable=cfg.n_random_unreliable,
    )


def edge_weights(est: Estimator, d: np.ndarray, mode: str) -> np.ndarray | None:
    """Edge weights of ``recover.weights``: ``None`` for ``"none"``, the calibration's
    ``1/σ²(d̂)`` (mean 1) for ``"confidence"``."""
    if mode == "none":
        return None
    if est.calibration is None:
        raise CryoOrientError(
            f"recover.weights: confidence needs a calibrated model; the {est.name} distance has no calibration "
            "(train with this version, or set recover.weights: none)"
        )
    return np.asarray(est.calibration.weights(np.asarray(d, dtype=np.float64)), dtype=np.float32)


def recovery_edges(graph: PairGraph, est: Estimator, weights: str = "none") -> RecoveryEdges:
    """The largest connected component of ``graph`` (all of it when connected), d̂ on its edges
    and their weights (:func:`edge_weights`)."""
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
    d = check_distances(est.distance(nodes[gi], nodes[gj]))
    return RecoveryEdges(nodes, gi, gj, d, edge_weights(est, d, weights))


def _restrict(graph: PairGraph, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges of ``graph`` inside the node subset ``keep`` (bool mask), renumbered."""
    new = np.full(graph.n_nodes, -1, np.int64)
    new[keep] = np.arange(int(keep.sum()))
    inside = keep[graph.i] & keep[graph.j]
    return new[graph.i[inside]], new[graph.j[inside]]


# ----------------------------------------------------------------------------------------------- solve


def solve(
    edges: RecoveryEdges,
    cfg: RecoverConfig,
    seed: int,
    progress=None,
    symmetry: str = "C1",
    distance: DistanceFn | None = None,
) -> RecoveryResult:
    """L_OR on ``edges`` with the optimiser of ``cfg``, on ``cfg.actors`` Ray actors (0: in process).

    Ray must be running when ``cfg.actors > 0``. With a point group other than C1 the recovery
    runs on SO(3)/G (:func:`solve_symmetric`, in process): it needs ``distance``, the estimator's
    d̂ for indices into the selection, for the anchor edges.
    """
    from cryoorient_ray.distributed.recover_actors import recover_on_actors

    if symmetry != "C1":
        if distance is None:
            raise CryoOrientError(f"recovery with point group {symmetry} needs the estimator's distance")
        return solve_symmetric(edges, cfg, seed, symmetry, distance, progress)

    return recover_on_actors(
        len(edges.nodes),
        edges.i,
        edges.j,
        edges.d,
        n_actors=cfg.actors,
        settings=cfg.settings(seed),
        cpus_per_actor=cfg.cpus_per_actor,
        progress=progress,
        weights=edges.w,
    )


def solve_symmetric(
    edges: RecoveryEdges, cfg: RecoverConfig, seed: int, symmetry: str, distance: DistanceFn, progress=None
) -> RecoveryResult:
    """Recovery on SO(3)/G (:func:`~cryoorient_ray.core.recovery.symmetric.recover_symmetric`): the
    anchor start from d̂ to a few anchor projections, then the symmetric L_OR on the graph plus the
    anchor edges. In process (``cfg.actors`` is not used: the symmetric loss has no actor partition yet)."""
    from cryoorient_ray.core.recovery.symmetric import recover_symmetric

    if cfg.actors:
        log.warning("recovery with point group %s runs in process; recover.actors=%d is not used", symmetry, cfg.actors)
    nodes = edges.nodes
    result, start = recover_symmetric(
        len(nodes),
        edges.i,
        edges.j,
        edges.d,
        lambda a, b: distance(nodes[a], nodes[b]),
        symmetry,
        settings=cfg.settings(seed),
        progress=progress,
        spectral={"auto": "auto", "anchors": "off", "spectral": "only"}[cfg.symmetric_start],
    )
    log.info(
        "point group %s: the L_OR phase ran from the %s start (graph residual: anchors %.4g, spectral %.4g rad²)",
        symmetry,
        start.kind,
        start.graph_residual,
        start.spectral_graph_residual,
    )
    result.start = start.kind
    return result


# ----------------------------------------------------------------------------------------------- gauge


def gauge_inputs(store: ProjectionStore, sel: Selection, size: int):
    """The particles of ``sel``, centred and Fourier-cropped to ``size`` (a ParticleStack)."""
    return store.particles(sel.rows).centred().fourier_crop(size)


def run_gauge(store: ProjectionStore, sel: Selection, q_est: np.ndarray, cfg: RecoverConfig, seed: int):
    """Resolve the gauge on a random subset of the recovered projections; returns the GaugeResult.

    It runs on ``cfg.gauge.threads`` torch threads (restored after): its many small reconstructions
    gain little from more, and threads waiting on each other under load cost it 10× (measured).
    """
    rng = np.random.default_rng(seed + 11)
    p = len(q_est)
    nodes = np.sort(rng.choice(p, min(p, cfg.gauge.max_images), replace=False))
    # Neighbours by the recovered orientations: d_q(q̂_i, q̂_j) does not depend on the gauge, and
    # it is what the recovery settled on (it averages the estimator's errors over the graph).
    q_sub = q_est[nodes]
    i, j = knn_edges(q_sub, 8, "quaternion")
    d = np.asarray(quat_distance(q_sub[i], q_sub[j]))
    gc = cfg.gauge
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, gc.threads))
    try:
        return _resolve_on_subset(store, sel.subset(nodes), q_sub, (i, j, d), gc, seed)
    finally:
        torch.set_num_threads(threads)


def _resolve_on_subset(store, sel: Selection, q_sub: np.ndarray, pairs, gc, seed: int):
    """The gauge of ``q_sub`` from the images of ``sel`` (read, centred and cropped here)."""
    from cryoorient_ray.core.recovery.gauge import crossval_score_fn, resolve_gauge

    stack = gauge_inputs(store, sel, gc.image_size)
    # Cost proportional to the decision: the coarse in-plane grid on few, small images; the
    # refinement and polish on more (crossval_score_fn subsets and Fourier-crops once, up front).
    search = crossval_score_fn(stack, seed=seed, image_size=gc.search_size, max_images=gc.search_images)
    score = crossval_score_fn(stack, seed=seed, image_size=gc.polish_size, max_images=gc.polish_images)
    return resolve_gauge(
        stack,
        q_sub,
        pairs,
        score_fn=score,
        phi_steps=gc.phi_steps,
        polish_rounds=gc.polish_rounds,
        seed=seed,
        search_score_fn=search,
        phi_margin=gc.phi_margin,
    )


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


# ----------------------------------------------------------------------------------------------- errors


def measure_errors(
    q_true: np.ndarray, q_final: np.ndarray, symmetry: str, seed: int, gauge_ran: bool
) -> tuple[dict, dict]:
    """E_OR (O(4)) and the registration error (rotation + hand) of ``q_final (P, 4)`` against the truth.

    Returns ``({"o4": AlignResult, "registration": RegistrationResult}, metrics)``; the metrics say
    whether the gauge found the physical solution (``gauge_ran``: it did run).
    """
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation, error_report

    t0 = time.perf_counter()
    o4 = align_o4(q_true, q_final, symmetry=symmetry, seed=seed)
    reg = align_rotation(q_true, q_final, symmetry=symmetry, allow_mirror=True, seed=seed)
    metrics = error_report(o4, reg)
    if gauge_ran:
        metrics["gauge_physical"] = bool(metrics["registration"] <= metrics["e_or_o4"] + GAUGE_TOLERANCE)
    metrics["align_s"] = round(time.perf_counter() - t0, 3)
    return {"o4": o4, "registration": reg}, metrics


def _recovery_metrics(
    sel: Selection, est: Estimator, graph: PairGraph, edges: RecoveryEdges, result: RecoveryResult, actors: int
) -> dict:
    """What one recovery reports before its timings and errors."""
    return {
        "protein": sel.protein_name,
        "symmetry": sel.symmetry,
        "estimator": est.name,
        "projections": int(len(sel.rows)),
        "recovered": int(len(edges.nodes)),
        "edges": int(len(edges.i)),
        "components": int(graph.n_components),
        "L_OR": float(result.final_loss),
        "steps": int(result.steps),
        "converged": bool(result.converged),
        "restart_L_OR": [float(x) for x in result.restart_losses],
        "start": result.start,
        "actors": int(actors),
    }


# ----------------------------------------------------------------------------------------------- recovery


def recover_store(
    store_path: str,
    cfg: RecoverConfig,
    model_path: str | None = None,
    seed: int = 0,
    progress=None,
    status=None,
) -> RecoveryOutcome:
    """Steps 1–6 of the module docstring on ``store_path``. Ray must be running when ``cfg.actors > 0``.

    ``progress(phase, step, total, L_OR)`` follows the optimiser, ``status(text)`` the steps.
    """
    say = status or (lambda text: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "estimator_s"):
        store = ProjectionStore.open(store_path)
        sel = select_projections(store, cfg, seed)
        say(f"{len(sel.rows)} projections of {sel.protein_name}: distances ({cfg.estimator})")
        est = make_estimator(store, sel, cfg, model_path, seed)
    with _timed(timings, "graph_s"):
        say("pair graph")
        graph = pair_graph(est, cfg, seed)
        edges = recovery_edges(graph, est, cfg.weights)
    with _timed(timings, "recovery_s"):
        say(f"recovery: {len(edges.nodes)} projections, {len(edges.i)} edges, {cfg.actors or 'no'} actors")
        result = solve(edges, cfg, seed, progress, symmetry=sel.symmetry, distance=est.distance)
    q_raw = result.quaternions
    sub = sel.subset(edges.nodes)  # the recovered projections
    gauge, q_final = None, q_raw
    if cfg.gauge.enabled:
        with _timed(timings, "gauge_s"):
            say("gauge: in-plane fit and cross-validated reconstructions")
            gauge = run_gauge(store, sub, q_raw, cfg, seed)
            q_final = gauge.apply(q_raw)
    metrics = _recovery_metrics(sel, est, graph, edges, result, cfg.actors)
    metrics.update({k: round(v, 3) for k, v in timings.items()}, **est.info)
    metrics["graph"] = {
        "k": cfg.k,
        "n_random": cfg.n_random,
        "mutual_knn": cfg.mutual_knn,
        "n_random_unreliable": cfg.n_random_unreliable,
        "weights": cfg.weights,
        "loss": cfg.loss,
        "loss_scale": cfg.loss_scale,
    }
    if sel.q_true is not None and cfg.k > 0:
        t_nq = time.perf_counter()
        nq = neighbour_quality(est.features, sel.q_true, k=cfg.k, metric=est.metric, symmetry=sel.symmetry)
        # the graph's own edges (kNN part filtered or not, random ones included): how many are near
        d_graph = np.asarray(symmetric_quat_distance(sel.q_true[graph.i], sel.q_true[graph.j], sel.symmetry))
        near = d_graph < nq["near_threshold"]
        nq["graph_near_fraction"] = float(near.mean()) if len(near) else 0.0
        nq["graph_near_per_node"] = float(2 * near.sum() / graph.n_nodes)
        nq["seconds"] = time.perf_counter() - t_nq
        metrics["neighbour_quality"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in nq.items()}
    if gauge is not None:
        metrics["gauge"] = gauge.to_dict()
    errors = {}
    if sub.q_true is not None:
        errors, error_metrics = measure_errors(sub.q_true, q_final, sel.symmetry, seed, gauge is not None)
        metrics.update(error_metrics)
    metrics["total_s"] = round(time.perf_counter() - t0, 3)
    return RecoveryOutcome(sel, est.name, graph, edges.nodes, result, q_raw, q_final, gauge, metrics, errors)


# ----------------------------------------------------------------------------------------------- outputs


def _recovery_progress(show: bool):
    """A rich progress bar driven by ``progress(phase, step, total, L_OR)``: ``(bar, progress, status)``."""
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


def _plot_errors(outcome: RecoveryOutcome, path: Path) -> None:
    """Histogram of the per-image errors after both alignments."""
    from cryoorient_ray.plots import plot_error_histogram

    m = outcome.metrics
    plot_error_histogram(
        {
            "after O(4) alignment (E_OR)": outcome.errors["o4"].errors,
            "after rotation + hand (physical)": outcome.errors["registration"].errors,
        },
        path,
        title=f"{m['protein']}: E_OR {m['e_or_o4']:.3f} rad, registration {m['registration']:.3f} rad",
    )


def write_recovery_outputs(
    outcome: RecoveryOutcome, store_path: str, out: Path, prefix: str = "recovered"
) -> dict[str, str]:
    """.star + .mrcs (RELION), .npz, L_OR curve, directions and (truth known) error histogram."""
    from cryoorient_ray.io.relion import export_relion
    from cryoorient_ray.plots import plot_recovery_loss

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
        files["errors"] = f"{prefix}_errors.png"
        _plot_errors(outcome, out / files["errors"])
    plot_orientations(q_plot, out / files["directions"], title=f"recovered orientations ({m['protein']})")
    atomic_write_text(out / f"{prefix}.json", json.dumps(m, indent=2) + "\n")
    files["report"] = f"{prefix}.json"
    return files


# ----------------------------------------------------------------------------------------------- stage


def _model_file(
    rcfg: RecoverConfig, out: Path, model_path: str | os.PathLike | None, image_size: int | None = None
) -> str | None:
    """The model file recovery reads (absolute: Ray Data workers do not share the driver's folder).

    ``model_path``, else ``recover.model`` (a file, or ``pretrained[:NAME]``: a shipped model),
    else the run's ``model.pt``, else (no model trained in this run) the shipped general distance
    when the store's images (``image_size``) have its box.
    """
    from cryoorient_ray.pretrained import PRETRAINED_IMAGE_SIZE

    if model_path is None and rcfg.estimator == "model":
        model_path = rcfg.model
        if model_path is None:
            model_path = str(out / MODEL_NAME)
            if not Path(model_path).is_file() and image_size == PRETRAINED_IMAGE_SIZE:
                model_path = "pretrained"
                log.info("no model trained in this run: recovering with the shipped general distance")
    hint = f"train first, set recover.model, or --model pretrained for {PRETRAINED_IMAGE_SIZE}² images"
    model_path = existing_model_file(model_path, hint)
    return None if model_path is None else os.path.abspath(model_path)


def existing_model_file(model: str | os.PathLike | None, hint: str) -> str | None:
    """``model`` with ``pretrained[:NAME]`` resolved to the shipped file (None stays None).

    Raises:
        CryoOrientError: ``model file not found: PATH (hint)``, or an unknown pretrained name.
    """
    from cryoorient_ray.pretrained import resolve_model_path

    path = resolve_model_path(None if model is None else str(model))
    if path is not None and not Path(path).is_file():
        raise CryoOrientError(f"model file not found: {path} ({hint})")
    return path


def stage_recover(
    cfg: RunConfig,
    out: Path,
    progress: bool = True,
    store_path: str | None = None,
    model_path: str | os.PathLike | None = None,
) -> StageResult:
    """Recover orientations of one protein's projections (pair graph, L_OR on actors, gauge, errors)."""
    from contextlib import nullcontext

    from cryoorient_ray.distributed.runtime import clear_nodes_used, ray_runtime
    from cryoorient_ray.io.store import absolute_store_path

    t0 = time.perf_counter()
    rcfg = cfg.recover
    store_path = absolute_store_path(store_path) if store_path else store_path_for(cfg, out)
    clear_nodes_used("recover")
    model_file = _model_file(rcfg, out, model_path, ProjectionStore.open(store_path).image_size)
    runtime = ray_runtime(cfg.ray) if rcfg.actors > 0 else nullcontext()
    bar, callback, status = _recovery_progress(progress)
    with runtime, bar:
        outcome = recover_store(store_path, rcfg, model_file, cfg.seed, callback, status)
    files = write_recovery_outputs(outcome, store_path, out)
    m = outcome.metrics
    keep = ("recovered", "edges", "L_OR", "e_or_o4", "registration", "gauge_physical", "recovery_s", "gauge_s")
    metrics = {k: (round(m[k], 4) if isinstance(m[k], float) else m[k]) for k in keep if k in m}
    if "neighbour_quality" in m:  # the median true d_q of the k nearest by d̂, and its ideal
        metrics["knn_median_dq"] = m["neighbour_quality"]["median_knn_dq"]
        metrics["knn_ideal_median_dq"] = m["neighbour_quality"]["ideal_median_knn_dq"]
    metrics.update(_ray_nodes_metric("recover"))
    return StageResult.done("recover", t0, outputs=files, metrics=metrics)


def check_recover_inputs(cfg: RunConfig, store_path: str, model_path: str | os.PathLike | None) -> None:
    """Before anything is written: the store opens intact and the model file (if one is needed) exists."""
    ProjectionStore.open(store_path)
    model = model_path or (cfg.recover.model if cfg.recover.estimator == "model" else None)
    existing_model_file(model, "train first, or set recover.model")


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
