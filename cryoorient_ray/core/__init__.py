"""Pure numpy/torch core: geometry, and later projection, model, recovery, reconstruction.

This package never imports ray or zarr (a test checks it). Every function that takes
quaternions expects the scalar-first convention ``(w, x, y, z)``, shape ``(..., 4)``.
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
