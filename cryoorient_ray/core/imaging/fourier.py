"""The Fourier toolbox shared by the projector, the reconstructors, the refiner, the gauge and the CTF.

Conventions (docs/CONVENTIONS.md):

- A volume is ``(D, D, D)`` indexed ``[z, y, x]`` with its origin at voxel ``D // 2``; an image
  is ``(L, L)`` indexed ``[y, x]`` with its origin at pixel ``L // 2``.
- Frequency grids are in torch's FFT layout: rows (``y``) in ``fftfreq`` order (``0, 1, …, −1``),
  columns (``x``) in ``rfftfreq`` order (``0 … L // 2``, the half-plane of ``rfft2``) or in
  ``fftfreq`` order (the full grid of ``fft2``). Three units, named in the functions:
  ``index_*`` integer frequencies in cycles per box, ``freq_*`` cycles per pixel,
  ``freq_*_per_A`` cycles per Å (1/Å).
- A *centred* 3-D FT (:func:`centred_volume_ft`) has the zero frequency at index ``N // 2`` on
  every axis: index ``N // 2 + m`` is frequency ``m / N`` cycles per voxel.

Everything is torch (differentiable where it makes sense); this module never imports ray or zarr.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cryoorient_ray.core._array import ArrayLike, as_tensor
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "KERNEL_POWER",
    "centred_volume_ft",
    "fft_index",
    "fourier_crop",
    "freq_grid_2d",
    "freq_grid_2d_per_A",
    "gridding_correction",
    "gridding_correction_3d",
    "index_grid_2d",
    "lowpass_gaussian",
    "lowpass_hard",
    "pad_volume_centred",
    "phase_ramp",
]

# Power of sinc in the Fourier transform of each interpolation kernel: the triangle (trilinear)
# is sinc², the cubic B-spline sinc⁴.
KERNEL_POWER = {"linear": 2, "cubic": 4}


# ----------------------------------------------------------------------------------------------
# frequency grids


def fft_index(size: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``(size,)`` integer frequencies (cycles per box) in FFT order: ``0, 1, …, −1`` (as ``fftfreq · size``)."""
    return ((torch.arange(size, device=device) + size // 2) % size - size // 2).to(dtype)


def index_grid_2d(
    size: int, rfft: bool = True, dtype: torch.dtype = torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ky, kx)`` integer frequencies (cycles per box) of an ``L × L`` image's DFT, each ``(L, L//2+1)``
    (``rfft=True``, the ``rfft2`` half-plane) or ``(L, L)`` (``fft2``)."""
    ky = fft_index(size, dtype, device)
    kx = torch.arange(size // 2 + 1, dtype=dtype, device=device) if rfft else ky
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return gy, gx


def freq_grid_2d(
    size: int, rfft: bool = True, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fy, fx)`` frequencies in cycles per pixel (``torch.fft.fftfreq(L)``) on the ``rfft2``/``fft2`` grid."""
    return _freq_grid(size, 1.0, rfft, dtype, device)


def freq_grid_2d_per_A(
    size: int, pixel_size_A: float, rfft: bool = True, dtype: torch.dtype = torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sy, sx)`` spatial frequencies in 1/Å (spacing ``1 / (L · pixel_size_A)``) on the ``rfft2``/``fft2`` grid."""
    return _freq_grid(size, pixel_size_A, rfft, dtype, device)


def _freq_grid(size: int, d: float, rfft: bool, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``meshgrid`` of ``fftfreq(L, d)`` (rows) and ``rfftfreq``/``fftfreq(L, d)`` (columns)."""
    fy = torch.fft.fftfreq(size, d=d, dtype=dtype, device=device)
    fx = torch.fft.rfftfreq(size, d=d, dtype=dtype, device=device) if rfft else fy
    gy, gx = torch.meshgrid(fy, fx, indexing="ij")
    return gy, gx


def phase_ramp(
    shifts: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, sign: float = -1.0, period: float = 1.0
) -> torch.Tensor:
    """``exp(sign · 2πi (kx·tx + ky·ty) / period)`` for ``shifts (B, 2)`` = ``(tx, ty)`` pixels.

    ``kx``, ``ky`` broadcast against each other (frequency grids ``S``); the result is ``(B,) + S``.
    With ``sign = −1`` and frequencies in cycles per pixel it moves image content by ``+t`` (the
    projector's shift); ``sign = +1`` undoes it. ``period = L`` takes integer frequencies (cycles per box).
    """
    ndim = max(kx.ndim, ky.ndim)
    tx = shifts[:, 0].reshape(-1, *([1] * ndim))
    ty = shifts[:, 1].reshape(-1, *([1] * ndim))
    phase = (sign * 2.0 * math.pi / period) * (tx * kx + ty * ky)
    return torch.polar(torch.ones_like(phase), phase)


# ----------------------------------------------------------------------------------------------
# the padded, gridding-corrected, centred volume FT


def gridding_correction(
    size: int, kernel: str = "linear", dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """``(N,)`` transform of the interpolation kernel along one axis: ``sinc^p((i − N//2) / N)``
    (``p = 2`` trilinear, ``4`` cubic B-spline), the factor a padded volume is divided by."""
    x = (torch.arange(size, device=device, dtype=dtype) - size // 2) / size
    return torch.sinc(x) ** KERNEL_POWER[kernel]


def gridding_correction_3d(
    size: int, kernel: str = "linear", dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """``(N, N, N)`` product of :func:`gridding_correction` along the three axes."""
    s = gridding_correction(size, kernel, dtype, device)
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def pad_volume_centred(volume: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Zero-pad a ``(D, D, D)`` volume to ``(N, N, N)`` so that voxel ``D // 2`` lands on ``N // 2``."""
    d, n = volume.shape[0], padded_size
    before = n // 2 - d // 2
    after = n - d - before
    return F.pad(volume, (before, after, before, after, before, after))


def centred_volume_ft(volume: torch.Tensor, padded_size: int, kernel: str | None = "linear") -> torch.Tensor:
    """``(D, D, D)`` → ``(1, 2, N, N, N)``: the centred 3-D FT of the zero-padded volume, gridding-corrected.

    The volume is padded (:func:`pad_volume_centred`), divided by :func:`gridding_correction_3d`
    of ``kernel`` (``"linear"``, ``"cubic"``; ``None`` for no correction) and transformed with its
    origin at index 0; the zero frequency goes back to ``N // 2``. Real and imaginary parts are
    the two channels, ready for ``grid_sample``. Differentiable in ``volume``.
    """
    padded = pad_volume_centred(volume, padded_size)
    if kernel is not None:
        padded = padded / gridding_correction_3d(padded_size, kernel, volume.dtype, volume.device)
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
    return torch.stack([ft.real, ft.imag], 0).unsqueeze(0).contiguous()


# ----------------------------------------------------------------------------------------------
# image filters


def _float_images(images: ArrayLike) -> torch.Tensor:
    x = as_tensor(images)[0].to(torch.float32)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise CryoOrientError(f"images must be (..., L, L) square images; got shape {tuple(x.shape)}")
    return x


def fourier_crop(images: ArrayLike, size: int) -> torch.Tensor:
    """Downsample ``(B, L, L)`` images to ``(B, size, size)`` float32 by cropping their Fourier transform.

    The pixel size grows by ``L / size``; the centre pixel ``L // 2`` maps to ``size // 2``.
    ``size ≥ L`` returns the images unchanged (as a float32 tensor).
    """
    x = _float_images(images)
    lsize = x.shape[-1]
    if size >= lsize:
        return x
    ft = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
    a = lsize // 2 - size // 2
    ft = ft[..., a : a + size, a : a + size]
    out = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(ft, dim=(-2, -1))), dim=(-2, -1)).real
    return out * (size * size) / (lsize * lsize)


def lowpass_gaussian(images: ArrayLike, sigma_cycles_per_px: float) -> torch.Tensor:
    """``(B, L, L)`` images times the Gaussian ``exp(−|f|² / 2σ²)`` in Fourier space (σ in cycles per pixel)."""
    x = _float_images(images)
    fy, fx = freq_grid_2d(x.shape[-1], rfft=False)
    g = torch.exp(-(fy**2 + fx**2) / (2 * sigma_cycles_per_px**2))
    return torch.fft.ifft2(torch.fft.fft2(x) * g).real


def lowpass_hard(images: ArrayLike, cutoff_cycles_per_px: float) -> torch.Tensor:
    """``(B, L, L)`` images with every frequency ``|f| > cutoff`` (cycles per pixel) set to zero."""
    x = _float_images(images)
    lsize = x.shape[-1]
    fy, fx = freq_grid_2d(lsize)
    keep = (fy**2 + fx**2) <= cutoff_cycles_per_px**2
    return torch.fft.irfft2(torch.fft.rfft2(x) * keep, s=(lsize, lsize))
