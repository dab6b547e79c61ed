"""The contrast transfer function, exactly as RELION computes it (``CTF::getCTF`` in ``src/ctf.h``).

Parameters (RELION's ``.star`` names in brackets):

- ``defocus_u``, ``defocus_v`` [rlnDefocusU/V]: defocus in Å, positive = underfocus.
- ``defocus_angle`` [rlnDefocusAngle]: azimuth of the ``u`` axis, degrees from the image x axis
  towards y.
- ``voltage`` [rlnVoltage] in kV, ``cs`` [rlnSphericalAberration] in mm,
  ``amplitude_contrast`` ``Q0`` [rlnAmplitudeContrast], ``phase_shift`` [rlnPhaseShift] in
  degrees, ``bfactor`` [rlnCtfBfactor] in Å².

RELION's constants (``CTF::initialise``), with ``V`` in volts and ``Cs`` in Å::

    λ  = 12.2643247 / sqrt(V · (1 + V · 0.978466e-6))            (Å)
    K1 = π·λ,   K2 = (π/2)·Cs·λ³,   K3 = atan(Q0 / sqrt(1 − Q0²)),   K4 = −B/4,   K5 = phase_shift (rad)
    deltaf(φ) = −[(defU + defV)/2 + (defU − defV)/2 · cos(2(φ − defocus_angle))]

and at a spatial frequency ``(sx, sy)`` (1/Å), ``s² = sx² + sy²``, ``φ = atan2(sy, sx)``::

    γ   = K1 · deltaf(φ) · s² + K2 · s⁴ − K5 − K3
    CTF = −sin(γ) · exp(K4 · s²)

Writing ``χ = π λ Δf s² − (π/2) Cs λ³ s⁴ + K3 + K5`` with ``Δf = −deltaf > 0`` for underfocus,
``γ = −χ`` and ``CTF = sin(χ) · exp(−B s²/4)``. At ``s = 0``: ``CTF(0) = −sin(−K3 − K5) =
sin(K3 + K5)``, i.e. ``sin(K3) = Q0 > 0`` without phase plate. It then *rises* with underfocus
(RELION's sign: positive at low frequency, so a projection of positive density stays positive
after the CTF). With ``Cs = 0`` and ``Q0 = 0`` the zeros are at ``s² = n / (λ Δf)``.

The 2D grids are in torch's FFT layout (``fftfreq`` along y = rows, ``rfftfreq``/``fftfreq``
along x = the last axis, spacing ``1 / (L · pixel_size)``), so they multiply ``rfft2``/``fft2`` of
``[y, x]`` images directly. The CTF is even in ``(sx, sy)``, so the image origin convention
does not matter for the product.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_pixel_size, to_output
from cryoorient_ray.core.imaging.fourier import freq_grid_2d_per_A
from cryoorient_ray.errors import CryoOrientError

__all__ = ["OPTICS_DEFAULTS", "apply_ctf", "check_ctf_params", "ctf_2d", "ctf_at", "electron_wavelength"]


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å at ``voltage_kv`` kV (RELION's formula)."""
    v = float(voltage_kv) * 1e3
    if not v > 0:
        raise CryoOrientError(f"voltage must be positive (kV); got {voltage_kv!r}")
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


# The optics parameters of every CTF function (keyword arguments) and their defaults.
OPTICS_DEFAULTS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1, "phase_shift": 0.0, "bfactor": 0.0}


def _params(
    defocus_u: ArrayLike, defocus_v: ArrayLike, defocus_angle: ArrayLike, optics: dict[str, ArrayLike]
) -> tuple[dict[str, torch.Tensor], int]:
    """Cast CTF parameters to float64 ``(B,)`` tensors, broadcasting scalars and length-1 arrays.

    ``optics`` holds any of :data:`OPTICS_DEFAULTS`' keys (the rest take their defaults).
    """
    unknown = sorted(set(optics) - set(OPTICS_DEFAULTS))
    if unknown:
        raise CryoOrientError(f"unknown CTF parameter(s) {unknown}; the optics are {', '.join(OPTICS_DEFAULTS)}")
    params = {"defocus_u": defocus_u, "defocus_v": defocus_v, "defocus_angle": defocus_angle}
    params.update({**OPTICS_DEFAULTS, **optics})
    out: dict[str, torch.Tensor] = {}
    batch = 1
    for name, value in params.items():
        t, _ = as_tensor(value)
        t = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1) if t.ndim <= 1 else None
        if t is None:
            raise CryoOrientError(f"{name} must be a scalar or a 1-D array of length B; got shape {np.shape(value)}")
        if t.numel() == 0:
            raise CryoOrientError(f"{name} is empty")
        if not torch.isfinite(t).all():
            raise CryoOrientError(f"{name} contains NaN or infinite values")
        if t.numel() != 1:
            if batch not in (1, t.numel()):
                sizes = {k: v.numel() for k, v in out.items()}
                raise CryoOrientError(f"CTF parameters have mismatched batch sizes: {name} has {t.numel()}, {sizes}")
            batch = t.numel()
        out[name] = t
    out = {k: v.expand(batch) for k, v in out.items()}
    if (out["voltage"] <= 0).any():
        raise CryoOrientError("voltage must be positive (kV)")
    q0 = out["amplitude_contrast"]
    if ((q0 < 0) | (q0 > 1)).any():
        raise CryoOrientError("amplitude_contrast must lie in [0, 1]")
    return out, batch


def check_ctf_params(defocus_u: ArrayLike, defocus_v: ArrayLike, defocus_angle: ArrayLike, **optics: ArrayLike) -> int:
    """Check CTF parameters as :func:`ctf_2d` takes them (finite, one batch size, voltage > 0,
    ``0 ≤ Q0 ≤ 1``, no unknown name); returns the batch size ``B``."""
    return _params(defocus_u, defocus_v, defocus_angle, optics)[1]


def _ctf_from_params(sx: torch.Tensor, sy: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """RELION's CTF at frequencies ``sx, sy`` (1/Å, broadcastable) for ``(B,)`` float64 parameters."""
    v = p["voltage"] * 1e3
    lam = 12.2643247 / torch.sqrt(v * (1.0 + v * 0.978466e-6))
    cs = p["cs"] * 1e7  # mm → Å
    q0 = p["amplitude_contrast"]
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs * lam**3
    k3 = torch.atan2(q0, torch.sqrt(1.0 - q0 * q0))  # = atan(Q0 / sqrt(1 - Q0²)), finite at Q0 = 1
    k4 = -p["bfactor"] / 4.0
    k5 = torch.deg2rad(p["phase_shift"])
    defocus_average = -(p["defocus_u"] + p["defocus_v"]) * 0.5
    defocus_deviation = -(p["defocus_u"] - p["defocus_v"]) * 0.5
    az = torch.deg2rad(p["defocus_angle"])

    def col(t: torch.Tensor) -> torch.Tensor:  # (B,) → (B, 1, ..., 1) against the frequency grid
        return t.reshape((-1,) + (1,) * sx.ndim)

    u2 = sx * sx + sy * sy
    u4 = u2 * u2
    phi = torch.atan2(sy, sx)
    deltaf = col(defocus_average) + col(defocus_deviation) * torch.cos(2.0 * (phi - col(az)))
    gamma = col(k1) * deltaf * u2 + col(k2) * u4 - col(k5) - col(k3)
    return -torch.sin(gamma) * torch.exp(col(k4) * u2)


def ctf_at(
    freq_x: ArrayLike,
    freq_y: ArrayLike,
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    defocus_angle: ArrayLike,
    **optics: ArrayLike,
) -> ArrayLike:
    """RELION's CTF at arbitrary frequencies.

    Args:
        freq_x, freq_y: spatial frequencies in 1/Å (any broadcastable shapes ``S``).
        defocus_u, defocus_v, defocus_angle: scalars or ``(B,)`` arrays (Å, Å, degrees).
        optics: ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``, ``phase_shift`` (degrees),
            ``bfactor`` (Å²), scalars or ``(B,)`` arrays; defaults :data:`OPTICS_DEFAULTS`.

    Returns:
        ``(B,) + S`` float64 values, numpy if ``freq_x`` was numpy.
    """
    sx, was_np = as_tensor(freq_x)
    sy, _ = as_tensor(freq_y)
    if not isinstance(freq_x, torch.Tensor):  # as_tensor turns scalars into (1,) arrays
        sx = sx.reshape(np.shape(freq_x))
    if not isinstance(freq_y, torch.Tensor):
        sy = sy.reshape(np.shape(freq_y))
    sx, sy = torch.broadcast_tensors(sx.to(torch.float64), sy.to(device=sx.device, dtype=torch.float64))
    p, _ = _params(defocus_u, defocus_v, defocus_angle, optics)
    p = {k: v.to(sx.device) for k, v in p.items()}
    return to_output(_ctf_from_params(sx, sy, p), was_np)


def _check_size(image_size: int, pixel_size: float) -> tuple[int, float]:
    if isinstance(image_size, bool) or int(image_size) != image_size or int(image_size) < 1:
        raise CryoOrientError(f"image_size must be a positive integer; got {image_size!r}")
    px = check_pixel_size(pixel_size)
    return int(image_size), px


def ctf_2d(
    image_size: int,
    pixel_size: float,
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    defocus_angle: ArrayLike,
    *,
    rfft: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
    **optics: ArrayLike,
) -> torch.Tensor:
    """CTF on the FFT grid of ``L × L`` images with pixels of ``pixel_size`` Å.

    Args:
        image_size: ``L``.
        pixel_size: Å per pixel (> 0).
        defocus_u, defocus_v, defocus_angle: scalars or ``(B,)`` arrays (Å, Å, degrees).
        optics: ``voltage``, ``cs``, ``amplitude_contrast``, ``phase_shift``, ``bfactor`` as
            :func:`ctf_at` takes them. All arrays have one length ``B``; units in the module docstring.
        rfft: ``True`` for the half grid of ``torch.fft.rfft2`` (``(B, L, L//2 + 1)``), ``False``
            for the full ``torch.fft.fft2`` grid (``(B, L, L)``); both unshifted (zero frequency
            at ``[0, 0]``, ``fftshift`` for display).
        dtype, device: of the returned tensor (computed in float64).

    Returns:
        ``(B, L, L//2 + 1)`` or ``(B, L, L)`` torch tensor; rows are y frequencies, columns x.
    """
    lsize, px = _check_size(image_size, pixel_size)
    p, _ = _params(defocus_u, defocus_v, defocus_angle, optics)
    sy, sx = freq_grid_2d_per_A(lsize, px, rfft=rfft)
    return _ctf_from_params(sx, sy, p).to(dtype=dtype, device=device)


def apply_ctf(
    images: ArrayLike,
    pixel_size: float,
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    defocus_angle: ArrayLike,
    *,
    pad_factor: int = 2,
    **optics: ArrayLike,
) -> ArrayLike:
    """Multiply ``(B, L, L)`` images by the CTF in Fourier space.

    Each image is zero-padded (centred) to ``pad_factor · L``, so the CTF's point-spread function
    does not wrap round the box, multiplied by :func:`ctf_2d` on that finer grid and cropped back.
    Parameters (as :func:`ctf_2d` takes them; ``optics`` as :func:`ctf_at`) are scalars (one
    CTF for all images) or ``(B,)`` arrays (one per image).

    Returns:
        ``(B, L, L)`` images of the type and dtype given.
    """
    imgs, was_np = as_tensor(images)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise CryoOrientError(f"images must have shape (B, L, L); got {tuple(imgs.shape)}")
    if isinstance(pad_factor, bool) or int(pad_factor) != pad_factor or int(pad_factor) < 1:
        raise CryoOrientError(f"pad_factor must be an integer >= 1; got {pad_factor!r}")
    b, lsize = imgs.shape[0], imgs.shape[1]
    m = int(pad_factor) * lsize
    ctf = ctf_2d(m, pixel_size, defocus_u, defocus_v, defocus_angle, dtype=imgs.dtype, device=imgs.device, **optics)
    if ctf.shape[0] not in (1, b):
        raise CryoOrientError(f"CTF parameters have batch size {ctf.shape[0]} but there are {b} images")
    before = m // 2 - lsize // 2  # pixel L//2 stays the centre: it lands on m//2
    after = m - lsize - before
    padded = torch.nn.functional.pad(imgs, (before, after, before, after))
    out = torch.fft.irfft2(torch.fft.rfft2(padded) * ctf, s=(m, m))
    return to_output(out[:, before : before + lsize, before : before + lsize], was_np)
