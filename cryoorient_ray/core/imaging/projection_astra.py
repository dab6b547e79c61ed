"""ASTRA Toolbox backend: CUDA ``parallel3d_vec`` forward projections in the project's geometry.

ASTRA is imported lazily, inside the functions, so that importing this module never needs it.

Never call an ASTRA 3D CUDA function unless :func:`astra_available` is True: on a machine
without a GPU they kill the whole process with SIGFPE (``astra.use_cuda()`` itself is safe).

How the geometry is matched (ASTRA docs, "3D geometries", and ``cuda/3d/par3d_fp.cu``):

- ASTRA's volume array is indexed ``[slice, row, col] = [z, y, x]`` with x along the last
  index, no axis flipped; voxel ``i`` of an axis of ``D`` voxels in the window ``[min, max]``
  has its centre at ``min + i + 0.5``. The window is set to ``[-(D//2) - 0.5, D - D//2 - 0.5]``
  on every axis, so voxel ``D // 2`` sits at the origin, as in our convention.
- Each projection is a row ``(ray, d, u, v)``: ray direction, detector centre, the vector from
  detector pixel (0,0) to (0,1) (``u``, along columns = image x) and from (0,0) to (1,0) (``v``,
  along rows = image y). The centre of pixel ``(row, col)`` is
  ``d + (col - L/2 + 0.5)·u + (row - L/2 + 0.5)·v``. The projection data comes back as
  ``(rows, angles, cols)``.
- Our image is ``p(x, y) = ∫ V(Rᵀ(x, y, z)) dz``: the image axes are ``u = Rᵀe_x = R[0, :]``,
  ``v = Rᵀe_y = R[1, :]``, the ray ``Rᵀe_z = R[2, :]`` (its sign does not matter for a line
  integral). Pixel ``(iy, ix)`` must see the map point with ``u·P = ix - L//2 - tx`` (the object
  moved by ``+t``), hence ``d = (L/2 - L//2 - 0.5 - tx)·u + (L/2 - L//2 - 0.5 - ty)·v``.
- ASTRA's parallel-beam FP sums texture (trilinear) samples on unit steps along the dominant
  axis times the step length, i.e. a line integral in voxel units, like our projectors.
"""

from __future__ import annotations

import numpy as np

from cryoorient_ray.errors import CryoOrientError

__all__ = ["ASTRA_BATCH", "astra_available", "astra_project", "astra_vectors"]

# Projections per ASTRA call (as in the paper's code): bounds the GPU memory of one call.
ASTRA_BATCH = 50


def astra_available() -> bool:
    """True when astra-toolbox is installed *and* reports CUDA support (a usable GPU).

    Only calls ``astra.use_cuda()``, which is safe on a machine without a GPU; returns False
    when the package is missing or fails to load.
    """
    try:
        import astra  # optional, heavy dependency loaded on demand
    except Exception:  # ImportError, or a broken shared library
        return False
    try:
        return bool(astra.use_cuda())
    except Exception:
        return False


def astra_vectors(rotmats: np.ndarray, shifts: np.ndarray | None, image_size: int) -> np.ndarray:
    """``(B, 12)`` ``parallel3d_vec`` rows ``(ray, d, u, v)`` for rotations ``(B, 3, 3)`` and shifts ``(B, 2)``.

    Pure numpy (no ASTRA call), so the geometry can be checked without a GPU.
    """
    r = np.asarray(rotmats, dtype=np.float64)
    if r.ndim != 3 or r.shape[1:] != (3, 3):
        raise CryoOrientError(f"rotmats must have shape (B, 3, 3); got {r.shape}")
    b = r.shape[0]
    t = np.zeros((b, 2)) if shifts is None else np.asarray(shifts, dtype=np.float64)
    if t.shape != (b, 2):
        raise CryoOrientError(f"shifts must have shape (B, 2) = ({b}, 2); got {t.shape}")
    u = r[:, 0, :]
    v = r[:, 1, :]
    ray = r[:, 2, :]
    offset = image_size / 2 - image_size // 2 - 0.5  # -0.5 for even L, 0 for odd L
    d = (offset - t[:, :1]) * u + (offset - t[:, 1:]) * v
    return np.concatenate([ray, d, u, v], axis=1)


def astra_project(
    volume: np.ndarray,
    rotmats: np.ndarray,
    shifts: np.ndarray | None = None,
    image_size: int | None = None,
    batch_size: int = ASTRA_BATCH,
) -> np.ndarray:
    """Project a ``(D, D, D)`` volume (``[z, y, x]``) with ASTRA's CUDA ``FP3D_CUDA``.

    Args:
        volume: ``(D, D, D)`` map, numpy (cast to contiguous float32).
        rotmats: ``(B, 3, 3)`` rotation matrices (active, RELION's ``A``).
        shifts: optional ``(B, 2)`` shifts ``(tx, ty)`` in pixels (object moves by +t; cut, not wrapped).
        image_size: ``L`` (default ``D``).
        batch_size: projections per ASTRA call.

    Returns:
        ``(B, L, L)`` float32 images indexed ``[y, x]``, the same images as the torch projectors.

    Raises:
        CryoOrientError: when ASTRA with CUDA is not usable, or on bad input.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or not (vol.shape[0] == vol.shape[1] == vol.shape[2]):
        raise CryoOrientError(f"volume must be a cubic (D, D, D) array; got shape {vol.shape}")
    d = vol.shape[0]
    lsize = d if image_size is None else int(image_size)
    if lsize < 1:
        raise CryoOrientError(f"image_size must be a positive integer; got {image_size!r}")
    if int(batch_size) < 1:
        raise CryoOrientError(f"batch_size must be a positive integer; got {batch_size!r}")
    vectors = astra_vectors(rotmats, shifts, lsize)  # validates the shapes
    if vectors.shape[0] == 0:
        return np.zeros((0, lsize, lsize), dtype=np.float32)
    if not astra_available():
        raise CryoOrientError("ASTRA with CUDA is not available (no astra-toolbox, or no usable GPU)")

    import astra

    lo = -(d // 2) - 0.5
    hi = lo + d
    vol_geom = astra.create_vol_geom(d, d, d, lo, hi, lo, hi, lo, hi)
    vol32 = np.ascontiguousarray(vol, dtype=np.float32)
    b = vectors.shape[0]
    out = np.empty((b, lsize, lsize), dtype=np.float32)
    vol_id = astra.data3d.create("-vol", vol_geom, vol32)
    try:
        for start in range(0, b, int(batch_size)):
            vec = vectors[start : start + int(batch_size)]
            proj_geom = astra.create_proj_geom("parallel3d_vec", lsize, lsize, vec)
            sino_id, sino = astra.create_sino3d_gpu(vol_id, proj_geom, vol_geom)
            astra.data3d.delete(sino_id)
            out[start : start + vec.shape[0]] = np.transpose(sino, (1, 0, 2))  # (rows, angles, cols) → (B, y, x)
    finally:
        astra.data3d.delete(vol_id)
    return out
