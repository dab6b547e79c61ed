"""Fourier-space projection matching shared by the local and the global refiner.

:class:`SliceMatcher` holds the images' DFTs on their ``L × L`` rfft grid (phases about pixel
``L // 2``, known shifts undone by a phase ramp) and the CTF on that grid, and scores them against
central slices of a reference's padded 3-D FT (projection-slice theorem) on a band of frequencies
``0 < |k| ≤ r`` weighted by ``h w²`` (``h = 2`` counts the Hermitian mate of every half-plane
point; the ``kx = 0`` column keeps ``ky > 0`` only). The band's points are sorted by ``|k|``, so
the first :meth:`SliceMatcher.points_within` points are a lower band (the global search scores its
coarse levels on fewer frequencies). The score is the normalised cross-correlation

    NCC = Σ_k h w² Re(I* c P) / sqrt(Σ_k h w² |I|² · Σ_k h w² c² |P|²).

:func:`fsc_band` turns the half maps' FSC into the band: ``w(s) = sqrt(2 FSC / (1 + FSC))`` up to
the first shell below 0.143. This module never imports ray or zarr.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cryoorient_ray.core.imaging.fourier import index_grid_2d, phase_ramp
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.reconstruction.inversion import _ctf_source

__all__ = ["BAND_THRESHOLD", "REF_SCALE", "SliceMatcher", "fsc_band"]

# FSC threshold beyond which the reference's shells are dropped (the gold-standard criterion).
BAND_THRESHOLD = 0.143
# The band keeps at least this many shells, each weighted at least _MIN_WEIGHT (a collapsed FSC
# must not leave an empty score).
_MIN_SHELLS = 3
_MIN_WEIGHT = 0.05
# Cycles per L box → index offset in the 2× padded reference FT.
REF_SCALE = 2.0


def fsc_band(
    fsc_curve: np.ndarray, lsize: int, max_radius: float | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """The reference's filter ``w(|k|)`` (cycles per box) from the half maps' FSC, and the band's edge.

    The edge is the last shell before the FSC first falls below 0.143 (at least ``_MIN_SHELLS``
    shells, at most ``L / 2 − 1``), or ``max_radius`` when given (the weights beyond the FSC's own
    edge are then the floor ``_MIN_WEIGHT``).
    """
    curve = np.clip(fsc_curve, 0.0, 1.0)
    below = np.flatnonzero(curve[1:] < BAND_THRESHOLD)
    last = (below[0] + 1) if below.size else len(curve)  # first shell left out
    last = min(max(last, _MIN_SHELLS), len(curve))
    weight = np.maximum(np.sqrt(2 * curve / (1 + curve)), _MIN_WEIGHT)
    if max_radius is None:
        weight[last:] = 0.0
        # Shell s is s cycles per box (frequency s / L per pixel), as the images' DFT grid.
        max_radius = min(last - 1, lsize / 2 - 1)
    else:
        weight[int(np.floor(max_radius)) + 2 :] = 0.0

    def band_weight(r, w=weight):
        return np.interp(r, np.arange(len(w)), w)

    return band_weight, float(max_radius)


class SliceMatcher:
    """The images' DFTs on their ``L × L`` rfft grid and the scoring of candidate rotations.

    Args:
        stack: float32 images (CPU tensors); their ``shifts`` (if any) are undone.
        device: where the DFTs, the CTF and the scoring live.
    """

    def __init__(self, stack: ParticleStack, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        imgs, shifts = stack.images, stack.shifts
        p, lsize = imgs.shape[0], imgs.shape[1]
        self.lsize = lsize
        # Pixel L//2 to index 0: the phases are about the rotation centre.
        ft = torch.fft.rfft2(torch.roll(imgs, (-(lsize // 2), -(lsize // 2)), (1, 2)))  # (P, L, L//2+1)
        gy, gx = index_grid_2d(lsize)  # cycles per box
        self.kx_all, self.ky_all = gx.reshape(-1), gy.reshape(-1)
        self.radius_all = torch.sqrt(gx * gx + gy * gy).reshape(-1)
        ft = ft.reshape(p, -1)
        if shifts is not None:  # the data were moved by +t: undo it
            ft = ft * phase_ramp(shifts.double(), self.kx_all, self.ky_all, sign=1.0, period=lsize).to(ft.dtype)
        self.ft = ft.to(self.device)
        # The CTF on the 2× padded grid; its even rows and columns are the L grid.
        self.ctf_fn = _ctf_source(stack, None, 2 * lsize, torch.float32, self.device)

    def set_band(self, weight_of_radius: Callable[[np.ndarray], np.ndarray], max_radius: float) -> None:
        """The band: points ``0 < |k| ≤ max_radius`` (cycles per box), sorted by ``|k|``, weighted ``h w²``."""
        r = self.radius_all
        sel = torch.nonzero((r > 0) & (r <= max_radius) & ~((self.kx_all == 0) & (self.ky_all < 0))).squeeze(1)
        # The kx = 0 column holds k and its mate -k: keep ky > 0 there and count every point twice.
        sel = sel[torch.argsort(r[sel], stable=True)]
        self.sel = sel.to(self.device)
        self.radius = r[sel].float().to(self.device)
        self.kxy = torch.stack([self.kx_all[sel], self.ky_all[sel]], -1).float().to(self.device)  # (M, 2)
        w = torch.from_numpy(weight_of_radius(r[sel].numpy())).float()
        self.w2 = (2.0 * w * w).to(self.device)  # (M,)
        self.n_points = sel.numel()

    def points_within(self, radius: float) -> int:
        """How many of the band's (sorted) points have ``|k| ≤ radius`` (at least 1)."""
        return max(1, int(torch.searchsorted(self.radius, torch.tensor([radius + 1e-6], device=self.device)).item()))

    def ctf(self, idx: torch.Tensor) -> torch.Tensor:
        """The CTF ``(b, M)`` of images ``idx`` on the band points (``(1, M)`` ones without a CTF)."""
        if self.ctf_fn is None:
            return torch.ones(1, self.n_points, device=self.device)
        grid = self.ctf_fn(idx)[:, ::2, ::2].reshape(idx.numel(), -1)
        return grid[:, self.sel].float()

    def band_images(self, idx: torch.Tensor) -> torch.Tensor:
        """The images ``idx`` on the band points, ``(b, M)`` complex."""
        return self.ft[idx.to(self.device)][:, self.sel]

    def image_terms(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For images ``idx``: ``(A (b, 2, M), ctf² h w² (b, M), ‖I‖²_w (b,))`` with ``A = h w² c I``."""
        i = self.band_images(idx)  # (b, M) complex
        c = self.ctf(idx)
        a = torch.stack([i.real, i.imag], 1) * (self.w2 * c)[:, None, :]
        norm_i = (self.w2 * (i.real**2 + i.imag**2)).sum(-1)
        return a, (c * c * self.w2).expand(idx.numel(), -1), norm_i

    def sample(self, ref: torch.Tensor, rows: torch.Tensor, n_points: int | None = None) -> torch.Tensor:
        """Central slices ``(2, *S, m)`` (real, imag) of the reference at the first ``m`` band points.

        ``ref`` is the ``(1, 2, 2L, 2L, 2L)`` centred FT of the reference; ``rows`` is ``(*S, 2, 3)``:
        the first two rows of each rotation matrix.
        """
        m = self.n_points if n_points is None else n_points
        n = ref.shape[-1]
        shape = rows.shape[:-2]
        flat = rows.reshape(-1, 2, 3)
        # Rᵀ (kx, ky, 0) = kx R[0, :] + ky R[1, :], in reference indices (x, y, z), centred at n//2.
        pos = torch.einsum("mc,kcj->kmj", self.kxy[:m] * REF_SCALE, flat) + n // 2
        grid = pos * (2.0 / (n - 1)) - 1.0
        sampled = F.grid_sample(ref, grid.reshape(1, flat.shape[0], m, 1, 3), mode="bilinear", align_corners=True)
        return sampled.reshape(2, *shape, m)

    def scores(self, ref: torch.Tensor, rows: torch.Tensor, terms) -> torch.Tensor:
        """NCC ``(b, K)`` of images (``terms`` from :meth:`image_terms`) with the reference at rotations.

        ``ref`` is the ``(1, 2, 2L, 2L, 2L)`` centred FT of the reference; ``rows`` is
        ``(b, K, 2, 3)``: the first two rows of each candidate rotation matrix.
        """
        a, cw, norm_i = terms
        sampled = self.sample(ref, rows)  # (re/im, b, K, M)
        num = torch.einsum("cbkm,bcm->bk", sampled, a)
        norm_p = torch.einsum("cbkm,bm->bk", sampled * sampled, cw)
        return num / torch.sqrt((norm_p * norm_i[:, None]).clamp_min(1e-30))
