"""The oracle: exhaustive assignment of orientations against the true map, the floor of any method.

For every image, the map is projected at ``n_candidates`` random orientations (the same draw for
all images) and the image takes the candidate it correlates best with: the normalised
cross-correlation of the two after a Gaussian low-pass, with the image's own CTF applied to the
candidate when the stack has one, and the image moved back by its known shift. No method that
sees only the images can do better on average than this (up to the grid's spacing, about
``0.89 · (6π / n_candidates)^(1/3)`` rad: 0.088 rad for 20,000 candidates), so every noisy
benchmark row reports its error beside the method's. The map's frame is the truth's, so the error
needs no alignment (:func:`oracle_error`).

The score is computed in Fourier space on the ``rfft2`` half-plane of the ``L × L`` images, on the
frequencies where the low-pass is not negligible (``|f| ≤ 3.7 σ``), zero frequency left out (the
means). With ``G`` the low-pass, ``C_i`` image ``i``'s CTF, ``Î_i`` its transform and ``P̂_j`` the
candidate's projection, Parseval gives

    ncc_ij ∝ Σ_k w_k G_k² C_ik Re(conj(Î_ik) P̂_jk) / sqrt(Σ_k w_k G_k² C_ik² |P̂_jk|²)

(``w_k`` = 2 for the half-plane's interior columns, 1 for ``kx = 0`` and Nyquist; the image's own
norm does not change the argmax), i.e. two matrix products per batch of candidates:
``(P, 2K) @ (2K, b)`` and ``(P, K) @ (K, b)``. Pure torch (CPU or GPU); never imports ray.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance
from cryoorient_ray.core.imaging.fourier import freq_grid_2d
from cryoorient_ray.core.imaging.particles import ParticleStack, as_particle_stack
from cryoorient_ray.core.imaging.projection import cubic_volume, make_projector
from cryoorient_ray.errors import CryoOrientError

__all__ = ["DEFAULT_LOWPASS_SIGMA", "oracle_assignment", "oracle_error"]

# Gaussian low-pass σ in cycles per pixel of the stack (0.5 is Nyquist): mild, G = 0.14 at Nyquist.
# On white noise a stronger one only loses (32², 0 dB: mean error 0.82 rad at σ = 0.1, 0.22 at 0.25).
DEFAULT_LOWPASS_SIGMA = 0.25
# Frequencies with G² below this are left out of the score.
_NEGLIGIBLE = 1e-6
# The candidates are drawn from default_rng([seed, _STREAM]). Not default_rng(seed): that equals
# default_rng([seed, 0]), the simulator's draw of protein 0 (parameters.py), so the oracle of a
# store made with the same seed would have every true orientation of its first protein among the
# candidates and an error of 0.
_STREAM = 0x0AC1E


def _check_args(n_candidates: int, lowpass_sigma: float, batch: int) -> None:
    if isinstance(n_candidates, bool) or int(n_candidates) != n_candidates or n_candidates < 1:
        raise CryoOrientError(f"n_candidates must be a positive integer; got {n_candidates!r}")
    if not (isinstance(lowpass_sigma, (int, float)) and math.isfinite(lowpass_sigma) and lowpass_sigma > 0):
        raise CryoOrientError(f"lowpass_sigma must be a positive number of cycles per pixel; got {lowpass_sigma!r}")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise CryoOrientError(f"batch must be a positive integer; got {batch!r}")


def _frequency_support(size: int, sigma: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask (L, L//2+1) bool, weight (K,) = w · G²)`` of the frequencies the score uses."""
    fy, fx = freq_grid_2d(size, dtype=torch.float64, device=device)
    g2 = torch.exp(-(fy**2 + fx**2) / sigma**2)  # G² with G = exp(-|f|² / 2σ²)
    mask = g2 > _NEGLIGIBLE
    mask[0, 0] = False  # the mean
    cols = torch.full_like(fx, 2.0)
    cols[:, 0] = 1.0
    if size % 2 == 0:
        cols[:, -1] = 1.0
    return mask, (cols * g2)[mask]


def _image_side(
    stack: ParticleStack, mask: torch.Tensor, weight: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``A (P, 2K)``: ``w G² C_i Î_i`` as real and imaginary parts; ``D (P, K)``: ``w G² C_i²`` (None without CTF)."""
    images = stack.centred().images.to(device=device, dtype=torch.float32)
    ft = torch.fft.rfft2(images)[:, mask].to(torch.complex64)
    w = weight.to(torch.float32)
    if stack.ctf is None:
        a = ft * w
        return torch.cat([a.real, a.imag], 1), None
    rows = torch.arange(len(stack)).split(4096)  # the full CTF grids of a few thousand images at a time
    grid = stack.ctf.grid
    ctf = torch.cat([grid(stack.image_size, stack.pixel_size_A, r, device=device)[:, mask] for r in rows])
    a = ft * (w * ctf)
    return torch.cat([a.real, a.imag], 1), w * ctf * ctf


def oracle_assignment(
    stack: ParticleStack | np.ndarray | torch.Tensor,
    volume: np.ndarray | torch.Tensor,
    n_candidates: int = 20000,
    lowpass_sigma: float = DEFAULT_LOWPASS_SIGMA,
    seed: int = 0,
    batch: int = 1024,
    device=None,
) -> np.ndarray:
    """The best of ``n_candidates`` random orientations for each image of ``stack``, against ``volume``.

    Args:
        stack: a :class:`ParticleStack` (its shifts are undone, its CTF applied to each candidate)
            or ``(P, L, L)`` images.
        volume: the true ``(D, D, D)`` map ``[z, y, x]`` at the stack's pixel size (``D ≥ L``; the
            projections are the central ``L × L`` pixels).
        n_candidates: random orientations, uniform on SO(3) (drawn from ``default_rng([seed, 0x0AC1E])``,
            never the simulator's stream of a store made with the same seed).
        lowpass_sigma: σ of the Gaussian low-pass ``exp(−|f|²/2σ²)``, cycles per pixel.
        seed: of the candidates.
        batch: candidates projected and scored at once (bounds memory: ``P × batch`` scores).
        device: torch device (default: CPU).

    Returns:
        ``(P, 4)`` float64 unit quaternions (w, x, y, z), each image's best candidate.
    """
    _check_args(n_candidates, lowpass_sigma, batch)
    stack = as_particle_stack(stack)
    device = torch.device("cpu" if device is None else device)
    vol, _ = cubic_volume(volume, "volume")
    size = stack.image_size
    if vol.shape[0] < size:
        raise CryoOrientError(f"the map ({vol.shape[0]}³) is smaller than the images ({size}²)")
    mask, weight = _frequency_support(size, float(lowpass_sigma), device)
    a, d_img = _image_side(stack, mask, weight, device)
    candidates = sample_orientations(int(n_candidates), seed=np.random.default_rng([int(seed), _STREAM]))
    projector = make_projector(vol.to(torch.float32), backend="torch", device=device)
    rotmats = torch.as_tensor(unitquat_to_rotmat(candidates), dtype=torch.float32)
    best = torch.full((len(stack),), -torch.inf, device=device)
    best_idx = torch.zeros(len(stack), dtype=torch.long, device=device)
    w = weight.to(torch.float32)
    for start in range(0, len(candidates), int(batch)):
        r = rotmats[start : start + int(batch)].to(device)
        ft = torch.fft.rfft2(projector(r, image_size=size))[:, mask].to(torch.complex64)
        numer = a @ torch.cat([ft.real, ft.imag], 1).T  # (P, b)
        power = ft.real**2 + ft.imag**2
        denom = (power * w).sum(1)[None, :] if d_img is None else d_img @ power.T
        score = numer / denom.clamp_min(1e-30).sqrt()
        top, idx = score.max(dim=1)
        better = top > best
        best = torch.where(better, top, best)
        best_idx = torch.where(better, idx + start, best_idx)
    return candidates[best_idx.cpu().numpy()]


def oracle_error(
    stack: ParticleStack | np.ndarray | torch.Tensor,
    volume: np.ndarray | torch.Tensor,
    q_true: np.ndarray,
    symmetry: str = "C1",
    **kwargs,
) -> tuple[float, float]:
    """``(mean, median)`` rotation error (rad) of :func:`oracle_assignment` against ``q_true (P, 4)``.

    No alignment: the map's frame is the truth's. With a point group, the symmetry-aware ``d_G``.
    ``kwargs`` go to :func:`oracle_assignment`.
    """
    q_true = np.asarray(q_true, dtype=np.float64)
    n = len(as_particle_stack(stack))
    if q_true.shape != (n, 4) or not np.isfinite(q_true).all():
        raise CryoOrientError(f"q_true must be ({n}, 4) finite quaternions (w, x, y, z); got shape {q_true.shape}")
    q = oracle_assignment(stack, volume, **kwargs)
    err = np.asarray(symmetric_quat_distance(q, q_true, symmetry))
    return float(err.mean()), float(np.median(err))
