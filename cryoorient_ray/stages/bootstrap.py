"""The ``bootstrap`` stage: fine-tune the distance on projections of the data's own map, recover again, refine.

For a protein nobody trained on, the distance the recovery used (trained on other proteins, or
the shipped general one) fits its images only roughly. Each bootstrap round (``bootstrap.rounds``,
`cryoorient run ... --bootstrap N`) makes a training set from the data itself:

a. **map** (:func:`project_map`): the current map — round 1: the pipeline's refined map
   (``refine/map.mrc``) or reconstruction (``reconstruction.mrc``), ``bootstrap.map``; later
   rounds: the previous round's refined map — low-passed to its own half-map FSC0.143 (no ground
   truth), masked (the refinement's soft sphere) and clipped at zero;
b. **store** (:func:`round_simulation`): that map projected into a new store with the data
   store's working box and pixel size, acquisition box, SNR, CTF ranges and shifts (read from its
   manifest), at orientations drawn uniformly, so they are known;
c. **fine-tune** (:func:`fine_tune`): the current distance trained further on it with Ray Train
   (``train.init_model``; ``bootstrap.epochs``/``passes_per_epoch``/``lr``, the rest from ``train``,
   fresh noise at the data's SNR);
d. **recover + refine** (:func:`recover_round`, :func:`refine_round`): the data store's
   projections (``recover.split``/``protein``) recovered with the fine-tuned distance, then the
   global refinement with the run's ``refine`` settings (``refine.ab_initio`` auto decides), whose
   half maps give the round's FSC0.143 and its map for the next round;
e. **record**: per round the half-map FSC0.143/0.5 (Å), the recovery's and the refinement's
   rotation + hand error and E_OR when the data store knows the truth, and the times.

Files: ``bootstrap/round_<r>/`` (``start_map.mrc`` the projected map, ``projections.zarr``,
``model.pt`` + the training files, ``recovered*``, ``refined*``, ``map.mrc``, ``half_map_1/2.mrc``,
``round.json``), ``bootstrap/bootstrap.json`` (the start and the rounds) and ``bootstrap/bootstrap.png``.

:func:`bootstrap_rounds` is the function API (the ``unseen`` benchmark calls it);
:func:`stage_bootstrap` runs it after the pipeline's other stages, from the model the recover
stage used (``recovered.json``'s ``model``: a trained ``model.pt``, ``recover.model`` or the
shipped one).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from cryoorient_ray.config import BootstrapConfig, InputSpec, RunConfig, SimulateConfig
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text
from cryoorient_ray.io.store import ProjectionStore, absolute_store_path
from cryoorient_ray.stages.base import MODEL_NAME, StageResult, store_path_for

log = logging.getLogger(__name__)

FOLDER = "bootstrap"
REPORT_NAME = "bootstrap.json"
PLOT_NAME = "bootstrap.png"
START_MAP = "start_map.mrc"
ROUND_RECORD = "round.json"


# ----------------------------------------------------------------------------------------------- the map


def map_resolution(map_path: str | Path) -> float | None:
    """The half-map FSC0.143 (Å) of a map, from the files beside it: the refinement's ``refined.json``,
    the reconstruction's ``fsc.json``, or its ``half_map_1/2.mrc`` (FSC in the soft sphere ``L/2 − 4``).
    None when the half maps agree to Nyquist.

    Raises:
        CryoOrientError: the map is missing, or nothing beside it gives its half maps' resolution.
    """
    path = Path(map_path)
    if not path.is_file():
        raise CryoOrientError(f"bootstrap map not found: {path}")
    folder = path.parent
    refined, fsc_json = folder / "refined.json", folder / "fsc.json"
    if path.name == "map.mrc" and refined.is_file():
        return _finite(json.loads(refined.read_text()).get("final", {}).get("halfmap_fsc0143_A"))
    if fsc_json.is_file():
        half = json.loads(fsc_json.read_text()).get("half maps (recovered)")
        if half is not None:
            return _finite(half.get("resolution_0.143"))
    h1, h2 = folder / "half_map_1.mrc", folder / "half_map_2.mrc"
    if h1.is_file() and h2.is_file():
        from cryoorient_ray.core.reconstruction.fsc import fsc
        from cryoorient_ray.io.mrc import read_map

        a, b = read_map(h1), read_map(h2)
        return _finite(fsc(a.data, b.data, pixel_size=a.voxel_size, mask=a.data.shape[-1] / 2 - 4).resolution_0143)
    raise CryoOrientError(
        f"{path}: no half maps beside it (half_map_1/2.mrc, refined.json or fsc.json) to tell its resolution"
    )


def halfmap_area(data_store: str, orientations: str | Path, symmetry: str | None = None) -> float:
    """How well orientations explain the data, without ground truth: the sum over shells ``1 … L/2``
    of the FSC (clipped at 0) between two half maps of the data's images at those orientations (even
    and odd images, Fourier inversion, soft sphere ``L/2 − 4``). ``orientations``: an ``.npz`` with
    ``rows`` and ``quaternions`` (``recovered``/``refined_orientations.npz``). Every candidate of a
    bootstrap is scored by this one function, so their scores compare."""
    from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
    from cryoorient_ray.core.reconstruction.fsc import fsc, fsc_area
    from cryoorient_ray.core.reconstruction.inversion import reconstruct_fourier

    saved = np.load(orientations)
    rows, q = np.asarray(saved["rows"]), np.asarray(saved["quaternions"], dtype=np.float64)
    store = ProjectionStore.open(data_store)
    stack = store.particles(rows)
    rot = unitquat_to_rotmat(q).astype(np.float32)
    halves = []
    for part in (slice(0, None, 2), slice(1, None, 2)):
        halves.append(reconstruct_fourier(stack.subset(np.arange(len(rows))[part]), rot[part], symmetry=symmetry))
    curve = fsc(halves[0], halves[1], pixel_size=stack.pixel_size_A, mask=stack.image_size / 2 - 4).fsc
    return fsc_area(curve)


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def project_map(map_path: Path, resolution_A: float | None, target: Path, mask_radius: float | None) -> dict:
    """Step a of the module docstring: ``map_path`` low-passed to ``resolution_A`` (None: Nyquist),
    masked (soft sphere of ``mask_radius`` voxels, default ``L/2 − 4``), clipped at zero, into ``target``."""
    from cryoorient_ray.core.density.volume import DensityMap
    from cryoorient_ray.core.reconstruction.fsc import soft_mask
    from cryoorient_ray.core.refinement.ab_initio import lowpass_volume
    from cryoorient_ray.io.mrc import read_map, write_map

    density = read_map(map_path)
    vol = np.asarray(density.data, dtype=np.float32)
    size, pixel = vol.shape[-1], float(density.voxel_size)
    edge = size / 2 if resolution_A is None else min(max(size * pixel / resolution_A, 2.0), size / 2)
    radius = mask_radius if mask_radius is not None else size / 2 - 4
    data = np.clip(lowpass_volume(vol, edge) * soft_mask(size, radius), 0.0, None).astype(np.float32)
    if not np.any(data > 0):
        raise CryoOrientError(f"{map_path}: no positive density inside the mask; nothing to project")
    write_map(target, DensityMap(data, pixel, name="bootstrap"))
    return {"map": str(map_path), "map_fsc0143_A": resolution_A, "lowpass_A": round(size * pixel / edge, 2)}


def round_simulation(store: ProjectionStore, protein: int, map_file: Path, b: BootstrapConfig, name: str):
    """Step b: the :class:`SimulateConfig` that projects ``map_file`` as the data ``store`` was
    recorded — working box and pixel size, acquisition box, SNR, CTF ranges and optics, shifts — with
    ``b.n_images`` projections (default: the protein's count), uniform orientations, no test split."""
    m, acq = store.manifest, store.acquisition
    config = m.get("config") or {}
    ctf = {"enabled": False}
    if m.get("ctf_applied"):
        ranges = m.get("ctf_ranges") or config.get("ctf") or {}
        optics = m.get("optics", {})
        ctf = {
            "enabled": True,
            **{k: float(ranges[k]) for k in ("defocus_min", "defocus_max", "astigmatism_max") if k in ranges},
            **{k: float(optics[k]) for k in ("voltage", "cs", "amplitude_contrast") if k in optics},
        }
    shifts = config.get("shifts")
    if not isinstance(shifts, dict):  # imported particles: as far as the recorded shifts go
        rows = store.select_rows(protein=protein)
        recorded = np.abs(store.read_metadata(rows, names=["shift"])["shift"])
        shifts = {"max_shift": float(np.nanmax(recorded)) if np.isfinite(recorded).any() else 0.0}
    box = int(acq.get("image_size") or store.image_size)
    n = b.n_images or int(store.proteins[protein]["count"])
    return SimulateConfig(
        inputs=[InputSpec(source=str(map_file), name=name, symmetry=store.proteins[protein].get("symmetry") or "C1")],
        n_per_map=n,
        image_size=store.image_size,
        voxel_size=store.pixel_size,
        acquisition={"image_size": box} if box != store.image_size else {},
        noise={"snr_db": acq.get("snr_db")},
        shifts=shifts,
        ctf=ctf,
        splits={"train": 1.0 - b.val_fraction, "val": b.val_fraction, "test": 0.0},
        shard_size=max(1, min(store.shard_size, math.ceil(n / 4))),
    )


# ----------------------------------------------------------------------------------------------- one round


def fine_tune(cfg: RunConfig, store_path: str, model_path: str, folder: Path, r: int, progress: bool) -> dict:
    """Step c: ``model_path`` trained further on ``store_path`` (``train`` plus the ``bootstrap`` overrides)
    into ``folder/model.pt``; the fine-tune's numbers."""
    from cryoorient_ray.config import ModelConfig, TrainConfig
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance
    from cryoorient_ray.stages.train import calibrate_distance

    b = cfg.bootstrap
    spec = load_distance_model(model_path)[0].spec.to_dict()
    data = cfg.train.model_dump()
    data.update(
        stores=[store_path],
        init_model=str(model_path),
        epochs=b.epochs,
        passes_per_epoch=b.passes_per_epoch,
        lr=b.lr or cfg.train.lr / 3,
        model={k: v for k, v in spec.items() if k in ModelConfig.model_fields},  # the init model's own
    )
    data["noise"].update(snr_db=None, curriculum_start_db=None)  # the data's SNR, as the store records it
    tcfg = TrainConfig.model_validate(data)
    # a shared train.storage_path outlives the round's folder: a name of its own, so no old checkpoint resumes
    name = f"bootstrap_{r}" if not tcfg.storage_path else f"bootstrap_{r}_{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train_distance(TrainJob(tcfg, [store_path], folder, seed=cfg.seed + r, name=name), progress)
    calibrate_distance(store_path, folder / MODEL_NAME, seed=cfg.seed)  # σ(d̂) for recover.weights: confidence
    history = json.loads((folder / "history.json").read_text())
    return {
        "start_val_L_DE": _round(history[0].get("initial_val_loss")),
        "best_val_L_DE": _round(summary["best_val_loss"]),
        "epochs": summary["epochs_run"],
        "steps": summary["steps_per_worker"],
    }


def recover_round(cfg: RunConfig, data_store: str, model_file: str, folder: Path, progress: bool) -> dict:
    """Step d, recovery: the data store's projections with the fine-tuned distance, files into ``folder``."""
    from cryoorient_ray.stages.recover import _recovery_progress, recover_store, write_recovery_outputs

    bar, callback, status = _recovery_progress(progress)
    with bar:
        outcome = recover_store(data_store, cfg.recover, model_file, cfg.seed, callback, status)
    write_recovery_outputs(outcome, data_store, folder)
    m = outcome.metrics
    return {k: _round(m[k]) for k in ("e_or_o4", "registration", "L_OR", "recovered") if k in m}


def refine_round(cfg: RunConfig, data_store: str, folder: Path, progress: bool) -> dict:
    """Step d, refinement: the run's ``refine`` settings from the round's recovered orientations, into ``folder``."""
    from cryoorient_ray.stages.refine import plan_refinement, refine_into

    rcfg = cfg.refine.model_copy(update={"start": "recovered", "start_file": None})
    cfg = cfg.model_copy(update={"refine": rcfg})
    run = plan_refinement(cfg, data_store, folder, folder, restart=True, discard_stale=True)
    _, metrics = refine_into(cfg, run, folder, progress)
    keep = ("halfmap_fsc0143_A", "halfmap_fsc05_A", "e_or_o4", "registration", "iterations", "initial_model")
    return {k: metrics[k] for k in keep if k in metrics}


def _round(value):
    return round(float(value), 4) if isinstance(value, float | np.floating) else value


def one_round(
    cfg: RunConfig,
    data_store: str,
    model_path: str,
    start: tuple[Path, float | None],
    folder: Path,
    r: int,
    progress: bool,
) -> dict:
    """Steps a–e of round ``r`` into ``folder``; the round's record (``model``, ``map`` for the next)."""
    from cryoorient_ray.distributed.simulate_tasks import simulate_store
    from cryoorient_ray.stages.recover import select_projections

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = ProjectionStore.open(data_store)
    protein = select_projections(data, cfg.recover, cfg.seed).protein
    record: dict = {"round": r, **project_map(start[0], start[1], folder / START_MAP, cfg.refine.mask_radius)}
    sim = round_simulation(data, protein, (folder / START_MAP).resolve(), cfg.bootstrap, f"bootstrap_{r}")
    log.info(
        "bootstrap round %d: %d projections of %s low-passed to %.1f Å (%d² px, %.3g Å/px, SNR %s)",
        r,
        sim.n_per_map,
        start[0].name,
        record["lowpass_A"],
        sim.image_size,
        sim.voxel_size,
        "noiseless" if sim.noise.snr_db is None else f"{sim.noise.snr_db:g} dB",
    )
    store_path = absolute_store_path(folder / "projections.zarr")
    simulate_store(sim, cfg.seed + 7919 * r, store_path, progress=progress, cache_dir=folder / "cache")
    times["simulate_s"] = time.perf_counter() - t0
    record.update(
        store=store_path,
        n_images=sim.n_per_map,
        image_size=sim.image_size,
        pixel_size_A=sim.voxel_size,
        snr_db=sim.noise.snr_db,
    )
    log.info("bootstrap round %d: fine-tuning %s (%d epochs)", r, model_path, cfg.bootstrap.epochs)
    t1 = time.perf_counter()
    record["fine_tune"] = fine_tune(cfg, store_path, model_path, folder, r, progress)
    times["fine_tune_s"] = time.perf_counter() - t1
    log.info(
        "bootstrap round %d: fine-tuned, validation L_DE %s → %s rad²; recovering",
        r,
        record["fine_tune"]["start_val_L_DE"],
        record["fine_tune"]["best_val_L_DE"],
    )
    t2 = time.perf_counter()
    record["recover"] = recover_round(cfg, data_store, str((folder / MODEL_NAME).resolve()), folder, progress)
    times["recover_s"] = time.perf_counter() - t2
    log.info("bootstrap round %d: recovered (%s); refining", r, _errors_text(record["recover"]))
    t3 = time.perf_counter()
    record["refine"] = refine_round(cfg, data_store, folder, progress)
    times["refine_s"] = time.perf_counter() - t3
    times["total_s"] = time.perf_counter() - t0
    record.update({k: round(v, 2) for k, v in times.items()})
    record["model"] = str((folder / MODEL_NAME).resolve())
    record["next_map"] = str((folder / "map.mrc").resolve())
    log.info(
        "bootstrap round %d: half maps FSC0.143 %s Å (%s), %.0f s",
        r,
        record["refine"].get("halfmap_fsc0143_A"),
        _errors_text(record["refine"]),
        times["total_s"],
    )
    return record  # bootstrap_rounds writes it (round.json) once it has decided which poses the round keeps


def _errors_text(m: dict) -> str:
    if "registration" not in m:
        return "truth unknown"
    return f"error {m['registration']} rad after rotation + hand, E_OR {m.get('e_or_o4')} rad"


# ----------------------------------------------------------------------------------------------- API and stage


def bootstrap_rounds(
    data_store: str,
    model_path: str,
    map_path: str,
    cfg: RunConfig,
    out: Path,
    rounds: int | None = None,
    progress: bool = False,
    map_resolution_A: float | None = None,
    start_orientations: str | Path | None = None,
    start_refine: dict | None = None,
) -> list[dict]:
    """``rounds`` (default ``cfg.bootstrap.rounds``) bootstrap rounds into ``out/round_<r>/``: the per-round records.

    ``data_store``: the data's projections (``cfg.recover`` picks the split and protein);
    ``model_path``: the distance to start from; ``map_path``: the map round 1 projects, its
    resolution read beside it (:func:`map_resolution`) unless ``map_resolution_A`` is given.
    ``start_orientations`` (an ``.npz`` with ``rows``, ``quaternions``) and ``start_refine`` (their
    errors, when known) are the start's poses: a round whose refined poses explain the data worse
    (:func:`halfmap_area`) than the best so far keeps the best (``kept: "previous"``; its ``final``
    holds the kept numbers, its ``next_map`` the kept map); the distance goes on from the round's
    fine-tuned model either way. Starts (or reuses) Ray (``cfg.ray``).

    Raises:
        CryoOrientError: a missing store, model or map, ``rounds`` < 1, or a recovery that does not use a model.
    """
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.distributed.runtime import ray_runtime

    rounds = cfg.bootstrap.rounds if rounds is None else rounds
    if rounds < 1:
        raise CryoOrientError(f"bootstrap needs at least 1 round; got {rounds}")
    data_store = absolute_store_path(data_store)
    ProjectionStore.open(data_store)
    load_distance_model(model_path)  # a missing or unreadable model: one line before Ray starts
    res = map_resolution(map_path) if map_resolution_A is None else float(map_resolution_A)
    current, model = (Path(map_path), res), str(Path(model_path).resolve())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    best_area = None if start_orientations is None else halfmap_area(data_store, start_orientations)
    best_final = dict(start_refine or {})
    with ray_runtime(cfg.ray):
        for r in range(1, rounds + 1):
            folder = out / f"round_{r}"
            rec = one_round(cfg, data_store, model, current, folder, r, progress)
            area = halfmap_area(data_store, folder / "refined_orientations.npz")
            rec["halfmap_area"], rec["start_halfmap_area"] = round(area, 3), _round(best_area)
            if best_area is not None and area < best_area:
                rec["kept"], rec["final"], rec["next_map"] = "previous", best_final, str(current[0])
                log.info("bootstrap round %d: its poses explain the data less (half-map FSC area %.2f < %.2f); "
                         "keeping the previous ones", r, area, best_area)  # fmt: skip
            else:
                rec["kept"], rec["final"] = "this round", rec["refine"]
                best_area, best_final = area, rec["refine"]
                current = (Path(rec["next_map"]), rec["refine"].get("halfmap_fsc0143_A"))
            atomic_write_text(folder / ROUND_RECORD, json.dumps(rec, indent=2) + "\n")
            records.append(rec)
            model = rec["model"]
    return records


def start_of(cfg: RunConfig, out: Path) -> tuple[Path, str, dict]:
    """The pipeline's start of the bootstrap: ``(map, model, numbers)`` — the map ``bootstrap.map``
    names, the model the recover stage used (``recovered.json``) and that stage's errors.

    Raises:
        CryoOrientError: the map or the model is not there, or the recovery used no model.
    """
    check_bootstrap(cfg)
    kind = cfg.bootstrap.map
    if kind == "auto":
        kind = "refined" if cfg.refine.enabled else "reconstruct"
    map_path = out / ("refine/map.mrc" if kind == "refined" else "reconstruction.mrc")
    if not map_path.is_file():
        raise CryoOrientError(f"bootstrap.map {kind}: {map_path} not found (run the {kind} stage first)")
    recovered = json.loads((out / "recovered.json").read_text()) if (out / "recovered.json").is_file() else {}
    model = recovered.get("model") or str(out / MODEL_NAME)
    if not Path(model).is_file():
        raise CryoOrientError(f"bootstrap: the recovery's model {model} not found")
    numbers = {k: recovered[k] for k in ("e_or_o4", "registration") if k in recovered}
    return map_path, model, numbers


def check_bootstrap(cfg: RunConfig) -> None:
    """Before the first stage: a bootstrap has a map to start from and a learned distance to fine-tune."""
    b = cfg.bootstrap
    if b.rounds == 0:
        return
    if cfg.recover.estimator != "model":
        raise CryoOrientError(
            f"bootstrap fine-tunes the learned distance, but recover.estimator is {cfg.recover.estimator!r} (use model)"
        )
    if b.map == "refined" and not cfg.refine.enabled:
        raise CryoOrientError("bootstrap.map refined needs the refine stage (refine.enabled true), or use reconstruct")


def stage_bootstrap(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """The pipeline's ``bootstrap`` stage: ``bootstrap.rounds`` rounds into ``<run>/bootstrap/``, with
    ``bootstrap.json``, ``bootstrap.png`` and the last round's numbers as its metrics."""
    from cryoorient_ray.plots import plot_bootstrap_rounds

    t0 = time.perf_counter()
    map_path, model, recovered = start_of(cfg, out)
    start = {"map": str(map_path), "model": model, "halfmap_fsc0143_A": map_resolution(map_path), "recover": recovered}
    refined = out / "refine" / "refined.json"
    if map_path.parent.name == "refine" and refined.is_file():
        final = json.loads(refined.read_text()).get("final", {})
        start["refine"] = {k: final[k] for k in ("halfmap_fsc0143_A", "e_or_o4", "registration") if k in final}
    folder = out / FOLDER
    poses = out / "refine" / "refined_orientations.npz"
    poses = poses if map_path.parent.name == "refine" and poses.is_file() else out / "recovered_orientations.npz"
    records = bootstrap_rounds(
        store_path_for(cfg, out),
        model,
        str(map_path),
        cfg,
        folder,
        progress=progress,
        start_orientations=poses if poses.is_file() else None,
        start_refine=start.get("refine") or recovered,
    )
    report = {"start": start, "rounds": records, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(folder / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    plot_bootstrap_rounds(start, records, folder / PLOT_NAME)
    last = records[-1]
    metrics = {"rounds": len(records), "round_s": round(float(np.mean([r["total_s"] for r in records])), 1)}
    metrics.update({f"refined_{k}": v for k, v in last["final"].items() if k != "initial_model"})
    metrics["kept_rounds"] = sum(r["kept"] == "this round" for r in records)
    metrics.update({f"recovered_{k}": v for k, v in last["recover"].items() if k in ("e_or_o4", "registration")})
    outputs = {
        "report": f"{FOLDER}/{REPORT_NAME}",
        "plot": f"{FOLDER}/{PLOT_NAME}",
        "last_round": f"{FOLDER}/round_{len(records)}/",
    }
    return StageResult.done("bootstrap", t0, outputs=outputs, metrics=metrics)
