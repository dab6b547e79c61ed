"""One particle stack: the images with their shifts, CTF and pixel size, as the algorithms take them.

ASPIRE style: the reconstructors (:mod:`cryoorient_ray.core.reconstruction.inversion`), the refiner
(:mod:`cryoorient_ray.core.refinement.local`) and the gauge (:mod:`cryoorient_ray.core.recovery.gauge`)
take one :class:`ParticleStack` instead of parallel arrays; :meth:`ParticleStack.subset` keeps them
together (one place that indexes the CTF), :meth:`ParticleStack.fourier_crop` keeps the pixel size
and the shifts in step with the images. ``ProjectionStore.particles(rows)`` reads one from a store.

Units: images ``(P, L, L)`` indexed ``[y, x]`` (origin pixel ``L // 2``), shifts ``(P, 2)`` as
``(tx, ty)`` pixels (the object's centre sits at ``(L // 2 + tx, L // 2 + ty)``), pixel size in Å,
CTF parameters in RELION's units (:mod:`cryoorient_ray.core.imaging.ctf`). Pure numpy/torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_pixel_size
from cryoorient_ray.core.imaging.ctf import OPTICS_DEFAULTS, check_ctf_params, ctf_2d
from cryoorient_ray.errors import CryoOrientError

__all__ = ["CTF_KEYS", "CTFParams", "ParticleStack", "as_particle_stack"]

# Keys of a CTF parameter dict (as ctf_2d takes them); the first three are required.
CTF_KEYS = ("defocus_u", "defocus_v", "defocus_angle", *OPTICS_DEFAULTS)


def _values(value: ArrayLike, name: str) -> np.ndarray:
    v = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if v.ndim > 1:
        raise CryoOrientError(f"CTF parameter {name} must be a scalar or a 1-D array; got shape {v.shape}")
    v = v.reshape(-1)
    if v.size == 0:
        raise CryoOrientError(f"CTF parameter {name} is empty")
    return v


@dataclass(frozen=True, eq=False)
class CTFParams:
    """CTF parameters of a stack: every field a float64 ``(P,)`` array (one per image) or ``(1,)`` (shared).

    Attributes:
        defocus_u, defocus_v: defocus in Å, positive = underfocus [rlnDefocusU/V].
        defocus_angle: azimuth of the ``u`` axis in degrees [rlnDefocusAngle].
        voltage: kV; cs: spherical aberration in mm; amplitude_contrast: ``Q0`` in ``[0, 1]``;
        phase_shift: degrees; bfactor: Å².

    The values are checked (finite, voltage > 0, ``0 ≤ Q0 ≤ 1``, one length) on construction.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray = field(default_factory=lambda: np.array([300.0]))
    cs: np.ndarray = field(default_factory=lambda: np.array([2.7]))
    amplitude_contrast: np.ndarray = field(default_factory=lambda: np.array([0.1]))
    phase_shift: np.ndarray = field(default_factory=lambda: np.array([0.0]))
    bfactor: np.ndarray = field(default_factory=lambda: np.array([0.0]))

    def __post_init__(self) -> None:
        for key in CTF_KEYS:
            object.__setattr__(self, key, _values(getattr(self, key), key))
        check_ctf_params(**self.to_dict())  # finite, voltage > 0, 0 ≤ Q0 ≤ 1, one batch size

    @classmethod
    def from_dict(cls, params: dict) -> CTFParams:
        """From a dict with the keys :data:`CTF_KEYS` (the first three required; scalars or ``(P,)`` arrays)."""
        unknown = sorted(set(params) - set(CTF_KEYS))
        if unknown:
            raise CryoOrientError(f"unknown CTF parameter(s) {unknown}; use {', '.join(CTF_KEYS)}")
        missing = [k for k in CTF_KEYS[:3] if k not in params]
        if missing:
            raise CryoOrientError(f"the CTF needs {', '.join(missing)} (per image or one value for all)")
        return cls(**{k: params.get(k, OPTICS_DEFAULTS.get(k)) for k in CTF_KEYS})

    def to_dict(self) -> dict[str, np.ndarray]:
        """The parameters as keyword arguments of :func:`~cryoorient_ray.core.imaging.ctf.ctf_2d` / ``apply_ctf``."""
        return {k: getattr(self, k) for k in CTF_KEYS}

    def __len__(self) -> int:
        """The number of images (1 when every value is shared)."""
        return max(getattr(self, k).size for k in CTF_KEYS)

    def check_length(self, n_images: int) -> None:
        """Raise unless every field has 1 or ``n_images`` values."""
        for k in CTF_KEYS:
            if getattr(self, k).size not in (1, n_images):
                raise CryoOrientError(f"CTF parameter {k} has {getattr(self, k).size} values for {n_images} images")

    def subset(self, idx: ArrayLike) -> CTFParams:
        """The parameters of the images ``idx`` (shared values kept)."""
        i = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
        return CTFParams(**{k: (v if v.size == 1 else v[i]) for k, v in self.to_dict().items()})

    def grid(self, size: int, pixel_size_A: float, idx: torch.Tensor, dtype=torch.float32, device=None) -> torch.Tensor:
        """CTF ``(m, size, size//2 + 1)`` of the ``m`` images ``idx`` on the ``rfft2`` grid of ``size²`` images."""
        out = ctf_2d(size, pixel_size_A, **self.subset(idx).to_dict(), dtype=dtype, device=device)
        return out.expand(idx.numel(), -1, -1) if out.shape[0] == 1 else out


@dataclass(frozen=True, eq=False)
class ParticleStack:
    """``P`` particle images with their shifts, CTF and pixel size.

    Attributes:
        images: ``(P, L, L)`` real torch tensor indexed ``[y, x]`` (numpy input is wrapped without a
            copy; float32 and float64 are kept, other dtypes become float64 as ``as_tensor`` does).
        shifts: ``(P, 2)`` ``(tx, ty)`` in pixels the images were made with, or None (no shifts).
        ctf: :class:`CTFParams` (1 or ``P`` values each; a dict of :data:`CTF_KEYS` is converted
            with :meth:`CTFParams.from_dict`) or None (no CTF was applied).
        pixel_size_A: Å per pixel; required with a CTF, else optional.
        numpy_out: whether algorithms hand back numpy arrays (True when ``images`` was given as numpy).
    """

    images: torch.Tensor
    shifts: torch.Tensor | None = None
    ctf: CTFParams | None = None
    pixel_size_A: float | None = None
    numpy_out: bool = False

    def __post_init__(self) -> None:
        imgs, was_np = as_tensor(self.images)
        if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
            raise CryoOrientError(f"images must be a (P, L, L) stack of square images; got shape {tuple(imgs.shape)}")
        object.__setattr__(self, "images", imgs)
        if was_np:
            object.__setattr__(self, "numpy_out", True)
        p = imgs.shape[0]
        if self.shifts is not None:
            t = as_tensor(self.shifts)[0].detach()
            if t.ndim != 2 or tuple(t.shape) != (p, 2):
                raise CryoOrientError(
                    f"shifts must have shape (P, 2) = ({p}, 2) as (x, y) pixels; got {tuple(t.shape)}"
                )
            if not torch.isfinite(t).all():
                raise CryoOrientError("shifts contain NaN or infinite values")
            object.__setattr__(self, "shifts", t)
        if self.ctf is not None:
            if isinstance(self.ctf, dict):
                object.__setattr__(self, "ctf", CTFParams.from_dict(self.ctf))
            self.ctf.check_length(p)
            if self.pixel_size_A is None:
                raise CryoOrientError("a stack with a CTF needs pixel_size_A (Å per pixel)")
        if self.pixel_size_A is not None:
            object.__setattr__(self, "pixel_size_A", check_pixel_size(self.pixel_size_A))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """``L``."""
        return int(self.images.shape[-1])

    def subset(self, idx: ArrayLike) -> ParticleStack:
        """The particles ``idx`` (integer indices or a boolean mask), everything kept in step."""
        i = torch.as_tensor(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
        if i.dtype == torch.bool:
            i = torch.nonzero(i).squeeze(1)
        return dataclasses.replace(
            self,
            images=self.images[i.to(self.images.device)],
            shifts=None if self.shifts is None else self.shifts[i.to(self.shifts.device)],
            ctf=None if self.ctf is None else self.ctf.subset(i.numpy()),
        )

    def with_images(self, images: torch.Tensor) -> ParticleStack:
        """The same particles with other ``(P, L', L')`` images (e.g. filtered)."""
        return dataclasses.replace(self, images=images)

    def centred(self) -> ParticleStack:
        """The images moved back by their shifts (:func:`~cryoorient_ray.core.imaging.projection.shift_images`
        by ``-t``, float32), shifts None."""
        if self.shifts is None:
            return self
        from cryoorient_ray.core.imaging.projection import shift_images

        moved = shift_images(self.images.to(torch.float32), -self.shifts.to(torch.float32))
        return dataclasses.replace(self, images=moved, shifts=None)

    def fourier_crop(self, size: int) -> ParticleStack:
        """Downsampled to ``size²`` by Fourier cropping (float32): the pixel size grows by ``L / size``,
        shifts shrink by ``size / L``; ``size ≥ L`` changes nothing but the dtype."""
        from cryoorient_ray.core.imaging.fourier import fourier_crop

        lsize = self.image_size
        small = fourier_crop(self.images, size)
        new = small.shape[-1]
        return dataclasses.replace(
            self,
            images=small,
            shifts=None if self.shifts is None else self.shifts * new / lsize,
            pixel_size_A=None if self.pixel_size_A is None else self.pixel_size_A * lsize / new,
        )


def as_particle_stack(stack: ParticleStack | ArrayLike) -> ParticleStack:
    """A :class:`ParticleStack` as is, or ``(P, L, L)`` images alone (no shifts, no CTF) as one."""
    return stack if isinstance(stack, ParticleStack) else ParticleStack(stack)
