"""Pure numpy/torch core: the algorithms of the pipeline, one sub-package per step.

- ``geometry``: unit quaternions and d_q (``quaternion``), RELION Euler angles (``euler``),
  orientation samplers (``sampling``), point groups and the symmetry-aware distance (``symmetry``).
- ``imaging``: projections (torch Fourier slice, real-space reference, ASTRA: ``projection``,
  ``projection_astra``), CTF, noise, the image formation ``forward`` model and its per-image
  ``parameters``.
- ``density``: density maps boxed to the simulator's cube (``volume``), the pseudo-protein (``phantom``).
- ``learning``: the Siamese distance network (``model``) and its training pairs (``pairs``).
- ``recovery``: pair graphs, the L_OR solver, alignment to the truth (E_OR) and the physical ``gauge``.
- ``reconstruction``: Fourier inversion / CG / ASTRA reconstruction (``inversion``) and FSC.
- ``refinement``: local refinement of orientations by projection matching (``local``).

Files, stores and configs are in :mod:`cryoorient_ray.io` and :mod:`cryoorient_ray.config`, Ray in
:mod:`cryoorient_ray.distributed`, the stages that join them in :mod:`cryoorient_ray.stages`. This
package never imports ray, zarr or those upper layers (``tests/test_layering.py`` checks it). Every
function that takes quaternions expects the scalar-first convention ``(w, x, y, z)``, shape
``(..., 4)``. The geometry functions used most are re-exported here.
"""

from cryoorient_ray.core.geometry.euler import (
    euler_relion_to_rotmat,
    euler_relion_to_unitquat,
    rotmat_to_euler_relion,
    unitquat_to_euler_relion,
    viewing_direction,
)
from cryoorient_ray.core.geometry.quaternion import (
    pairwise_quat_distance,
    quat_canonicalize,
    quat_conjugate,
    quat_distance,
    quat_normalize,
    quat_product,
    quat_wxyz_to_xyzw,
    quat_xyzw_to_wxyz,
    rotation_angle,
    rotmat_to_unitquat,
    unitquat_to_rotmat,
)
from cryoorient_ray.core.geometry.sampling import (
    COVERAGES,
    SAMPLERS,
    rotation_angle_cdf,
    rotation_angle_pdf,
    sample_orientations,
)
from cryoorient_ray.core.geometry.symmetry import (
    SymmetryGroup,
    symmetric_quat_distance,
    symmetry_group,
)

__all__ = [
    "COVERAGES",
    "SAMPLERS",
    "SymmetryGroup",
    "euler_relion_to_rotmat",
    "euler_relion_to_unitquat",
    "pairwise_quat_distance",
    "quat_canonicalize",
    "quat_conjugate",
    "quat_distance",
    "quat_normalize",
    "quat_product",
    "quat_wxyz_to_xyzw",
    "quat_xyzw_to_wxyz",
    "rotation_angle",
    "rotation_angle_cdf",
    "rotation_angle_pdf",
    "rotmat_to_euler_relion",
    "rotmat_to_unitquat",
    "sample_orientations",
    "symmetric_quat_distance",
    "symmetry_group",
    "unitquat_to_euler_relion",
    "unitquat_to_rotmat",
    "viewing_direction",
]
