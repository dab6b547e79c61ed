"""Fresh noise, CTF and shifts drawn for every training batch, with the simulator's statistics.

Training on a fixed noisy store lets a small network memorise the noise of each image. Instead,
the store keeps the clean projections (``clean``: the projection at the working box before CTF and
noise, Fourier-cropped with the noisy images' scaling) and :class:`FreshCorruption` draws new
noise (and, when asked, a new CTF and shift) every time an image is used, so the network never
sees the same noisy image twice.

Matching the simulator (:func:`~cryoorient_ray.core.imaging.forward.render_projections` at the
acquisition box followed by the Fourier crop; docs/CONVENTIONS.md, "Noise"):

- the SNR is set at the acquisition box, per image: ``σ²_acq = var_acq(C · clean) / 10^(SNR/10)``
  where ``var_acq`` is the variance over the acquisition box. The store records each image's
  ``clean_variance`` (the acquisition-box variance of the projection before the CTF); with a CTF,
  ``var_acq(C · x) ≈ var(C · x_w) + ⟨C²⟩_removed · (clean_variance − var(x_w))``: the working
  band's variance measured on the working box plus the band the crop removed, scaled by the CTF's
  mean square over those frequencies (exact without CTF);
- the Fourier crop keeps ``(L / L_acq)²`` of white noise's power, so the noise added to the
  working image is white with ``σ²_w = σ²_acq · (L / L_acq)²`` (the manifest's
  ``noise_variance_to_working``);
- the CTF is RELION's at the working pixel size (the crop keeps the frequencies below the working
  Nyquist, where the two agree), applied on a 2× padded image as the simulator does; defoci are
  drawn as :func:`~cryoorient_ray.core.imaging.parameters.sample_defocus` draws them.

Pure torch; a seeded ``torch.Generator`` makes every draw reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cryoorient_ray.core._array import check_pixel_size
from cryoorient_ray.core.imaging.ctf import OPTICS_DEFAULTS, apply_ctf, ctf_2d
from cryoorient_ray.core.imaging.fourier import freq_grid_2d, index_grid_2d, phase_ramp
from cryoorient_ray.errors import CryoOrientError

__all__ = ["Corrupted", "FreshCorruption", "shift_images"]


@dataclass(frozen=True)
class Corrupted:
    """A freshly corrupted batch: ``images (B, L, L)``, the CTF it got (``ctf``: ``defocus_u``,
    ``defocus_v``, ``defocus_angle`` ``(B,)`` tensors plus the optics, as
    :func:`~cryoorient_ray.core.imaging.ctf.ctf_2d` takes them; None without CTF), the SNR drawn
    per image (``snr_db (B,)``, dB at acquisition; None when noiseless), σ² per working pixel and
    the images before the noise (``signal``)."""

    images: torch.Tensor
    ctf: dict | None
    snr_db: torch.Tensor | None
    noise_variance_working: torch.Tensor
    signal: torch.Tensor  # the images before the noise (shifted and CTF'd clean projections)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 1:
        raise CryoOrientError(f"{name} must be a positive integer (pixels); got {value!r}")
    return int(value)


def _check_db(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CryoOrientError(f"{name} must be a number (dB); got {value!r}") from None
    if not math.isfinite(v):
        raise CryoOrientError(f"{name} must be a finite SNR in dB; got {value!r}")
    return v


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``(B, L, L)`` images moved by ``shifts (B, 2)`` = ``(x, y)`` pixels (sub-pixel: a Fourier phase
    ramp on the 2× zero-padded image, so content leaving the box is cut, never wrapped round)."""
    b, size = images.shape[0], images.shape[-1]
    m = 2 * size
    before = m // 2 - size // 2
    after = m - size - before
    padded = torch.nn.functional.pad(images, (before, after, before, after))
    fy, fx = freq_grid_2d(m, rfft=True, dtype=images.dtype, device=images.device)
    ramp = phase_ramp(shifts.to(images.dtype), fx, fy)
    out = torch.fft.irfft2(torch.fft.rfft2(padded) * ramp, s=(m, m))
    return out[:, before : before + size, before : before + size].reshape(b, size, size)


@dataclass(frozen=True)
class FreshCorruption:
    """What :meth:`apply` draws per image, at the store's geometry.

    Attributes:
        working_size, working_pixel_size: the box ``L`` (pixels) and Å per pixel the images are at.
        acquisition_size, acquisition_pixel_size: where the SNR is set (``L_acq ≥ L``; the same
            field of view). Equal to the working ones for stores simulated at the working box.
        snr_db: the target SNR at acquisition (dB), one value or a range ``(lo, hi)`` drawn uniformly
            per image; None = no noise (CTF/shift only).
        curriculum_start_db: with a curriculum, the (upper) SNR at ``progress`` 0, in dB; the
            range moves linearly to ``snr_db`` over the first ``curriculum_fraction`` of training;
            None = always the target.
        ctf: None (no CTF), or the defocus ranges and optics ``{"defocus_min", "defocus_max",
            "astigmatism_max"`` (Å), ``"voltage"``, ``"cs"``, ``"amplitude_contrast"}``; a fresh
            defocus is drawn per image as the simulator draws it.
        max_shift_px: a fresh shift uniform in ``±max_shift_px`` working pixels per axis on top of
            the clean image's own (0 = none).
    """

    working_size: int
    working_pixel_size: float
    acquisition_size: int
    acquisition_pixel_size: float
    snr_db: float | tuple[float, float] | None = None
    curriculum_start_db: float | None = None
    curriculum_fraction: float = 0.5
    ctf: dict | None = None
    max_shift_px: float = 0.0
    _range: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lw = _check_size("the working box", self.working_size)
        la = _check_size("the acquisition box", self.acquisition_size)
        if la < lw:
            raise CryoOrientError(
                f"the acquisition box ({la} px) is smaller than the working box ({lw} px): images are "
                "Fourier-cropped from acquisition to working, so it must be at least as large"
            )
        pw = check_pixel_size(self.working_pixel_size, "the working pixel size")
        pa = check_pixel_size(self.acquisition_pixel_size, "the acquisition pixel size")
        if abs(pa * la - pw * lw) > 1e-3 * pw * lw:
            raise CryoOrientError(
                f"acquisition {la} px × {pa:g} Å and working {lw} px × {pw:g} Å do not span the same field of view"
            )
        rng = None
        if self.snr_db is not None:
            if isinstance(self.snr_db, (tuple, list)):
                if len(self.snr_db) != 2:
                    raise CryoOrientError(f"an SNR range is [lo, hi] in dB; got {self.snr_db!r}")
                lo, hi = (_check_db("snr_db", v) for v in self.snr_db)
                if lo > hi:
                    raise CryoOrientError(f"the SNR range [{lo:g}, {hi:g}] dB has lo > hi")
                rng = (lo, hi)
            else:
                v = _check_db("snr_db", self.snr_db)
                rng = (v, v)
        if self.curriculum_start_db is not None:
            _check_db("curriculum_start_db", self.curriculum_start_db)
            if rng is None:
                raise CryoOrientError("a noise curriculum needs a target snr_db")
        if not 0 < float(self.curriculum_fraction) <= 1:
            raise CryoOrientError(f"curriculum_fraction must lie in (0, 1]; got {self.curriculum_fraction!r}")
        if not math.isfinite(float(self.max_shift_px)) or float(self.max_shift_px) < 0:
            raise CryoOrientError(f"max_shift_px must be >= 0; got {self.max_shift_px!r}")
        if self.ctf is not None:
            need = {"defocus_min", "defocus_max"}
            missing = sorted(need - set(self.ctf))
            if missing:
                raise CryoOrientError(f"a fresh CTF needs {', '.join(missing)} (Å)")
            unknown = sorted(set(self.ctf) - need - {"astigmatism_max"} - set(OPTICS_DEFAULTS))
            if unknown:
                raise CryoOrientError(f"unknown fresh-CTF setting(s) {unknown}")
            if not 0 <= float(self.ctf["defocus_min"]) <= float(self.ctf["defocus_max"]):
                raise CryoOrientError(
                    f"need 0 <= defocus_min <= defocus_max, got {self.ctf['defocus_min']}, {self.ctf['defocus_max']}"
                )
        object.__setattr__(self, "_range", rng)

    # ------------------------------------------------------------------ derived
    @property
    def noise_variance_to_working(self) -> float:
        """``(L / L_acq)²``: σ² per working pixel of white noise set at the acquisition box, per σ²_acq."""
        return (self.working_size / self.acquisition_size) ** 2

    @property
    def optics(self) -> dict:
        """The CTF's optics (voltage, Cs, amplitude contrast …) with RELION's defaults filled in."""
        ctf = self.ctf or {}
        return {k: float(ctf.get(k, v)) for k, v in OPTICS_DEFAULTS.items()}

    def snr_range(self, progress: float = 1.0) -> tuple[float, float] | None:
        """``(lo, hi)`` dB at acquisition at ``progress`` ∈ [0, 1] of training (the curriculum's
        offset decays linearly to 0 over ``curriculum_fraction``); None when noiseless."""
        if self._range is None:
            return None
        lo, hi = self._range
        if self.curriculum_start_db is None:
            return lo, hi
        t = min(1.0, max(0.0, float(progress)) / float(self.curriculum_fraction))
        offset = max(0.0, float(self.curriculum_start_db) - hi) * (1.0 - t)
        return lo + offset, hi + offset

    def to_dict(self) -> dict:
        """JSON-able settings (``FreshCorruption(**d)`` rebuilds it)."""
        return {
            "working_size": self.working_size,
            "working_pixel_size": self.working_pixel_size,
            "acquisition_size": self.acquisition_size,
            "acquisition_pixel_size": self.acquisition_pixel_size,
            "snr_db": list(self.snr_db) if isinstance(self.snr_db, (tuple, list)) else self.snr_db,
            "curriculum_start_db": self.curriculum_start_db,
            "curriculum_fraction": self.curriculum_fraction,
            "ctf": None if self.ctf is None else dict(self.ctf),
            "max_shift_px": self.max_shift_px,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FreshCorruption:
        d = dict(d)
        if isinstance(d.get("snr_db"), list):
            d["snr_db"] = tuple(d["snr_db"])
        return cls(**d)

    def _removed_band_ctf2(self, params: dict) -> torch.Tensor:
        """``(B,)`` mean CTF² over the acquisition frequencies the crop to the working box removes."""
        if self.acquisition_size == self.working_size:
            return torch.zeros(torch.as_tensor(params["defocus_u"]).numel(), dtype=torch.float64)
        la = self.acquisition_size
        ky, kx = index_grid_2d(la, rfft=True)
        half = self.working_size / 2
        band = (ky.abs() > half) | (kx > half)
        c = ctf_2d(
            la,
            self.acquisition_pixel_size,
            params["defocus_u"],
            params["defocus_v"],
            params["defocus_angle"],
            dtype=torch.float64,
            **{k: params[k] for k in OPTICS_DEFAULTS if k in params},
        )
        return (c[:, band] ** 2).mean(dim=1)

    # ------------------------------------------------------------------ drawing
    def draw_ctf(self, n: int, generator: torch.Generator | None = None) -> dict | None:
        """Fresh CTF parameters for ``n`` images (as the simulator draws them), or None without CTF."""
        if self.ctf is None:
            return None
        lo, hi = float(self.ctf["defocus_min"]), float(self.ctf["defocus_max"])
        astig_max = float(self.ctf.get("astigmatism_max", 0.0))
        mean = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        astig = astig_max * torch.rand(n, generator=generator, dtype=torch.float64)
        angle = 180.0 * torch.rand(n, generator=generator, dtype=torch.float64)
        return {"defocus_u": mean + astig / 2, "defocus_v": mean - astig / 2, "defocus_angle": angle, **self.optics}

    def apply(
        self,
        clean: torch.Tensor,
        clean_variance: torch.Tensor,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        ctf: dict | None = None,
    ) -> Corrupted:
        """Corrupt ``clean (B, L, L)`` working-box projections afresh.

        Args:
            clean: the store's ``clean`` images (before CTF and noise).
            clean_variance: ``(B,)`` variance of each clean projection over the acquisition box
                (the store's ``clean_variance``); sets σ² so the SNR is the simulator's.
            progress: fraction of training done, for the curriculum.
            generator: seeded torch generator (CPU) for every draw.
            ctf: CTF parameters to use instead of fresh ones (e.g. the store's, as the simulator
                applied them); only with a CTF.

        Returns:
            :class:`Corrupted` (images, the CTF applied, the SNR drawn, σ² per working pixel).
        """
        x = torch.as_tensor(clean)
        if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[-1] != self.working_size:
            raise CryoOrientError(
                f"clean images must be (B, {self.working_size}, {self.working_size}); got {tuple(x.shape)}"
            )
        x = x.to(torch.float32)
        b = x.shape[0]
        var_clean = torch.as_tensor(clean_variance, dtype=torch.float64).reshape(-1).cpu()
        if var_clean.numel() != b:
            raise CryoOrientError(f"clean_variance needs one value per image ({b}); got {var_clean.numel()}")
        if self.max_shift_px > 0:
            m = float(self.max_shift_px)
            shifts = (2 * torch.rand(b, 2, generator=generator) - 1) * m
            x = shift_images(x, shifts.to(x.device))
        params = None
        if self.ctf is not None:
            params = dict(ctf) if ctf is not None else self.draw_ctf(b, generator)
            before = x.double().reshape(b, -1).var(dim=1, unbiased=False).cpu()
            x = apply_ctf(
                x,
                self.working_pixel_size,
                params["defocus_u"],
                params["defocus_v"],
                params["defocus_angle"],
                **{k: params[k] for k in OPTICS_DEFAULTS if k in params},
            )
            after = x.double().reshape(b, -1).var(dim=1, unbiased=False).cpu()
            # the acquisition box's variance = the working band's + the band the crop removed; the CTF
            # scales the latter by its mean square over that band
            removed = (var_clean - before).clamp_min(0)
            signal = after + removed * self._removed_band_ctf2(params)
        elif ctf is not None:
            raise CryoOrientError("CTF parameters were given but this corruption applies no CTF")
        else:
            signal = var_clean
        rng = self.snr_range(progress)
        if rng is None:
            return Corrupted(x, params, None, torch.zeros(b, dtype=torch.float64), x)
        lo, hi = rng
        snr = (
            lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)
            if hi > lo
            else torch.full((b,), lo, dtype=torch.float64)
        )
        var_w = signal / 10.0 ** (snr / 10.0) * self.noise_variance_to_working
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        noisy = x + noise.to(x.device) * var_w.sqrt().to(torch.float32).to(x.device)[:, None, None]
        return Corrupted(noisy, params, snr, var_w, x)
