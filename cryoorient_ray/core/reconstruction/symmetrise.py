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

A map made without the group (a C1 ab initio map, a C1 refinement) has its symmetry axes wherever its
orientations put them, not on the declared ones (the project's setting: ``scipy``'s groups, the
2-folds of D2 on x, y and z). Imposing or averaging the group then blurs the map instead of averaging
its noise. :func:`symmetry_frame` finds the rotation that puts them there (what RELION's
``relion_align_symmetry`` does before symmetrising): the map ``V(Rᵀ r)`` is symmetric under the
declared group, and orientations ``q ⊗ r*`` (``r`` the quaternion of ``R``) give the same
projections of it as ``q`` of the original map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cryoorient_ray.core._array import ArrayLike, as_tensor, to_output
from cryoorient_ray.core.geometry.grids import grid_children, grid_level_for_step, grid_rotmats, grid_size
from cryoorient_ray.core.geometry.quaternion import (
    quat_conjugate,
    quat_product,
    rotation_angle,
    rotmat_to_unitquat,
    unitquat_to_rotmat,
)
from cryoorient_ray.core.geometry.symmetry import SymmetryGroup, symmetry_group
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "MODES",
    "SymmetryFrame",
    "reconstruct_symmetric",
    "symmetrise_volume",
    "symmetry_frame",
    "symmetry_residual",
]

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


# ----------------------------------------------------------------------------------------------
# the frame of a map's symmetry axes


@dataclass(frozen=True)
class SymmetryFrame:
    """Where a map's symmetry axes are (:func:`symmetry_frame`).

    Attributes:
        rotmat: ``(3, 3)`` ``R``: the map rotated by it, ``V(Rᵀ r)``, has the group's axes on the declared ones.
        quaternion: ``(4,)`` ``r``, the unit quaternion of ``R`` (wxyz); orientations ``q ⊗ r*`` of the
            rotated map give the projections ``q`` gave of the original (:meth:`orientations`).
        score: the mean normalised correlation, inside the mask, of the rotated map with its images
            under the group's scored elements (1: exactly symmetric).
        identity_score: the same score of the map as it is (``R = I``).
        angle_rad: the rotation angle of ``R``.
    """

    rotmat: np.ndarray
    quaternion: np.ndarray
    score: float
    identity_score: float
    angle_rad: float

    def orientations(self, q: np.ndarray) -> np.ndarray:
        """``(P, 4)`` orientations of the original map → the same projections of the rotated map (``q ⊗ r*``)."""
        return np.asarray(quat_product(np.asarray(q, dtype=np.float64), quat_conjugate(self.quaternion)))

    def volume(self, volume: ArrayLike) -> ArrayLike:
        """``volume (D, D, D)`` rotated by ``R`` (``V(Rᵀ r)``, trilinear, about voxel ``D // 2``)."""
        t, was_np = as_tensor(volume)
        work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        rot = torch.as_tensor(self.rotmat, dtype=work.dtype, device=work.device)[None]
        return to_output(_rotate_many(work[None, None], rot)[0], was_np)

    def summary(self) -> dict:
        """JSON-safe numbers (the rotation as a quaternion, its angle and both scores)."""
        return {
            "quaternion": [float(x) for x in self.quaternion],
            "angle_deg": math.degrees(self.angle_rad),
            "score": self.score,
            "identity_score": self.identity_score,
        }


def _scoring_elements(grp: SymmetryGroup) -> np.ndarray:
    """``(K, 4)`` non-identity elements whose invariance means the group's: all of them for groups of
    order ≤ 12; else an element of the largest order and the largest-order element about another
    axis (they generate Cn, Dn, O and I: two different 4-folds give O, two different 5-folds I)."""
    q = np.asarray(grp.quaternions, dtype=np.float64)
    q = q[np.abs(q[:, 0]) < 1 - 1e-9]  # no identity
    if grp.order <= 12:
        return q
    angle = 2 * np.arccos(np.clip(np.abs(q[:, 0]), 0, 1))
    first = int(np.argmin(angle))  # the smallest turn: the largest order
    axis = q[:, 1:] / np.linalg.norm(q[:, 1:], axis=1, keepdims=True)
    other = np.abs(axis @ axis[first]) < 1 - 1e-6
    if not other.any():  # a cyclic group: one axis
        return q[[first]]
    second = int(np.flatnonzero(other)[np.argmin(angle[other])])
    return q[[first, second]]


def _correlations(vol: torch.Tensor, mask: torch.Tensor, rotmats: torch.Tensor) -> torch.Tensor:
    """``(M,)`` normalised correlation inside ``mask`` of ``vol`` with ``vol`` rotated by each of ``rotmats``."""
    ref = vol[mask]
    ref = (ref - ref.mean()) / torch.clamp(ref.std(), min=1e-30)
    out = []
    for s in range(0, rotmats.shape[0], 96):
        rot = _rotate_many(vol[None, None], rotmats[s : s + 96])[:, mask]
        rot = (rot - rot.mean(1, keepdim=True)) / torch.clamp(rot.std(1, keepdim=True), min=1e-30)
        out.append((rot * ref).mean(1))
    return torch.cat(out)


def symmetry_frame(
    volume: ArrayLike,
    symmetry: SymmetryGroup | str,
    *,
    size: int = 24,
    grid_deg: float = 15.0,
    levels: int = 3,
    keep: int = 8,
) -> SymmetryFrame:
    """The rotation that puts ``volume``'s symmetry axes on the declared axes of ``symmetry``.

    A coarse-to-fine search over SO(3): the map is Fourier-cropped to ``size``³ (at most), masked by a
    sphere, and each candidate ``R`` scored by how well the map agrees with itself under the
    conjugated elements ``Rᵀ g R`` (the group's scored elements, :func:`_scoring_elements`). The
    grid of step ``grid_deg`` is scored whole, then the ``keep`` best are refined ``levels`` times
    on the grid's children (halving the step each time: 15° → 1.9° by default). The score is
    invariant under the group's normaliser, so ``R`` is one of several equivalent answers. The map
    should be low-passed to what it resolves (noise lowers every score alike).

    Args:
        volume: ``(D, D, D)`` map (numpy or torch), its centre at voxel ``D // 2``.
        symmetry: the point group (``C1``: the identity, score 1).
        size: the box the search works at (the map is Fourier-cropped to it when larger).
        grid_deg, levels, keep: the search (step of the first grid, refinements, candidates kept).

    Raises:
        CryoOrientError: not a cube, an empty map, bad search settings.
    """
    from cryoorient_ray.core.imaging.forward import fourier_crop_volume

    grp = symmetry if isinstance(symmetry, SymmetryGroup) else symmetry_group(symmetry)
    v = np.asarray(to_output(as_tensor(volume)[0].detach().cpu().double(), True))
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise CryoOrientError(f"volume must be a cube (D, D, D); got shape {tuple(v.shape)}")
    for name, value, lo in (("size", size, 8), ("levels", levels, 0), ("keep", keep, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise CryoOrientError(f"symmetry_frame's {name} must be an integer >= {lo}; got {value!r}")
    identity = np.eye(3)
    if grp.order == 1:
        return SymmetryFrame(identity, np.array([1.0, 0.0, 0.0, 0.0]), 1.0, 1.0, 0.0)
    work = fourier_crop_volume(v, int(size)) if v.shape[0] > size else v.astype(np.float32)
    vol = torch.from_numpy(np.ascontiguousarray(work, dtype=np.float32))
    d = vol.shape[0]
    g = torch.arange(d, dtype=torch.float32) - d // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    mask = (x * x + y * y + z * z) <= (d / 2 - 1) ** 2
    if float(vol[mask].std()) == 0.0:
        raise CryoOrientError("symmetry_frame: the map is constant inside its mask")
    elems = torch.as_tensor(unitquat_to_rotmat(_scoring_elements(grp)), dtype=torch.float32)  # (K, 3, 3)

    def score(rots: torch.Tensor) -> torch.Tensor:  # (N, 3, 3) candidates R → (N,) mean correlation
        conj = torch.einsum("nba,kbc,ncd->nkad", rots, elems, rots).reshape(-1, 3, 3)  # Rᵀ g R
        return _correlations(vol, mask, conj).reshape(rots.shape[0], -1).mean(1)

    n = grid_level_for_step(grid_deg)
    idx = torch.arange(grid_size(n))
    scores = score(grid_rotmats(n, idx).float())
    for _ in range(int(levels)):
        best = idx[torch.topk(scores, min(int(keep), scores.numel())).indices]
        idx = grid_children(n, best).reshape(-1)
        n *= 2
        scores = score(grid_rotmats(n, idx).float())
    top = int(torch.argmax(scores))
    rot = grid_rotmats(n, idx[top : top + 1])[0].numpy()
    quat = np.asarray(rotmat_to_unitquat(rot), dtype=np.float64)
    return SymmetryFrame(
        rotmat=rot,
        quaternion=quat,
        score=float(scores[top]),
        identity_score=float(score(torch.eye(3)[None])[0]),
        angle_rad=float(rotation_angle(quat)),
    )
