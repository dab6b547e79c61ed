"""Additive white Gaussian noise at a chosen SNR or variance.

The SNR of an image is ``var(clean image) / σ²`` (signal variance over all the pixels of the
box, population variance, divided by the noise variance), in decibels ``10 · log10(SNR)``. The
paper's setting ``σ² = 16`` against a signal variance ≈ 1.04 is ``10 · log10(1.04 / 16) ≈ −11.9 dB``.
The simulator applies it at the acquisition box, before images are Fourier-cropped to the working
box (:mod:`cryoorient_ray.core.imaging.forward`; docs/CONVENTIONS.md, "Noise").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, to_output
from cryoorient_ray.errors import CryoOrientError

__all__ = ["add_gaussian_noise", "ratio_to_snr_db", "snr_db_to_ratio"]


def snr_db_to_ratio(snr_db: ArrayLike) -> ArrayLike:
    """``10 ** (snr_db / 10)``: decibels to the power ratio (scalars stay Python floats)."""
    if isinstance(snr_db, (int, float)) and not isinstance(snr_db, bool):
        return 10.0 ** (float(snr_db) / 10.0)
    t, was_np = as_tensor(snr_db)
    return to_output(10.0 ** (t / 10.0), was_np)


def ratio_to_snr_db(ratio: ArrayLike) -> ArrayLike:
    """``10 · log10(ratio)``: power ratio (> 0) to decibels (scalars stay Python floats)."""
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        if not ratio > 0:
            raise CryoOrientError(f"an SNR ratio must be positive; got {ratio!r}")
        return 10.0 * math.log10(float(ratio))
    t, was_np = as_tensor(ratio)
    if not (t > 0).all():
        raise CryoOrientError("an SNR ratio must be positive")
    return to_output(10.0 * torch.log10(t), was_np)


def add_gaussian_noise(
    images: ArrayLike,
    snr_db: float | None = None,
    variance: ArrayLike | None = None,
    generator: torch.Generator | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """Add i.i.d. Gaussian noise to ``(B, L, L)`` images; give exactly one of ``snr_db`` / ``variance``.

    Args:
        images: ``(B, L, L)`` clean images (numpy or torch).
        snr_db: target SNR in dB; image ``b`` gets noise of variance ``var(images[b]) / 10^(snr_db/10)``
            (a constant image gets no noise).
        variance: noise variance σ², a scalar or ``(B,)`` array (≥ 0).
        generator: a seeded ``torch.Generator`` (on the images' device) makes the noise reproducible.

    Returns:
        ``(noisy (B, L, L), variances (B,))``, of the type and dtype given.
    """
    imgs, was_np = as_tensor(images)
    if imgs.ndim != 3:
        raise CryoOrientError(f"images must have shape (B, L, L); got {tuple(imgs.shape)}")
    if (snr_db is None) == (variance is None):
        raise CryoOrientError("give exactly one of snr_db and variance")
    b = imgs.shape[0]
    if snr_db is not None:
        try:
            snr = float(snr_db)
        except (TypeError, ValueError):
            raise CryoOrientError(f"snr_db must be a number (dB); got {snr_db!r}") from None
        if not math.isfinite(snr):
            raise CryoOrientError(f"snr_db must be finite; got {snr_db!r}")
        signal = imgs.detach().reshape(b, -1).var(dim=1, unbiased=False) if b else imgs.new_zeros(0)
        var = signal / snr_db_to_ratio(snr)
    else:
        var, _ = as_tensor(variance)
        var = var.detach().to(dtype=imgs.dtype, device=imgs.device)
        if var.ndim > 1 or (var.ndim == 1 and var.shape[0] not in (1, b)):
            raise CryoOrientError(f"variance must be a scalar or a (B,) = ({b},) array; got shape {np.shape(variance)}")
        if not torch.isfinite(var).all() or (var < 0).any():
            raise CryoOrientError("variance must be finite and >= 0")
        var = var.reshape(-1).expand(b).clone() if var.ndim else var.expand(b).clone()
    try:
        noise = torch.randn(imgs.shape, generator=generator, dtype=imgs.dtype, device=imgs.device)
    except RuntimeError as exc:  # e.g. a CPU generator for CUDA images
        raise CryoOrientError(f"cannot draw noise with this generator: {exc}") from None
    noisy = imgs + noise * var.sqrt()[:, None, None]
    return to_output(noisy, was_np), to_output(var, was_np)
