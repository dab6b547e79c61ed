"""Volume reconstruction from projections with known orientations: direct Fourier inversion, CG, ASTRA.

Geometry (the project's convention, docs/CONVENTIONS.md, and :mod:`cryoorient_ray.core.imaging.projection`):

- Images are ``(B, L, L)`` indexed ``[y, x]`` with the origin at pixel ``L // 2``; the volume
  comes back as ``(D, D, D)`` with ``D = L``, indexed ``[z, y, x]``, origin at voxel ``D // 2``.
- Image ``i`` is ``p_i(x, y) = ∫ V(R_iᵀ · (x, y, z)) dz`` moved by its shift ``t_i = (tx, ty)``
  pixels (the object's centre at ``(L // 2 + tx, L // 2 + ty)``) and, optionally, multiplied
  by its CTF in Fourier space, i.e. the forward model of
  :class:`~cryoorient_ray.core.imaging.projection.FourierSliceProjector` followed by
  :func:`~cryoorient_ray.core.imaging.ctf.apply_ctf`. By the projection-slice theorem the 2D FT of
  ``p_i`` at ``(kx, ky)`` is the 3D FT of ``V`` at ``R_iᵀ · (kx, ky, 0) = kx·R_i[0, :] + ky·R_i[1, :]``
  (components ``(x, y, z)``).

Direct Fourier inversion (:func:`reconstruct_fourier`): each image is zero-padded (centred) to
``N = oversampling · L``, Fourier transformed, its shift undone by the phase ramp
``exp(+2πi (kx tx + ky ty) / N)`` and multiplied by its CTF ``c`` (computed on the padded grid,
as :func:`~cryoorient_ray.core.imaging.ctf.apply_ctf` applies it). The half-plane ``kx ≥ 0`` inside the
Nyquist circle ``|k| ≤ N / 2`` is then inserted into an ``N³`` Fourier grid with trilinear
weights ``w`` (``index_add_`` on flattened indices), accumulating ``Σ w c P`` and ``Σ w c²``;
the Hermitian mates ``-k`` are added at the end (so the map is real). The grid is divided by
``Σ w c² + wiener``, inverse transformed, divided by the transform of the trilinear kernel
(``∏ sinc²(x_i / N)``, the gridding correction) and cropped to the central ``D³``.
With a point group, every image is also inserted at ``R_i · g`` for each ``g`` of the group
(``q`` and ``q ⊗ g`` give the same projections of a symmetric map).

Accuracy (noiseless FourierSliceProjector images of Gaussian blobs, σ 1.2–2.5 voxels, D = 32,
2,000 uniform orientations): real-space correlation 0.9997 with the true map and FSC > 0.88 up
to Nyquist. Dividing by the summed weights is not an exact density compensation, so the sinc²
correction over-corrects slightly: amplitudes come out ~1 % high (~2–3 % for smoother maps;
``oversampling=3`` halves it). :func:`reconstruct_cg` solves the least-squares problem against
the projector's own forward model and removes it (correlation 0.999999 after 5 iterations).
Timings are in docs/BENCHMARKS.md.

Every function takes one :class:`~cryoorient_ray.core.imaging.particles.ParticleStack` (images,
shifts, CTF, pixel size; bare ``(B, L, L)`` images are a stack without shifts or CTF) and the
``(B, 3, 3)`` rotation matrices; the result is numpy when the stack's images were numpy.

This module never imports ray or zarr; ASTRA is imported lazily and its 3D CUDA calls are only
made when :func:`~cryoorient_ray.core.imaging.projection_astra.astra_available` is True (without a GPU
they kill the process).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cryoorient_ray.core._array import ArrayLike, as_tensor, to_output
from cryoorient_ray.core.imaging.fourier import (
    centred_volume_ft,
    gridding_correction_3d,
    index_grid_2d,
    phase_ramp,
)
from cryoorient_ray.core.imaging.particles import ParticleStack, as_particle_stack
from cryoorient_ray.core.imaging.projection import _rotmats_tensor, _shifts_tensor
from cryoorient_ray.core.reconstruction.fsc import soft_mask
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "METHODS",
    "fourier_sums",
    "half_maps",
    "reconstruct",
    "reconstruct_astra",
    "reconstruct_cg",
    "reconstruct_fourier",
    "volume_from_sums",
]

METHODS = ("auto", "fourier", "cg", "astra")
# Inserted points (image points × 8 trilinear corners) per index_add_ call: bounds memory (~0.5 GB).
_INSERT_POINTS_PER_CHUNK = 1 << 23
# Points sampled per chunk of the CG forward model (as the projector's slice sampling).
_CG_POINTS_PER_CHUNK = 1 << 22

CtfSource = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# input checks


def _images_tensor(images: ArrayLike) -> tuple[torch.Tensor, bool]:
    imgs, was_np = as_tensor(images)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise CryoOrientError(f"images must be a (B, L, L) stack of square images; got shape {tuple(imgs.shape)}")
    if imgs.shape[0] == 0:
        raise CryoOrientError("cannot reconstruct from an empty image stack")
    if imgs.shape[1] < 2:
        raise CryoOrientError(f"images must be at least 2 pixels wide; got shape {tuple(imgs.shape)}")
    if not torch.isfinite(imgs).all():
        raise CryoOrientError("images contain NaN or infinite values")
    if imgs.dtype not in (torch.float32, torch.float64):
        imgs = imgs.to(torch.float32)  # half precision: compute in float32
    return imgs, was_np


def _inputs(stack: ParticleStack, rotmats, device=None):
    """Checked ``(images, rotmats, shifts | None, numpy_out)`` tensors of one dtype on ``device``."""
    imgs, _ = _images_tensor(stack.images)
    dtype = imgs.dtype
    device = imgs.device if device is None else torch.device(device)
    imgs = imgs.detach().to(device)
    rot, _ = as_tensor(rotmats)
    if rot.ndim == 3 and rot.shape[0] != imgs.shape[0]:
        raise CryoOrientError(
            f"the image stack and the orientations differ in length: {imgs.shape[0]} images, {rot.shape[0]} rotations"
        )
    r, _ = _rotmats_tensor(rot.detach(), dtype, device)
    t = _shifts_tensor(stack.shifts, imgs.shape[0], dtype, device)
    return imgs, r, t, stack.numpy_out


def _int_option(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise CryoOrientError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _float_option(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CryoOrientError(f"{name} must be a non-negative number; got {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise CryoOrientError(f"{name} must be a non-negative number; got {value!r}")
    return v


def _ctf_source(stack: ParticleStack, ctf_grid, n: int, dtype, device) -> CtfSource | None:
    """A function ``image indices (m,) -> CTF (m, N, N//2 + 1)`` on the padded rfft grid, or None.

    From the stack's :class:`~cryoorient_ray.core.imaging.particles.CTFParams` (evaluated with
    :func:`~cryoorient_ray.core.imaging.ctf.ctf_2d` on the ``N × N`` grid) or from ``ctf_grid``,
    an array ``(B, N, N//2 + 1)`` / ``(1, N, N//2 + 1)`` already on that grid.
    """
    if ctf_grid is None:
        if stack.ctf is None:
            return None
        params, px = stack.ctf, stack.pixel_size_A

        def from_params(idx: torch.Tensor) -> torch.Tensor:
            return params.grid(n, px, idx.cpu(), dtype=dtype, device=device)

        return from_params
    if stack.ctf is not None:
        raise CryoOrientError("give the CTF either in the particle stack or as ctf_grid, not both")
    b = len(stack)
    grid, _ = as_tensor(ctf_grid)
    shape = (n, n // 2 + 1)
    if grid.ndim != 3 or tuple(grid.shape[1:]) != shape or grid.shape[0] not in (1, b):
        raise CryoOrientError(
            f"a CTF array must be (B, N, N//2+1) = ({b}, {n}, {n // 2 + 1}) on the padded rfft grid; "
            f"got {tuple(grid.shape)}"
        )
    if not torch.isfinite(grid).all():
        raise CryoOrientError("the CTF array contains NaN or infinite values")
    grid = grid.detach().to(device=device, dtype=dtype)

    def from_array(idx: torch.Tensor) -> torch.Tensor:
        if grid.shape[0] == 1:
            return grid.expand(idx.numel(), -1, -1)
        return grid[idx.to(grid.device)]

    return from_array


def _image_weights(weights, b: int, dtype, device) -> torch.Tensor | None:
    if weights is None:
        return None
    w, _ = as_tensor(weights)
    w = w.detach().to(device=device, dtype=dtype)
    if tuple(w.shape) != (b,) or not torch.isfinite(w).all() or (w < 0).any():
        raise CryoOrientError(f"weights must be ({b},) finite non-negative numbers, one per image")
    return w


def _symmetry_rotmats(symmetry: str | None, dtype, device) -> torch.Tensor | None:
    if symmetry is None:
        return None
    from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
    from cryoorient_ray.core.geometry.symmetry import symmetry_group

    group = symmetry_group(symmetry)
    if group.order == 1:
        return None
    return torch.as_tensor(unitquat_to_rotmat(np.asarray(group.quaternions)), dtype=dtype, device=device)


def _pad_images(imgs: torch.Tensor, n: int) -> torch.Tensor:
    """``(b, L, L)`` → ``(b, N, N)`` with pixel ``L // 2`` at index 0 (origin first, periodic): ready for rfft2."""
    b, lsize = imgs.shape[0], imgs.shape[1]
    idx = (torch.arange(lsize, device=imgs.device) - lsize // 2) % n
    out = imgs.new_zeros(b, n, n)
    out[:, idx[:, None], idx[None, :]] = imgs
    return out


def _crop_centre(vol: torch.Tensor, d: int) -> torch.Tensor:
    n = vol.shape[0]
    lo = n // 2 - d // 2
    return vol[lo : lo + d, lo : lo + d, lo : lo + d]


# ----------------------------------------------------------------------------------------------
# direct Fourier inversion


class _HalfPlane:
    """The rfft half-plane points of an ``N × N`` image inside the Nyquist circle ``|k| ≤ N/2``
    (and within ``radius`` when given)."""

    def __init__(self, n: int, dtype, device, radius: float | None = None) -> None:
        gy, gx = index_grid_2d(n, device=device)  # rows 0, 1, …, -1; columns 0 … N//2
        keep = (gx * gx + gy * gy) <= (n / 2) ** 2
        if radius is not None:  # only the points within radius (padded grid units) of the origin
            keep &= (gx * gx + gy * gy) <= float(radius) ** 2
        self.flat = torch.nonzero(keep.reshape(-1)).squeeze(1)  # into the (N, N//2+1) grid
        self.kx = gx.reshape(-1)[self.flat].to(dtype)
        self.ky = gy.reshape(-1)[self.flat].to(dtype)
        # The column kx = 0 holds both (0, ky) and its mate (0, -ky): half weight each, since
        # every point is also inserted at its mate -k.
        self.half = torch.where(self.kx == 0, 0.5, 1.0).to(dtype)
        self.size = self.flat.numel()


def _insert(
    data: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    ctf2: torch.Tensor,
    r: torch.Tensor,
    plane: _HalfPlane,
    n: int,
) -> None:
    """Trilinear insertion of ``values (b, P)`` (complex) and ``ctf2 (b, P)`` at ``Rᵀ (kx, ky, 0)``.

    ``data`` (complex) and ``weight`` (real) are flat ``M³`` grids, ``M = N + 2``, in the centred
    layout (index ``N // 2`` is frequency 0 on each axis, ``[z, y, x]``). Every fractional index
    lies in ``[0, N]``, so its corners lie in ``[0, N + 1]``: the two extra planes per axis are
    folded back onto ``0`` and ``1`` afterwards (:func:`_fold`), as the DFT grid is periodic.
    """
    m = n + 2
    # (b, P, 3) fractional centred indices, components (x, y, z).
    pos = plane.kx[None, :, None] * r[:, None, 0, :] + plane.ky[None, :, None] * r[:, None, 1, :] + n // 2
    # |k| ≤ N/2 puts pos in [0, N] up to round-off (and the 1e-3 tolerance on RᵀR = I): clamp it there.
    pos = pos.clamp(0, n)
    base = torch.floor(pos)
    frac = pos - base
    base = base.to(torch.int64)
    flat = ((base[..., 2] * m + base[..., 1]) * m + base[..., 0]).reshape(-1)  # (b·P,)
    values = torch.view_as_real(values)  # (b, P, 2): real weights times a complex without promotion
    fx, fy, fz = frac.unbind(-1)
    wx = (1 - fx, fx)
    wy = (1 - fy, fy)
    wz = (1 - fz, fz)
    for zb in (0, 1):
        for yb in (0, 1):
            wzy = wz[zb] * wy[yb]
            for xb in (0, 1):
                w = wzy * wx[xb]
                # Corner (xb, yb, zb) of every point: the flat index plus a constant offset, i.e. an
                # index_add_ into the grid viewed from that offset on.
                off = (zb * m + yb) * m + xb
                data[off:].index_add_(0, flat, torch.view_as_complex(values * w[..., None]).reshape(-1))
                weight[off:].index_add_(0, flat, (w * ctf2).reshape(-1))


def _fold(grid: torch.Tensor, n: int) -> torch.Tensor:
    """``(M, M, M)`` with ``M = N + 2`` → ``(N, N, N)``: planes ``N`` and ``N + 1`` added onto ``0`` and ``1``."""
    for axis in range(3):
        main = grid.narrow(axis, 0, n).clone()
        main.narrow(axis, 0, 2).add_(grid.narrow(axis, n, 2))
        grid = main
    return grid


def _add_hermitian_mates(grid: torch.Tensor, conj: bool) -> torch.Tensor:
    """``grid(k) + grid(-k)*`` on a centred ``N³`` grid (index ``j`` is ``k = j - N//2``, ``-k`` is ``(N - j) % N``)."""
    mate = torch.roll(torch.flip(grid, (0, 1, 2)), (1, 1, 1), (0, 1, 2))
    return grid + (mate.conj() if conj else mate)


def _backproject(
    imgs: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor | None,
    ctf: CtfSource | None,
    n: int,
    sym: torch.Tensor | None,
    batch_size: int,
    image_weights: torch.Tensor | None = None,
    radius: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated ``Σ w c P`` (complex) and ``Σ w c²`` on the centred ``N³`` grid, mates included
    (each image's terms times its ``image_weights`` entry when given; only the frequencies within
    ``radius`` padded-grid units when given)."""
    dtype, device = imgs.dtype, imgs.device
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    plane = _HalfPlane(n, dtype, device, radius)
    n_sym = 1 if sym is None else sym.shape[0]
    chunk = max(1, min(batch_size, _INSERT_POINTS_PER_CHUNK // (8 * plane.size * n_sym)))
    m = n + 2
    data = torch.zeros(m**3, dtype=cdtype, device=device)
    weight = torch.zeros(m**3, dtype=dtype, device=device)
    kx = plane.kx / n  # cycles per pixel, for the phase ramp
    ky = plane.ky / n
    b = imgs.shape[0]
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        ft = torch.fft.rfft2(_pad_images(imgs[start:stop], n)).reshape(stop - start, -1)[:, plane.flat]
        if t is not None:
            ft = ft * phase_ramp(t[start:stop], kx, ky, sign=1.0)  # the projector's exp(-2πi k·t) undone
        if ctf is None:
            ctf2 = plane.half.expand(stop - start, -1)
        else:
            c = ctf(torch.arange(start, stop, device=device)).reshape(stop - start, -1)[:, plane.flat]
            ft = ft * c
            ctf2 = c * c * plane.half
        ft = ft * plane.half
        if image_weights is not None:
            iw = image_weights[start:stop, None]
            ft, ctf2 = ft * iw, ctf2 * iw
        rb = r[start:stop]
        if sym is None:
            _insert(data, weight, ft, ctf2, rb, plane, n)
        else:
            for g in sym:
                _insert(data, weight, ft, ctf2, rb @ g, plane, n)
    data = _add_hermitian_mates(_fold(data.reshape(m, m, m), n), conj=True)
    weight = _add_hermitian_mates(_fold(weight.reshape(m, m, m), n), conj=False)
    return data, weight


def reconstruct_fourier(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    ctf_grid: ArrayLike | None = None,
    oversampling: int = 2,
    wiener: float = 1e-2,
    symmetry: str | None = None,
    mask_radius: float | None = None,
    mask_width: float = 3.0,
    batch_size: int | None = None,
    device=None,
    weights: ArrayLike | None = None,
) -> ArrayLike:
    """Direct Fourier inversion with trilinear gridding and a Wiener-style constant (module docstring).

    Args:
        stack: the particles (:class:`~cryoorient_ray.core.imaging.particles.ParticleStack`, or
            bare ``(B, L, L)`` images): images indexed ``[y, x]`` (float64 computed in float64,
            anything else in float32); their shifts ``(tx, ty)`` pixels (object moved by ``+t``)
            are undone; their CTF (RELION's parameters, with the stack's ``pixel_size_A``) is
            evaluated with :func:`~cryoorient_ray.core.imaging.ctf.ctf_2d` on the padded ``N × N``
            grid. Images are multiplied by the CTF and the weights accumulate ``CTF²`` (phase flip
            and amplitude correction in one).
        rotmats: ``(B, 3, 3)`` rotation matrices (active, RELION's ``A``; ``unitquat_to_rotmat(q)``).
        ctf_grid: instead of the stack's CTF, an array ``(B, N, N//2 + 1)`` (or ``(1, …)``) on the
            padded rfft grid.
        oversampling: padding factor ``N / L`` (≥ 1; 2 matches the projector and apply_ctf).
        wiener: constant added to the weights ``Σ w·CTF²`` before dividing (≈ 1 / SNR of one
            image's Fourier coefficient; a weight of 1 is one image's full contribution). Must
            be > 0 where some voxels get no data (keeps them 0).
        symmetry: optional point group (``"C4"``, ``"D2"``, ``"I"`` …, project convention):
            each image is also inserted at ``R · g`` for every ``g`` of the group.
        mask_radius: optional radius (voxels) of a spherical soft mask (cosine edge of
            ``mask_width`` voxels, :func:`~cryoorient_ray.core.reconstruction.fsc.soft_mask`) applied to the result.
        batch_size: images per chunk (also bounded so one chunk inserts ≤ 2²³ points). Default:
            64 on CPU (small chunks keep the grid lines a chunk touches in cache across its 8
            corner passes; the fastest for 32² and 64² images) and 1024 on a GPU (fewer launches).
        device: torch device of the computation (default: that of the images).
        weights: optional ``(B,)`` non-negative weight of each image's contribution (to ``Σ w c P``
            and ``Σ w c²`` alike): a soft assignment inserts an image at several orientations
            with its posterior probabilities.

    Returns:
        ``(D, D, D)`` volume with ``D = L``, indexed ``[z, y, x]``, origin at voxel ``D // 2``;
        numpy if the stack's images were numpy, else a tensor on ``device``.

    Raises:
        CryoOrientError: mismatched lengths or shapes, bad rotations, bad options.
    """
    stack = as_particle_stack(stack)
    oversampling = _int_option(oversampling, "oversampling")
    wiener = _float_option(wiener, "wiener")
    data, weight, was_np = _sums(stack, rotmats, ctf_grid, oversampling, symmetry, batch_size, device, weights, None)
    d = stack.image_size
    with torch.no_grad():
        vol = volume_from_sums(data, weight, wiener, d)
        if mask_radius is not None:
            vol = vol * torch.from_numpy(soft_mask(d, mask_radius, mask_width)).to(device=vol.device, dtype=vol.dtype)
    return to_output(vol, was_np)


def _sums(stack, rotmats, ctf_grid, oversampling, symmetry, batch_size, device, weights, radius):
    """:func:`fourier_sums` of an already converted stack, and whether its images were numpy."""
    oversampling = _int_option(oversampling, "oversampling")
    imgs, r, t, was_np = _inputs(stack, rotmats, device)
    dtype, dev = imgs.dtype, imgs.device
    if batch_size is None:
        batch_size = 64 if dev.type == "cpu" else 1024
    batch_size = _int_option(batch_size, "batch_size")
    n = oversampling * imgs.shape[1]
    ctf_fn = _ctf_source(stack, ctf_grid, n, dtype, dev)
    sym = _symmetry_rotmats(symmetry, dtype, dev)
    with torch.no_grad():
        iw = _image_weights(weights, imgs.shape[0], dtype, dev)
        data, weight = _backproject(imgs, r, t, ctf_fn, n, sym, batch_size, iw, radius)
    return data, weight, was_np


def fourier_sums(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    ctf_grid: ArrayLike | None = None,
    oversampling: int = 2,
    symmetry: str | None = None,
    batch_size: int | None = None,
    device=None,
    weights: ArrayLike | None = None,
    radius: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inserted sums of :func:`reconstruct_fourier` before the division: ``Σ w c P`` (complex)
    and ``Σ w c²`` on the centred padded ``N³`` grid (``N = oversampling · L``), mates included,
    for callers that accumulate them across batches (an online map; :func:`volume_from_sums` turns
    them into a volume). Arguments as :func:`reconstruct_fourier`'s; ``radius``: insert only the
    frequencies within this many padded-grid units of the origin (the sums are those of the full
    insertion there, 0 beyond).
    """
    data, weight, _ = _sums(
        as_particle_stack(stack), rotmats, ctf_grid, oversampling, symmetry, batch_size, device, weights, radius
    )
    return data, weight


def volume_from_sums(data: torch.Tensor, weight: torch.Tensor, wiener: float, size: int) -> torch.Tensor:
    """The ``(L, L, L)`` volume (``L = size``) of :func:`fourier_sums`' sums: their Wiener ratio
    ``data / (weight + wiener)`` (``wiener`` 0: ``data / weight`` where there is weight, else 0),
    inverse transformed, gridding-corrected and cropped from the padded grid."""
    n = data.shape[0]
    with torch.no_grad():
        ft = data / (weight + wiener) if wiener > 0 else torch.where(weight > 0, data / weight, torch.zeros_like(data))
        vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(ft))).real
        vol = vol / gridding_correction_3d(n, "linear", vol.dtype, vol.device)
        return _crop_centre(vol, size).contiguous()


# ----------------------------------------------------------------------------------------------
# least squares by conjugate gradients


class _SliceOperator:
    """The linear forward model ``A: V (D³) → images (B·G, L, L)`` of FourierSliceProjector (+ CTF).

    ``A V`` = crop_L(irfft2(CTF · ramp(t) · slice_R(FT(pad_N(V) / ∏ sinc²)))), the slices sampled
    trilinearly (``grid_sample``) at ``Rᵀ (kx, ky, 0)`` as the projector does. Applications of
    ``A`` and ``Aᵀ`` come from autograd, accumulated chunk by chunk.
    """

    def __init__(self, imgs, r, t, ctf_fn, n, sym, batch_size) -> None:
        self.imgs, self.t, self.ctf, self.n = imgs, t, ctf_fn, n
        self.d = imgs.shape[1]
        dtype, device = imgs.dtype, imgs.device
        b = imgs.shape[0]
        if sym is None:
            self.r = r
            self.source = torch.arange(b, device=device)
        else:  # image i with rotation R_i·g: every (g, i) pair
            self.r = torch.einsum("bij,gjk->gbik", r, sym).reshape(-1, 3, 3)
            self.source = torch.arange(b, device=device).repeat(sym.shape[0])
        gy, gx = index_grid_2d(n, dtype=dtype, device=device)
        self.plane = torch.stack([gx, gy], -1)  # (N, N//2+1, 2) as (kx, ky)
        self.kx, self.ky = gx[0] / n, gy[:, 0] / n
        self.chunk = max(1, min(batch_size, _CG_POINTS_PER_CHUNK // (n * (n // 2 + 1))))
        self.crop = (torch.arange(self.d, device=device) - self.d // 2) % n

    def transform(self, vol: torch.Tensor) -> torch.Tensor:
        """``(D³)`` → ``(1, 2, N, N, N)`` centred FT (real, imag channels), gridding-corrected."""
        return centred_volume_ft(vol, self.n)

    def images(self, ft: torch.Tensor, sl: slice) -> torch.Tensor:
        n = self.n
        r = self.r[sl]
        k3 = torch.einsum("hwc,bcj->bhwj", self.plane, r[:, :2, :]) + n // 2
        grid = (k3 * (2.0 / (n - 1)) - 1.0).unsqueeze(0)
        sampled = F.grid_sample(ft, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        slc = torch.complex(sampled[0, 0], sampled[0, 1])
        src = self.source[sl]
        if self.t is not None:
            slc = slc * phase_ramp(self.t[src], self.kx, self.ky[:, None])
        if self.ctf is not None:
            slc = slc * self.ctf(src)
        img = torch.fft.irfft2(slc, s=(n, n))
        return img[:, self.crop][:, :, self.crop]

    def gradient(self, vol: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        """``Aᵀ(A V − b) + λ V`` and the data residual ``‖A V − b‖²``."""
        v = vol.detach().requires_grad_(True)
        ft = self.transform(v)
        leaf = ft.detach().requires_grad_(True)
        total = 0.0
        for start in range(0, self.r.shape[0], self.chunk):
            sl = slice(start, start + self.chunk)
            res = self.images(leaf, sl) - self.imgs[self.source[sl]]
            loss = 0.5 * (res * res).sum()
            loss.backward()
            total += 2.0 * float(loss.detach())
        ft.backward(leaf.grad)
        return v.grad + lam * vol, total

    def normal(self, p: torch.Tensor, lam: float) -> torch.Tensor:
        """``(AᵀA + λ) p``."""
        v = p.detach().requires_grad_(True)
        ft = self.transform(v)
        leaf = ft.detach().requires_grad_(True)
        for start in range(0, self.r.shape[0], self.chunk):
            img = self.images(leaf, slice(start, start + self.chunk))
            (0.5 * (img * img).sum()).backward()
        ft.backward(leaf.grad)
        return v.grad + lam * p


def _conjugate_gradients(
    op: _SliceOperator, x: torch.Tensor, lam: float, iterations: int, tol: float, track: bool
) -> tuple[torch.Tensor, list[float]]:
    """CG on ``(AᵀA + λ) V = Aᵀ b`` from ``x``; the data residuals (start, then per iteration when ``track``)."""
    grad, res2 = op.gradient(x, lam)
    residuals = [res2]
    rr = -grad
    p = rr.clone()
    rs = float((rr * rr).sum())
    rs0 = rs
    for _ in range(iterations):
        if rs <= (tol**2) * rs0 or rs == 0:
            break
        ap = op.normal(p, lam)
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rs / pap
        x = x + alpha * p
        rr = rr - alpha * ap
        rs_new = float((rr * rr).sum())
        if track:
            residuals.append(op.gradient(x, lam)[1])
        p = rr + (rs_new / rs) * p
        rs = rs_new
    return x.detach(), residuals


def reconstruct_cg(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    ctf_grid: ArrayLike | None = None,
    iterations: int = 5,
    regularization: float = 0.0,
    init: ArrayLike | None = None,
    oversampling: int = 2,
    symmetry: str | None = None,
    mask_radius: float | None = None,
    mask_width: float = 3.0,
    batch_size: int = 64,
    tol: float = 1e-6,
    device=None,
    return_residuals: bool = False,
):
    """Least squares ``min_V Σ_i ‖A_i V − p_i‖² + λ‖V‖²`` by conjugate gradients on the normal equations.

    ``A_i`` is the forward model of :class:`~cryoorient_ray.core.imaging.projection.FourierSliceProjector`
    (trilinear slice sampling, gridding-corrected, ``oversampling``-padded), then the shift and
    the CTF (the stack's, or ``ctf_grid``, as :func:`reconstruct_fourier` takes them, but applied
    on the projector's ``N × N`` slice before the crop); ``Aᵀ`` comes from autograd. Each
    iteration costs one forward and one backward pass over all images. Starts from ``init`` or
    from :func:`reconstruct_fourier` (with the same options), so a few iterations refine it.

    Args:
        stack, rotmats, ctf_grid, oversampling, symmetry, mask_radius, mask_width, device: as
            :func:`reconstruct_fourier` (the mask is applied at the end).
        iterations: CG iterations (≥ 0; 0 returns the starting volume, masked).
        regularization: ``λ`` (≥ 0), in units of squared image intensity per squared voxel value.
        init: optional ``(D, D, D)`` starting volume.
        batch_size: images per forward/backward chunk.
        tol: stop when ``‖r‖ ≤ tol · ‖r₀‖`` (the normal-equation residual).
        return_residuals: also return the data residuals ``Σ‖A V − p‖²`` (start, then after each iteration).

    Returns:
        ``(D, D, D)`` volume (numpy if the stack's images were numpy), or ``(volume, residuals)``.
    """
    stack = as_particle_stack(stack)
    iterations = _int_option(iterations, "iterations", minimum=0)
    lam = _float_option(regularization, "regularization")
    tol = _float_option(tol, "tol")
    oversampling = _int_option(oversampling, "oversampling")
    batch_size = _int_option(batch_size, "batch_size")
    imgs, r, t, was_np = _inputs(stack, rotmats, device)
    dtype, dev = imgs.dtype, imgs.device
    d = imgs.shape[1]
    n = oversampling * d
    ctf_fn = _ctf_source(stack, ctf_grid, n, dtype, dev)
    sym = _symmetry_rotmats(symmetry, dtype, dev)
    if init is None:
        start = dataclasses.replace(stack, images=imgs, shifts=t, numpy_out=False)
        x = reconstruct_fourier(start, r, ctf_grid=ctf_grid, oversampling=oversampling, symmetry=symmetry, device=dev)
    else:
        x, _ = as_tensor(init)
        if tuple(x.shape) != (d, d, d):
            raise CryoOrientError(f"init must be a ({d}, {d}, {d}) volume for {d}-pixel images; got {tuple(x.shape)}")
    x = x.detach().to(device=dev, dtype=dtype).clone()
    op = _SliceOperator(imgs, r, t, ctf_fn, n, sym, batch_size)
    x, residuals = _conjugate_gradients(op, x, lam, iterations, tol, return_residuals)
    if mask_radius is not None:
        x = x * torch.from_numpy(soft_mask(d, mask_radius, mask_width)).to(device=dev, dtype=dtype)
    out = to_output(x, was_np)
    return (out, residuals) if return_residuals else out


# ----------------------------------------------------------------------------------------------
# ASTRA (CUDA)


def _reconstruct_astra(imgs: np.ndarray, rotmats: np.ndarray, shifts: np.ndarray | None, iterations: int) -> np.ndarray:
    """ASTRA's ``CGLS3D_CUDA`` in the geometry of :mod:`cryoorient_ray.core.imaging.projection_astra`.

    ``imgs (B, L, L)`` float32, ``rotmats (B, 3, 3)``, ``shifts (B, 2)``; returns ``(L, L, L)`` float32.
    Call only when :func:`~cryoorient_ray.core.imaging.projection_astra.astra_available` is True.
    """
    from cryoorient_ray.core.imaging.projection_astra import astra_available, astra_vectors

    if not astra_available():
        raise CryoOrientError("ASTRA with CUDA is not available (no astra-toolbox, or no usable GPU)")
    import astra

    lsize = imgs.shape[1]
    d = lsize
    lo = -(d // 2) - 0.5  # voxel D//2 at the origin, as astra_project
    hi = lo + d
    vol_geom = astra.create_vol_geom(d, d, d, lo, hi, lo, hi, lo, hi)
    vectors = astra_vectors(rotmats, shifts, lsize)
    proj_geom = astra.create_proj_geom("parallel3d_vec", lsize, lsize, vectors)
    sino = np.ascontiguousarray(np.transpose(imgs, (1, 0, 2)), dtype=np.float32)  # (rows, angles, cols)
    vol_id = astra.data3d.create("-vol", vol_geom, 0.0)  # CGLS starts from zero
    sino_id = astra.data3d.create("-sino", proj_geom, sino)
    alg_id = None
    try:
        cfg = astra.astra_dict("CGLS3D_CUDA")
        cfg["ReconstructionDataId"] = vol_id
        cfg["ProjectionDataId"] = sino_id
        alg_id = astra.algorithm.create(cfg)
        astra.algorithm.run(alg_id, int(iterations))
        rec = np.array(astra.data3d.get(vol_id), dtype=np.float32)
    finally:
        if alg_id is not None:
            astra.algorithm.delete(alg_id)
        astra.data3d.delete(vol_id)
        astra.data3d.delete(sino_id)
    return rec


def reconstruct_astra(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    iterations: int = 50,
    symmetry: str | None = None,
    mask_radius: float | None = None,
    mask_width: float = 3.0,
) -> ArrayLike:
    """CGLS reconstruction with ASTRA's ``CGLS3D_CUDA`` (needs astra-toolbox with CUDA and a GPU).

    Same geometry as :func:`~cryoorient_ray.core.imaging.projection_astra.astra_project` (its ray-casting
    forward model, with the stack's shifts; no CTF, so a stack with a CTF is refused). The whole
    stack goes to the GPU at once (``B · L²`` float32 values), with every image repeated for each
    element of ``symmetry``. ``iterations`` CGLS iterations start from zero. Returns numpy if
    the stack's images were numpy, else a tensor on their device.

    Raises:
        CryoOrientError: when ASTRA with CUDA is not usable, or on bad input.
    """
    stack = as_particle_stack(stack)
    if stack.ctf is not None:
        raise CryoOrientError("the 'astra' reconstruction has no CTF model; use method='fourier' or 'cg'")
    iterations = _int_option(iterations, "iterations")
    imgs, _, _, was_np = _inputs(stack, rotmats, "cpu")  # validates everything
    r64, _ = _rotmats_tensor(as_tensor(rotmats)[0].detach(), torch.float64, "cpu")  # full precision for ASTRA
    sym = _symmetry_rotmats(symmetry, torch.float64, "cpu")
    img_np = imgs.to(torch.float32).numpy()
    t_np = None if stack.shifts is None else stack.shifts.to(device="cpu", dtype=torch.float64).numpy()
    if sym is not None:
        r64 = torch.einsum("bij,gjk->gbik", r64, sym).reshape(-1, 3, 3)
        img_np = np.tile(img_np, (sym.shape[0], 1, 1))
        t_np = None if t_np is None else np.tile(t_np, (sym.shape[0], 1))
    vol = _reconstruct_astra(img_np, r64.numpy(), t_np, iterations)
    if mask_radius is not None:
        vol = vol * soft_mask(vol.shape[0], mask_radius, mask_width)
    out = torch.from_numpy(np.ascontiguousarray(vol)).to(imgs.dtype)
    if not was_np:
        out = out.to(stack.images.device)
    return to_output(out, was_np)


# ----------------------------------------------------------------------------------------------
# dispatch and half maps


def reconstruct(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    method: str = "auto",
    **kwargs,
) -> ArrayLike:
    """Reconstruct a ``(D, D, D)`` volume from a particle stack with known orientations ``rotmats (B, 3, 3)``.

    Methods:

    - ``"fourier"``: :func:`reconstruct_fourier` (direct Fourier inversion; fast on CPU).
    - ``"cg"``: :func:`reconstruct_cg` (least squares, started from the Fourier inversion).
    - ``"astra"``: :func:`reconstruct_astra` (ASTRA's ``CGLS3D_CUDA``; needs a CUDA GPU; no CTF).
    - ``"auto"``: ``"astra"`` when :func:`~cryoorient_ray.core.imaging.projection_astra.astra_available`
      is True and the stack has no CTF, else ``"fourier"``.

    ``kwargs`` go to the chosen function (e.g. ``wiener``, ``iterations``, ``symmetry``,
    ``mask_radius``); ``"auto"`` only picks ASTRA when it takes them all (``iterations``,
    ``symmetry``, ``mask_radius``, ``mask_width``). An option the chosen method does not take
    raises :class:`~cryoorient_ray.errors.CryoOrientError`.
    """
    stack = as_particle_stack(stack)
    if method not in METHODS:
        raise CryoOrientError(f"unknown reconstruction method {method!r}; choose one of {', '.join(METHODS)}")
    functions = {"fourier": reconstruct_fourier, "cg": reconstruct_cg, "astra": reconstruct_astra}
    if method == "auto":
        from cryoorient_ray.core.imaging.projection_astra import astra_available

        astra_ok = stack.ctf is None and not set(kwargs) - _options(reconstruct_astra)
        method = "astra" if astra_ok and astra_available() else "fourier"
    unknown = sorted(set(kwargs) - _options(functions[method]))
    if unknown:
        raise CryoOrientError(
            f"the {method!r} reconstruction takes no option(s) {unknown}; "
            f"it takes {', '.join(sorted(_options(functions[method])))}"
        )
    return functions[method](stack, rotmats, **kwargs)


def _options(function) -> set[str]:
    """Names of a reconstruction function's keyword-only options."""
    import inspect

    params = inspect.signature(function).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def split_halves(split, b: int) -> tuple[np.ndarray, np.ndarray]:
    """The two sorted index sets of ``b`` images that ``split`` names (a seed or Generator: a random half
    each, the first ``b // 2`` of a permutation; or a (B,) 0/1 array); both must be non-empty."""
    if split is None or isinstance(split, (int, np.integer, np.random.Generator)) and not isinstance(split, bool):
        rng = split if isinstance(split, np.random.Generator) else np.random.default_rng(0 if split is None else split)
        perm = rng.permutation(b)
        first, second = np.sort(perm[: b // 2]), np.sort(perm[b // 2 :])
    else:
        s = np.asarray(split.detach().cpu() if isinstance(split, torch.Tensor) else split)
        if s.shape != (b,) or not np.isin(s, (0, 1)).all():
            raise CryoOrientError(f"split must be a seed, a Generator or a (B,) = ({b},) boolean array")
        first, second = np.flatnonzero(s == 0), np.flatnonzero(s == 1)
    if len(first) == 0 or len(second) == 0:
        raise CryoOrientError(f"half maps need at least one image in each half; got {len(first)} and {len(second)}")
    return first, second


def _take(x, idx: np.ndarray, n_images: int | None = None):
    """Rows ``idx`` of an array (of a per-image one only, when ``n_images`` is given), type kept."""
    if x is None:
        return None
    tx, was_np = as_tensor(x)
    if n_images is not None and not (tx.ndim == 3 and tx.shape[0] == n_images):
        return x  # a shared CTF grid
    return to_output(tx[torch.as_tensor(idx, device=tx.device)], was_np)


def half_maps(
    stack: ParticleStack | ArrayLike,
    rotmats: ArrayLike,
    *,
    split: ArrayLike | int | np.random.Generator | None = None,
    method: str = "auto",
    **kwargs,
) -> tuple[ArrayLike, ArrayLike]:
    """Two independent reconstructions from two halves of the data (for the gold-standard FSC).

    Args:
        stack, rotmats, method, kwargs: as :func:`reconstruct` (a per-image ``ctf_grid`` is split too).
        split: how to halve the ``B`` images: None (seed 0), an int seed or a
            ``numpy.random.Generator`` (a random permutation, first ``B // 2`` vs the rest), or a
            ``(B,)`` boolean/0-1 array (False/0 → first half, True/1 → second).

    Returns:
        ``(half1, half2)``, each ``(D, D, D)`` (numpy if the stack's images were numpy).
    """
    stack = as_particle_stack(stack)
    imgs, _ = _images_tensor(stack.images)
    b = imgs.shape[0]
    rot, _ = as_tensor(rotmats)
    if rot.ndim != 3 or rot.shape[0] != b:
        raise CryoOrientError(
            f"the image stack and the orientations differ in length: {b} images, "
            f"{rot.shape[0] if rot.ndim else 0} rotations"
        )
    maps = []
    for idx in split_halves(split, b):
        options = dict(kwargs)
        if options.get("ctf_grid") is not None:
            options["ctf_grid"] = _take(options["ctf_grid"], idx, b)
        maps.append(reconstruct(stack.subset(idx), _take(rotmats, idx), method=method, **options))
    return maps[0], maps[1]
