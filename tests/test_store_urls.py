"""Projection stores at fsspec URLs (``memory://``, ``file://``; ``s3://``/``gs://`` go the same way)."""

from __future__ import annotations

import numpy as np
import pytest

from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore, absolute_store_path, store_exists
from tests.helpers import make_store


def test_memory_url_round_trip():
    url = "memory://cryoorient-test/a.zarr"
    assert not store_exists(url)
    make_store(url, n_per_protein=40, shard_size=16)
    assert store_exists(url)
    st = ProjectionStore.open(url)
    assert st.is_complete and st.summary()["samples"] == 80
    np.testing.assert_array_equal(st.read_shard(2)["images"][:, 0, 0], np.arange(32, 48))
    with pytest.raises(CryoOrientError, match="already exists"):
        make_store(url)


def test_file_url_creates_its_folders(tmp_path):
    url = f"file://{tmp_path}/nested/b.zarr"
    store = make_store(url, n_per_protein=20, shard_size=8, write_shards=False)
    a, b = store.shard_range(1)
    ProjectionStore.open(url, mode="r+").write_shard(1, np.ones((b - a, 8, 8)), np.zeros(b - a))
    assert (tmp_path / "nested" / "b.zarr" / "zarr.json").is_file()
    np.testing.assert_array_equal(ProjectionStore.open(url).done_rows(), np.arange(a, b))
    # the same store through its plain path
    assert ProjectionStore.open(tmp_path / "nested" / "b.zarr").n_samples == 40


def test_bad_urls_are_one_line_errors():
    with pytest.raises(CryoOrientError, match="not found"):
        ProjectionStore.open("memory://cryoorient-test/missing.zarr")
    with pytest.raises(CryoOrientError, match="no fsspec support for 'nosuchproto://'"):
        ProjectionStore.open("nosuchproto://bucket/x.zarr")


def test_absolute_store_path_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_store_path("runs/x.zarr") == str(tmp_path / "runs" / "x.zarr")
    assert absolute_store_path("s3://bucket/x.zarr") == "s3://bucket/x.zarr"


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_simulate_writes_a_file_url_store_from_ray_tasks(ray_local, tmp_path):
    """Shard tasks in other processes write through fsspec, as they would to s3:// or gs://."""
    from cryoorient_ray.config import SimulateConfig
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    sim = SimulateConfig(inputs=["pseudo:0"], n_per_map=24, image_size=16, voxel_size=10.0, shard_size=12)
    url = f"file://{tmp_path}/sim.zarr"
    store = simulate_store(sim, 0, url, progress=False, cache_dir=tmp_path / "cache")
    assert store.is_complete and store.n_shards == 2
    again = simulate_store(sim, 0, url, progress=False)  # resuming a URL store: nothing left to do
    images = again.read_images(np.arange(24))
    assert images.shape == (24, 16, 16) and np.isfinite(images).all() and images.std() > 0
