"""cryoorient_ray: orientation recovery for single-particle cryo-EM with a learned distance.

Layout, from the bottom up (each layer imports only those below it; ``tests/test_layering.py``):

- :mod:`~cryoorient_ray.core`: the algorithms, pure numpy/torch (geometry, imaging, density,
  learning, recovery, reconstruction, refinement).
- :mod:`~cryoorient_ray.io`: files and the sharded Zarr projection stores;
  :mod:`~cryoorient_ray.config`: the pydantic run config.
- :mod:`~cryoorient_ray.distributed`: what runs on Ray (the only package that imports ray).
- :mod:`~cryoorient_ray.stages`: one module per stage (simulate, train, tune, recover, reconstruct,
  ...) with its runner and the files it writes; :mod:`~cryoorient_ray.pipeline`: ``cryoorient run``
  (order, caching, headline); :mod:`~cryoorient_ray.plots`, :mod:`~cryoorient_ray.report`.
- :mod:`~cryoorient_ray.cli`: the ``cryoorient`` command line.

Quaternion convention, used everywhere in this package: **unit quaternions are stored
scalar-first, ``(w, x, y, z)``** (wxyz), as arrays of shape ``(..., 4)``. A quaternion ``q``
stands for the rotation ``R(q)`` that is applied to the *object* (the density map); the image
is the line integral along the beam axis ``z`` of the rotated map. ``R(q)`` is RELION's Euler
matrix ``A(rot, tilt, psi)`` (see :mod:`cryoorient_ray.core.geometry.euler` and docs/CONVENTIONS.md).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
