"""Unit quaternions, scalar-first ``(w, x, y, z)``, and the orientation distance d_q.

Conventions (stated once for the whole package, see docs/CONVENTIONS.md):

- A quaternion is an array of shape ``(..., 4)`` ordered ``(w, x, y, z)``.
- ``q`` and ``-q`` are the same rotation. :func:`quat_canonicalize` picks ``w >= 0``.
- The Hamilton product is used: ``unitquat_to_rotmat(quat_product(a, b)) ==
  unitquat_to_rotmat(a) @ unitquat_to_rotmat(b)``.
- ``R(q)`` rotates the object (active rotation); it equals RELION's Euler matrix ``A``.

Every function accepts numpy arrays or torch tensors and returns the same type
(see :mod:`cryoorient_ray.core._array`). Conversions to and from rotation matrices use
roma (which stores quaternions as ``(x, y, z, w)``); this module reorders at the boundary.
"""

from __future__ import annotations

import roma
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_last_dim, check_matrix, safe_norm, to_output
from cryoorient_ray.errors import CryoOrientError


def quat_wxyz_to_xyzw(q: ArrayLike) -> ArrayLike:
    """Reorder ``(..., 4)`` quaternions from ``(w, x, y, z)`` to ``(x, y, z, w)`` (scipy, roma)."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(t[..., [1, 2, 3, 0]], was_np)


def quat_xyzw_to_wxyz(q: ArrayLike) -> ArrayLike:
    """Reorder ``(..., 4)`` quaternions from ``(x, y, z, w)`` (scipy, roma) to ``(w, x, y, z)``."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(t[..., [3, 0, 1, 2]], was_np)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-30)


def quat_normalize(q: ArrayLike) -> ArrayLike:
    """Project ``(..., 4)`` quaternions onto the unit sphere S³."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(_normalize(t), was_np)


def _canonicalize(t: torch.Tensor) -> torch.Tensor:
    # Sign of the first non-zero component, w first: q and -q map to one representative.
    sign = torch.zeros_like(t[..., 0])
    for k in range(4):
        comp = t[..., k]
        sign = torch.where((sign == 0) & (comp != 0), torch.sign(comp), sign)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return t * sign.unsqueeze(-1)


def quat_canonicalize(q: ArrayLike) -> ArrayLike:
    """Return the representative of ``±q`` with ``w > 0`` (ties broken on x, then y, then z)."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(_canonicalize(t), was_np)


def quat_conjugate(q: ArrayLike) -> ArrayLike:
    """Conjugate ``(w, -x, -y, -z)``: the inverse rotation for unit quaternions."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(t * t.new_tensor([1.0, -1.0, -1.0, -1.0]), was_np)


def quat_product(a: ArrayLike, b: ArrayLike) -> ArrayLike:
    """Hamilton product ``a ⊗ b`` of ``(..., 4)`` quaternions (broadcasting): rotation ``R(a) R(b)``."""
    ta, was_np = as_tensor(a)
    tb, _ = as_tensor(b, like=ta)
    check_last_dim(ta, 4, "a")
    check_last_dim(tb, 4, "b")
    ta, tb = torch.broadcast_tensors(ta, tb)
    out = roma.quat_product(ta[..., [1, 2, 3, 0]], tb[..., [1, 2, 3, 0]])
    return to_output(out[..., [3, 0, 1, 2]], was_np)


def unitquat_to_rotmat(q: ArrayLike) -> ArrayLike:
    """Rotation matrices ``(..., 3, 3)`` of unit quaternions ``(..., 4)`` (normalised first)."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    r = roma.unitquat_to_rotmat(_normalize(t)[..., [1, 2, 3, 0]])
    return to_output(r, was_np)


def rotmat_to_unitquat(r: ArrayLike) -> ArrayLike:
    """Unit quaternions ``(..., 4)``, canonical (``w >= 0``), of rotation matrices ``(..., 3, 3)``."""
    t, was_np = as_tensor(r)
    check_matrix(t, "r")
    q = roma.rotmat_to_unitquat(t)[..., [3, 0, 1, 2]]
    return to_output(_canonicalize(q), was_np)


def rotation_angle(q: ArrayLike) -> ArrayLike:
    """Angle in radians, in ``[0, π]``, of the rotation of each ``(..., 4)`` quaternion."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(2.0 * torch.atan2(safe_norm(t[..., 1:]), t[..., 0].abs()), was_np)


def quat_distance(q1: ArrayLike, q2: ArrayLike) -> ArrayLike:
    """Geodesic distance on SO(3): ``d_q(q1, q2) = 2·arccos|⟨q1, q2⟩|``, in radians, in ``[0, π]``.

    Args:
        q1, q2: quaternions ``(..., 4)`` (wxyz), broadcast against each other; they are
            normalised first.

    Returns:
        distances of the broadcast shape without the last axis.

    Computed as ``4·atan2(‖q1 − s·q2‖, ‖q1 + s·q2‖)`` with ``s = sign⟨q1, q2⟩``, which equals the
    arccos form but is accurate near 0 and π in float32 and has finite gradients everywhere
    (the gradient at ``q1 = ±q2`` is 0). It is invariant under ``q1 → -q1``, and under
    ``(q1, q2) → (a⊗q1⊗b, a⊗q2⊗b)`` for unit ``a, b``.
    """
    a, was_np = as_tensor(q1)
    b, _ = as_tensor(q2, like=a)
    check_last_dim(a, 4, "q1")
    check_last_dim(b, 4, "q2")
    a, b = _normalize(a), _normalize(b)
    sign = torch.where((a * b).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(a.dtype)
    b = b * sign
    return to_output(4.0 * torch.atan2(safe_norm(a - b), safe_norm(a + b)), was_np)


def pairwise_quat_distance(q1: ArrayLike, q2: ArrayLike | None = None) -> ArrayLike:
    """Matrix ``D[i, j] = d_q(q1[i], q2[j])`` of shape ``(N, M)`` for ``q1 (N, 4)``, ``q2 (M, 4)``.

    ``q2`` defaults to ``q1``. Memory grows as ``N·M``: meant for test sets and plots, not for
    the sparse pair graphs of large recoveries.
    """
    a, was_np = as_tensor(q1)
    b = a if q2 is None else as_tensor(q2, like=a)[0]
    if a.ndim != 2 or b.ndim != 2:
        raise CryoOrientError(
            f"pairwise_quat_distance takes (N, 4) and (M, 4); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return to_output(quat_distance(a[:, None, :], b[None, :, :]), was_np)


# ----------------------------------------------------------------------------------------------
# Thin wrappers over roma in the wxyz convention: rotation vectors, Procrustes, random rotations.
# One place for these, so no module writes its own copy.


def rotvec_to_unitquat(v: ArrayLike) -> ArrayLike:
    """Unit quaternions ``(..., 4)`` (wxyz) of rotation vectors ``(..., 3)`` (axis · angle in rad)."""
    t, was_np = as_tensor(v)
    check_last_dim(t, 3, "v")
    return to_output(roma.rotvec_to_unitquat(t)[..., [3, 0, 1, 2]], was_np)


def unitquat_to_rotvec(q: ArrayLike) -> ArrayLike:
    """Rotation vectors ``(..., 3)`` (axis · angle, angle in ``[0, π]``) of quaternions ``(..., 4)``."""
    t, was_np = as_tensor(q)
    check_last_dim(t, 4, "q")
    return to_output(roma.unitquat_to_rotvec(_normalize(t)[..., [1, 2, 3, 0]], shortest_arc=True), was_np)


def rotvec_to_rotmat(v: ArrayLike) -> ArrayLike:
    """Rotation matrices ``(..., 3, 3)`` of rotation vectors ``(..., 3)`` (Rodrigues)."""
    t, was_np = as_tensor(v)
    check_last_dim(t, 3, "v")
    return to_output(roma.rotvec_to_rotmat(t), was_np)


def rotmat_to_rotvec(r: ArrayLike) -> ArrayLike:
    """Rotation vectors ``(..., 3)`` of rotation matrices ``(..., 3, 3)``."""
    t, was_np = as_tensor(r)
    check_matrix(t, "r")
    return to_output(roma.rotmat_to_rotvec(t), was_np)


def special_procrustes(m: ArrayLike) -> ArrayLike:
    """The rotation matrix nearest (Frobenius) to each ``(..., 3, 3)`` matrix: ``argmax_R tr(Rᵀ M)``.

    For ``M = Σ dst srcᵀ`` it is the Kabsch rotation with ``dst ≈ R src``.
    """
    t, was_np = as_tensor(m)
    check_matrix(t, "m")
    return to_output(roma.special_procrustes(t), was_np)


def random_unitquat(n: int, seed: int | None = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, 4)`` quaternions uniform on S³ (normalised Gaussians, float64 draws), scalar-first.

    Seeded with a torch generator so that a seed gives the same draws on every machine;
    ``seed=None`` draws from the clock.
    """
    import time

    g = torch.Generator().manual_seed(int(seed) if seed is not None else int(time.time_ns() % 2**31))
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return (q / q.norm(dim=1, keepdim=True)).to(dtype)
