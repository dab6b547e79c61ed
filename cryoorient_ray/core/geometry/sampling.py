"""Orientation samplers (the paper's Appendix A, Figure 12).

``sampler``:
  - ``"uniform"``: uniform (Haar) on SO(3). With full coverage, normalised 4D Gaussians;
    with restricted coverage, viewing directions uniform on the allowed part of the sphere
    (``cos(tilt)`` uniform) and ``psi`` uniform.
  - ``"euler"``: ``rot``, ``tilt`` and ``psi`` each uniform in their range (not uniform on
    SO(3): directions crowd at the poles, as in the paper's Figure 12, orange).

``coverage`` restricts the viewing direction ``(rot, tilt)`` (RELION angles, see
:mod:`cryoorient_ray.core.geometry.euler`); ``psi`` always covers ``[0, 360)``:
  - ``"full"``:    ``tilt ∈ [0, 180]``, ``rot ∈ [0, 360)``
  - ``"half"``:    ``tilt ∈ [0, 90)``,  ``rot ∈ [0, 360)``  (a hemisphere)
  - ``"quarter"``: ``tilt ∈ [0, 90)``,  ``rot ∈ [0, 180)``  (the paper's treatment of 5a1a's D2)

For symmetric proteins, prefer full coverage with a symmetry-aware distance
(:mod:`cryoorient_ray.core.geometry.symmetry`) over restricting coverage.
"""

from __future__ import annotations

import math

import numpy as np

from cryoorient_ray.core.geometry.euler import euler_relion_to_unitquat
from cryoorient_ray.core.geometry.quaternion import quat_canonicalize
from cryoorient_ray.errors import CryoOrientError

SAMPLERS = ("uniform", "euler")
# coverage -> (max tilt, max rot) in degrees
COVERAGES: dict[str, tuple[float, float]] = {
    "full": (180.0, 360.0),
    "half": (90.0, 360.0),
    "quarter": (90.0, 180.0),
}


def sample_orientations(
    n: int,
    sampler: str = "uniform",
    coverage: str = "full",
    seed: int | np.random.Generator | None = 0,
    dtype: np.dtype | type = np.float64,
) -> np.ndarray:
    """Draw ``n`` orientations as canonical unit quaternions.

    Args:
        n: number of orientations (``>= 0``).
        sampler: ``"uniform"`` (Haar on SO(3)) or ``"euler"`` (uniform Euler angles).
        coverage: ``"full"``, ``"half"`` or ``"quarter"`` of the viewing directions.
        seed: an int seed or a ``numpy.random.Generator``; the same seed gives the same draw.
        dtype: float dtype of the result.

    Returns:
        ``(n, 4)`` array of unit quaternions, scalar-first ``(w, x, y, z)``, with ``w >= 0``.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise CryoOrientError(f"number of orientations must be a non-negative integer; got {n!r}")
    if sampler not in SAMPLERS:
        raise CryoOrientError(f"unknown orientation sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if coverage not in COVERAGES:
        raise CryoOrientError(f"unknown coverage {coverage!r}; choose one of {', '.join(COVERAGES)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    tilt_max, rot_max = COVERAGES[coverage]

    if sampler == "uniform" and coverage == "full":
        q = rng.standard_normal((n, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        return quat_canonicalize(q).astype(dtype)

    rot = rng.uniform(0.0, rot_max, n)
    psi = rng.uniform(0.0, 360.0, n)
    if sampler == "uniform":
        cos_tilt = rng.uniform(math.cos(math.radians(tilt_max)), 1.0, n)
        tilt = np.degrees(np.arccos(np.clip(cos_tilt, -1.0, 1.0)))
    else:
        tilt = rng.uniform(0.0, tilt_max, n)
    angles = np.stack([rot, tilt, psi], axis=-1)
    return euler_relion_to_unitquat(angles).astype(dtype)


def rotation_angle_pdf(theta: np.ndarray) -> np.ndarray:
    """Density ``(1 - cos θ) / π`` on ``[0, π]`` of the rotation angle of a Haar-uniform rotation.

    By bi-invariance it is also the density of ``d_q(q_i, q_j)`` for independent uniform ``q_i, q_j``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    return np.where((theta >= 0) & (theta <= np.pi), (1.0 - np.cos(theta)) / np.pi, 0.0)


def rotation_angle_cdf(theta: np.ndarray) -> np.ndarray:
    """Cumulative distribution ``(θ - sin θ) / π`` of :func:`rotation_angle_pdf`."""
    theta = np.clip(np.asarray(theta, dtype=np.float64), 0.0, np.pi)
    return (theta - np.sin(theta)) / np.pi
