"""Ray Data streams over stores: samples by split/protein, and uniform-distance pair batches."""

from __future__ import annotations

import numpy as np
import pytest

from cryoorient_ray.core import symmetric_quat_distance
from tests.helpers import make_store

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def test_sample_stream_filters_split_and_heldout(ray_local, tmp_path):
    from cryoorient_ray.distributed.data import sample_dataset

    store = make_store(tmp_path / "s.zarr", n_per_protein=40, heldout=("b",))
    rows = sample_dataset([tmp_path / "s.zarr"], splits=["val", "test"], proteins="seen").take_all()
    meta = store.read_metadata()
    expected = np.flatnonzero((meta["protein"] == 0) & np.isin(meta["split"], [1, 2]))
    got = np.sort([r["index"] for r in rows])
    np.testing.assert_array_equal(got, expected)
    assert all(r["images"][0, 0] == r["index"] for r in rows)


def test_pair_stream_is_uniform_symmetric_and_split_disjoint(ray_local, tmp_path):
    from cryoorient_ray.distributed.data import pair_dataset

    store = make_store(tmp_path / "s.zarr", n_per_protein=400, shard_size=200, symmetry="D2", ctf=False)
    ds = pair_dataset([tmp_path / "s.zarr"], split="train", pairs_per_shard=3200, n_bins=16, seed=1)
    dists, n = [], 0
    meta = store.read_metadata()
    for batch in ds.iter_torch_batches(batch_size=512):
        assert batch["image_i"].shape[1:] == (8, 8) and batch["distance"].dtype.is_floating_point
        i, j = batch["index_i"].numpy(), batch["index_j"].numpy()
        # images are the stored ones, pairs are train-train and within one protein
        np.testing.assert_array_equal(batch["image_i"][:, 0, 0].numpy(), i)
        assert np.all(meta["split"][i] == 0) and np.all(meta["split"][j] == 0)
        assert np.all(meta["protein"][i] == meta["protein"][j])
        d = batch["distance"].numpy()
        np.testing.assert_allclose(
            d, symmetric_quat_distance(meta["quaternion"][i], meta["quaternion"][j], "D2"), atol=1e-5
        )
        dists.append(d)
        n += len(d)
    d = np.concatenate(dists)
    assert n == 4 * 3200
    # D2 caps d_G below π (at 2π/3 for rotations beyond the group's reach); pairs are uniform
    # on the bins the group leaves reachable
    counts, _ = np.histogram(d, bins=16, range=(0, np.pi))
    filled = counts[counts > 0]
    assert len(filled) >= 10 and filled.min() >= 0.8 * filled.mean(), counts
    # and the flattening really changed the law: for uniform D2 orientations about 4.5 % of pairs
    # fall below 0.6 rad; flattened over the reachable [0, ~2.1] it is about 29 %
    assert 0.25 < np.mean(d < 0.6) < 0.33


def test_pair_reader_is_seeded_and_stays_within_split_and_protein(tmp_path):
    """The per-shard pair reader on its own (what each Ray Data read task runs), without Ray."""
    from cryoorient_ray.distributed.data import PairSampling, _make_pairs_batch, shard_descriptors

    store = make_store(tmp_path / "s.zarr", n_per_protein=80, shard_size=40, heldout=("b",))
    items = shard_descriptors([tmp_path / "s.zarr"], "val", "seen")
    batch = {k: np.array([it[k] for it in items]) for k in items[0]}
    sampling = PairSampling("val", "seen", pairs_per_shard=30, n_bins=8, seed=3, max_candidates=10_000)
    a, b = _make_pairs_batch(batch, sampling), _make_pairs_batch(batch, sampling)
    assert all(np.array_equal(a[k], b[k]) for k in a) and len(a["distance"]) == 30 * len(items)
    meta = store.read_metadata()
    assert np.all(meta["split"][a["index_i"]] == 1) and np.all(meta["split"][a["index_j"]] == 1)
    assert np.all(meta["protein"][a["index_i"]] == 0) and np.all(meta["protein"][a["index_j"]] == 0)
    fresh = _make_pairs_batch(batch, PairSampling("val", "seen", 30, 8, None, 10_000))
    assert not np.array_equal(fresh["index_i"], a["index_i"])  # seed None: fresh pairs each time
