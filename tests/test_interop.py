"""Files other programs read: RELION 3.1 .star (read back with starfile) and .mrcs/.mrc headers (mrcfile)."""

from __future__ import annotations

import mrcfile
import numpy as np
import starfile

from cryoorient_ray.core.density.volume import DensityMap
from cryoorient_ray.io.mrc import write_map
from cryoorient_ray.io.relion import export_relion
from cryoorient_ray.io.star import write_orientations_star
from tests.helpers import make_store

RELION_VERSION_LINE = "# version 30001"  # what RELION 3.1 writes before every block

# What a RELION 3.1 reader (relion_reconstruct, cryoDRGN's parse_ctf_star) needs of each block.
OPTICS_NEEDS = {
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
}
PARTICLES_NEEDS = {
    "rlnImageName",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOpticsGroup",
}
CTF_NEEDS = {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"}


def _blocks_preceded_by_version(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    blocks = [k for k, line in enumerate(lines) if line.startswith("data_")]
    return bool(blocks) and all(k > 0 and lines[k - 1] == RELION_VERSION_LINE for k in blocks)


def test_exported_star_has_what_relion31_readers_need(tmp_path):
    store = make_store(tmp_path / "s.zarr", ctf=True)
    star, mrcs = export_relion(store, tmp_path / "relion")
    blocks = starfile.read(star, always_dict=True)
    assert set(blocks) == {"optics", "particles"}
    optics, particles = blocks["optics"], blocks["particles"]
    assert OPTICS_NEEDS <= set(optics.columns)
    assert PARTICLES_NEEDS | CTF_NEEDS <= set(particles.columns)
    assert len(particles) == store.n_samples
    np.testing.assert_array_equal(particles["rlnPhaseShift"].to_numpy(float), 0.0)
    assert np.isfinite(particles[sorted(CTF_NEEDS)].to_numpy(float)).all()
    assert set(particles["rlnOpticsGroup"]) <= set(optics["rlnOpticsGroup"])
    assert particles["rlnImageName"].iloc[0] == f"000001@{mrcs.name}"
    assert _blocks_preceded_by_version(star.read_text())


def test_no_ctf_columns_without_a_ctf(tmp_path):
    store = make_store(tmp_path / "s.zarr", ctf=False)
    star, _ = export_relion(store, tmp_path / "relion")
    particles = starfile.read(star, always_dict=True)["particles"]
    assert not CTF_NEEDS & set(particles.columns)


def test_orientations_star_has_the_version_line(tmp_path):
    q = np.tile([1.0, 0.0, 0.0, 0.0], (3, 1))
    path = write_orientations_star(tmp_path / "o.star", q)
    assert _blocks_preceded_by_version(path.read_text())
    assert len(starfile.read(path, always_dict=True)["particles"]) == 3


def test_mrcs_and_mrc_headers_carry_statistics(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    _, mrcs = export_relion(store, tmp_path / "relion")
    with mrcfile.open(mrcs) as m:
        data, h = np.asarray(m.data, dtype=np.float64), m.header
        assert m.is_image_stack()
        np.testing.assert_allclose([h.dmin, h.dmax], [data.min(), data.max()], rtol=1e-6)
        np.testing.assert_allclose(h.dmean, data.mean(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(h.rms, data.std(), rtol=1e-4)
        np.testing.assert_allclose(float(m.voxel_size.x), 2.5)
    vol = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)
    path = write_map(tmp_path / "v.mrc", DensityMap(vol, 2.0, name="v"))
    with mrcfile.open(path) as m:
        assert m.header.dmax > m.header.dmin and m.header.rms > 0
        np.testing.assert_allclose(m.header.dmean, vol.mean(), atol=1e-5)
