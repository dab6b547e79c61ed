"""cryoorient_ray: orientation recovery for single-particle cryo-EM with a learned distance.

Quaternion convention, used everywhere in this package: **unit quaternions are stored
scalar-first, ``(w, x, y, z)``** (wxyz), as arrays of shape ``(..., 4)``. A quaternion ``q``
stands for the rotation ``R(q)`` that is applied to the *object* (the density map); the image
is the line integral along the beam axis ``z`` of the rotated map. ``R(q)`` is RELION's Euler
matrix ``A(rot, tilt, psi)`` (see :mod:`cryoorient_ray.core.geometry.euler` and docs/CONVENTIONS.md).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
