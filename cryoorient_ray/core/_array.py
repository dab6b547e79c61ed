"""One implementation for numpy and torch inputs.

Core functions compute in torch (so they are differentiable and run on GPU) and hand back
the type they were given: a numpy array in, a numpy array out (same float dtype); a tensor
in, a tensor out (same device and dtype, autograd intact).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cryoorient_ray.errors import CryoOrientError

ArrayLike = Any  # np.ndarray | torch.Tensor | sequences of numbers


def as_tensor(x: ArrayLike, like: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, was_numpy)``. Non-float input becomes float64 (float32 stays float32)."""
    if isinstance(x, torch.Tensor):
        t = x if x.is_floating_point() else x.to(torch.float64)
        if like is not None and (t.dtype != like.dtype or t.device != like.device):
            t = t.to(dtype=like.dtype, device=like.device)
        return t, False
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
        arr = arr.copy()
    t = torch.from_numpy(arr)
    if like is not None:
        t = t.to(dtype=like.dtype, device=like.device)
    return t, True


def to_output(t: torch.Tensor, was_numpy: bool) -> ArrayLike:
    """Give back the type the caller passed in."""
    if was_numpy:
        return t.detach().cpu().numpy()
    return t


def safe_norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis whose gradient at 0 is 0 instead of NaN."""
    sq = (v * v).sum(-1)
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def check_last_dim(t: torch.Tensor, size: int, name: str) -> None:
    """Raise a clear error if ``t`` is not ``(..., size)``."""
    if t.ndim == 0 or t.shape[-1] != size:
        raise CryoOrientError(f"{name} must have shape (..., {size}); got {tuple(t.shape)}")


def check_matrix(t: torch.Tensor, name: str) -> None:
    """Raise a clear error if ``t`` is not ``(..., 3, 3)``."""
    if t.ndim < 2 or tuple(t.shape[-2:]) != (3, 3):
        raise CryoOrientError(f"{name} must have shape (..., 3, 3); got {tuple(t.shape)}")


def check_pixel_size(pixel_size, name: str = "pixel_size") -> float:
    """``pixel_size`` as a float, or a clear error (naming ``name``) if it is not a finite positive number (Å)."""
    try:
        px = float(pixel_size)
    except (TypeError, ValueError):
        raise CryoOrientError(f"{name} must be a positive number (Å); got {pixel_size!r}") from None
    if not (math.isfinite(px) and px > 0):
        raise CryoOrientError(f"{name} must be a positive number (Å); got {pixel_size!r}")
    return px
