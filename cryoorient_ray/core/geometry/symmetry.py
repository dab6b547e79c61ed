"""Point-group symmetries ``C_n``, ``D_n``, ``T``, ``O``, ``I`` and the symmetry-aware distance.

A map with point group G is unchanged by every ``g ∈ G``: the orientations ``q`` and ``q ⊗ g``
give the same projections. The distance the images can tell is therefore

    d_G(q_i, q_j) = min_{g ∈ G} d_q(q_i, q_j ⊗ g) = 2·arccos max_g |⟨q_j* ⊗ q_i, g⟩|

(the paper restricted the sampled directions to a quarter sphere for 5a1a's D2 instead).

Group elements come from scipy's ``Rotation.create_group``, with its axes:
  - ``Cn``: n-fold axis along z.
  - ``Dn``: n-fold axis along z, a 2-fold axis along x (RELION's convention too).
  - ``T``, ``O``: 2-fold (T) / 4-fold (O) axes along x, y and z.
  - ``I``: 2-fold axes along x, y and z, 5-fold axes in the xz plane, e.g. ``(0.851, 0, 0.526)``.
Maps in another setting (e.g. RELION's other icosahedral settings) must be rotated into this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_last_dim, to_output
from cryoorient_ray.core.geometry.quaternion import (
    quat_canonicalize,
    quat_conjugate,
    quat_distance,
    quat_product,
    quat_xyzw_to_wxyz,
)
from cryoorient_ray.errors import CryoOrientError

_PATTERN = re.compile(r"^(?:([CD])([1-9][0-9]*)|(T|O|I))$")


@dataclass(frozen=True)
class SymmetryGroup:
    """A point group: its name and its elements as canonical unit quaternions ``(G, 4)`` (wxyz)."""

    name: str
    quaternions: np.ndarray

    @property
    def order(self) -> int:
        """Number of rotations in the group."""
        return int(self.quaternions.shape[0])


def normalize_symmetry_name(name: str) -> str:
    """Upper-case and validate a point-group name (``C1``, ``C7``, ``D2``, ``T``, ``O``, ``I``)."""
    key = str(name).strip().upper()
    if not _PATTERN.match(key):
        raise CryoOrientError(f"unknown point group {name!r}; use Cn or Dn (n >= 1, e.g. C1, C4, D2), T, O or I")
    return key


@lru_cache(maxsize=64)
def symmetry_group(name: str) -> SymmetryGroup:
    """The point group ``name`` (``C1`` … ``Cn``, ``D1`` … ``Dn``, ``T``, ``O``, ``I``).

    ``C1`` is the trivial group. ``D1`` is a single 2-fold axis along x (order 2).
    """
    key = normalize_symmetry_name(name)
    if key == "C1":
        q = np.array([[1.0, 0.0, 0.0, 0.0]])
    else:
        q = quat_xyzw_to_wxyz(Rotation.create_group(key).as_quat())
    q = np.asarray(q, dtype=np.float64)
    q[np.abs(q) < 1e-12] = 0.0  # scipy leaves cos(π/2) ≈ 6e-17; exact zeros keep signs canonical
    q = quat_canonicalize(q)
    q.setflags(write=False)
    return SymmetryGroup(name=key, quaternions=q)


def symmetric_quat_distance(q1: ArrayLike, q2: ArrayLike, group: SymmetryGroup | str = "C1") -> ArrayLike:
    """``d_G(q1, q2) = min_g d_q(q1, q2 ⊗ g)`` in radians, broadcasting ``(..., 4)`` inputs.

    With ``C1`` this is :func:`~cryoorient_ray.core.geometry.quaternion.quat_distance`. Differentiable
    almost everywhere (like any minimum).
    """
    grp = group if isinstance(group, SymmetryGroup) else symmetry_group(group)
    a, was_np = as_tensor(q1)
    b, _ = as_tensor(q2, like=a)
    check_last_dim(a, 4, "q1")
    check_last_dim(b, 4, "q2")
    if grp.order == 1:
        return to_output(quat_distance(a, b), was_np)
    rel = quat_product(quat_conjugate(b), a)  # q2* ⊗ q1
    g = torch.tensor(grp.quaternions, dtype=a.dtype, device=a.device)
    d = quat_distance(rel.unsqueeze(-2), g)  # (..., G)
    return to_output(d.min(dim=-1).values, was_np)
