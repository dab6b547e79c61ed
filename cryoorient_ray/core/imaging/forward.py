"""The image formation model p = C · S_t · P_q · x + n for a batch of projections of one map."""

from __future__ import annotations

import numpy as np
import torch

from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
from cryoorient_ray.core.imaging.ctf import apply_ctf
from cryoorient_ray.core.imaging.noise import add_gaussian_noise
from cryoorient_ray.core.imaging.projection import make_projector
from cryoorient_ray.errors import CryoOrientError


def render_projections(
    volume: np.ndarray,
    quaternions: np.ndarray,
    shifts: np.ndarray | None = None,
    *,
    pixel_size: float = 1.0,
    ctf: dict | None = None,
    defocus_u: np.ndarray | None = None,
    defocus_v: np.ndarray | None = None,
    defocus_angle: np.ndarray | None = None,
    snr_db: float | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    projector=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate projections of ``volume`` (D, D, D) [z, y, x] at ``quaternions`` (B, 4) wxyz.

    Args:
        shifts: (B, 2) pixels (x, y); the object's centre ends at (L//2 + x, L//2 + y).
        pixel_size: Å per pixel (the map's voxel size).
        ctf: None (no CTF) or ``{"voltage": kV, "cs": mm, "amplitude_contrast": Q0}``, with the
            per-image ``defocus_u``, ``defocus_v`` (Å) and ``defocus_angle`` (degrees), RELION's convention.
        snr_db: per-image SNR of the added Gaussian noise; None = noiseless.
        generator: seeded torch generator for the noise.
        backend: projector backend (see :func:`cryoorient_ray.core.imaging.projection.make_projector`).
        projector: a projector already made for this volume (reused across batches).

    Returns:
        ``images (B, D, D)`` float32 and ``noise_variance (B,)`` (0 when noiseless).
    """
    q = np.asarray(quaternions, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4:
        raise CryoOrientError(f"quaternions must have shape (B, 4), got {q.shape}")
    proj = projector if projector is not None else make_projector(torch.as_tensor(volume), backend=backend)
    rotmats = torch.as_tensor(unitquat_to_rotmat(q), dtype=torch.float32)
    sh = None if shifts is None or not np.any(shifts) else torch.as_tensor(np.asarray(shifts), dtype=torch.float32)
    images = torch.as_tensor(proj(rotmats, sh), dtype=torch.float32)
    if ctf is not None:
        if defocus_u is None or defocus_v is None or defocus_angle is None:
            raise CryoOrientError("a CTF needs defocus_u, defocus_v and defocus_angle for every image")
        images = apply_ctf(
            images,
            pixel_size,
            torch.as_tensor(np.asarray(defocus_u), dtype=torch.float32),
            torch.as_tensor(np.asarray(defocus_v), dtype=torch.float32),
            torch.as_tensor(np.asarray(defocus_angle), dtype=torch.float32),
            voltage=ctf.get("voltage", 300.0),
            cs=ctf.get("cs", 2.7),
            amplitude_contrast=ctf.get("amplitude_contrast", 0.1),
        )
    if snr_db is None:
        variances = torch.zeros(images.shape[0])
    else:
        images, variances = add_gaussian_noise(images, snr_db=snr_db, generator=generator)
    return images.numpy().astype(np.float32, copy=False), np.asarray(variances, dtype=np.float32)
