"""RELION .star/.mrcs export and import: a round trip keeps angles, shifts, CTF and images."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryoorient_ray.core import quat_distance
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.relion import export_relion, import_relion
from tests.helpers import make_store


def test_export_import_round_trip(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_per_protein=30, shard_size=16)
    star, mrcs = export_relion(store, tmp_path / "relion", name="parts")
    blocks = starfile.read(star, always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(2.5)
    assert len(parts) == 60 and parts["rlnImageName"].iloc[0] == "000001@parts.mrcs"
    assert set(parts["rlnMicrographName"]) == {"a", "b"}
    with mrcfile.open(mrcs) as m:
        assert m.data.shape == (60, 8, 8) and float(m.voxel_size.x) == pytest.approx(2.5)

    back = import_relion(star, tmp_path / "back.zarr", shard_size=25)
    orig, new = store.read_metadata(), back.read_metadata()
    np.testing.assert_allclose(quat_distance(orig["quaternion"], new["quaternion"]), 0, atol=1e-6)
    np.testing.assert_allclose(new["shift"], orig["shift"], atol=1e-5)
    for k in ("defocus_u", "defocus_v", "defocus_angle"):
        np.testing.assert_allclose(new[k], orig[k], atol=1e-4)  # Å and degrees, as star text keeps them
    np.testing.assert_array_equal(back.read_images(slice(None)), store.read_images(slice(None)))
    assert back.pixel_size == pytest.approx(2.5) and back.is_complete and back.n_shards == 3


def test_origin_sign_follows_relion(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_per_protein=5, proteins=("a",))
    star, _ = export_relion(store, tmp_path / "r")
    parts = starfile.read(star, always_dict=True)["particles"]
    shift = store.read_metadata()["shift"]
    # the object sits at +t pixels; RELION's origin is the translation that re-centres it
    np.testing.assert_allclose(parts["rlnOriginXAngst"], -shift[:, 0] * 2.5, rtol=1e-5)


def test_import_without_angles_and_relion30_layout(tmp_path):
    imgs = np.random.default_rng(0).standard_normal((4, 6, 6)).astype(np.float32)
    with mrcfile.new(tmp_path / "st.mrcs") as m:
        m.set_data(imgs)
    import pandas as pd

    df = pd.DataFrame(
        {
            "rlnImageName": [f"{k}@st.mrcs" for k in (4, 3, 2, 1)],
            "rlnDetectorPixelSize": 5.0,
            "rlnMagnification": 10000.0,
            "rlnOriginX": [1.0, 0, 0, 0],
            "rlnOriginY": 0.0,
        }
    )
    starfile.write(df, tmp_path / "old.star")
    store = import_relion(tmp_path / "old.star", tmp_path / "old.zarr")
    assert store.manifest["has_orientations"] is False and store.pixel_size == pytest.approx(5.0)
    assert np.isnan(store.read_metadata()["quaternion"]).all()
    np.testing.assert_array_equal(store.read_images(slice(None)), imgs[::-1])
    assert store.read_metadata()["shift"][0, 0] == pytest.approx(-1.0)


def test_import_crops_to_a_working_box(tmp_path):
    """--image-size: Fourier-cropped particles, the pixel size and shifts rescaled, the box kept as acquisition."""
    from cryoorient_ray.core.imaging.fourier import fourier_crop

    store = make_store(tmp_path / "s.zarr", n_per_protein=10, shard_size=16, size=16)
    star, _ = export_relion(store, tmp_path / "relion", name="parts")
    back = import_relion(star, tmp_path / "crop.zarr", image_size=8)
    assert back.image_size == 8 and back.pixel_size == pytest.approx(5.0)
    acq = back.manifest["acquisition"]
    assert acq["image_size"] == 16 and acq["pixel_size"] == pytest.approx(2.5) and acq["snr_db"] is None
    np.testing.assert_allclose(back.read_metadata()["shift"], store.read_metadata()["shift"] / 2, atol=1e-5)
    want = fourier_crop(store.read_images(slice(None)), 8).numpy()
    np.testing.assert_allclose(back.read_images(slice(None)), want, atol=1e-5)
    with pytest.raises(CryoOrientError, match="cannot crop 16² particles to 32²"):
        import_relion(star, tmp_path / "big.zarr", image_size=32)
    assert not (tmp_path / "big.zarr").exists()


def test_import_errors_leave_nothing(tmp_path):
    import pandas as pd

    starfile.write(pd.DataFrame({"rlnImageName": ["1@missing.mrcs"], "rlnImagePixelSize": [1.0]}), tmp_path / "a.star")
    with pytest.raises(CryoOrientError, match="image stack not found"):
        import_relion(tmp_path / "a.star", tmp_path / "a.zarr")
    starfile.write(pd.DataFrame({"rlnImageName": ["1@x.mrcs"]}), tmp_path / "b.star")
    with pytest.raises(CryoOrientError, match="no pixel size"):
        import_relion(tmp_path / "b.star", tmp_path / "b.zarr")
    with pytest.raises(CryoOrientError, match="not found"):
        import_relion(tmp_path / "none.star", tmp_path / "c.zarr")
    assert not any(p.suffix == ".zarr" or ".creating" in p.name for p in tmp_path.iterdir())
