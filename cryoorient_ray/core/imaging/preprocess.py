"""What the distance network sees: the same preprocessing in training and in recovery.

:class:`Preprocess` is applied to every image before the model's per-image standardisation:

1. **phase flipping** (``phase_flip``, when the images carry a CTF): the image's Fourier transform
   times ``sign(CTF)`` of that image (RELION's convention, :mod:`~cryoorient_ray.core.imaging.ctf`,
   at the working pixel size), so the contrast of every frequency has one sign whatever the defocus;
   or the **Wiener CTF correction** (``ctf_wiener``): ``CTF(k) / (CTF(k)² + N / S₀(k))`` of each
   image, with ``S₀`` the radial power of the clean projections *before* the CTF and ``N`` the
   white noise's power: the least-squares estimate of the projection without its CTF, so images
   taken at different defoci look alike (the low frequencies a CTF damps are restored as far as
   the SNR allows). It already matches the SNR, so it takes no radial filter;
2. a **radial filter** (``filter``) matched to the SNR: ``wiener``, ``w(k) = S(k) / (S(k) + N)`` with
   ``S`` the radial power spectrum of the noiseless images the network sees (after the CTF and the
   flip) and ``N`` the power of the white noise at the working box; ``lowpass``, 1 up to the first
   shell where ``w < ½`` and 0 beyond; ``none``.

The filter is estimated once (:func:`estimate_preprocess`, from a training store's clean images and
the known noise level) and travels with the model file (``save_distance_model``), so every stage
that embeds images applies exactly the same thing. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryoorient_ray.core.imaging.ctf import OPTICS_DEFAULTS, ctf_2d
from cryoorient_ray.core.imaging.fourier import index_grid_2d
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "FILTERS",
    "Preprocess",
    "estimate_ctf_wiener",
    "estimate_preprocess",
    "phase_flip",
    "radial_power",
    "radial_shells",
]

FILTERS = ("wiener", "lowpass", "none")
# The Wiener CTF correction's N/S₀ is at least this: with no noise it stays bounded at CTF zeros
# (gain ≤ 1 / (2 √floor) ≈ 16).
_CTF_WIENER_FLOOR = 1e-3


def radial_shells(size: int, device=None) -> torch.Tensor:
    """``(L, L//2 + 1)`` integer shell index ``round(|k|)`` (cycles per box) of the ``rfft2`` grid."""
    ky, kx = index_grid_2d(size, rfft=True, device=device)
    return torch.round(torch.sqrt(ky * ky + kx * kx)).to(torch.long)


def n_shells(size: int) -> int:
    """Shells of an ``L × L`` image's ``rfft2`` grid (the corners reach ``L/√2``)."""
    return int(math.ceil(size / math.sqrt(2.0))) + 1


def radial_power(images: torch.Tensor) -> torch.Tensor:
    """``(n_shells,)`` float64 mean ``|rfft2(image)|²`` per radial shell over a batch ``(B, L, L)``."""
    x = torch.as_tensor(images, dtype=torch.float64)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise CryoOrientError(f"images must have shape (B, L, L); got {tuple(x.shape)}")
    size = x.shape[-1]
    shells = radial_shells(size).reshape(-1)
    power = (torch.fft.rfft2(x).abs() ** 2).mean(dim=0).reshape(-1)
    # rfft2 keeps half the plane: columns 1 … L/2−1 stand for two coefficients each, which the
    # mean over a shell does not need to know (both halves have the same power).
    total = torch.zeros(n_shells(size), dtype=torch.float64).index_add_(0, shells, power)
    count = torch.zeros(n_shells(size), dtype=torch.float64).index_add_(0, shells, torch.ones_like(power))
    return total / count.clamp_min(1)


def _ctf_values(size: int, pixel_size: float, ctf: dict, n_images: int, device=None) -> torch.Tensor:
    """``(B or 1, L, L//2 + 1)`` CTF of each image on the ``rfft2`` grid."""
    optics = {k: ctf[k] for k in OPTICS_DEFAULTS if k in ctf}
    c = ctf_2d(size, pixel_size, ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle"], device=device, **optics)
    if c.shape[0] not in (1, n_images):
        raise CryoOrientError(f"CTF parameters for {c.shape[0]} images given for {n_images} images")
    return c


def _ctf_sign(size: int, pixel_size: float, ctf: dict, n_images: int, device=None) -> torch.Tensor:
    """``(B or 1, L, L//2 + 1)`` float32 ``sign(CTF)`` (+1 at zeros) of each image on the ``rfft2`` grid."""
    c = _ctf_values(size, pixel_size, ctf, n_images, device)
    return torch.where(c >= 0, 1.0, -1.0).to(torch.float32)


def phase_flip(images: torch.Tensor, pixel_size: float, ctf: dict) -> torch.Tensor:
    """``(B, L, L)`` images with their Fourier transform times ``sign(CTF)`` of each image.

    ``ctf``: ``defocus_u``, ``defocus_v``, ``defocus_angle`` (scalars or ``(B,)``) and optionally the
    optics (:data:`~cryoorient_ray.core.imaging.ctf.OPTICS_DEFAULTS`), as ``ctf_2d`` takes them.
    """
    x = torch.as_tensor(images)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise CryoOrientError(f"images must have shape (B, L, L); got {tuple(x.shape)}")
    size = x.shape[-1]
    sign = _ctf_sign(size, pixel_size, ctf, x.shape[0], x.device)
    return torch.fft.irfft2(torch.fft.rfft2(x.to(torch.float32)) * sign, s=(size, size))


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing of :mod:`this module <cryoorient_ray.core.imaging.preprocess>` for ``image_size``² images.

    Attributes:
        image_size, pixel_size: the working box (pixels) and Å per pixel it was estimated for.
        phase_flip: flip by the sign of each image's CTF (then :meth:`apply` needs the CTF).
        filter: ``wiener``, ``lowpass`` or ``none``.
        gain: the filter per radial shell ``0 … n_shells − 1`` (cycles per box); None for ``none``.
        snr_db: the acquisition SNR the filter was matched to (a record).
        ctf_wiener: ``N / S₀`` per radial shell of the Wiener CTF correction (then :meth:`apply`
            needs the CTF; no phase flip and no filter beside it); None: not used.
    """

    image_size: int
    pixel_size: float
    phase_flip: bool = False
    filter: str = "none"
    gain: tuple[float, ...] | None = None
    snr_db: float | None = None
    ctf_wiener: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise CryoOrientError(f"preprocess filter must be one of {', '.join(FILTERS)}; got {self.filter!r}")
        if self.filter != "none":
            if self.gain is None or len(self.gain) != n_shells(int(self.image_size)):
                raise CryoOrientError(f"a {self.filter} filter needs {n_shells(int(self.image_size))} shell gains")
            if not all(math.isfinite(g) and 0 <= g <= 1 for g in self.gain):
                raise CryoOrientError("filter gains must lie in [0, 1]")
        if not math.isfinite(float(self.pixel_size)) or float(self.pixel_size) <= 0:
            raise CryoOrientError(f"pixel_size must be positive; got {self.pixel_size!r}")
        if self.ctf_wiener is not None:
            if self.phase_flip or self.filter != "none":
                raise CryoOrientError("the Wiener CTF correction takes neither a phase flip nor a radial filter")
            if len(self.ctf_wiener) != n_shells(int(self.image_size)):
                raise CryoOrientError(f"a Wiener CTF correction needs {n_shells(int(self.image_size))} shell values")
            if not all(math.isfinite(r) and r > 0 for r in self.ctf_wiener):
                raise CryoOrientError("the Wiener CTF correction's N/S values must be positive and finite")

    @property
    def identity(self) -> bool:
        return not self.phase_flip and self.filter == "none" and self.ctf_wiener is None

    @property
    def needs_ctf(self) -> bool:
        """True when :meth:`apply` needs each image's CTF (phase flip or Wiener CTF correction)."""
        return bool(self.phase_flip) or self.ctf_wiener is not None

    def gain_2d(self, device=None) -> torch.Tensor | None:
        """``(L, L//2 + 1)`` float32 filter on the ``rfft2`` grid, or None for no filter."""
        if self.filter == "none":
            return None
        g = torch.tensor(self.gain, dtype=torch.float32, device=device)
        return g[radial_shells(int(self.image_size), device=device)]

    def apply(self, images: torch.Tensor, ctf: dict | None = None) -> torch.Tensor:
        """``(B, L, L)`` images as the network sees them (before its standardisation).

        ``ctf``: each image's CTF (``defocus_u/v/angle`` ``(B,)`` plus optics) when :attr:`needs_ctf`.
        """
        x = torch.as_tensor(images)
        if self.identity:
            return x
        if x.ndim != 3 or x.shape[-1] != int(self.image_size) or x.shape[-2] != int(self.image_size):
            raise CryoOrientError(
                f"this preprocessing is for ({self.image_size}, {self.image_size}) images; got {tuple(x.shape[1:])}"
            )
        size = int(self.image_size)
        ft = torch.fft.rfft2(x.to(torch.float32))
        if self.needs_ctf and ctf is None:
            raise CryoOrientError("this model corrects its images' CTF: their CTF parameters are needed")
        if self.phase_flip:
            ft = ft * _ctf_sign(size, self.pixel_size, ctf, x.shape[0], x.device)
        if self.ctf_wiener is not None:
            h = _ctf_values(size, self.pixel_size, ctf, x.shape[0], x.device).to(torch.float32)
            r = torch.tensor(self.ctf_wiener, dtype=torch.float32, device=x.device)[radial_shells(size, x.device)]
            ft = ft * (h / (h * h + r))
        gain = self.gain_2d(x.device)
        if gain is not None:
            ft = ft * gain
        return torch.fft.irfft2(ft, s=(size, size)).to(x.dtype)

    def to_dict(self) -> dict:
        return {
            "image_size": int(self.image_size),
            "pixel_size": float(self.pixel_size),
            "phase_flip": bool(self.phase_flip),
            "filter": self.filter,
            "gain": None if self.gain is None else [float(g) for g in self.gain],
            "snr_db": self.snr_db,
            "ctf_wiener": None if self.ctf_wiener is None else [float(r) for r in self.ctf_wiener],
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess | None:
        if not d:
            return None
        d = dict(d)
        for key in ("gain", "ctf_wiener"):
            if d.get(key) is not None:
                d[key] = tuple(float(g) for g in d[key])
        return cls(**d)


def wiener_gain(signal_power: torch.Tensor, noise_power: float) -> torch.Tensor:
    """``S / (S + N)`` per shell (1 where there is no noise)."""
    s = torch.as_tensor(signal_power, dtype=torch.float64).clamp_min(0)
    if noise_power <= 0:
        return torch.ones_like(s)
    return s / (s + float(noise_power))


def estimate_preprocess(
    signal_images: torch.Tensor,
    noise_variance_working: float,
    pixel_size: float,
    filter: str = "wiener",
    phase_flip: bool = False,
    snr_db: float | None = None,
    noisy: bool = False,
) -> Preprocess:
    """The :class:`Preprocess` matched to a noise level.

    Args:
        signal_images: ``(B, L, L)`` noiseless images as the network would see them without noise
            (the clean projections, after the CTF and the phase flip when there is one); with
            ``noisy`` True, noisy ones (the white noise's power is subtracted from their spectrum).
        noise_variance_working: σ² per working pixel of the white noise (mean over images).
        pixel_size: Å per working pixel.
        filter: ``wiener``, ``lowpass`` or ``none``.
        phase_flip: record that images are phase-flipped (by their CTF) first.
        snr_db: the acquisition SNR this matches (recorded).
    """
    if filter not in FILTERS:
        raise CryoOrientError(f"preprocess filter must be one of {', '.join(FILTERS)}; got {filter!r}")
    x = torch.as_tensor(signal_images)
    size = int(x.shape[-1])
    if filter == "none":
        return Preprocess(size, float(pixel_size), phase_flip, "none", None, snr_db)
    var = float(noise_variance_working)
    if not math.isfinite(var) or var < 0:
        raise CryoOrientError(f"the noise variance must be finite and >= 0; got {noise_variance_working!r}")
    noise_power = var * size * size  # E|rfft2(white noise)|² per coefficient
    signal = radial_power(x)
    if noisy:
        signal = signal - noise_power
    w = wiener_gain(signal, noise_power)
    w[0] = 1.0  # the mean is removed by the standardisation anyway
    if filter == "lowpass":
        below = torch.nonzero(w[1:] < 0.5)
        cut = int(below[0]) + 1 if len(below) else len(w)
        w = (torch.arange(len(w)) < cut).to(torch.float64)
    gain = tuple(float(v) for v in np.clip(w.numpy(), 0.0, 1.0))
    return Preprocess(size, float(pixel_size), phase_flip, filter, gain, snr_db)


def estimate_ctf_wiener(
    clean_images: torch.Tensor, noise_variance_working: float, pixel_size: float, snr_db: float | None = None
) -> Preprocess:
    """The Wiener CTF correction matched to a noise level: ``N / S₀`` per shell.

    Args:
        clean_images: ``(B, L, L)`` noiseless projections *without* their CTF (a store's clean ones).
        noise_variance_working: σ² per working pixel of the white noise (mean over images; 0: none).
        pixel_size: Å per working pixel.
        snr_db: the acquisition SNR this matches (recorded).
    """
    x = torch.as_tensor(clean_images)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise CryoOrientError(f"clean images must have shape (B, L, L); got {tuple(x.shape)}")
    var = float(noise_variance_working)
    if not math.isfinite(var) or var < 0:
        raise CryoOrientError(f"the noise variance must be finite and >= 0; got {noise_variance_working!r}")
    size = int(x.shape[-1])
    signal = radial_power(x).clamp_min(1e-30)
    ratio = (var * size * size / signal).clamp(_CTF_WIENER_FLOOR, 1e12)
    return Preprocess(size, float(pixel_size), False, "none", None, snr_db, tuple(float(r) for r in ratio))
