"""File formats: RELION .star, .mrc maps and (later) the sharded Zarr projection stores."""
