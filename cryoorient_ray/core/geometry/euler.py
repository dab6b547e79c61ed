"""RELION Euler angles ``(rot, tilt, psi)`` in degrees, ZYZ, and their link to quaternions.

RELION builds its matrix (``Euler_angles2matrix`` in ``src/euler.cpp``) as

    A = Rz'(psi) · Ry'(tilt) · Rz'(rot)

where ``Rz'(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]`` (and ``Ry'`` alike) turn
the *coordinate frame*. ``A`` rotates the map: the image is ``p(x, y) = ∫ V(Aᵀ (x, y, z)) dz``.
In scipy's terms ``A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv()``.
This package's quaternion ``q`` for the angles is the one with ``unitquat_to_rotmat(q) == A``.

``rot`` and ``tilt`` fix the viewing direction ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``
(the beam direction in the map's frame, the third row of ``A``); ``psi`` is the in-plane
rotation. Angles come back with ``tilt ∈ [0, 180]`` and ``rot, psi ∈ (-180, 180]``.
"""

from __future__ import annotations

import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_last_dim, check_matrix, to_output
from cryoorient_ray.core.geometry.quaternion import rotmat_to_unitquat, unitquat_to_rotmat

# Below this |sin(tilt)| the view is along ±z and rot, psi are not separable (gimbal lock).
_GIMBAL_EPS = 1e-6


def euler_relion_to_rotmat(angles: ArrayLike) -> ArrayLike:
    """RELION matrices ``A`` ``(..., 3, 3)`` of Euler angles ``(..., 3)`` = ``(rot, tilt, psi)`` in degrees."""
    t, was_np = as_tensor(angles)
    check_last_dim(t, 3, "angles")
    a, b, g = torch.deg2rad(t).unbind(-1)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return to_output(torch.stack(rows, -2), was_np)


def rotmat_to_euler_relion(r: ArrayLike) -> ArrayLike:
    """RELION Euler angles ``(..., 3)`` = ``(rot, tilt, psi)`` in degrees of matrices ``(..., 3, 3)``.

    Follows RELION's ``Euler_matrix2angles``: ``tilt ∈ [0, 180]``; at ``tilt`` 0 or 180
    (gimbal lock) ``rot`` is set to 0 and the whole in-plane angle goes to ``psi``.
    """
    t, was_np = as_tensor(r)
    check_matrix(t, "r")
    abs_sb = torch.sqrt(t[..., 0, 2] ** 2 + t[..., 1, 2] ** 2)
    regular = abs_sb > _GIMBAL_EPS
    rot = torch.where(regular, torch.atan2(t[..., 2, 1], t[..., 2, 0]), torch.zeros_like(abs_sb))
    tilt = torch.atan2(abs_sb, t[..., 2, 2])
    psi_locked = torch.where(
        t[..., 2, 2] > 0,
        torch.atan2(-t[..., 1, 0], t[..., 0, 0]),
        torch.atan2(t[..., 1, 0], -t[..., 0, 0]),
    )
    psi = torch.where(regular, torch.atan2(t[..., 1, 2], -t[..., 0, 2]), psi_locked)
    return to_output(torch.rad2deg(torch.stack([rot, tilt, psi], -1)), was_np)


def euler_relion_to_unitquat(angles: ArrayLike) -> ArrayLike:
    """Canonical unit quaternions ``(..., 4)`` (wxyz) of RELION Euler angles ``(..., 3)`` in degrees."""
    return rotmat_to_unitquat(euler_relion_to_rotmat(angles))


def unitquat_to_euler_relion(q: ArrayLike) -> ArrayLike:
    """RELION Euler angles ``(..., 3)`` = ``(rot, tilt, psi)`` in degrees of quaternions ``(..., 4)`` (wxyz)."""
    return rotmat_to_euler_relion(unitquat_to_rotmat(q))


def viewing_direction(q: ArrayLike) -> ArrayLike:
    """Unit viewing directions ``(..., 3)``: the beam axis in the map's frame, ``R(q)ᵀ e_z``."""
    r, was_np = as_tensor(unitquat_to_rotmat(q))
    return to_output(r[..., 2, :], was_np)
