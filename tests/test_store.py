"""Sharded Zarr v3 projection stores: layout, done flags, reading back, dask, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore
from tests.helpers import make_store


def test_layout_is_zarr3_with_sharded_images(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_per_protein=40, shard_size=16)
    assert store.n_samples == 80 and store.n_shards == 5
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["images"]
    assert arr.metadata.zarr_format == 3
    assert arr.chunks == (1, 8, 8) and arr.shards == (16, 8, 8)
    assert store.is_complete


def test_readback_and_shard_rows(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    reopened = ProjectionStore.open(tmp_path / "s.zarr")
    data = reopened.read_shard(2)
    np.testing.assert_array_equal(data["index"], np.arange(32, 48))
    np.testing.assert_array_equal(data["images"][:, 0, 0], np.arange(32, 48))
    assert data["quaternion"].shape == (16, 4)
    np.testing.assert_allclose(np.linalg.norm(data["quaternion"], axis=1), 1.0)
    summary = reopened.summary()
    assert summary["samples"] == 80 and summary["complete"] and summary["shards_done"] == 5
    assert [p["name"] for p in summary["proteins"]] == ["a", "b"]
    assert sum(summary["proteins"][0][s] for s in ("train", "val", "test")) == 40
    assert store.manifest["format"].startswith("cryoorient-projections")


def test_missing_shards_are_invisible(tmp_path):
    store = make_store(tmp_path / "s.zarr", write_shards=False)
    assert not store.is_complete and store.done_rows().size == 0
    a, b = store.shard_range(1)
    store.write_shard(1, np.ones((b - a, 8, 8)), np.zeros(b - a))
    np.testing.assert_array_equal(store.done_rows(), np.arange(a, b))
    with pytest.raises(CryoOrientError, match="not complete"):
        store.read_shard(0)


def test_dask_view(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    x = store.to_dask()
    assert x.shape == (80, 8, 8) and x.chunksize == (16, 8, 8)
    np.testing.assert_array_equal(x[:, 0, 0].compute(), np.arange(80))


def test_bad_input(tmp_path):
    with pytest.raises(CryoOrientError, match="not found"):
        ProjectionStore.open(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(CryoOrientError, match="not a cryoorient projection store"):
        ProjectionStore.open(tmp_path / "plain.zarr")
    store = make_store(tmp_path / "s.zarr", write_shards=False)
    with pytest.raises(CryoOrientError, match="needs images of shape"):
        store.write_shard(0, np.zeros((3, 8, 8)), np.zeros(3))
    with pytest.raises(CryoOrientError, match="NaN"):
        store.write_shard(0, np.full((16, 8, 8), np.nan), np.zeros(16))
    with pytest.raises(CryoOrientError, match="already exists"):
        make_store(tmp_path / "s.zarr")
    with pytest.raises(CryoOrientError, match="out of range"):
        store.shard_range(99)
