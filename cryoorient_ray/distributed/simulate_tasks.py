"""Simulation at scale: density maps prepared in parallel, one Ray task per store shard.

Flow (driver):
  1. expand the inputs (files, folders, ids, ``pseudo[:SEED]``) into one entry per protein;
  2. if the store exists with the same config, resume: read its maps back and render only the
     shards whose done flag is missing; with a different config, stop with an error;
  3. otherwise prepare every map in parallel (Ray tasks), draw every projection's parameters
     (deterministic for the seed), write the store skeleton into a temporary folder and move it
     into place, so a store at the final path always has its maps and metadata;
  4. render the missing shards as Ray tasks (bounded in flight), with a progress bar.
A shard becomes visible (done flag) only after all its images are written.

Acquisition box (``simulate.acquisition``): when it differs from the working box, maps are
prepared at the acquisition box and pixel size, each shard renders there (shifts scaled from
working to acquisition pixels, CTF at the acquisition pixel size, noise at the SNR set on the
acquisition image) and Fourier-crops to the working box. The store keeps the working map
(the 3-D Fourier crop of the acquisition map) as each protein's map and the acquisition map beside
it, the working pixel size, shifts in working pixels, σ² per acquisition pixel, and the
``acquisition`` manifest record. With the acquisition unset the store is bit for bit the one made
before it existed (same config hash, same images).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cryoorient_ray.config import InputSpec, SimulateConfig
from cryoorient_ray.core.imaging.forward import fourier_crop_volume
from cryoorient_ray.core.imaging.parameters import sample_projection_parameters
from cryoorient_ray.distributed.runtime import current_node_id, record_nodes
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import strip_suffixes
from cryoorient_ray.io.store import ProjectionStore, config_hash, is_url, store_exists

log = logging.getLogger(__name__)
DEFAULT_MODEL_VOXEL_SIZE = 3.0


@dataclass
class ProteinEntry:
    """One protein of the dataset, as recorded in the store manifest."""

    name: str
    source: str
    symmetry: str
    heldout: bool
    count: int  # projections of this protein


def resolve_inputs(sim: SimulateConfig) -> list[ProteinEntry]:
    """Expand folders, apply defaults, and give every protein a unique name."""
    from cryoorient_ray.io.maps import expand_sources

    entries: list[ProteinEntry] = []
    for item in sim.inputs:
        spec = item if isinstance(item, InputSpec) else InputSpec(source=item)
        sources = expand_sources([spec.source])
        for src in sources:
            name = spec.name if (spec.name and len(sources) == 1) else _name_of(src)
            entries.append(
                ProteinEntry(
                    name=name,
                    source=str(src),
                    symmetry=spec.symmetry or sim.orientations.symmetry,
                    heldout=spec.heldout,
                    count=spec.n_per_map or sim.n_per_map,
                )
            )
    if not entries:
        raise CryoOrientError("simulate.inputs is empty: give at least one model, map, id or 'pseudo'")
    seen: dict[str, int] = {}
    for e in entries:
        if e.name in seen:
            seen[e.name] += 1
            e.name = f"{e.name}_{seen[e.name]}"
        else:
            seen[e.name] = 0
    return entries


def _name_of(source: str) -> str:
    from cryoorient_ray.io.models import MODEL_SUFFIXES
    from cryoorient_ray.io.mrc import MAP_SUFFIXES

    return strip_suffixes(Path(str(source)).name, MAP_SUFFIXES + MODEL_SUFFIXES).replace(":", "_") or "map"


def _is_model(source: str) -> bool:
    from cryoorient_ray.io.maps import source_kind

    return source_kind(source) == "model"


def _unwrap(exc: Exception, what: str) -> CryoOrientError:
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, CryoOrientError):
        text = str(cause)
        return CryoOrientError(text if text.startswith(what) else f"{what}: {text}")
    return CryoOrientError(f"{what}: {type(cause).__name__}: {cause}")


@ray.remote(num_cpus=1)
def _prepare_map_task(
    source: str, voxel_size: float | None, resolution: float | None, image_size: int, cache_dir
) -> tuple[np.ndarray, float]:
    """The map of ``source`` prepared at ``voxel_size`` (None: its own; 3 Å for models) in an ``image_size`` box."""
    import torch

    from cryoorient_ray.core.density.volume import prepare_map
    from cryoorient_ray.io.maps import PSEUDO_DEFAULTS, is_pseudo_source, load_density

    torch.set_num_threads(1)
    if voxel_size is None and _is_model(source):
        voxel_size = DEFAULT_MODEL_VOXEL_SIZE
    # the pseudo-protein is built in its default box unless the image box is larger: at a fine
    # pixel (e.g. 116² at 1.66 Å) its 64 voxels would not hold it
    box = image_size if is_pseudo_source(source) and image_size > PSEUDO_DEFAULTS["box_size"] else None
    density = load_density(source, voxel_size=voxel_size, resolution=resolution, box_size=box, cache_dir=cache_dir)
    prepared = prepare_map(density, box_size=image_size, voxel_size=voxel_size)
    return prepared.data.astype(np.float32), float(prepared.voxel_size)


@dataclass(frozen=True)
class ShardRenderSettings:
    """What every shard's Ray task needs besides its shard index and the maps of its proteins.

    Attributes:
        store_path: the store being written (local path or URL).
        seed: the run's seed; shard ``k`` draws its noise from ``seed * 1_000_003 + k``.
        pixel_size: Å per working pixel (the store's pixel size).
        backend: projector backend (:func:`cryoorient_ray.core.imaging.projection.make_projector`).
        snr_db: per-image SNR of the added Gaussian noise (dB), set at the acquisition box; None = noiseless.
        ctf: microscope optics ``{"voltage": kV, "cs": mm, "amplitude_contrast": Q0}`` when the
            CTF is applied (defoci come from each row's metadata), else None.
        acquisition_size, acquisition_pixel_size: the box (pixels) and pixel size (Å) images are
            rendered at before the Fourier crop to the working box; None when that is the working box.
    """

    store_path: str
    seed: int
    pixel_size: float
    backend: str
    snr_db: float | None
    ctf: dict | None
    acquisition_size: int | None = None
    acquisition_pixel_size: float | None = None


def shard_render_settings(sim: SimulateConfig, seed: int, store: ProjectionStore, path: str) -> ShardRenderSettings:
    """What the shard tasks of ``store`` need; the acquisition box and pixel come from its manifest."""
    optics = {"voltage": sim.ctf.voltage, "cs": sim.ctf.cs, "amplitude_contrast": sim.ctf.amplitude_contrast}
    acq = store.acquisition
    cropped = int(acq["image_size"]) != store.image_size
    return ShardRenderSettings(
        store_path=path,
        seed=seed,
        pixel_size=store.pixel_size,
        backend=sim.backend,
        snr_db=sim.noise.snr_db,
        ctf=optics if sim.ctf.enabled else None,
        acquisition_size=int(acq["image_size"]) if cropped else None,
        acquisition_pixel_size=float(acq["pixel_size"]) if cropped else None,
    )


@ray.remote(num_cpus=1)
def _render_shard_task(settings: ShardRenderSettings, shard: int, volume_refs: dict) -> tuple[int, float, str]:
    """Render and write one shard (one CPU, one torch thread); returns ``(shard, seconds, node id)``.

    ``volume_refs``: object refs of the maps the shard's proteins are rendered from, by protein index:
    ``(L, L, L)``, or ``(L_acq,)*3`` with an acquisition box (:class:`ShardRenderSettings`).
    """
    import torch

    from cryoorient_ray.core.imaging.forward import render_projections
    from cryoorient_ray.core.imaging.projection import make_projector

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    store = ProjectionStore.open(settings.store_path, mode="r+", verify=False)
    start, stop = store.shard_range(shard)
    meta = store.read_metadata(slice(start, stop))
    size = store.image_size
    images = np.zeros((stop - start, size, size), dtype=np.float32)
    noise_var = np.zeros(stop - start, dtype=np.float32)
    keep_clean = store.has_clean  # stores with noise or CTF keep the clean projections for fresh training noise
    clean = np.zeros_like(images) if keep_clean else None
    clean_var = np.zeros(stop - start, dtype=np.float32) if keep_clean else None
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + int(shard))
    acq_size = settings.acquisition_size
    shifts = meta["shift"] if acq_size is None else meta["shift"] * (acq_size / size)  # to acquisition pixels
    for protein in np.unique(meta["protein"]):
        rows = np.flatnonzero(meta["protein"] == protein)
        volume = np.array(ray.get(volume_refs[int(protein)]))  # a writable copy of the shared map
        projector = make_projector(torch.as_tensor(volume), backend=settings.backend)
        rendered = render_projections(
            volume,
            meta["quaternion"][rows],
            shifts[rows],
            pixel_size=settings.pixel_size if acq_size is None else settings.acquisition_pixel_size,
            ctf=settings.ctf,
            defocus_u=meta["defocus_u"][rows],
            defocus_v=meta["defocus_v"][rows],
            defocus_angle=meta["defocus_angle"][rows],
            snr_db=settings.snr_db,
            generator=generator,
            projector=projector,
            output_size=None if acq_size is None else size,
            return_clean=keep_clean,
        )
        images[rows], noise_var[rows] = rendered[0], rendered[1]
        if keep_clean:
            clean[rows], clean_var[rows] = rendered[2], rendered[3]
    store.write_shard(shard, images, noise_var, clean, clean_var)
    return shard, time.perf_counter() - t0, current_node_id()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _prepare_maps(
    entries: list[ProteinEntry], sim: SimulateConfig, cache_dir, progress: bool
) -> tuple[list[ProteinEntry], list[np.ndarray], float]:
    """The loadable entries with their maps at the acquisition box and pixel size, and that pixel size."""
    voxel_size = sim.acquisition_pixel_size()
    box = sim.acquisition_size
    refs = [_prepare_map_task.remote(e.source, voxel_size, sim.resolution, box, cache_dir) for e in entries]
    kept, volumes, sizes, failed = [], [], [], []
    with _progress(progress) as bar:
        task = bar.add_task("preparing maps", total=len(refs))
        pending = dict(zip(refs, entries, strict=True))
        results: dict[int, tuple] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            entry = pending.pop(ref)
            try:
                results[id(entry)] = ray.get(ref)
            except Exception as exc:  # a RayTaskError wrapping the loader's error
                err = _unwrap(exc, entry.source)
                if box != sim.image_size and "does not fit" in str(err):
                    err = CryoOrientError(f"{err} (the acquisition box, simulate.acquisition.image_size)")
                if not sim.skip_failed_inputs:
                    for r in pending:
                        ray.cancel(r)
                    raise err from None
                failed.append(str(err))
            bar.advance(task)
    for entry in entries:
        if id(entry) in results:
            data, vs = results[id(entry)]
            kept.append(entry)
            volumes.append(data)
            sizes.append(vs)
    for msg in failed:
        log.warning("skipped %s", msg)
    if not kept:
        raise CryoOrientError("no input could be loaded")
    if max(sizes) - min(sizes) > 1e-3 * max(sizes):
        detail = ", ".join(f"{e.name} {s:.3g} Å" for e, s in zip(kept, sizes, strict=True))
        raise CryoOrientError(f"inputs have different voxel sizes ({detail}); set simulate.voxel_size")
    return kept, volumes, float(sizes[0])


def _settings_fingerprint(sim: SimulateConfig, seed: int) -> tuple[dict, str]:
    """The config a store records and its hash; an unset acquisition is left out, so stores made
    before it existed keep their hash (and resume)."""
    exclude = {"store", "backend"} | ({"acquisition"} if sim.acquisition_unset else set())
    cfg = sim.model_dump(mode="json", exclude=exclude)
    cfg["seed"] = seed
    return cfg, config_hash(cfg)


def _ctf_ranges(sim: SimulateConfig) -> dict | None:
    """Defocus and astigmatism ranges (Å) the parameters are drawn from, None without CTF."""
    if not sim.ctf.enabled:
        return None
    return {
        "defocus_min": sim.ctf.defocus_min,
        "defocus_max": sim.ctf.defocus_max,
        "astigmatism_max": sim.ctf.astigmatism_max,
    }


def _projection_metadata(sim: SimulateConfig, seed: int, counts: list[int]) -> dict[str, np.ndarray]:
    """Every projection's parameters, ``counts[k]`` rows for protein ``k``, in protein order
    (deterministic for the seed)."""
    parts = []
    for k, n in enumerate(counts):
        p = sample_projection_parameters(
            n,
            seed,
            k,
            sampler=sim.orientations.sampler,
            coverage=sim.orientations.coverage,
            max_shift=sim.shifts.max_shift,
            shift_distribution=sim.shifts.distribution,
            ctf=_ctf_ranges(sim),
            split_fractions=sim.splits.fractions(),
        )
        p["protein"] = np.full(n, k, dtype=np.int32)
        parts.append(p)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _acquisition_record(sim: SimulateConfig, acquisition_pixel_size: float) -> dict:
    """The manifest's ``acquisition``: where the images were simulated and what ``noise_variance`` means."""
    size, box = sim.image_size, sim.acquisition_size
    return {
        "image_size": int(box),
        "pixel_size": float(acquisition_pixel_size),
        "snr_db": sim.noise.snr_db,
        "noise_variance_box": "acquisition",
        "noise_variance_to_working": (size / box) ** 2,
    }


def _manifest(
    sim: SimulateConfig,
    entries: list[ProteinEntry],
    fingerprint: tuple[dict, str],
    pixel_size: float,
    acquisition_pixel_size: float,
) -> dict:
    starts = np.concatenate([[0], np.cumsum([e.count for e in entries])]).astype(int)
    proteins = [
        {
            "name": e.name,
            "source": e.source,
            "symmetry": e.symmetry,
            "heldout": e.heldout,
            "start": int(starts[k]),
            "count": e.count,
        }
        for k, e in enumerate(entries)
    ]
    return {
        "config": fingerprint[0],
        "config_hash": fingerprint[1],
        "pixel_size": pixel_size,
        "proteins": proteins,
        "has_orientations": True,
        "optics": {"voltage": sim.ctf.voltage, "cs": sim.ctf.cs, "amplitude_contrast": sim.ctf.amplitude_contrast},
        "ctf_applied": sim.ctf.enabled,
        "ctf_ranges": _ctf_ranges(sim),  # what fresh training CTFs are drawn from
        "source": "simulated",
        "acquisition": _acquisition_record(sim, acquisition_pixel_size),
    }


def _build_store(
    path: str, sim: SimulateConfig, seed: int, fingerprint: tuple[dict, str], progress: bool, cache_dir
) -> ProjectionStore:
    """The store skeleton (maps, metadata, no images), written into a temporary folder and moved
    into place (local stores), so a store at the final path always has its maps and metadata."""
    entries, volumes, acq_pixel = _prepare_maps(resolve_inputs(sim), sim, cache_dir, progress)
    cropped = sim.acquisition_size != sim.image_size
    pixel_size = sim.working_pixel_size(acq_pixel) if cropped else acq_pixel
    metadata = _projection_metadata(sim, seed, [e.count for e in entries])
    manifest = _manifest(sim, entries, fingerprint, pixel_size, acq_pixel)
    local = not is_url(path)
    target = Path(path)
    build_path = str(target.with_name(f".{target.name}.creating-{os.getpid()}")) if local else path
    if local and Path(build_path).exists():
        shutil.rmtree(build_path)
    clean = sim.noise.snr_db is not None or sim.ctf.enabled  # what fresh training noise is drawn on
    store = ProjectionStore.create(
        build_path, manifest, len(metadata["protein"]), sim.image_size, sim.shard_size, clean=clean
    )
    for k, vol in enumerate(volumes):
        store.write_volume(k, fourier_crop_volume(vol, sim.image_size) if cropped else vol)
        if cropped:
            store.write_volume(k, vol, acquisition=True)
    store.write_metadata(metadata)
    if local:
        os.replace(build_path, target)
        store = ProjectionStore.open(target, mode="r+")
    return store


def check_resumable(path: str, sim: SimulateConfig, seed: int, mode: str = "r") -> ProjectionStore:
    """The existing store at ``path``, opened, if ``simulate`` may resume it (same config, arrays intact).

    Raises:
        CryoOrientError: not a store, an array's metadata gone, or made with a different config.
    """
    store = ProjectionStore.open(path, mode=mode, verify=False)
    store.check_arrays()
    if store.manifest.get("config_hash") != _settings_fingerprint(sim, seed)[1]:
        raise CryoOrientError(f"{path} exists and was made with a different config; choose another output or delete it")
    return store


def check_simulate_inputs(sim: SimulateConfig, seed: int, path: str) -> None:
    """Before Ray starts: an existing store at ``path`` must be resumable, else every input must exist."""
    from cryoorient_ray.io.maps import check_source

    if store_exists(path):
        check_resumable(path, sim, seed)
        return
    for entry in resolve_inputs(sim):
        check_source(entry.source)


def open_for_resume(path: str, sim: SimulateConfig, seed: int) -> ProjectionStore:
    """The existing store at ``path`` made with the same config, its damaged shards unflagged.

    Raises:
        CryoOrientError: as :func:`check_resumable`.
    """
    store = check_resumable(path, sim, seed, mode="r+")
    damaged = store.damaged_shards()
    if damaged:
        log.warning("%s: %s; rendering them again", path, store.damage_report(damaged))
        store.clear_shards(damaged)
    log.info("resuming %s: %d/%d shards already done", path, store.done_shards().sum(), store.n_shards)
    return store


def _render_shards(
    store: ProjectionStore, settings: ShardRenderSettings, todo: list[int], progress: bool, limit: int
) -> None:
    """The ``todo`` shards as Ray tasks, at most ``limit`` in flight, each given only its proteins' maps."""
    acq = settings.acquisition_size is not None
    volume_refs = {k: ray.put(store.read_volume(k, acquisition=acq)) for k in range(len(store.manifest["proteins"]))}
    shard_proteins = store.group["protein"]
    queue = list(todo)
    in_flight: dict = {}
    with _progress(progress) as bar:
        task = bar.add_task("rendering shards", total=store.n_shards, completed=store.n_shards - len(todo))
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                k = queue.pop(0)
                start, stop = store.shard_range(k)
                used = {int(p) for p in np.unique(shard_proteins[start:stop])}
                refs = {p: volume_refs[p] for p in used}
                in_flight[_render_shard_task.remote(settings, k, refs)] = k
            done, _ = ray.wait(list(in_flight), num_returns=1)
            shard = in_flight.pop(done[0])
            try:
                record_nodes("simulate", [ray.get(done[0])[2]])
            except Exception as exc:
                for r in in_flight:
                    ray.cancel(r)
                raise _unwrap(exc, f"shard {shard}") from None
            bar.advance(task)


def simulate_store(
    sim: SimulateConfig,
    seed: int,
    path: str | os.PathLike,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    max_in_flight: int | None = None,
) -> ProjectionStore:
    """Create (or finish) the projection store at ``path`` for ``sim``. Ray must be initialised.

    ``max_in_flight``: shard tasks submitted at once (default: twice the available CPUs, at least 2).
    A store this call created is removed again when rendering fails before any shard is done, so a
    failed first run leaves nothing that blocks the next one.
    """
    path = str(path)
    if store_exists(path):
        store, fresh = open_for_resume(path, sim, seed), False
    else:
        store, fresh = _build_store(path, sim, seed, _settings_fingerprint(sim, seed), progress, cache_dir), True
    todo = [int(k) for k in np.flatnonzero(~store.done_shards())]
    try:
        if todo:
            limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
            _render_shards(store, shard_render_settings(sim, seed, store, path), todo, progress, limit)
    except BaseException:
        if fresh and not is_url(path) and not store.done_shards().any():
            shutil.rmtree(path, ignore_errors=True)
        raise
    store = ProjectionStore.open(path, mode="r")
    if not store.is_complete:
        raise CryoOrientError(f"{path} is still incomplete after simulation")
    return store
