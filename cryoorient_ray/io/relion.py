"""RELION particle stacks (.star + .mrcs) to and from projection stores.

Export writes a RELION 3.1+ star file (``data_optics`` + ``data_particles``) and one .mrcs
stack. Import reads RELION 3.1+ files (optics groups) and RELION 3.0 files (optics values in the
particles table), with images in any number of .mrcs stacks, into a new projection store.

Conventions:
- Angles: ``rlnAngleRot/Tilt/Psi`` (degrees) ↔ quaternions, as in docs/CONVENTIONS.md.
- Shifts: our shift ``t`` (pixels) moves the object's centre to ``L//2 + t``. RELION's
  ``rlnOriginX/YAngst`` is the translation that re-centres the particle (``relion_project``
  shifts a centred projection by ``-origin``), so ``rlnOriginXAngst = -t_x · pixel_size``.
- CTF: ``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (degrees), ``rlnPhaseShift`` (0; readers such as
  cryoDRGN need it), ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``.
- Files: every block preceded by RELION 3.1's ``# version 30001`` line; the .mrcs header carries
  the pixel size and the statistics (dmin, dmax, dmean, rms).
- ``rlnMicrographName`` carries the protein name, ``rlnRandomSubset`` alternates 1/2 for half maps.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryoorient_ray.core.geometry.euler import euler_relion_to_unitquat, unitquat_to_euler_relion
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path
from cryoorient_ray.io.star import write_star_blocks
from cryoorient_ray.io.store import SPLIT_CODES, ProjectionStore, split_codes

log = logging.getLogger(__name__)


def export_relion(
    store: ProjectionStore,
    out_dir: str | os.PathLike,
    rows: np.ndarray | None = None,
    name: str = "particles",
    quaternions: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.star`` and ``<name>.mrcs`` for ``rows`` (default: all completed rows).

    ``quaternions`` (``(len(rows), 4)``, wxyz) replaces the store's orientations in the .star
    (recovered orientations); by default the store's own (true) angles are written, if any.
    ``shifts`` (``(len(rows), 2)`` pixels, refined) replaces the store's shifts likewise.
    Returns ``(star_path, mrcs_path)``. Both appear only when fully written.
    """
    done = store.done_rows()
    rows = done if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise CryoOrientError(f"{store.path}: nothing to export (no completed rows selected)")
    missing = np.setdiff1d(rows, done)
    if len(missing):
        raise CryoOrientError(f"{store.path}: {len(missing)} selected rows are in shards not yet written")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = store.manifest
    pix, size = float(m["pixel_size"]), store.image_size
    meta = store.read_metadata(rows)
    optics = m.get("optics", {})
    mrcs_path, star_path = out / f"{name}.mrcs", out / f"{name}.star"

    with atomic_path(mrcs_path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(len(rows), size, size), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pix
            for a in range(0, len(rows), 1024):
                mrc.data[a : a + 1024] = store.read_images(rows[a : a + 1024])
            mrc.update_header_stats()  # dmin, dmax, dmean, rms

    optics_df = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [float(optics.get("amplitude_contrast", 0.1))],
            "rlnSphericalAberration": [float(optics.get("cs", 2.7))],
            "rlnVoltage": [float(optics.get("voltage", 300.0))],
            "rlnImagePixelSize": [pix],
            "rlnImageSize": [size],
            "rlnImageDimensionality": [2],
        }
    )
    names = [p["name"] for p in m.get("proteins", [])]
    particles = {"rlnImageName": [f"{k + 1:06d}@{mrcs_path.name}" for k in range(len(rows))]}
    if quaternions is not None:
        quaternions = np.asarray(quaternions, dtype=np.float64)
        if quaternions.shape != (len(rows), 4):
            raise CryoOrientError(f"{len(rows)} rows but quaternions of shape {quaternions.shape}")
        euler = np.asarray(unitquat_to_euler_relion(quaternions))
        for k, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            particles[col] = euler[:, k]
    elif m.get("has_orientations", True):
        for k, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            particles[col] = meta["euler"][:, k]
    shift = meta["shift"] if shifts is None else np.asarray(shifts, dtype=np.float64)
    if shift.shape != (len(rows), 2):
        raise CryoOrientError(f"{len(rows)} rows but shifts of shape {shift.shape}")
    particles["rlnOriginXAngst"] = -shift[:, 0].astype(np.float64) * pix
    particles["rlnOriginYAngst"] = -shift[:, 1].astype(np.float64) * pix
    if m.get("ctf_applied", False):
        particles["rlnDefocusU"] = meta["defocus_u"].astype(np.float64)
        particles["rlnDefocusV"] = meta["defocus_v"].astype(np.float64)
        particles["rlnDefocusAngle"] = meta["defocus_angle"].astype(np.float64)
        particles["rlnPhaseShift"] = np.zeros(len(rows))  # cryoDRGN reads NaN without it
    particles["rlnOpticsGroup"] = np.ones(len(rows), dtype=int)
    particles["rlnRandomSubset"] = (np.arange(len(rows)) % 2) + 1
    if names:
        particles["rlnMicrographName"] = [names[p] if 0 <= p < len(names) else "unknown" for p in meta["protein"]]
    write_star_blocks(star_path, {"optics": optics_df, "particles": pd.DataFrame(particles)})
    return star_path, mrcs_path


def _read_star(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if not path.is_file():
        raise CryoOrientError(f"star file not found: {path}")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise CryoOrientError(f"cannot read {path} as a .star file: {exc}") from None
    particles = blocks.get("particles")
    if particles is None:  # RELION 3.0 and older: one unnamed block
        particles = next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnImageName" in b), None)
    if not isinstance(particles, pd.DataFrame) or "rlnImageName" not in particles:
        raise CryoOrientError(f"{path} has no particles table with rlnImageName")
    optics = blocks.get("optics")
    return particles.reset_index(drop=True), optics if isinstance(optics, pd.DataFrame) else None


def _optics_value(particles: pd.DataFrame, optics: pd.DataFrame | None, label: str, default=None):
    """Per-particle values of ``label`` from the particles table, else via the optics group."""
    if label in particles:
        return particles[label].to_numpy()
    if optics is not None and label in optics:
        if "rlnOpticsGroup" in particles and "rlnOpticsGroup" in optics:
            table = dict(zip(optics["rlnOpticsGroup"], optics[label], strict=True))
            return particles["rlnOpticsGroup"].map(table).to_numpy()
        return np.full(len(particles), optics[label].iloc[0])
    if default is None:
        return None
    return np.full(len(particles), default)


def _pixel_size(particles: pd.DataFrame, optics: pd.DataFrame | None, path: Path) -> float:
    pix = _optics_value(particles, optics, "rlnImagePixelSize")
    if pix is None:
        det, mag = particles.get("rlnDetectorPixelSize"), particles.get("rlnMagnification")
        if det is not None and mag is not None:
            pix = det.to_numpy() * 1e4 / mag.to_numpy()
    if pix is None:
        raise CryoOrientError(f"{path}: no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize + rlnMagnification)")
    pix = np.asarray(pix, dtype=float)
    if np.ptp(pix) > 1e-4 * pix.max():
        raise CryoOrientError(f"{path}: optics groups have different pixel sizes ({sorted(set(pix))}); split the file")
    return float(pix[0])


def _load_images(particles: pd.DataFrame, star_path: Path) -> np.ndarray:
    """All particle images, in table order, from ``index@stack.mrcs`` names (relative to the star file)."""
    parsed = []
    for name in particles["rlnImageName"].astype(str):
        idx, sep, file = name.partition("@")
        if not sep or not idx.strip().isdigit():
            raise CryoOrientError(f"{star_path}: rlnImageName {name!r} is not of the form index@stack.mrcs")
        parsed.append((int(idx) - 1, file))
    files = {f for _, f in parsed}
    stacks = {}
    for f in files:
        p = Path(f) if Path(f).is_absolute() else star_path.parent / f
        if not p.is_file():
            raise CryoOrientError(f"{star_path}: image stack not found: {p}")
        try:
            stacks[f] = mrcfile.mmap(p, mode="r", permissive=True)
        except Exception as exc:
            raise CryoOrientError(f"cannot read image stack {p}: {exc}") from None
    try:
        first = next(iter(stacks.values())).data
        size = first.shape[-1]
        images = np.empty((len(parsed), size, size), dtype=np.float32)
        for k, (idx, f) in enumerate(parsed):
            data = stacks[f].data
            data = data[None] if data.ndim == 2 else data
            if data.shape[-2:] != (size, size):
                raise CryoOrientError(f"{star_path}: stack {f} has images of {data.shape[-2:]}, others {size}²")
            if not 0 <= idx < data.shape[0]:
                raise CryoOrientError(f"{star_path}: image {idx + 1}@{f} is beyond the stack's {data.shape[0]} images")
            images[k] = data[idx]
    finally:
        for s in stacks.values():
            s.close()
    return images


def read_star_particles(star_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The particles of a RELION .star: images ``(N, L, L)`` float32 (from their stacks, in table order)
    and orientations ``(N, 4)`` wxyz (None when the table has no angles)."""
    star_path = Path(star_path)
    particles, _ = _read_star(star_path)
    images = _load_images(particles, star_path)
    angle_cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if not all(c in particles for c in angle_cols):
        return images, None
    return images, np.asarray(euler_relion_to_unitquat(particles[angle_cols].to_numpy(float)))


def _particle_metadata(particles: pd.DataFrame, pix: float, n: int, split: str) -> tuple[dict, bool, bool]:
    """The store's per-sample arrays from a particles table; ``(arrays, has_angles, has_ctf)``."""
    angle_cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    has_angles = all(c in particles for c in angle_cols)
    euler = particles[list(angle_cols)].to_numpy(float) if has_angles else np.full((n, 3), np.nan)
    quat = euler_relion_to_unitquat(euler) if has_angles else np.full((n, 4), np.nan)
    if "rlnOriginXAngst" in particles:
        origin = particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float) / pix
    elif "rlnOriginX" in particles:  # RELION 3.0: pixels
        origin = particles[["rlnOriginX", "rlnOriginY"]].to_numpy(float)
    else:
        origin = np.zeros((n, 2))
    has_ctf = "rlnDefocusU" in particles
    du = particles["rlnDefocusU"].to_numpy(float) if has_ctf else np.zeros(n)
    dv = particles["rlnDefocusV"].to_numpy(float) if "rlnDefocusV" in particles else du
    da = particles["rlnDefocusAngle"].to_numpy(float) if "rlnDefocusAngle" in particles else np.zeros(n)
    arrays = {
        "quaternion": quat,
        "euler": euler,
        "shift": -origin,
        "defocus_u": du,
        "defocus_v": dv,
        "defocus_angle": da,
        "protein": np.zeros(n, dtype=np.int32),
        "split": np.full(n, SPLIT_CODES[split], dtype=np.uint8),
    }
    return arrays, has_angles, has_ctf


def _optics(particles: pd.DataFrame, optics: pd.DataFrame | None, star_path: Path) -> dict[str, float]:
    """Voltage, Cs and amplitude contrast (the first optics group's, with a warning when groups differ)."""
    values = {
        key: _optics_value(particles, optics, label, default)
        for key, label, default in (
            ("voltage", "rlnVoltage", 300.0),
            ("cs", "rlnSphericalAberration", 2.7),
            ("amplitude_contrast", "rlnAmplitudeContrast", 0.1),
        )
    }
    for key, vals in values.items():
        if np.ptp(np.asarray(vals, float)) > 0:
            log.warning("%s: optics groups differ in %s; the store keeps the first group's value", star_path, key)
    return {k: float(np.asarray(v, float)[0]) for k, v in values.items()}


def _write_new_store(target: Path, manifest: dict, images: np.ndarray, arrays: dict, shard_size: int) -> None:
    """Build the store in a hidden folder beside ``target`` and move it into place when complete."""
    n, size = images.shape[0], images.shape[-1]
    tmp = target.with_name(f".{target.name}.creating-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        store = ProjectionStore.create(tmp, manifest, n, size, shard_size)
        store.write_metadata(arrays)
        for k in range(store.n_shards):
            a, b = store.shard_range(k)
            store.write_shard(k, images[a:b], np.full(b - a, np.nan, dtype=np.float32))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _crop_particles(
    images: np.ndarray, arrays: dict, pix: float, size: int, star_path: Path
) -> tuple[np.ndarray, dict, float]:
    """``images`` Fourier-cropped to ``size``² (in blocks), the shifts rescaled, the new pixel size."""
    from cryoorient_ray.core.imaging.fourier import fourier_crop

    box = images.shape[-1]
    if size > box or size < 8:
        raise CryoOrientError(
            f"{star_path}: cannot crop {box}² particles to {size}² (the working box must be 8 to {box} pixels)"
        )
    out = np.empty((len(images), size, size), dtype=np.float32)
    for a in range(0, len(images), 1024):
        out[a : a + 1024] = fourier_crop(images[a : a + 1024], size).numpy()
    arrays = {**arrays, "shift": arrays["shift"] * (size / box)}
    return out, arrays, pix * box / size


def import_relion(
    star_path: str | os.PathLike,
    store_path: str | os.PathLike,
    shard_size: int = 256,
    symmetry: str = "C1",
    split: str = "test",
    name: str | None = None,
    image_size: int | None = None,
) -> ProjectionStore:
    """Read a RELION particle stack into a new projection store (all rows in ``split``).

    Angles (if present) become the store's orientations; without them the store records
    ``has_orientations: false`` and its quaternions are NaN. ``image_size``: Fourier-crop the
    particles to this working box (as RELION's rescale at extraction: the pixel size grows by
    ``L / image_size``, shifts in pixels shrink by it); the manifest's ``acquisition`` keeps the
    extracted box and pixel size.
    """
    from cryoorient_ray.core.geometry.symmetry import normalize_symmetry_name

    star_path = Path(star_path)
    split_codes(split)  # an unknown split is one clear error, before anything is read
    symmetry = normalize_symmetry_name(symmetry)
    particles, optics = _read_star(star_path)
    pix = _pixel_size(particles, optics, star_path)
    images = _load_images(particles, star_path)
    if not np.isfinite(images).all():
        raise CryoOrientError(f"{star_path}: images contain NaN or inf")
    n = images.shape[0]
    arrays, has_angles, has_ctf = _particle_metadata(particles, pix, n, split)
    box = int(images.shape[-1])
    if image_size is not None and image_size != box:
        images, arrays, pix = _crop_particles(images, arrays, pix, image_size, star_path)
    acquisition = {
        "image_size": box,
        "pixel_size": pix * images.shape[-1] / box,
        "snr_db": None,  # unknown for real particles
        "noise_variance_box": "acquisition",
        "noise_variance_to_working": (images.shape[-1] / box) ** 2,
    }
    protein = {"name": name or star_path.stem, "source": str(star_path), "symmetry": symmetry}
    manifest = {
        "config": {"imported_from": str(star_path)},
        "config_hash": "",
        "pixel_size": pix,
        "proteins": [{**protein, "heldout": False, "start": 0, "count": n}],
        "has_orientations": has_angles,
        "optics": _optics(particles, optics, star_path),
        "ctf_applied": has_ctf,
        "source": "relion",
        "acquisition": acquisition,
    }
    target = Path(store_path)
    if target.exists():
        raise CryoOrientError(f"{target} already exists; choose another output store")
    _write_new_store(target, manifest, images, arrays, shard_size)
    return ProjectionStore.open(target)
