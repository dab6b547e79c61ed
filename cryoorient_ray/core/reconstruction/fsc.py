"""Fourier shell correlation (FSC) between two maps, resolution at a threshold, masks and hand.

Conventions (docs/CONVENTIONS.md): volumes are ``(D, D, D)`` indexed ``[z, y, x]`` with the
origin at voxel ``D // 2``; voxel sizes in Å. For two maps ``V1``, ``V2`` with 3D DFTs ``F1``,
``F2`` (``torch.fft.fftn``, integer frequencies ``k = (kx, ky, kz)`` in cycles per box), shell
``s = round(|k|)`` (shells one Fourier voxel wide, ``s = 0 … D // 2``; the corners beyond
``D // 2`` are left out) has

    FSC(s) = Σ_{k ∈ s} Re(F1(k) F2(k)*) / sqrt(Σ_{k ∈ s} |F1(k)|² · Σ_{k ∈ s} |F2(k)|²)

at the spatial frequency ``s / (D · pixel_size)`` (1/Å); the last shell ``D // 2`` is Nyquist,
``1 / (2 · pixel_size)`` for even ``D``. The sums are in float64 with the same arithmetic for the
cross term and the powers, so the FSC of a map with itself is exactly 1 in every shell. A shell
where both maps have no power counts as identical (FSC = 1); one where only one of them has
power gives 0.

The resolution at a threshold (0.143 for two independent half maps, 0.5 against a reference
map) is ``1 / f`` at the first frequency where the curve falls below the threshold, with ``f``
interpolated linearly between the two shells around the crossing (:func:`fsc_resolution`).

Every function takes numpy arrays or torch tensors. This module never imports ray or zarr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_pixel_size, to_output
from cryoorient_ray.core.imaging.fourier import fft_index
from cryoorient_ray.core.imaging.projection import cubic_volume
from cryoorient_ray.errors import CryoOrientError

__all__ = ["FSCResult", "best_hand", "fsc", "fsc_resolution", "mirror_volume", "soft_mask"]

THRESHOLDS = (0.5, 0.143)


@dataclass(frozen=True)
class FSCResult:
    """An FSC curve: ``frequency`` (1/Å, shell centres from 0 to Nyquist), ``fsc`` and voxels per shell.

    All three arrays have ``D // 2 + 1`` entries (numpy float64 / int64).
    """

    frequency: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    pixel_size: float

    def resolution(self, threshold: float = 0.143) -> float:
        """Resolution in Å where the curve first falls below ``threshold`` (see :func:`fsc_resolution`)."""
        return fsc_resolution(self.fsc, self.frequency, threshold)

    @property
    def resolution_05(self) -> float:
        """Resolution (Å) at FSC = 0.5 (the criterion against a reference map)."""
        return self.resolution(0.5)

    @property
    def resolution_0143(self) -> float:
        """Resolution (Å) at FSC = 0.143 (the gold-standard criterion between half maps)."""
        return self.resolution(0.143)

    @property
    def mean(self) -> float:
        """Average of the curve over the shells 1 … Nyquist (the zero-frequency shell left out)."""
        return float(np.mean(self.fsc[1:])) if len(self.fsc) > 1 else float(self.fsc[0])

    def to_dict(self) -> dict:
        """Plain-Python summary (lists and floats) for JSON reports."""
        return {
            "pixel_size": self.pixel_size,
            "frequency": self.frequency.tolist(),
            "fsc": self.fsc.tolist(),
            "n_voxels": self.n_voxels.tolist(),
            "resolution_0.5": self.resolution_05,
            "resolution_0.143": self.resolution_0143,
        }


def _shell_index(d: int, device) -> torch.Tensor:
    """``round(|k|)`` of every voxel of the (unshifted) ``fftn`` grid of a ``D³`` box, flattened."""
    f = fft_index(d, device=device)  # integer frequencies (cycles per box)
    kz, ky, kx = torch.meshgrid(f, f, f, indexing="ij")
    return torch.round(torch.sqrt(kx * kx + ky * ky + kz * kz)).to(torch.int64).reshape(-1)


def soft_mask(size: int, radius: float, width: float = 3.0, dtype=np.float32) -> np.ndarray:
    """Spherical mask ``(D, D, D)`` (numpy) centred on voxel ``D // 2``, with a raised-cosine edge.

    1 for ``r ≤ radius``, ``(1 + cos(π (r - radius) / width)) / 2`` for ``radius < r < radius + width``
    and 0 beyond (``r`` in voxels from the centre); ``width = 0`` gives a hard edge.
    """
    if isinstance(size, bool) or int(size) != size or int(size) < 1:
        raise CryoOrientError(f"mask size must be a positive integer; got {size!r}")
    radius, width = float(radius), float(width)
    if not (math.isfinite(radius) and radius > 0):
        raise CryoOrientError(f"mask radius must be a positive number of voxels; got {radius!r}")
    if not (math.isfinite(width) and width >= 0):
        raise CryoOrientError(f"mask width must be a non-negative number of voxels; got {width!r}")
    d = int(size)
    ax = np.arange(d, dtype=np.float64) - d // 2
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    if width == 0:
        return (r <= radius).astype(dtype)
    edge = 0.5 * (1.0 + np.cos(np.pi * np.clip((r - radius) / width, 0.0, 1.0)))
    return edge.astype(dtype)


def fsc(vol1: ArrayLike, vol2: ArrayLike, pixel_size: float = 1.0, mask: ArrayLike | float | None = None) -> FSCResult:
    """Fourier shell correlation of two ``(D, D, D)`` maps (see the module docstring).

    Args:
        vol1, vol2: maps of the same cubic shape, indexed ``[z, y, x]`` (numpy or torch).
        pixel_size: voxel size in Å (sets the frequency axis).
        mask: None, a ``(D, D, D)`` array multiplied into both maps, or a number: the radius in
            voxels of a :func:`soft_mask` (3-voxel cosine edge).

    Returns:
        :class:`FSCResult` with ``frequency`` (1/Å) and ``fsc`` for the shells ``0 … D // 2``.
    """
    px = check_pixel_size(pixel_size)
    a, _ = cubic_volume(vol1, "vol1")
    b, _ = cubic_volume(vol2, "vol2")
    if a.shape != b.shape:
        raise CryoOrientError(f"FSC needs two maps of the same size; got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[0]
    a = a.detach().to(torch.float64)
    b = b.detach().to(device=a.device, dtype=torch.float64)
    if mask is not None:
        if isinstance(mask, (int, float)) and not isinstance(mask, bool):
            m = torch.from_numpy(soft_mask(d, float(mask), dtype=np.float64)).to(a.device)
        else:
            m, _ = as_tensor(mask)
            if tuple(m.shape) != tuple(a.shape):
                raise CryoOrientError(f"mask must have the maps' shape {tuple(a.shape)}; got {tuple(m.shape)}")
            m = m.detach().to(device=a.device, dtype=torch.float64)
        a, b = a * m, b * m
    fa = torch.fft.fftn(a).reshape(-1)
    fb = torch.fft.fftn(b).reshape(-1)
    shell = _shell_index(d, a.device)
    nshell = d // 2 + 1
    keep = shell < nshell
    shell = shell[keep]
    ra, ia, rb, ib = fa.real[keep], fa.imag[keep], fb.real[keep], fb.imag[keep]
    # Same arithmetic for the cross term and the powers: FSC(V, V) is exactly 1.
    cross = torch.bincount(shell, weights=ra * rb + ia * ib, minlength=nshell)
    pa = torch.bincount(shell, weights=ra * ra + ia * ia, minlength=nshell)
    pb = torch.bincount(shell, weights=rb * rb + ib * ib, minlength=nshell)
    count = torch.bincount(shell, minlength=nshell)
    denom = torch.sqrt(pa * pb)
    both_empty = (pa == 0) & (pb == 0)
    curve = torch.where(denom > 0, cross / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(pa))
    curve = torch.where(both_empty, torch.ones_like(curve), curve).clamp(-1.0, 1.0)
    freq = np.arange(nshell, dtype=np.float64) / (d * px)
    return FSCResult(frequency=freq, fsc=curve.cpu().numpy(), n_voxels=count.cpu().numpy(), pixel_size=px)


def fsc_area(curve: ArrayLike) -> float:
    """The sum of an FSC curve over the shells ``1 … L/2`` (clipped at 0): grows with resolution and
    with the correlation of every shell, also once the 0.143 or 0.5 crossing sits at Nyquist."""
    return float(np.clip(np.asarray(curve, dtype=np.float64)[1:], 0.0, 1.0).sum())


def fsc_resolution(curve: ArrayLike, freqs: ArrayLike, threshold: float = 0.143) -> float:
    """Resolution (Å) where an FSC curve first falls below ``threshold``.

    Scans the shells in order of frequency; at the first ``i`` with ``curve[i] < threshold`` the
    crossing frequency is interpolated linearly between shells ``i - 1`` and ``i`` and the
    resolution is its inverse. Special cases: a curve that never falls below the threshold
    gives the resolution of the last shell, ``1 / freqs[-1]`` (Nyquist, ``2 · pixel_size`` for an
    even box); one already below it at the first shell gives ``inf``.

    Args:
        curve: ``(S,)`` FSC values.
        freqs: ``(S,)`` increasing spatial frequencies in 1/Å (``freqs[0]`` is usually 0).
        threshold: e.g. 0.5 or 0.143.
    """
    c = np.asarray(curve.detach().cpu() if isinstance(curve, torch.Tensor) else curve, dtype=np.float64).reshape(-1)
    f = np.asarray(freqs.detach().cpu() if isinstance(freqs, torch.Tensor) else freqs, dtype=np.float64).reshape(-1)
    if c.shape != f.shape or c.size == 0:
        raise CryoOrientError(f"curve and freqs must be 1-D arrays of one non-zero length; got {c.shape} and {f.shape}")
    if not (np.isfinite(c).all() and np.isfinite(f).all()):
        raise CryoOrientError("curve and freqs must be finite")
    if np.any(np.diff(f) <= 0):
        raise CryoOrientError("freqs must be strictly increasing")
    below = np.flatnonzero(c < threshold)
    if below.size == 0:
        return float(1.0 / f[-1]) if f[-1] > 0 else math.inf
    i = int(below[0])
    if i == 0:
        return math.inf
    c0, c1 = c[i - 1], c[i]
    frac = (c0 - threshold) / (c0 - c1)  # c0 ≥ threshold > c1, so 0 ≤ frac < 1
    fc = f[i - 1] + frac * (f[i] - f[i - 1])
    return float(1.0 / fc) if fc > 0 else math.inf


def mirror_volume(volume: ArrayLike) -> ArrayLike:
    """The mirror image ``z → -z`` about the centre voxel ``D // 2``: voxel ``i → (2·(D//2) − i) mod D`` along z.

    For an odd ``D`` this is ``volume[::-1]``; for an even ``D`` the voxel ``D // 2`` stays in place
    (and slice 0, at ``-D/2``, maps to itself: its mirror lies outside the box). Returns the type given.
    """
    vol, was_np = cubic_volume(volume, "volume")
    d = vol.shape[0]
    idx = (2 * (d // 2) - torch.arange(d, device=vol.device)) % d
    return to_output(vol[idx], was_np)


def best_hand(volume: ArrayLike, reference: ArrayLike, mask: ArrayLike | float | None = None) -> ArrayLike:
    """``volume`` or its mirror (:func:`mirror_volume`), whichever agrees better with ``reference``.

    "Better" is the higher average FSC over the shells 1 … Nyquist (:attr:`FSCResult.mean`). Only
    the hand is decided: the volume is not rotated or shifted. Returns the type given.
    """
    mirrored = mirror_volume(volume)
    if fsc(mirrored, reference, mask=mask).mean > fsc(volume, reference, mask=mask).mean:
        return mirrored
    return volume
