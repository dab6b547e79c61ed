"""The ``refine`` stage: global projection matching from recovered, given or random orientations.

What `cryoorient refine STORE START` runs (and the ``refine`` stage of `cryoorient run`, after
``recover`` when ``refine.enabled``), in the order of this module:

1. **start** (:func:`load_start`): the projections and where they start —
   ``recovered``: the rows and orientations of a ``recovered_orientations.npz`` (a run folder's, or
   the run's own in the pipeline); ``star``: a RELION .star whose particles are matched to the
   store's rows by their images (:func:`match_star_rows`); ``random``: one protein's rows of a split
   at random orientations (the control: ab initio from nothing);
2. **resume** (:func:`check_resume`): the output folder's ``state/`` holds the
   :class:`~cryoorient_ray.core.refinement.global_search.GlobalRefineState` of the last finished
   iteration and what it was computed from (``state/run.json``: store, rows, start, settings but
   the iteration count). The same command resumes from there; anything else is one error
   (``--restart`` discards the state instead; `cryoorient run` discards a stale state by itself);
3. **search** (:func:`refine_into`): :func:`~cryoorient_ray.core.refinement.global_search.global_refine`
   with image batches scored in process or on Ray actors
   (:class:`~cryoorient_ray.distributed.refine_actors.RayScorer`), one line per iteration and a
   progress bar within it; the state is saved after every iteration. A protein declared with a
   point group (the store's ``symmetry``) is refined with it (``refine.symmetry_mode``: its
   asymmetric unit searched and the group imposed on the maps, or C1 then symmetrised) and every
   error against the truth is symmetry-aware;
4. **outputs**: ``refined.star`` + ``refined.mrcs`` (RELION), ``refined_orientations.npz`` (the
   format of ``recovered_orientations.npz``: `cryoorient reconstruct` and the pipeline's
   ``reconstruct`` stage read it), ``map.mrc``, ``half_map_1.mrc``, ``half_map_2.mrc``,
   ``fsc_iterations.png``, ``resolution_iterations.png`` and ``refined.json`` (history, final
   resolutions and, when the store knows the truth, E_OR (O(4)) and the rotation + hand error).

In a `cryoorient run` folder the stage writes into ``refine/`` (the ``reconstruct`` stage writes
``refined.star`` and ``fsc.png`` of its own local refinement beside the run's other files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryoorient_ray.config import RefineConfig, RunConfig
from cryoorient_ray.core.refinement.global_search import (
    GlobalRefineResult,
    GlobalRefineSettings,
    GlobalRefineState,
    global_refine,
)
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_savez, atomic_write_text
from cryoorient_ray.io.store import ProjectionStore, absolute_store_path
from cryoorient_ray.stages.base import StageResult, _ray_nodes_metric, run_standalone, store_path_for

log = logging.getLogger(__name__)

RUN_FOLDER = "refine"  # the stage's folder inside a `cryoorient run` folder
STATE_DIR = "state"
STATE_FILE = "state.npz"
STATE_INFO = "run.json"
RECOVERED_NAME = "recovered_orientations.npz"
REFINED_NAME = "refined_orientations.npz"
REPORT_NAME = "refined.json"
FSC_PLOT = "fsc_iterations.png"
RESOLUTION_PLOT = "resolution_iterations.png"
# Settings that change the work but not what a finished iteration means: a resume may change them.
RESUMABLE_SETTINGS = ("iterations", "batch_size", "device")


# ----------------------------------------------------------------------------------------------- start


@dataclass
class RefineStart:
    """The projections one refinement works on and where they start.

    Attributes:
        store_path: the store (absolute path or URL).
        rows: ``(P,)`` store rows; ``quaternions``: ``(P, 4)`` float64 starting orientations (wxyz), or
            None for ``random`` (the search draws them, seeded, and starts both halves from one common map).
        kind: ``"recovered"``, ``"star"`` or ``"random"``; ``source``: the file it came from ('' for random).
        protein, protein_name, symmetry: the protein (one per refinement).
        q_true: ``(P, 4)`` true orientations, or None when the store has none.
    """

    store_path: str
    rows: np.ndarray
    quaternions: np.ndarray | None
    kind: str
    source: str
    protein: int
    protein_name: str
    symmetry: str
    q_true: np.ndarray | None


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _recovered_file(rcfg: RefineConfig, run_dir: Path | None) -> Path:
    """The ``.npz`` of ``start: recovered``: ``start_file`` (a run folder or the file), else the run's own."""
    if rcfg.start_file is None:
        if run_dir is None:
            raise CryoOrientError("refine.start recovered needs refine.start_file (a run folder or its .npz)")
        path = run_dir / RECOVERED_NAME
        if not path.is_file():
            raise CryoOrientError(f"{path} not found: run the recover stage first")
        return path
    path = Path(rcfg.start_file)
    if path.is_dir():
        path = path / RECOVERED_NAME
        if not path.is_file():
            raise CryoOrientError(
                f"START {rcfg.start_file} has no {RECOVERED_NAME}: give a run folder of `cryoorient recover` "
                "or `cryoorient run`, a .star file or 'random'"
            )
        return path
    if not path.exists():
        raise CryoOrientError(f"START not found: {path} (give a run folder, a .star file or 'random')")
    if path.suffix != ".npz":
        raise CryoOrientError(f"START {path} is neither a run folder, a .npz of orientations nor a .star file")
    return path


def _protein_of(store: ProjectionStore, rows: np.ndarray, what: str) -> int:
    proteins = np.unique(store.read_metadata(rows, names=["protein"])["protein"])
    if len(proteins) != 1:
        raise CryoOrientError(f"{what} holds particles of {len(proteins)} proteins; refinement takes one")
    return int(proteins[0])


def _truth(store: ProjectionStore, rows: np.ndarray) -> np.ndarray | None:
    if not store.manifest.get("has_orientations", True):
        return None
    q = store.read_metadata(rows, names=["quaternion"])["quaternion"].astype(np.float64)
    return q if np.isfinite(q).all() else None


def _from_recovered(store: ProjectionStore, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            rows, q = np.asarray(z["rows"], dtype=np.int64), np.asarray(z["quaternions"], dtype=np.float64)
            q_file = np.asarray(z["quaternions_true"], dtype=np.float64) if "quaternions_true" in z.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise CryoOrientError(f"cannot read {path} as recovered orientations (rows, quaternions): {exc}") from None
    if rows.ndim != 1 or q.shape != (len(rows), 4) or len(rows) < 3:
        raise CryoOrientError(
            f"{path}: expected rows (P,) and quaternions (P, 4) with P >= 3; got {rows.shape}, {q.shape}"
        )
    if not np.isfinite(q).all():
        raise CryoOrientError(f"{path}: orientations contain NaN or inf")
    missing = np.setdiff1d(rows, store.done_rows())
    if len(missing):
        raise CryoOrientError(f"{path} names {len(missing)} rows that {store.path} does not have (another store?)")
    q_store = _truth(store, rows)
    if q_file is not None and q_store is not None and np.isfinite(q_file).all():
        if np.abs(np.abs((q_file * q_store).sum(1)) - 1).max() > 1e-4:
            raise CryoOrientError(f"{path} was recovered from another store than {store.path} (its truth differs)")
    return rows, q


def match_star_rows(store: ProjectionStore, star_path: Path, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The store rows of a .star's particles and their orientations: each particle's image (read from its
    stack) must equal one of the ``candidates``' images exactly (a stack exported from this store, e.g.
    ``recovered.star`` + ``recovered.mrcs``, or a RELION job's output of it).

    Raises:
        CryoOrientError: no angles in the table, or particles whose images the store does not have.
    """
    from cryoorient_ray.io.relion import read_star_particles

    images, q = read_star_particles(star_path)
    if q is None:
        raise CryoOrientError(f"{star_path} has no angles (rlnAngleRot/Tilt/Psi) to start from")
    if images.shape[-1] != store.image_size:
        raise CryoOrientError(f"{star_path} has {images.shape[-1]}² images; {store.path} has {store.image_size}²")
    index = {}
    for a in range(0, len(candidates), 1024):
        chunk = candidates[a : a + 1024]
        for row, img in zip(chunk, store.read_images(chunk), strict=True):
            index.setdefault(np.ascontiguousarray(img, dtype=np.float32).tobytes(), int(row))
    rows = np.array([index.get(np.ascontiguousarray(img).tobytes(), -1) for img in images], dtype=np.int64)
    unknown = int((rows < 0).sum())
    if unknown:
        raise CryoOrientError(
            f"{unknown} of the {len(rows)} particles of {star_path} are not in {store.path} "
            f"(their images match none of the {len(candidates)} selected; see --split/--protein)"
        )
    if len(np.unique(rows)) != len(rows):
        raise CryoOrientError(f"{star_path} lists some of the store's particles more than once")
    if len(rows) < 3:
        raise CryoOrientError(f"{star_path} has {len(rows)} particles; refinement needs at least 3")
    return rows, np.asarray(q, dtype=np.float64)


def load_start(store: ProjectionStore, cfg: RunConfig, run_dir: Path | None = None) -> RefineStart:
    """The projections and starting orientations ``cfg.refine`` names (module docstring, step 1).

    ``run_dir`` is the pipeline's run folder (the default of ``start: recovered``).
    """
    rcfg = cfg.refine
    source = ""
    if rcfg.start == "recovered":
        path = _recovered_file(rcfg, run_dir)
        rows, q = _from_recovered(store, path)
        source = str(path)
    else:
        pid = 0 if rcfg.protein is None else store.protein_index(rcfg.protein)
        candidates = store.select_rows(split=rcfg.split, protein=pid)
        if rcfg.start == "star":
            if rcfg.start_file is None:
                raise CryoOrientError("refine.start star needs refine.start_file (the .star file)")
            star = Path(rcfg.start_file)
            if not star.is_file():
                raise CryoOrientError(f"star file not found: {star}")
            rows, q = match_star_rows(store, star, candidates)
            order = np.argsort(rows)
            rows, q, source = rows[order], q[order], str(star)
        else:
            rows = candidates
            if rcfg.max_projections is not None and len(rows) > rcfg.max_projections:
                rng = np.random.default_rng(cfg.seed)
                rows = np.sort(rng.choice(rows, rcfg.max_projections, replace=False))
            if len(rows) < 3:
                raise CryoOrientError(
                    f"{store.path}: protein {store.proteins[pid]['name']!r} has {len(rows)} completed projections "
                    f"in split '{rcfg.split}'; refinement needs at least 3"
                )
            q = None
    pid = _protein_of(store, rows, source or "the selection")
    protein = store.proteins[pid]
    return RefineStart(
        store_path=absolute_store_path(store.path),
        rows=rows,
        quaternions=None if q is None else np.asarray(q, dtype=np.float64),
        kind=rcfg.start,
        source=source,
        protein=pid,
        protein_name=protein["name"],
        symmetry=protein.get("symmetry", "C1") or "C1",
        q_true=_truth(store, rows),
    )


# ----------------------------------------------------------------------------------------------- resume


def run_record(start: RefineStart, settings: GlobalRefineSettings, store: ProjectionStore) -> dict:
    """What a saved state was computed from: a state resumes only a run with the same record."""
    fixed = {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESUMABLE_SETTINGS}
    return {
        "store": start.store_path,
        "store_config": store.manifest.get("config_hash", ""),
        "projections": int(len(start.rows)),
        "rows": _digest(start.rows.astype(np.int64)),
        "start": start.kind,
        "start_orientations": "" if start.quaternions is None else _digest(np.round(start.quaternions, 6)),
        "settings": fixed,
    }


def _differences(saved: dict, now: dict) -> list[str]:
    """The names of what differs between two :func:`run_record`s, settings by key."""
    out = []
    for key in ("store", "store_config", "projections", "rows", "start", "start_orientations"):
        if saved.get(key) != now.get(key):
            out.append({"store_config": "the store's content", "start_orientations": "the start"}.get(key, key))
    for key, value in now["settings"].items():
        if saved.get("settings", {}).get(key) != value:
            out.append(f"{key} {saved.get('settings', {}).get(key)!r} → {value!r}")
    return out


def check_resume(state_dir: Path, record: dict, restart: bool, discard_stale: bool = False) -> GlobalRefineState | None:
    """The saved :class:`GlobalRefineState` to resume from, or None to start afresh.

    ``restart`` discards a saved state; a state saved from another ``record`` is one error naming what
    differs (or, with ``discard_stale``, as in `cryoorient run`, discarded with a warning).
    """
    state_file, info_file = state_dir / STATE_FILE, state_dir / STATE_INFO
    if restart or not state_file.is_file():
        return None
    try:
        saved = json.loads(info_file.read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    diffs = _differences(saved, record)
    if diffs:
        if discard_stale:
            log.warning("refine: discarding the saved iterations in %s (%s changed)", state_dir, ", ".join(diffs))
            return None
        raise CryoOrientError(
            f"{state_dir} holds iterations of another refinement ({'; '.join(diffs)}): "
            "re-run with --restart to discard them, or choose another output folder"
        )
    return GlobalRefineState.from_npz(state_file)


def _resumable(state: GlobalRefineState | None, settings: GlobalRefineSettings) -> GlobalRefineState | None:
    """A saved state that stopped at its run's iteration limit goes on when the limit is now higher."""
    if state is not None and state.done and state.iteration < settings.iterations and state.stale < settings.patience:
        return dataclasses.replace(state, done=False)
    return state


# ----------------------------------------------------------------------------------------------- search


def _progress_bar(show: bool):
    """A rich progress bar for ``progress(label, done, total)`` of the search: ``(bar, callback)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.fields[label]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    )
    task = bar.add_task("refine", total=1, label="refine")
    state = {"label": None}

    def callback(label: str, done: int, total: int) -> None:
        if label != state["label"]:
            state["label"] = label
            bar.reset(task, total=max(total, 1), label=label)
        bar.update(task, completed=done)

    return bar, callback


def iteration_line(entry: dict, iterations: int) -> str:
    """One line per iteration: band, half-map FSC0.143, change and (truth known) error."""
    it = entry.get("iteration")
    head = "polish" if it == "polish" else f"iteration {it}/{iterations}"
    parts = [head]
    if entry.get("band_A") is not None:
        parts.append(f"band {entry['band_A']:.1f} Å")
    if entry.get("resolution_0143_A") is not None:
        parts.append(f"half-map FSC0.143 {entry['resolution_0143_A']:.1f} Å")
    if entry.get("change_rad") is not None:
        parts.append(f"change {math.degrees(entry['change_rad']):.2f}°")
    if entry.get("error_rad") is not None:
        parts.append(f"error {math.degrees(entry['error_rad']):.2f}° (rotation + hand)")
    if entry.get("seconds") is not None:
        parts.append(f"{entry['seconds']:.1f} s")
    return ", ".join(parts)


def _fsc_curve(stack, state, settings) -> tuple[np.ndarray, np.ndarray]:
    """The half maps' FSC of a state's poses (each half reconstructed from its own images)."""
    import torch

    from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
    from cryoorient_ray.core.reconstruction.fsc import fsc
    from cryoorient_ray.core.reconstruction.inversion import half_maps

    if state.shifts is not None:
        stack = dataclasses.replace(stack, shifts=np.asarray(state.shifts, dtype=np.float32))
    rot = torch.as_tensor(unitquat_to_rotmat(np.asarray(state.quaternions)), dtype=torch.float32)
    radius = settings.mask_radius if settings.mask_radius is not None else stack.image_size / 2 - 4
    h1, h2 = half_maps(stack, rot, split=np.asarray(state.halves), method="fourier", wiener=settings.wiener)
    res = fsc(np.asarray(h1), np.asarray(h2), pixel_size=stack.pixel_size_A, mask=radius)
    return res.frequency, res.fsc


def _curve_of(entry: dict, stack, state, settings) -> tuple[np.ndarray, np.ndarray]:
    """An iteration's half-map FSC curve: the entry's own (``fsc``, ``frequency``) when it has one."""
    if entry.get("fsc") is not None and entry.get("frequency") is not None:
        return np.asarray(entry["frequency"], dtype=np.float64), np.asarray(entry["fsc"], dtype=np.float64)
    return _fsc_curve(stack, state, settings)


def _scorer(rcfg: RefineConfig, device: str):
    """None (in process) or a :class:`RayScorer` on ``rcfg.actors`` actors (Ray must be running)."""
    if rcfg.actors <= 0:
        return None
    from cryoorient_ray.distributed.refine_actors import RayScorer

    threads = max(1, int(rcfg.cpus_per_actor))
    return RayScorer(
        n_actors=rcfg.actors,
        cpus_per_actor=rcfg.cpus_per_actor,
        threads_per_actor=threads,
        gpus_per_actor=1.0 if device == "cuda" else 0.0,
    )


def _save_state(state_dir: Path, state, record: dict, curves: dict) -> None:
    """The state of the last finished iteration, what it came from, and the FSC curves so far."""
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_dir / STATE_INFO, json.dumps(record, indent=2) + "\n")
    atomic_write_text(state_dir / "fsc_curves.json", json.dumps(curves) + "\n")
    state.to_npz(state_dir / STATE_FILE)  # written under a temporary name and renamed


def _saved_curves(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "fsc_curves.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _res(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 2)


@dataclass
class RefineRun:
    """One refinement's inputs, resolved before anything is written: the start, the search's settings,
    the record of what a saved state means (:func:`run_record`) and the state to resume from."""

    start: RefineStart
    settings: GlobalRefineSettings
    record: dict
    resume: GlobalRefineState | None


def plan_refinement(
    cfg: RunConfig, store_path: str, folder: Path, run_dir: Path | None, restart: bool, discard_stale: bool
) -> RefineRun:
    """Steps 1–2 of the module docstring: every input check, before the folder is made or Ray started."""
    from cryoorient_ray.stages.reconstruct import wiener_constant

    store = ProjectionStore.open(store_path)
    start = load_start(store, cfg, run_dir)
    wiener = wiener_constant(cfg.refine, store)  # refine.wiener, else from the simulated SNR
    settings = cfg.refine.settings(cfg.seed, start.symmetry, wiener).checked()  # the protein's point group
    record = run_record(start, settings, store)
    resume = _resumable(check_resume(folder / STATE_DIR, record, restart, discard_stale), settings)
    return RefineRun(start, settings, record, resume)


def refine_into(cfg: RunConfig, run: RefineRun, folder: Path, progress: bool = True) -> tuple[dict, dict]:
    """Step 3–4 of the module docstring into ``folder``; returns ``(files, metrics)`` (files relative to it)."""
    from contextlib import nullcontext

    from cryoorient_ray.distributed.runtime import clear_nodes_used, ray_runtime

    t0 = time.perf_counter()
    start, settings = run.start, run.settings
    store = ProjectionStore.open(start.store_path)
    stack = store.particles(start.rows)
    reference = None
    if start.q_true is not None and store.has_volume(start.protein):
        reference = store.read_volume(start.protein).astype(np.float32)
    state_dir = folder / STATE_DIR
    curves = _saved_curves(state_dir) if run.resume is not None else {}
    if run.resume is None and state_dir.exists():
        shutil.rmtree(state_dir)  # --restart, or a stale state in a run folder
    bar, callback = _progress_bar(progress)

    def say(text: str) -> None:
        bar.console.print(text, highlight=False, soft_wrap=True)

    n_it = settings.iterations

    def on_iteration(state, entry: dict) -> None:
        freq, curve = _curve_of(entry, stack, state, settings)
        curves[str(entry.get("iteration"))] = {"frequency": freq.tolist(), "fsc": curve.tolist()}
        _save_state(state_dir, state, run.record, curves)
        say(iteration_line(entry, n_it))

    clear_nodes_used("refine")
    scorer = _scorer(cfg.refine, settings.device)
    runtime = ray_runtime(cfg.ray) if scorer is not None else nullcontext()
    what = f"{len(start.rows)} projections of {start.protein_name}, start: {start.kind}"
    if run.resume is not None:
        say(f"resuming from iteration {run.resume.iteration} ({state_dir})")
    say(f"refine: {what}, {settings.device}, {cfg.refine.actors or 'no'} actors")
    with runtime, bar:
        result = global_refine(
            stack,
            start.quaternions,
            settings,
            scorer=scorer,
            resume=run.resume,
            on_iteration=on_iteration,
            q_true=start.q_true,
            reference=reference,
            progress=callback,
        )
    first = result.history[0] if result.history else {}
    if "start" in first:
        say(f"initial model: {first['start']} ({first.get('start_reason', '')})")
    if "symmetry_frame" in first:
        from cryoorient_ray.report import symmetry_frame_line

        say(f"{run.settings.symmetry}: {symmetry_frame_line(first['symmetry_frame'])}")
    return write_refine_outputs(store, run, result, curves, folder, started=t0)


def final_errors(start: RefineStart, q: np.ndarray, history: list[dict], seed: int) -> dict:
    """E_OR (O(4)) and the rotation + hand error of ``q`` against the truth, and of the start for comparison
    (a random start's, drawn by the search, from its history's iteration 0)."""
    from cryoorient_ray.core.recovery.align import orientation_errors

    if start.q_true is None:
        return {}
    out = orientation_errors(start.q_true, q, start.symmetry, seed=seed)
    if start.quaternions is not None:
        before = orientation_errors(start.q_true, start.quaternions, start.symmetry, seed=seed)
        out["start_e_or_o4"] = before["e_or_o4"]
        out["start_registration"] = before["registration"]
    elif history and history[0].get("iteration") == 0:
        first = history[0]  # the random orientations' error (before the ab initio phase, when it ran)
        err = first.get("start_error_rad", first.get("error_rad"))
        if err is not None:
            out["start_registration"] = float(err)
    return out


def write_refine_outputs(
    store: ProjectionStore, run: RefineRun, result: GlobalRefineResult, curves: dict, folder: Path, started: float
) -> tuple[dict, dict]:
    """The files of step 4 (module docstring) into ``folder``; returns ``(files, metrics)``.

    ``curves``: the half-map FSC of every iteration (``{iteration: {"frequency", "fsc"}}``);
    ``started``: the :func:`time.perf_counter` reading the stage's time counts from.
    """
    from cryoorient_ray.core.density.volume import DensityMap
    from cryoorient_ray.io.mrc import write_map
    from cryoorient_ray.io.relion import export_relion
    from cryoorient_ray.plots import plot_fsc_iterations, plot_refine_iterations

    start = run.start
    q = np.asarray(result.quaternions, dtype=np.float64)
    shifts = None if result.shifts is None else np.asarray(result.shifts, dtype=np.float64)
    star, mrcs = export_relion(store, folder, rows=start.rows, name="refined", quaternions=q, shifts=shifts)
    q_true = start.q_true if start.q_true is not None else np.full_like(q, np.nan)
    arrays = {"rows": start.rows, "quaternions": q, "quaternions_true": q_true}
    if start.quaternions is not None:
        arrays["quaternions_start"] = start.quaternions
    if shifts is not None:
        arrays["shifts"] = shifts
    atomic_savez(folder / REFINED_NAME, **arrays)
    pixel = float(store.pixel_size) * store.image_size / np.asarray(result.volume).shape[-1]
    files = {"star": star.name, "stack": mrcs.name, "array": REFINED_NAME}
    for key, name, vol in (
        ("map", "map.mrc", result.volume),
        ("half_map_1", "half_map_1.mrc", result.half_maps[0]),
        ("half_map_2", "half_map_2.mrc", result.half_maps[1]),
    ):
        write_map(folder / name, DensityMap(np.asarray(vol, dtype=np.float32), pixel, name=key))
        files[key] = name
    history = _jsonable(list(result.history))
    title = f"{start.protein_name}: {len(start.rows)} projections from {start.kind}"
    shown = [(f"iteration {it}", c["frequency"], c["fsc"]) for it, c in curves.items() if it != "polish"]
    if any(h.get("iteration") == "polish" for h in history):  # the final maps are the polished poses'
        shown.append(("after the local polish", result.fsc.frequency, result.fsc.fsc))
    plot_fsc_iterations(shown, folder / FSC_PLOT, title=title)
    plot_refine_iterations([h for h in history if h.get("iteration") != "polish"], folder / RESOLUTION_PLOT, title)
    files["fsc_iterations"] = FSC_PLOT
    files["resolution_iterations"] = RESOLUTION_PLOT
    metrics = {
        "projections": int(len(start.rows)),
        "start": start.kind,
        "symmetry": run.settings.symmetry,
        "iterations": int(result.state.iteration),
        "initial_model": history[0].get("start") if history else None,
        "halfmap_fsc0143_A": _res(result.fsc.resolution_0143),
        "halfmap_fsc05_A": _res(result.fsc.resolution_05),
    }
    last = next((h for h in reversed(history) if h.get("resolution_05_true_A") is not None), None)
    if last is not None:
        metrics["true_fsc05_A"] = _res(last["resolution_05_true_A"])
    errors = final_errors(start, q, history, run.settings.seed)
    for key in ("e_or_o4", "registration", "start_e_or_o4", "start_registration"):
        if key in errors:
            metrics[key] = round(float(errors[key]), 4)
    metrics["refine_s"] = round(time.perf_counter() - started, 2)
    metrics.update(_ray_nodes_metric("refine"))
    report = {
        "store": start.store_path,
        "protein": start.protein_name,
        "projections": int(len(start.rows)),
        "start": {"kind": start.kind, "source": start.source},
        "initial_model": {
            k: history[0][k]
            for k in ("start", "start_reason", "ab_initio", "symmetry_frame")
            if history and k in history[0]
        },
        "settings": dataclasses.asdict(run.settings),
        "history": history,
        "final": {k: v for k, v in metrics.items() if k not in ("projections", "start")},
        "fsc": result.fsc.to_dict(),
        "errors": errors,
        "seconds": metrics["refine_s"],
    }
    atomic_write_text(folder / REPORT_NAME, json.dumps(_jsonable(report), indent=2) + "\n")
    files["report"] = REPORT_NAME
    return files, {k: v for k, v in metrics.items() if v is not None}


# ----------------------------------------------------------------------------------------------- stage


def check_refine(cfg: RunConfig) -> None:
    """What `cryoorient run` can check of the refine stage before its first stage: the start file and the device."""
    rcfg = cfg.refine
    if not rcfg.enabled:
        return
    rcfg.device()
    if rcfg.start == "star":
        if rcfg.start_file is None:
            raise CryoOrientError("refine.start star needs refine.start_file (the .star file)")
        if not Path(rcfg.start_file).is_file():
            raise CryoOrientError(f"star file not found: {rcfg.start_file} (refine.start_file)")
    elif rcfg.start == "recovered" and rcfg.start_file is not None:
        _recovered_file(rcfg, None)


def stage_refine(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """The pipeline's ``refine`` stage: into ``<run>/refine/``, from ``refine.start`` (default: the run's
    recovered orientations); a stale saved state (another config) is discarded, not an error."""
    t0 = time.perf_counter()
    folder = out / RUN_FOLDER
    run = plan_refinement(cfg, store_path_for(cfg, out), folder, out, restart=False, discard_stale=True)
    folder.mkdir(parents=True, exist_ok=True)
    files, metrics = refine_into(cfg, run, folder, progress)
    outputs = {k: f"{RUN_FOLDER}/{v}" for k, v in files.items()}
    return StageResult.done("refine", t0, outputs=outputs, metrics=metrics)


def run_refine(
    cfg: RunConfig,
    store_path: str,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    restart: bool = False,
) -> tuple[Path, StageResult]:
    """`cryoorient refine STORE START`: the stage alone, into ``out_dir``, with report.html."""
    from cryoorient_ray.report import write_report
    from cryoorient_ray.stages.base import SUMMARY_NAME

    planned: dict[str, RefineRun] = {}
    path = absolute_store_path(store_path)

    def check(target: Path) -> None:  # before the folder is made and Ray starts
        planned["run"] = plan_refinement(cfg, path, target, None, restart=restart, discard_stale=False)

    def stage(folder: Path) -> StageResult:
        t0 = time.perf_counter()
        files, metrics = refine_into(cfg, planned["run"], folder, progress)
        return StageResult.done("refine", t0, outputs=files, metrics=metrics)

    out, results = run_standalone(cfg, out_dir, argv, [stage], needs_ray=cfg.refine.actors > 0, checks=[check])
    write_report(out, json.loads((out / SUMMARY_NAME).read_text()))
    return out, results[0]
