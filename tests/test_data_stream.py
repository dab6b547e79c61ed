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


def test_batch_plan_gives_every_worker_equal_steps_and_covers_each_row_once():
    from cryoorient_ray.distributed.data import batch_plan

    order = np.random.default_rng(0).permutation(1001)
    plans = [batch_plan(order, batch_size=64, world_size=3, rank=r) for r in range(3)]
    steps = int(np.ceil(1001 / (64 * 3)))
    assert [len(p) for p in plans] == [steps] * 3  # DDP: the same number of steps on every worker
    assert all(1 <= len(b) <= 64 for p in plans for b in p)
    # the global batches are consecutive runs of the order, split among the workers
    merged = np.concatenate([np.concatenate([plans[r][k] for r in range(3)]) for k in range(steps)])
    np.testing.assert_array_equal(merged, order)
    assert batch_plan(np.zeros(0, np.int64), 8, 1, 0) == []
    single = batch_plan(np.arange(300), batch_size=128, world_size=1, rank=0)
    assert [len(b) for b in single] == [100, 100, 100]  # balanced, never above the batch size


def test_grouped_order_keeps_proteins_contiguous_and_is_seeded():
    from cryoorient_ray.distributed.data import grouped_order

    groups = np.repeat([7, 3, 100_000], [50, 30, 20])[np.random.default_rng(1).permutation(100)]
    a = grouped_order(groups, np.random.default_rng([0, 1, 2]))
    assert sorted(a.tolist()) == list(range(100))
    runs = groups[a][np.r_[True, groups[a][1:] != groups[a][:-1]]]
    assert len(runs) == 3  # each protein in one run
    np.testing.assert_array_equal(a, grouped_order(groups, np.random.default_rng([0, 1, 2])))
    assert not np.array_equal(a, grouped_order(groups, np.random.default_rng([0, 1, 3])))


def test_memory_pairs_are_drawn_like_the_stream(tmp_path):
    """Pairs from memory: within a shard and a protein, at the true d_G, uniform in it, pairs_per_shard each."""
    import torch

    from cryoorient_ray.distributed.data import MemorySamples, PairSampling, memory_pairs

    store = make_store(tmp_path / "s.zarr", n_per_protein=400, shard_size=200, symmetry="D2", ctf=False)
    meta = store.read_metadata()
    rows = np.flatnonzero(meta["split"] == 0)
    data = MemorySamples(
        images=torch.zeros(len(rows), 1, 1),
        quaternion=meta["quaternion"][rows],
        group=meta["protein"][rows].astype(np.int64),
        shard=(rows // 200).astype(np.int64),
    )
    sampling = PairSampling("train", "seen", pairs_per_shard=3200, n_bins=16, seed=None, max_candidates=200_000)
    i, j, d = memory_pairs(data, {0: "D2", 1: "D2"}, sampling, np.random.default_rng(5))
    assert len(d) == 4 * 3200 and d.dtype == np.float32
    assert np.all(data.shard[i] == data.shard[j]) and np.all(data.group[i] == data.group[j])
    np.testing.assert_allclose(d, symmetric_quat_distance(data.quaternion[i], data.quaternion[j], "D2"), atol=1e-5)
    counts, _ = np.histogram(d, bins=16, range=(0, np.pi))
    filled = counts[counts > 0]
    assert len(filled) >= 10 and filled.min() >= 0.8 * filled.mean(), counts
    # shards come out mixed, not one after another
    assert len(np.unique(data.shard[i[:200]])) > 1
    again = memory_pairs(data, {0: "D2", 1: "D2"}, sampling, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip((i, j, d), again, strict=True))


def test_memory_sets_read_a_dataset_once_in_a_fixed_order(ray_local, tmp_path):
    from cryoorient_ray.distributed.data import MemoryPairs, MemorySamples, pair_dataset, sample_dataset

    store = make_store(tmp_path / "s.zarr", n_per_protein=60, shard_size=20, heldout=("b",))
    meta = store.read_metadata()
    samples = MemorySamples.load(sample_dataset([tmp_path / "s.zarr"], "train", proteins="seen").materialize())
    expected = np.flatnonzero((meta["split"] == 0) & (meta["protein"] == 0))
    np.testing.assert_array_equal(samples.images[:, 0, 0].numpy(), expected)  # sorted by row
    np.testing.assert_array_equal(samples.shard, expected // 20)
    np.testing.assert_allclose(samples.quaternion, meta["quaternion"][expected])
    assert np.all(samples.group == 0)
    ds = pair_dataset([tmp_path / "s.zarr"], "train", proteins="all", pairs_per_shard=40, seed=2).materialize()
    rows = ds.take_all()
    pairs = MemoryPairs.load(ds)
    # each distinct image once, and every pair rebuilt from it
    assert len(pairs) == len(rows) and len(pairs.images) == len(
        {r["index_i"] for r in rows} | {r["index_j"] for r in rows}
    )
    by_index = {int(r["index_i"]): r["image_i"] for r in rows} | {int(r["index_j"]): r["image_j"] for r in rows}
    got_i = pairs.images[pairs.left][:, 0, 0].numpy()
    got_j = pairs.images[pairs.right][:, 0, 0].numpy()
    assert sorted(zip(got_i, got_j, pairs.distance.numpy(), strict=True)) == sorted(
        (r["index_i"], r["index_j"], r["distance"]) for r in rows
    )
    assert all(np.array_equal(by_index[int(k)], pairs.images[pairs.left[n]].numpy()) for n, k in enumerate(got_i[:5]))
