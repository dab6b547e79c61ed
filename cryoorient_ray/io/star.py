"""RELION .star files for orientations (RELION 3.1+ layout, read and written with ``starfile``).

Angles are RELION's ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` in degrees
(see :mod:`cryoorient_ray.core.geometry.euler` for the convention). Files are written by
:func:`write_star_blocks`: ``starfile``'s tables, each block preceded by the ``# version 30001``
line RELION 3.1 writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoorient_ray.core.geometry.euler import euler_relion_to_unitquat, unitquat_to_euler_relion
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
RELION_VERSION_LINE = "# version 30001"


def write_star_blocks(path: str | os.PathLike, blocks: dict[str, pd.DataFrame]) -> Path:
    """Write ``{block name: table}`` as a RELION 3.1 .star file, atomically; returns the path."""
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)
        text = re.sub(r"^data_", f"{RELION_VERSION_LINE}\n\ndata_", tmp.read_text(), flags=re.MULTILINE)
        tmp.write_text(text)
    return Path(path)


def orientations_to_dataframe(quaternions: np.ndarray) -> pd.DataFrame:
    """A particles table with RELION Euler columns for ``(N, 4)`` wxyz quaternions."""
    q = np.asarray(quaternions, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4:
        raise CryoOrientError(f"orientations must have shape (N, 4); got {q.shape}")
    angles = unitquat_to_euler_relion(q)
    return pd.DataFrame({name: angles[:, k] for k, name in enumerate(ANGLE_COLUMNS)})


def write_orientations_star(path: str | os.PathLike, quaternions: np.ndarray, extra: dict | None = None) -> Path:
    """Write orientations as a ``data_particles`` block; ``extra`` adds columns (name → values)."""
    df = orientations_to_dataframe(quaternions)
    for name, values in (extra or {}).items():
        if len(values) != len(df):
            raise CryoOrientError(f"column {name!r} has {len(values)} values for {len(df)} orientations")
        df[name] = values
    return write_star_blocks(path, {"particles": df})


def read_orientations_star(path: str | os.PathLike) -> np.ndarray:
    """Read ``(N, 4)`` wxyz quaternions from the particles block of a RELION .star file."""
    p = Path(path)
    if not p.is_file():
        raise CryoOrientError(f"star file not found: {p}")
    try:
        data = starfile.read(p, always_dict=True)
    except Exception as exc:  # starfile raises many types on malformed files
        raise CryoOrientError(f"cannot read {p} as a .star file: {exc}") from exc
    block = data.get("particles")
    if block is None:
        block = next((b for b in data.values() if isinstance(b, pd.DataFrame) and ANGLE_COLUMNS[0] in b), None)
    if not isinstance(block, pd.DataFrame) or not all(c in block for c in ANGLE_COLUMNS):
        raise CryoOrientError(f"{p} has no particles block with {', '.join(ANGLE_COLUMNS)}")
    angles = block[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64)
    return euler_relion_to_unitquat(angles)
