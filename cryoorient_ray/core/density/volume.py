"""Density maps: the container, and the steps that turn any map into the simulator's cube.

Conventions (as in MRC files with the standard axis order):
  - a map is a float32 array indexed ``[z, y, x]`` (x fastest), voxel size in Å, isotropic;
  - the centre of a box of edge ``D`` is voxel index ``D // 2`` on each axis; every crop, pad
    and resampling here keeps that voxel at the centre.

The *molecule* of a map is its density above a noise floor (:func:`molecule_weights`): the
positive density of a noise-free simulated map, or the density above ``median + 3 σ`` (robust
σ from the median absolute deviation) of an experimental map with noise in the background. The
centre of mass and the "does it fit the box" check use these weights, so positive noise in the
corners of a big experimental box is not mistaken for part of the molecule.

:func:`prepare_map` is the one call the simulator uses: cube, resample, centre, fit the box,
normalise. Pure numpy/scipy: this module never imports ray, zarr, gemmi or mrcfile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from cryoorient_ray.errors import CryoOrientError

# Share of the molecule's mass that may fall outside the box before prepare_map refuses.
MAX_MASS_OUTSIDE = 0.01
# normalize_map: voxels above this fraction of the maximum make up the molecule's interior.
INTERIOR_FRACTION = 0.1


@dataclass(eq=False)
class DensityMap:
    """A density map.

    Attributes:
        data: ``(Z, Y, X)`` float32 array indexed ``[z, y, x]``; not necessarily cubic. Stored
            as a C-contiguous float32 array (other float/int input is converted).
        voxel_size: edge of a voxel in Å (isotropic, ``> 0``).
        name: short label (e.g. ``"5j0n"``), used in messages and outputs.
        source: where it came from (a path, an id, ``"pseudo:0"``), used in error messages.

    Raises:
        CryoOrientError: data not 3D, empty, with NaN/inf values or all zero; voxel size not a
            finite positive number.
    """

    data: np.ndarray = field(repr=False)
    voxel_size: float
    name: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        label = self.label
        arr = np.asarray(self.data)
        if arr.ndim != 3:
            raise CryoOrientError(f"{label}: a density map must be 3D [z, y, x]; got shape {arr.shape}")
        if arr.size == 0:
            raise CryoOrientError(f"{label}: the density map is empty (shape {arr.shape})")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise CryoOrientError(f"{label}: density values must be real numbers; got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise CryoOrientError(f"{label}: the density map has {bad} NaN or infinite values")
        if not np.any(arr):
            raise CryoOrientError(f"{label}: the density map is all zero (no molecule in it)")
        try:
            vs = float(self.voxel_size)
        except (TypeError, ValueError):
            raise CryoOrientError(f"{label}: voxel size must be a number in Å; got {self.voxel_size!r}") from None
        if not math.isfinite(vs) or vs <= 0:
            raise CryoOrientError(f"{label}: voxel size must be a positive number of Å; got {self.voxel_size!r}")
        self.data = arr
        self.voxel_size = vs

    def __repr__(self) -> str:
        return (
            f"DensityMap(shape={self.shape}, voxel_size={self.voxel_size:g}, "
            f"name={self.name!r}, source={self.source!r})"
        )

    @property
    def label(self) -> str:
        """What to call this map in messages: the source, else the name, else ``"density map"``."""
        return self.source or self.name or "density map"

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` in voxels."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def is_cubic(self) -> bool:
        """True if all three edges have the same length."""
        return len(set(self.data.shape)) == 1

    @property
    def box_size(self) -> int:
        """Edge of the box in voxels: ``D`` for a cubic map, the longest edge otherwise
        (the edge of the cube :func:`to_cube` makes of it)."""
        return int(max(self.data.shape))

    @property
    def extent_angstrom(self) -> float:
        """Edge of the box in Å: ``box_size · voxel_size``."""
        return self.box_size * self.voxel_size


# ----------------------------------------------------------------------------- checks


def _check_volume(data: np.ndarray, what: str = "map") -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 3 or arr.size == 0:
        raise CryoOrientError(f"{what}: expected a non-empty 3D array [z, y, x]; got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise CryoOrientError(f"{what}: the map has NaN or infinite values")
    return arr


def check_positive_angstrom(value, what: str) -> float:
    """``value`` as a positive finite float (Å), else a CryoOrientError naming ``what``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CryoOrientError(f"{what} must be a number of Å; got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise CryoOrientError(f"{what} must be a positive number of Å; got {value!r}")
    return v


def _check_box_size(box_size) -> int:
    if isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer)) or box_size < 2:
        raise CryoOrientError(f"box size must be an integer number of voxels >= 2; got {box_size!r}")
    return int(box_size)


# ----------------------------------------------------------------------------- boxes


def fit_box(data: np.ndarray, box_size: int, fill: float = 0.0) -> np.ndarray:
    """Crop or pad ``data`` (any 3D shape) to a ``(box_size,)*3`` cube, keeping the centre voxel.

    Voxel ``n // 2`` of each input axis (length ``n``) lands on ``box_size // 2``; padding uses
    ``fill``. Returns a new float32 array.
    """
    arr = _check_volume(data)
    box = _check_box_size(box_size)
    out = np.full((box, box, box), fill, dtype=np.float32)
    src, dst = [], []
    for n in arr.shape:
        offset = box // 2 - n // 2  # output index = input index + offset
        lo, hi = max(0, -offset), min(n, box - offset)
        src.append(slice(lo, hi))
        dst.append(slice(lo + offset, hi + offset))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def to_cube(data: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pad a non-cubic ``(Z, Y, X)`` array to a cube of edge ``max(Z, Y, X)`` with ``fill``.

    Padding is symmetric up to one voxel, chosen so that each axis' centre voxel ``n // 2``
    becomes the cube's centre ``D // 2``. A cubic input is returned as a float32 copy.
    """
    arr = _check_volume(data)
    return fit_box(arr, max(arr.shape), fill=fill)


# ----------------------------------------------------------------------------- molecule mass


def noise_floor(data: np.ndarray) -> float:
    """Density level below which a voxel is taken as background, ``>= 0``.

    ``median + 3·σ``, with the robust ``σ = 1.4826 · MAD`` (median absolute deviation), clipped
    to ``[0, max / 2]``. For noise-free simulated maps (background exactly 0 over most of the box)
    this is 0: every positive voxel counts. Estimated on at most ~10⁶ voxels (a regular subsample).
    """
    arr = np.asarray(data)
    flat = arr.ravel()
    step = max(1, flat.size // 1_000_000)
    sample = flat[::step].astype(np.float64)
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med)))
    floor = med + 3.0 * 1.4826 * mad
    top = float(arr.max())
    return float(min(max(floor, 0.0), max(top, 0.0) / 2))


def molecule_weights(data: np.ndarray, what: str = "map") -> np.ndarray:
    """The molecule's mass per voxel: ``max(data − noise_floor(data), 0)``, float32, same shape.

    Raises:
        CryoOrientError: the map has no density above its noise floor (e.g. all values ≤ 0).
    """
    arr = _check_volume(data, what)
    w = np.clip(arr - noise_floor(arr), 0.0, None, dtype=np.float32)
    if not np.any(w > 0):
        raise CryoOrientError(f"{what}: the map has no positive density (max {float(arr.max()):.3g})")
    return w


def _weighted_center(w: np.ndarray) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` in voxel indices of non-negative weights ``w``."""
    total = float(w.sum(dtype=np.float64))
    com = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        marginal = w.sum(axis=others, dtype=np.float64)
        com.append(float(np.dot(np.arange(w.shape[axis]), marginal)) / total)
    return np.array(com)


def center_of_mass(data: np.ndarray) -> np.ndarray:
    """Centre of mass of the molecule (:func:`molecule_weights`), ``(z, y, x)`` in voxel indices."""
    return _weighted_center(molecule_weights(data))


def _shift_integer(data: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift by whole voxels ``(dz, dy, dx)``, filling with zeros (no wrap-around)."""
    out = np.zeros_like(data)
    src, dst = [], []
    for n, k in zip(data.shape, shift, strict=True):
        k = int(k)
        if abs(k) >= n:
            return out
        src.append(slice(max(0, -k), n - max(0, k)))
        dst.append(slice(max(0, k), n - max(0, -k)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _shift_fourier(data: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Sub-voxel shift ``(dz, dy, dx)`` by a phase ramp in Fourier space (periodic)."""
    spec = sfft.rfftn(data, workers=-1)
    for axis, d in enumerate(shift):
        if d == 0:
            continue
        n = data.shape[axis]
        f = sfft.rfftfreq(n) if axis == 2 else sfft.fftfreq(n)
        shape = [1, 1, 1]
        shape[axis] = f.size
        spec *= np.exp(-2j * np.pi * f * d).astype(np.complex64).reshape(shape)
    return sfft.irfftn(spec, s=data.shape, workers=-1).astype(np.float32)


def center_of_mass_to_center(data: np.ndarray) -> np.ndarray:
    """Shift the map so that the molecule's centre of mass lies on the centre voxel ``n // 2``.

    The whole-voxel part of the shift is exact (zero fill: density pushed past an edge is lost;
    :func:`prepare_map` pads first so that none is); the remaining sub-voxel part (≤ 0.5 voxel)
    is a Fourier phase shift, exact for band-limited maps (a sub-voxel's worth of the edge layer
    wraps around, which is harmless with a zero background). The shape is kept. Returns a new
    float32 array.
    """
    arr = _check_volume(data)
    target = np.array([n // 2 for n in arr.shape], dtype=np.float64)
    delta = target - center_of_mass(arr)
    whole = np.round(delta)
    out = _shift_integer(arr, whole) if np.any(whole != 0) else arr.copy()
    frac = delta - whole
    if np.any(np.abs(frac) > 1e-3):
        out = _shift_fourier(out, frac)
    return out


def _extract_cube(data: np.ndarray, center: np.ndarray, edge: int) -> np.ndarray:
    """Cube of ``edge`` voxels whose voxel ``edge // 2`` is input voxel ``center`` (ints); zero-padded."""
    out = np.zeros((edge, edge, edge), dtype=np.float32)
    src, dst = [], []
    for n, c in zip(data.shape, center, strict=True):
        offset = edge // 2 - int(c)
        lo, hi = max(0, -offset), min(n, edge - offset)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo + offset, hi + offset))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _mass_inside(w: np.ndarray, center: np.ndarray, half: float) -> float:
    """Mass of ``w`` in the axis-aligned cube ``|i - center| <= half`` (voxel indices)."""
    sl = []
    for n, c in zip(w.shape, center, strict=True):
        lo = max(0, math.ceil(c - half - 1e-9))
        hi = min(n, math.floor(c + half + 1e-9) + 1)
        if hi <= lo:
            return 0.0
        sl.append(slice(lo, hi))
    return float(w[tuple(sl)].sum(dtype=np.float64))


def _needed_edge(w: np.ndarray, center: np.ndarray, keep: float) -> float:
    """Edge (voxels) of the smallest cube about ``center`` that holds ``keep`` of the mass."""
    total = float(w.sum(dtype=np.float64))
    lo, hi = 0.0, float(max(w.shape))
    for _ in range(40):
        mid = (lo + hi) / 2
        if _mass_inside(w, center, mid) >= keep * total:
            hi = mid
        else:
            lo = mid
        if hi - lo < 0.25:
            break
    return 2 * hi + 1


# ----------------------------------------------------------------------------- resampling


def _lowpass_axes(data: np.ndarray, cutoffs: list[float | None]) -> np.ndarray:
    """Separable Fourier low-pass: along each axis with a cutoff ``fc`` (cycles/voxel, ≤ 0.5),
    gain 1 below ``0.8 fc``, a cosine roll-off to 0 at ``fc``, 0 above. Axes with ``None`` are kept."""
    spec = sfft.rfftn(data.astype(np.float32), workers=-1)
    for axis, fc in enumerate(cutoffs):
        if fc is None:
            continue
        n = data.shape[axis]
        f = np.abs(sfft.rfftfreq(n) if axis == 2 else sfft.fftfreq(n))
        lo = 0.8 * fc
        gain = np.where(f <= lo, 1.0, np.where(f >= fc, 0.0, 0.5 * (1 + np.cos(np.pi * (f - lo) / (fc - lo)))))
        shape = [1, 1, 1]
        shape[axis] = gain.size
        spec *= gain.reshape(shape).astype(np.float32)
    return sfft.irfftn(spec, s=data.shape, workers=-1).astype(np.float32)


def resample(
    data: np.ndarray,
    voxel_size: float | tuple[float, float, float],
    new_voxel_size: float,
) -> np.ndarray:
    """Resample a map to an isotropic voxel size, keeping the centre voxel and the density values.

    Method: along every axis that gets coarser, the map is first low-pass filtered in Fourier
    space to the new Nyquist frequency (gain 1 up to 80 % of it, cosine roll-off to 0 at it),
    so nothing aliases; then the new grid is sampled with cubic-spline interpolation
    (``scipy.ndimage.affine_transform``, order 3, zero outside). Upsampled axes are only
    interpolated. Voxel ``n // 2`` stays the centre: new index ``j`` samples old position
    ``n // 2 + (j − m // 2) · new/old``; the new edge is ``m = round(n · old / new)``.

    Values are densities (per volume), not per-voxel sums: a constant map stays constant, and
    ``sum · voxel_volume`` is kept approximately.

    Args:
        data: ``(Z, Y, X)`` array.
        voxel_size: current voxel size in Å; a ``(z, y, x)`` triple for anisotropic voxels.
        new_voxel_size: wanted isotropic voxel size in Å.

    Returns:
        float32 array of shape ``(round(Z·vz/new), round(Y·vy/new), round(X·vx/new))``.
    """
    arr = _check_volume(data)
    if np.ndim(voxel_size) == 0:
        old = [check_positive_angstrom(voxel_size, "voxel size")] * 3
    else:
        if len(voxel_size) != 3:
            raise CryoOrientError(f"voxel size must be a number or a (z, y, x) triple; got {voxel_size!r}")
        old = [check_positive_angstrom(v, "voxel size") for v in voxel_size]
    new = check_positive_angstrom(new_voxel_size, "new voxel size")
    steps = [new / v for v in old]  # old voxels per new voxel
    if all(abs(s - 1) < 1e-6 for s in steps):
        return arr.copy()
    out_shape = tuple(max(1, round(n / s)) for n, s in zip(arr.shape, steps, strict=True))
    if math.prod(out_shape) > 2_000_000_000 // 4 // 4:
        raise CryoOrientError(
            f"resampling a {arr.shape} map from {old} Å to {new:g} Å would make a {out_shape} array; "
            "crop it first or use a larger voxel size"
        )
    cutoffs = [0.5 / s if s > 1 + 1e-6 else None for s in steps]
    src = _lowpass_axes(arr, cutoffs) if any(c is not None for c in cutoffs) else arr
    offset = [n // 2 - (m // 2) * s for n, m, s in zip(arr.shape, out_shape, steps, strict=True)]
    return ndimage.affine_transform(
        src,
        np.array(steps),
        offset=offset,
        output_shape=out_shape,
        output=np.float32,
        order=3,
        mode="grid-constant",
        cval=0.0,
    )


# ----------------------------------------------------------------------------- normalisation


def normalize_map(data: np.ndarray) -> np.ndarray:
    """Scale the map so that the mean density inside the molecule is 1.

    The molecule's interior is every voxel above ``INTERIOR_FRACTION`` (10 %) of the maximum.
    The scaling is multiplicative only, so a zero background stays zero and negative values keep
    their sign. With a uniform protein density of 1, a projection's value is about the thickness
    of the molecule in voxels — what a microscope records — so projections of different proteins
    (at similar box filling) have comparable intensities, whatever the map's original units
    (electron potential, int8 counts, arbitrary) or resolution (unlike ``max = 1``, which
    depends on how sharp the peaks are). Returns a new float32 array.
    """
    arr = _check_volume(data)
    top = float(arr.max())
    if top <= 0:
        raise CryoOrientError(f"map: the map has no positive density (max {top:.3g}); cannot normalise it")
    interior = arr[arr > INTERIOR_FRACTION * top]
    return (arr / np.float32(interior.mean(dtype=np.float64))).astype(np.float32)


# ----------------------------------------------------------------------------- the one call


def prepare_map(
    density: DensityMap,
    box_size: int,
    voxel_size: float | None = None,
    center: bool = True,
) -> DensityMap:
    """Turn any density map into the simulator's cube.

    Steps: (1) find the molecule's centre of mass (``center=True``) or take the box centre;
    (2) check that a cube of ``box_size`` voxels at ``voxel_size`` around that point holds at
    least 99 % of the molecule's mass (:func:`molecule_weights`), else raise; (3) cut that cube
    (plus a margin) from the map, zero-padding where needed — this also makes non-cubic maps
    cubic; (4) :func:`resample` to ``voxel_size`` (if given and different); (5) shift the
    centre of mass onto voxel ``box_size // 2`` (sub-voxel, :func:`center_of_mass_to_center`);
    (6) :func:`fit_box` to ``box_size``; (7) :func:`normalize_map`.

    Args:
        density: the input map (any shape, any voxel size).
        box_size: edge of the output cube in voxels.
        voxel_size: output voxel size in Å; ``None`` keeps the map's.
        center: move the centre of mass to the box centre (``False`` keeps the map's own centre
            voxel at the box centre).

    Returns:
        A cubic :class:`DensityMap` ``(box_size,)*3`` float32 with the new voxel size and the
        input's name and source.

    Raises:
        CryoOrientError: bad box or voxel size, no positive density, or more than 1 % of the
            molecule's mass outside the box (the message says which box size would fit).
    """
    if not isinstance(density, DensityMap):
        raise CryoOrientError(f"prepare_map needs a DensityMap; got {type(density).__name__}")
    box = _check_box_size(box_size)
    old_vs = density.voxel_size
    new_vs = old_vs if voxel_size is None else check_positive_angstrom(voxel_size, "voxel size")
    label = density.label
    data = density.data
    w = molecule_weights(data, label)
    com = _weighted_center(w) if center else np.array([n // 2 for n in data.shape], dtype=np.float64)

    step = new_vs / old_vs  # old voxels per new voxel
    half = box * step / 2  # half the box, in old voxels
    total = float(w.sum(dtype=np.float64))
    outside = 1.0 - _mass_inside(w, com, half - 0.5 * step) / total
    if outside > MAX_MASS_OUTSIDE:
        need = math.ceil(_needed_edge(w, com, 1 - MAX_MASS_OUTSIDE) / step) + 1
        raise CryoOrientError(
            f"{label}: the molecule does not fit a {box}-voxel box at {new_vs:g} Å/voxel "
            f"({box * new_vs:.0f} Å): {100 * outside:.1f}% of its mass lies outside; "
            f"it needs a box of at least {need} voxels (or a larger voxel size)"
        )
    del w

    # Cut a cube around the centre of mass with a margin for the filter, the spline and the shift.
    margin = math.ceil(4 * max(step, 1.0)) + 4
    edge = math.ceil(box * step) + 2 * margin
    cube = _extract_cube(data, np.round(com).astype(int), edge)
    if abs(step - 1) > 1e-6:
        cube = resample(cube, old_vs, new_vs)
    if center:
        cube = center_of_mass_to_center(cube)
    out = normalize_map(fit_box(cube, box))
    return DensityMap(out, new_vs, name=density.name, source=density.source)
