"""MRC/CCP4 density maps (``.mrc``, ``.map``, ``.ccp4``, ``.mrcs`` and their ``.gz``), via mrcfile.

Reading (:func:`read_map`):
  - the file is opened with ``mrcfile.open(path, permissive=False)``; anything mrcfile rejects
    (not a map, truncated, corrupt gzip) is one :class:`CryoOrientError` naming the file;
  - axis order: mrcfile gives ``[sections, rows, columns]``; the header's ``mapc/mapr/maps``
    say which of x, y, z each is, and the array is transposed to ``[z, y, x]``;
  - voxel size: from the header (``cella / (mx, my, mz)``, per axis). A header without one
    (0 Å, as some tools write) is an error unless ``voxel_size=`` is given; ``voxel_size=``
    always overrides the header;
  - non-cubic voxels (different x, y and z sizes, e.g. crystallographic maps) are resampled
    to the finest of the three (:func:`~cryoorient_ray.core.density.volume.resample`, cubic spline,
    only upsampling, so nothing aliases);
  - non-orthogonal unit cells (angles other than 90°, i.e. crystal maps) cannot be resampled
    onto a cubic grid faithfully: they are an error;
  - integer and half-float modes (int8, int16, uint16, float16) become float32; complex modes
    are an error;
  - the header's origin and start indices are ignored: the map is re-centred downstream.

Writing (:func:`write_map`): float32 (mode 2), standard axis order, the voxel size in the
header, origin 0, atomically; a name ending in ``.gz`` is gzip-compressed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mrcfile
import numpy as np

from cryoorient_ray.core.density.volume import DensityMap, check_positive_angstrom, resample
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path, existing_file, strip_suffixes

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".mrcs")
ANISOTROPY_TOLERANCE = 1e-3  # relative difference of x/y/z voxel sizes still treated as cubic


def map_stem(path: str | os.PathLike) -> str:
    """The file name without ``.gz`` and the map suffix: ``emd_1155.ccp4.gz`` → ``emd_1155``."""
    return strip_suffixes(Path(path).name, MAP_SUFFIXES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_map(
    path: str | os.PathLike,
    voxel_size: float | None = None,
    default_voxel_size: float | None = None,
) -> DensityMap:
    """Read an MRC/CCP4 map as a :class:`DensityMap` ``[z, y, x]`` float32 (see the module docstring).

    Args:
        path: ``.mrc``, ``.map``, ``.ccp4`` or ``.mrcs`` file, optionally gzipped.
        voxel_size: Å per voxel, overriding the header (required when the header has none).
        default_voxel_size: Å per voxel used only when the header has none (0).

    Raises:
        CryoOrientError: missing file, not a map, no voxel size, non-orthogonal cell, complex
            or 2D data, NaN values.
    """
    p = existing_file(path, "map")
    try:
        with mrcfile.open(p, mode="r", permissive=False) as mrc:
            header = mrc.header.copy()
            vs_xyz = (float(mrc.voxel_size.x), float(mrc.voxel_size.y), float(mrc.voxel_size.z))
            data = None if mrc.data is None else np.array(mrc.data)
    except Exception as exc:  # mrcfile raises ValueError, OSError, EOFError, zlib errors...
        raise CryoOrientError(f"{p}: not a readable MRC/CCP4 map ({_first_line(exc)})") from None
    if data is None or data.size == 0:
        raise CryoOrientError(f"{p}: the map file holds no data")
    if np.iscomplexobj(data):
        raise CryoOrientError(f"{p}: complex-valued map (mode {int(header.mode)}); expected a real density map")
    if data.ndim != 3:
        raise CryoOrientError(f"{p}: expected a 3D map; the file holds a {data.ndim}D array of shape {data.shape}")

    # Axis order: data axes are (sections, rows, columns) = (maps, mapr, mapc) in x=1, y=2, z=3.
    labels = [int(header.maps), int(header.mapr), int(header.mapc)]
    if sorted(labels) != [1, 2, 3]:
        raise CryoOrientError(
            f"{p}: invalid axis order in the header (mapc, mapr, maps = {labels[2]}, {labels[1]}, {labels[0]}); "
            "expected a permutation of 1, 2, 3"
        )
    if labels != [3, 2, 1]:
        data = data.transpose(labels.index(3), labels.index(2), labels.index(1))

    angles = [float(a) for a in (header.cellb.alpha, header.cellb.beta, header.cellb.gamma)]
    if not all(a == 0 for a in angles) and any(abs(a - 90.0) > 0.01 for a in angles):
        raise CryoOrientError(
            f"{p}: non-orthogonal unit cell (angles {angles[0]:g}°, {angles[1]:g}°, {angles[2]:g}°) — a "
            "crystallographic map; only maps on an orthogonal grid (single-particle maps) are supported"
        )

    header_missing = not all(math.isfinite(v) and v > 0 for v in vs_xyz)
    if voxel_size is None and header_missing and default_voxel_size is not None:
        voxel_size = default_voxel_size
    if voxel_size is not None:
        vs = check_positive_angstrom(voxel_size, f"{p}: voxel size override")
        return DensityMap(data, vs, name=map_stem(p), source=str(p))

    if header_missing:
        shown = ", ".join(f"{v:g}" for v in vs_xyz)
        raise CryoOrientError(
            f"{p}: the header gives no voxel size ({shown} Å); give the voxel size explicitly (voxel_size=...)"
        )
    vz, vy, vx = vs_xyz[2], vs_xyz[1], vs_xyz[0]
    finest = min(vs_xyz)
    if max(vs_xyz) / finest - 1 > ANISOTROPY_TOLERANCE:
        DensityMap(data, finest, source=str(p))  # validate (NaN, all zero) before resampling
        data = resample(data, (vz, vy, vx), finest)
        vs = finest
    else:
        vs = float(np.mean(vs_xyz))
    return DensityMap(data, vs, name=map_stem(p), source=str(p))


def write_map(path: str | os.PathLike, density: DensityMap) -> Path:
    """Write ``density`` as an MRC map (float32, standard axis order, voxel size, origin 0).

    The file appears atomically (:func:`~cryoorient_ray.io.files.atomic_path`); a name ending
    in ``.gz`` is gzip-compressed. Returns the path.
    """
    if not isinstance(density, DensityMap):
        raise CryoOrientError(f"write_map needs a DensityMap; got {type(density).__name__}")
    target = Path(path)
    compression = "gzip" if target.name.lower().endswith(".gz") else None
    with atomic_path(target) as tmp:
        with mrcfile.new(tmp, overwrite=True, compression=compression) as mrc:
            mrc.set_data(np.ascontiguousarray(density.data, dtype=np.float32))
            mrc.voxel_size = density.voxel_size
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            label = f"cryoorient_ray {density.name}".strip()[:80]
            mrc.header.label[0] = label.encode("ascii", "replace")
            mrc.header.nlabl = 1
    return target
