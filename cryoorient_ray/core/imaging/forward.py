"""The image formation model p = C · S_t · P_q · x + n for a batch of projections of one map.

Acquisition and working boxes: the microscope records ``L_acq²`` images; users bin them (RELION's
rescale at extraction) to the ``L²`` working box that training and recovery use. Rendering a map
prepared at the acquisition pixel size with ``output_size = L`` applies the CTF and the noise at
``L_acq`` (the SNR is set there) and Fourier-crops each image to ``L`` last
(:func:`~cryoorient_ray.core.imaging.fourier.fourier_crop`). :func:`fourier_crop_volume` gives the
map at the working box, the one the cropped images are projections of.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
from cryoorient_ray.core.imaging.ctf import apply_ctf
from cryoorient_ray.core.imaging.fourier import fourier_crop
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
    output_size: int | None = None,
    return_clean: bool = False,
) -> tuple[np.ndarray, ...]:
    """Simulate projections of ``volume`` (D, D, D) [z, y, x] at ``quaternions`` (B, 4) wxyz.

    Args:
        shifts: (B, 2) pixels (x, y) of the rendered box ``D``; the object's centre ends at (D//2 + x, D//2 + y).
        pixel_size: Å per pixel (the map's voxel size), the pixel the CTF is computed at.
        ctf: None (no CTF) or ``{"voltage": kV, "cs": mm, "amplitude_contrast": Q0}``, with the
            per-image ``defocus_u``, ``defocus_v`` (Å) and ``defocus_angle`` (degrees), RELION's convention.
        snr_db: per-image SNR of the added Gaussian noise, ``var(clean D² image) / σ²`` in dB; None = noiseless.
        generator: seeded torch generator for the noise.
        backend: projector backend (see :func:`cryoorient_ray.core.imaging.projection.make_projector`).
        projector: a projector already made for this volume (reused across batches).
        output_size: Fourier-crop the noisy images to this box last (``None`` or ``D``: no crop);
            the pixel size grows by ``D / output_size``, shifts shrink by ``output_size / D``. The
            line integrals are then counted in output pixels (times ``output_size / D``), so the
            images have the scale of projections of the map Fourier-cropped to the output box
            (:func:`fourier_crop_volume`); noise is added after that scaling.
        return_clean: also return the clean projections and their variances (below).

    Returns:
        ``images (B, L, L)`` float32 (``L = output_size or D``) and ``noise_variance (B,)``, σ² per
        pixel of the rendered ``D`` box (0 when noiseless); white noise per working pixel has
        ``σ² · L² / D²``. With ``return_clean`` also ``clean (B, L, L)``, the projections before CTF
        and noise, Fourier-cropped with the same scaling, and ``clean_variance (B,)``, their
        variance over the rendered ``D`` box (what fresh training noise,
        :class:`~cryoorient_ray.core.imaging.corruption.FreshCorruption`, sets its SNR against).
    """
    q = np.asarray(quaternions, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4:
        raise CryoOrientError(f"quaternions must have shape (B, 4), got {q.shape}")
    size = np.shape(volume)[-1]
    if output_size is not None and not 1 <= int(output_size) <= size:
        raise CryoOrientError(f"output_size must be between 1 and the volume's box {size}; got {output_size}")
    proj = projector if projector is not None else make_projector(torch.as_tensor(volume), backend=backend)
    rotmats = torch.as_tensor(unitquat_to_rotmat(q), dtype=torch.float32)
    sh = None if shifts is None or not np.any(shifts) else torch.as_tensor(np.asarray(shifts), dtype=torch.float32)
    images = torch.as_tensor(proj(rotmats, sh), dtype=torch.float32)
    if output_size is not None and int(output_size) < size:
        images = images * (int(output_size) / size)  # line integrals in output pixels (the working box's scale)
    clean = images if return_clean else None
    if ctf is not None:
        if defocus_u is None or defocus_v is None or defocus_angle is None:
            raise CryoOrientError("a CTF needs defocus_u, defocus_v and defocus_angle for every image")
        images = apply_ctf(
            images,
            pixel_size,
            torch.as_tensor(np.asarray(defocus_u), dtype=torch.float32),
            torch.as_tensor(np.asarray(defocus_v), dtype=torch.float32),
            torch.as_tensor(np.asarray(defocus_angle), dtype=torch.float32),
            **ctf,  # the optics; apply_ctf fills in OPTICS_DEFAULTS for any not given
        )
    if snr_db is None:
        variances = torch.zeros(images.shape[0])
    else:
        images, variances = add_gaussian_noise(images, snr_db=snr_db, generator=generator)
    if output_size is not None and int(output_size) < images.shape[-1]:
        images = fourier_crop(images, int(output_size))
    out = images.numpy().astype(np.float32, copy=False), np.asarray(variances, dtype=np.float32)
    if not return_clean:
        return out
    clean_variance = clean.double().reshape(clean.shape[0], -1).var(dim=1, unbiased=False).numpy()
    if output_size is not None and int(output_size) < clean.shape[-1]:
        clean = fourier_crop(clean, int(output_size))
    return *out, clean.numpy().astype(np.float32, copy=False), clean_variance.astype(np.float32)


def fourier_crop_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """``(D, D, D)`` → ``(size, size, size)`` float32 by cropping the centred 3-D Fourier transform.

    The 3-D analogue of :func:`~cryoorient_ray.core.imaging.fourier.fourier_crop` (same centring:
    voxel ``D // 2`` maps to ``size // 2``; values, not sums, are kept), so projecting the cropped
    map is Fourier-cropping the projections of the map. ``size ≥ D`` returns a float32 copy.
    """
    vol = torch.from_numpy(np.array(volume, dtype=np.float32))  # a copy (the input may be read-only)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise CryoOrientError(f"volume must be a cubic (D, D, D) array; got shape {tuple(vol.shape)}")
    d = vol.shape[0]
    if size >= d:
        return vol.numpy().copy()
    if size < 1:
        raise CryoOrientError(f"size must be >= 1; got {size}")
    axes = (0, 1, 2)
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol.double(), dim=axes)), dim=axes)
    a = d // 2 - size // 2
    ft = ft[a : a + size, a : a + size, a : a + size]
    out = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(ft, dim=axes)), dim=axes).real
    return (out * (size / d) ** 3).to(torch.float32).numpy()
