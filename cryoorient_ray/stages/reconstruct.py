"""Reconstruction stage: volume(s) from the projections and recovered orientations, FSC, resolution.

What the ``reconstruct`` stage of `cryoorient run` (and `cryoorient reconstruct`) does, from the
``recovered_orientations.npz`` the recovery wrote and the projection store:

- ``reconstruction.mrc``: the volume from the recovered (gauge-fixed) orientations, in their own
  frame — what a user without ground truth gets — and the two half maps' FSC (gold standard);
- optional refinement by projection matching (``reconstruct.refine_rounds``), then the same;
- with the truth known (simulated data): the recovered orientations registered onto the truth
  (global rotation + hand), the volume from them (``reconstruction_aligned.mrc``), and for
  comparison the volumes from the true orientations and from random ones (the paper's Figure 11),
  each with its FSC against the true map; plots of the FSC curves and of central slices.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryoorient_ray.config import ReconstructConfig, RefineConfig, RunConfig
from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_savez, atomic_write_text
from cryoorient_ray.io.store import ProjectionStore
from cryoorient_ray.stages.base import StageResult, prepare_output_dir, store_path_for, write_summary


@dataclass
class ReconstructionOutcome:
    volumes: dict[str, np.ndarray] = field(default_factory=dict)
    fsc: dict[str, object] = field(default_factory=dict)  # name -> FSCResult
    metrics: dict = field(default_factory=dict)
    refine_history: list[dict] = field(default_factory=list)
    pixel_size: float = 1.0
    rows: np.ndarray | None = None
    refined: np.ndarray | None = None  # (P, 4) refined quaternions, when refinement ran


def wiener_constant(cfg: ReconstructConfig | RefineConfig, store: ProjectionStore) -> float:
    """The Wiener constant of the Fourier reconstruction: given (``cfg.wiener``), or from the simulated SNR.

    ``0.25 / SNR`` (linear, of the working images) for simulated noisy stores, ``1e-2`` for
    noiseless ones, and 1 for stores of unknown SNR (imported particles). The SNR is set at the
    acquisition box; Fourier-cropping to the working box divides the white noise's variance by
    ``(L_acq / L)²`` (the store's ``acquisition.noise_variance_to_working``), and the SNR rises by as much.
    """
    if cfg.wiener is not None:
        return float(cfg.wiener)
    sim = store.manifest.get("config") or {}
    if "noise" not in sim:
        return 1.0
    snr_db = (sim.get("noise") or {}).get("snr_db")
    if snr_db is None:
        return 1e-2
    to_working = float(store.acquisition.get("noise_variance_to_working", 1.0))
    return float(min(max(0.25 * to_working * 10 ** (-float(snr_db) / 10), 1e-2), 100.0))


def load_recovered(path: Path) -> dict:
    """The arrays of a ``recovered_orientations.npz``."""
    if not path.is_file():
        raise CryoOrientError(f"{path} not found: run the recover stage first")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class _Reconstructor:
    """The particles and the reconstruction options of one run: volumes from orientations, FSCs."""

    stack: ParticleStack
    method: str
    options: dict
    mask_radius_fsc: float

    def volume(self, quats: np.ndarray) -> np.ndarray:
        from cryoorient_ray.core.reconstruction.inversion import reconstruct

        r = torch.as_tensor(unitquat_to_rotmat(quats), dtype=torch.float32)
        return np.asarray(reconstruct(self.stack, r, method=self.method, **self.options), dtype=np.float32)

    def fsc(self, a: np.ndarray, b: np.ndarray):
        from cryoorient_ray.core.reconstruction.fsc import fsc

        return fsc(a, b, pixel_size=self.stack.pixel_size_A, mask=self.mask_radius_fsc)


def _refine(recon: _Reconstructor, q: np.ndarray, cfg: RunConfig, truth: tuple, progress, out) -> np.ndarray:
    """Projection-matching refinement (``reconstruct.refine_rounds``) into ``out``; the refined ``(P, 4)``."""
    from cryoorient_ray.core.refinement.local import refine_orientations

    t0 = time.perf_counter()
    q_true, truth_map = truth
    res = refine_orientations(
        recon.stack,
        q,
        rounds=cfg.reconstruct.refine_rounds,
        wiener=recon.options["wiener"],
        q_true=q_true,
        reference=truth_map,
        progress=progress,
        seed=cfg.seed,
    )
    out.refined = np.asarray(res.quaternions, dtype=np.float64)
    out.refine_history = [dict(res.initial, round=0), *res.history] if res.initial else list(res.history)
    out.metrics["refine_s"] = round(time.perf_counter() - t0, 2)
    return out.refined


def _compare_with_truth(recon: _Reconstructor, q_use, q_true, truth_map, symmetry: str, seed: int, out) -> None:
    """The recovered orientations registered onto the truth, and the Figure 11 volumes, into ``out``."""
    from cryoorient_ray.core.recovery.align import align_rotation

    reg = align_rotation(q_true, q_use, symmetry=symmetry)
    out.metrics["registration_rad"] = round(float(reg.mean), 4)
    out.volumes["recovered (aligned)"] = recon.volume(np.asarray(reg.apply(q_use)))
    out.volumes["true orientations"] = recon.volume(q_true)
    out.volumes["random orientations"] = recon.volume(sample_orientations(len(q_use), seed=seed + 99))
    out.volumes["true map"] = truth_map
    for name in ("recovered (aligned)", "true orientations", "random orientations"):
        res = recon.fsc(out.volumes[name], truth_map)
        out.fsc[name + " vs true map"] = res
        key = name.split(" ")[0]
        out.metrics[f"{key}_fsc05_A"] = _res(res.resolution_05)
        out.metrics[f"{key}_fsc0143_A"] = _res(res.resolution_0143)


def reconstruct_from_recovery(
    store: ProjectionStore,
    recovered: dict,
    cfg: RunConfig,
    progress=None,
) -> ReconstructionOutcome:
    """Volumes, half maps, FSC curves (and refinement) for one recovered protein of ``store``."""
    from cryoorient_ray.core.reconstruction.inversion import half_maps

    rcfg = cfg.reconstruct
    rows = np.asarray(recovered["rows"], dtype=np.int64)
    q = np.asarray(recovered["quaternions"], dtype=np.float64)
    if len(rows) != len(q):
        raise CryoOrientError(f"{len(rows)} rows but {len(q)} orientations in the recovery file")
    options = {"wiener": wiener_constant(rcfg, store)}
    if rcfg.mask_radius is not None:
        options["mask_radius"] = rcfg.mask_radius
    recon = _Reconstructor(store.particles(rows), rcfg.method, options, store.image_size / 2 - 1)
    protein = int(store.read_metadata(rows, names=["protein"])["protein"][0])
    q_true = recovered.get("quaternions_true")
    has_truth = q_true is not None and bool(np.isfinite(q_true).all())
    truth = store.read_volume(protein).astype(np.float32) if has_truth and store.has_volume(protein) else None

    out = ReconstructionOutcome(pixel_size=store.pixel_size, rows=rows)
    q_use = q
    if rcfg.refine_rounds > 0:
        q_use = _refine(recon, q, cfg, (q_true if has_truth else None, truth), progress, out)
    out.metrics["refined"] = bool(rcfg.refine_rounds > 0)

    t1 = time.perf_counter()
    r_use = torch.as_tensor(unitquat_to_rotmat(q_use), dtype=torch.float32)
    out.volumes["recovered"] = recon.volume(q_use)
    h1, h2 = half_maps(recon.stack, r_use, split=cfg.seed, method=rcfg.method, **options)
    half = recon.fsc(np.asarray(h1), np.asarray(h2))
    out.fsc["half maps (recovered)"] = half
    out.metrics["halfmap_fsc05_A"] = _res(half.resolution_05)
    out.metrics["halfmap_fsc0143_A"] = _res(half.resolution_0143)
    if truth is not None:
        symmetry = store.symmetries().get(protein) or "C1"
        _compare_with_truth(recon, q_use, q_true, truth, symmetry, cfg.seed, out)
    out.metrics["reconstruct_s"] = round(time.perf_counter() - t1, 2)
    out.metrics["projections"] = int(len(rows))
    out.metrics["pixel_size_A"] = store.pixel_size
    return out


def _res(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 2)


def stage_reconstruct(
    cfg: RunConfig,
    out: Path,
    progress: bool = True,
    store_path: str | None = None,
    orientations: str = "recovered_orientations.npz",
) -> StageResult:
    """Volumes from the recovered orientations (and, with the truth, the Figure 11 comparison); FSC.

    ``orientations`` (relative to ``out``): the orientations file, ``recovered_orientations.npz`` or,
    after the ``refine`` stage, its ``refine/refined_orientations.npz`` (the same arrays).
    """
    from cryoorient_ray.core.density.volume import DensityMap
    from cryoorient_ray.io.mrc import write_map
    from cryoorient_ray.plots import plot_fsc, plot_refinement, plot_volume_slices

    t0 = time.perf_counter()
    store = ProjectionStore.open(store_path or store_path_for(cfg, out))
    recovered = load_recovered(out / orientations)
    outcome = reconstruct_from_recovery(store, recovered, cfg)
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

        star, mrcs = export_relion(store, out, rows=outcome.rows, name="refined", quaternions=outcome.refined)
        files["refined_star"] = star.name
        files["refined_stack"] = mrcs.name
    if outcome.refine_history:
        plot_refinement(outcome.refine_history, out / "refinement.png")
        files["refinement"] = "refinement.png"
        atomic_write_text(out / "refinement.json", json.dumps(outcome.refine_history, indent=2) + "\n")
    return StageResult.done(
        "reconstruct",
        t0,
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

    src = Path(orientations)
    if not src.is_file():
        raise CryoOrientError(f"orientations file not found: {src}")
    store = ProjectionStore.open(store_path)  # a missing or damaged store stops here, before the run folder
    out = prepare_output_dir(cfg, out_dir, argv)
    target = out / "recovered_orientations.npz"
    if src.suffix == ".npz":
        if src.resolve() != target.resolve():
            shutil.copyfile(src, target)
    else:
        q = read_orientations_star(src)
        rows = store.done_rows()
        if len(rows) != len(q):
            raise CryoOrientError(f"{src} has {len(q)} orientations but {store_path} has {len(rows)} images")
        atomic_savez(target, rows=rows, quaternions=q, quaternions_true=np.full_like(q, np.nan))
    result = stage_reconstruct(cfg, out, store_path=store_path)
    write_summary(out, cfg, [result])
    return out, result
