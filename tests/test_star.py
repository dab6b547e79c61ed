"""RELION .star orientation files: round trip and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from cryoorient_ray.core import quat_distance, sample_orientations
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.star import read_orientations_star, write_orientations_star


def test_roundtrip_and_relion_columns(tmp_path):
    q = sample_orientations(250, seed=0)
    path = write_orientations_star(tmp_path / "o.star", q, extra={"rlnClassNumber": np.ones(250, int)})
    df = starfile.read(path, always_dict=True)["particles"]
    assert list(df.columns[:3]) == ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    assert df["rlnAngleTilt"].between(0, 180).all()
    np.testing.assert_allclose(quat_distance(read_orientations_star(path), q), 0, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["o.star"]  # no temporary files left


def test_bad_inputs(tmp_path):
    with pytest.raises(CryoOrientError, match="shape"):
        write_orientations_star(tmp_path / "x.star", np.zeros((3, 3)))
    with pytest.raises(CryoOrientError, match="not found"):
        read_orientations_star(tmp_path / "missing.star")
    other = tmp_path / "other.star"
    starfile.write({"optics": __import__("pandas").DataFrame({"rlnVoltage": [300.0]})}, other)
    with pytest.raises(CryoOrientError, match="no particles block"):
        read_orientations_star(other)
