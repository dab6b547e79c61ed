"""Files and stores: everything read from or written to disk (or an fsspec URL).

- ``store``: the sharded Zarr v3 projection stores (:class:`~cryoorient_ray.io.store.ProjectionStore`,
  whose ``select_rows`` is the one row filter by split and protein).
- ``star`` (orientations as RELION .star), ``relion`` (particle stacks .star + .mrcs to and from stores),
  ``mrc`` (.mrc/.map/.ccp4 maps), ``models`` (maps from PDB/mmCIF models via gemmi), ``maps`` (one
  entry point for every density source), ``fetch`` (PDB/EMDB downloads by id), ``files`` (atomic writes).

Never imports ray (that is :mod:`cryoorient_ray.distributed`).
"""
