"""Maps of symmetric particles: the point group imposed, or C1 then symmetrised (RELION's advice).

With point group G the map is invariant under its rotations, ``V(R_g · r) = V(r)`` (``q`` and
``q ⊗ g`` give the same projections, docs/CONVENTIONS.md). Two ways to use it:

- **Imposed** during reconstruction: every image inserted at ``R_i · g`` for each ``g``
  (:func:`~cryoorient_ray.core.reconstruction.inversion.reconstruct_fourier`'s ``symmetry``).
- **C1, then symmetrised** (:func:`symmetrise_volume`): ``V_G(r) = (1/|G|) Σ_g V(R_gᵀ r)``, the
  average of the map over the group, sampled trilinearly about voxel ``D // 2``. RELION
  recommends refining in C1 first because it converges better; symmetrising afterwards gives the
  same averaging of the noise as imposing it, once the orientations are right.

:func:`reconstruct_symmetric` does either. Volumes are ``(D, D, D)`` indexed ``[z, y, x]``. No ray.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cryoorient_ray.core._array import ArrayLike, as_tensor, to_output
from cryoorient_ray.core.geometry.quaternion import unitquat_to_rotmat
from cryoorient_ray.core.geometry.symmetry import SymmetryGroup, symmetry_group
from cryoorient_ray.errors import CryoOrientError

__all__ = ["MODES", "reconstruct_symmetric", "symmetrise_volume", "symmetry_residual"]

MODES = ("impose", "c1_then_symmetrise")


def _rotate_many(vol: torch.Tensor, rotmats: torch.Tensor) -> torch.Tensor:
    """``V(Rᵀ r)`` for each ``R`` of ``rotmats (G, 3, 3)``: ``(G, D, D, D)`` (trilinear, zero outside)."""
    d = vol.shape[-1]
    c = d // 2
    idx = torch.arange(d, dtype=vol.dtype, device=vol.device) - c
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    r = torch.stack([x, y, z], -1).reshape(-1, 3)  # (x, y, z) of every voxel
    src = torch.einsum("gba,nb->gna", rotmats, r)  # Rᵀ r (row-vector form: r @ R)
    # grid_sample's align_corners=True maps -1 → index 0 and +1 → index D - 1
    norm = (src + c) / (d - 1) * 2.0 - 1.0
    grid = norm.reshape(rotmats.shape[0], d, d, d, 3)  # last axis (x, y, z) ↔ (W, H, D)
    inp = vol.expand(rotmats.shape[0], 1, d, d, d)
    return F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def symmetrise_volume(volume: ArrayLike, symmetry: SymmetryGroup | str) -> ArrayLike:
    """The average of ``volume (D, D, D)`` over the rotations of ``symmetry``, about voxel ``D // 2``.

    ``C1`` returns a copy. The result has the type of the input (numpy or torch).
    """
    grp = symmetry if isinstance(symmetry, SymmetryGroup) else symmetry_group(symmetry)
    t, was_np = as_tensor(volume)
    if t.ndim != 3 or len(set(t.shape)) != 1:
        raise CryoOrientError(f"volume must be a cube (D, D, D); got shape {tuple(t.shape)}")
    work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if grp.order == 1:
        return to_output(work.clone(), was_np)
    rot = torch.as_tensor(unitquat_to_rotmat(np.asarray(grp.quaternions)), dtype=work.dtype, device=work.device)
    out = torch.zeros_like(work)
    for s in range(0, grp.order, 12):  # bounded memory: 12 rotated copies at a time
        out += _rotate_many(work[None, None], rot[s : s + 12]).sum(0)
    return to_output(out / grp.order, was_np)


def symmetry_residual(volume: ArrayLike, symmetry: SymmetryGroup | str, radius: float | None = None) -> float:
    """``‖V − V_G‖ / ‖V‖`` inside a sphere of ``radius`` voxels (default ``D/2 − 2``): 0 for a symmetric map."""
    v = np.asarray(to_output(as_tensor(volume)[0].double(), True))
    vs = np.asarray(symmetrise_volume(v, symmetry))
    d = v.shape[-1]
    rad = (d / 2 - 2) if radius is None else float(radius)
    g = np.arange(d) - d // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    m = x * x + y * y + z * z <= rad * rad
    return float(np.linalg.norm((v - vs)[m]) / max(np.linalg.norm(v[m]), 1e-30))


def reconstruct_symmetric(stack, rotmats, symmetry: str, mode: str = "impose", **kwargs) -> ArrayLike:
    """A map of a particle with point group ``symmetry``: imposed, or reconstructed in C1 and symmetrised.

    ``kwargs`` go to :func:`~cryoorient_ray.core.reconstruction.inversion.reconstruct` (``method``,
    ``wiener``, ...; not ``symmetry``).
    """
    from cryoorient_ray.core.reconstruction.inversion import reconstruct

    if mode not in MODES:
        raise CryoOrientError(f"unknown symmetry mode {mode!r}; use one of {', '.join(MODES)}")
    if "symmetry" in kwargs:
        raise CryoOrientError("give the point group as reconstruct_symmetric's symmetry, not in kwargs")
    if mode == "impose":
        return reconstruct(stack, rotmats, symmetry=symmetry, **kwargs)
    return symmetrise_volume(reconstruct(stack, rotmats, **kwargs), symmetry)
