"""Ray Data streams over projection stores: samples, and training pairs (p_i, p_j, d_q).

Zarr v3 stores are read with a small reader of our own (Ray's ``read_zarr`` does not read Zarr 3):
a dataset of shard descriptors ``{store, shard}`` is mapped, one block per shard, to the
shard's rows. Only completed shards are read.

Pairs are formed *within* a shard, between projections of the same protein and the same split
(so train/val/test pairs stay disjoint), with the symmetry-aware distance d_G of the protein's
point group, and resampled so their distances are uniform on [0, π]
(:mod:`cryoorient_ray.core.learning.pairs`). Batches come out ready for ``iter_torch_batches``:
``image_i (B, L, L)``, ``image_j (B, L, L)``, ``distance (B,)`` float32, plus ``protein``,
``index_i``, ``index_j`` and ``store`` for bookkeeping.

In memory (``train.data: memory``, :class:`MemorySamples`, :class:`MemoryPairs`): a training
worker reads a (materialised) dataset once into tensors and draws every pass's batches from
them with a seeded order (:func:`batch_plan`, :func:`memory_pairs`); the pairs are drawn as the
stream draws them (:func:`draw_pairs`: within a shard, same protein, uniform in d_q), so only
where the images come from changes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from cryoorient_ray.core.learning.pairs import candidate_pairs, pair_distances, uniform_resample
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore

GROUP_STRIDE = 100_000  # protein group key of a row: store_id * GROUP_STRIDE + protein index


def shard_descriptors(
    stores: Sequence[str | os.PathLike], splits: str | Sequence[str], proteins: str = "all"
) -> list[dict]:
    """One ``{store, store_id, shard}`` per completed shard that holds rows of the wanted splits/proteins."""
    out = []
    for sid, path in enumerate(stores):
        store = ProjectionStore.open(path)
        rows = store.select_rows(split=splits, proteins=proteins)
        for k in np.unique(rows // store.shard_size):
            out.append({"store": str(path), "store_id": sid, "shard": int(k)})
    if not out:
        raise CryoOrientError(
            f"no completed shard holds {proteins} proteins in split(s) {splits} of {list(map(str, stores))}"
        )
    return out


def _read_rows(
    store: ProjectionStore,
    shard: int,
    splits: str | Sequence[str],
    proteins: str,
    clean: bool = False,
    preprocess: dict | None = None,
) -> dict:
    """The rows of one completed shard in ``splits`` of the ``proteins`` set (:meth:`ProjectionStore.row_mask`).

    ``clean``: ``images`` are the clean projections, with their ``clean_variance`` (fresh training
    noise is drawn on them). ``preprocess``: a :class:`~cryoorient_ray.core.imaging.preprocess.Preprocess`
    (as a dict) applied to the images (with each row's CTF), what the model sees.
    """
    data = store.read_shard(shard, clean=clean)
    keep = store.row_mask(data, split=splits, proteins=proteins)
    rows = {k: v[keep] for k, v in data.items()}
    if preprocess:
        from cryoorient_ray.core.imaging.preprocess import Preprocess

        images = torch.from_numpy(np.ascontiguousarray(rows["images"], dtype=np.float32))
        rows["images"] = Preprocess.from_dict(preprocess).apply(images, store.ctf_parameters(rows)).numpy()
    return rows


def _read_batch(
    batch: dict,
    splits: str | Sequence[str],
    proteins: str,
    shuffle: bool = False,
    clean: bool = False,
    preprocess: dict | None = None,
) -> dict:
    out: dict[str, list] = {}
    for path, sid, shard in zip(batch["store"], batch["store_id"], batch["shard"], strict=True):
        store = ProjectionStore.open(str(path), verify=False)
        rows = _read_rows(store, int(shard), splits, proteins, clean, preprocess)
        if shuffle:  # a fresh order every time the dataset is iterated (every epoch)
            order = np.random.default_rng().permutation(len(rows["index"]))
            rows = {k: v[order] for k, v in rows.items()}
        rows["store_id"] = np.full(len(rows["index"]), int(sid), dtype=np.int32)
        rows["shard"] = np.full(len(rows["index"]), int(shard), dtype=np.int32)
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def sample_dataset(
    stores: Sequence[str | os.PathLike],
    splits: str | Sequence[str] = "test",
    proteins: str = "all",
    num_cpus: float = 0.5,
    shuffle: bool = False,
    clean: bool = False,
    preprocess: dict | None = None,
) -> ray.data.Dataset:
    """Every projection (``images``, ``quaternion``, ``shift``, ``protein``, ``split``, ``index``,
    ``store_id``, ``shard`` …) of the splits.

    One block per shard, so consecutive rows share a protein; ``shuffle`` permutes the rows
    within each shard afresh on every iteration. ``clean``: the clean projections (and
    ``clean_variance``) as ``images``; ``preprocess``: applied to the images (:func:`_read_rows`).
    """
    items = shard_descriptors(stores, splits, proteins)
    if clean:
        for path in stores:
            ProjectionStore.open(path, verify=False).require_clean()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        _read_batch,
        fn_kwargs={
            "splits": splits,
            "proteins": proteins,
            "shuffle": shuffle,
            "clean": clean,
            "preprocess": preprocess,
        },
        batch_size=1,
        num_cpus=num_cpus,
    )


PAIR_COLUMNS = ("image_i", "image_j", "distance", "protein", "index_i", "index_j", "store_id")


PAIR_BINS = 32  # distance bins of [0, π] the training pairs are resampled uniform over
MAX_CANDIDATES = 200_000  # candidate pairs considered per shard


@dataclass(frozen=True)
class PairSampling:
    """How the pairs of each shard are drawn (the arguments of :func:`pair_dataset`)."""

    split: str
    proteins: str
    pairs_per_shard: int | None
    n_bins: int = PAIR_BINS
    seed: int | None = None
    max_candidates: int = MAX_CANDIDATES
    clean: bool = False  # the clean projections, with clean_variance_i/j (fresh training noise)
    preprocess: dict | None = None  # applied to the images as they are read (what the model sees)


def draw_pairs(
    candidates: np.ndarray,
    groups: np.ndarray,
    quaternions: np.ndarray,
    symmetry: dict[int, str],
    n: int,
    sampling: PairSampling,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``n`` pairs ``(i, j, d_G)`` of rows that share a ``candidates`` label, resampled uniform in d_G
    (``sampling.n_bins``; 0: the natural law); ``groups`` key the point group in ``symmetry``.
    None when no two rows share a label; NaN distances (no true orientations) raise."""
    i, j = candidate_pairs(candidates, sampling.max_candidates, rng)
    if len(i) == 0:
        return None
    d = pair_distances(quaternions, i, j, groups, symmetry)
    if np.isnan(d).any():
        raise CryoOrientError("training pairs need true orientations, and this store has none")
    n_bins = sampling.n_bins
    pick = uniform_resample(d, n, n_bins, rng) if n_bins else rng.choice(len(d), n, replace=n > len(d))
    return i[pick], j[pick], d[pick]


def _shard_pairs(store: ProjectionStore, sid: int, shard: int, sampling: PairSampling) -> dict | None:
    """Pairs of one shard (columns of :data:`PAIR_COLUMNS`), or None when it has no candidate pair."""
    rows = _read_rows(store, shard, sampling.split, sampling.proteins, sampling.clean, sampling.preprocess)
    # seed None: fresh pairs every time the dataset is iterated (every training epoch)
    seed = sampling.seed
    rng = np.random.default_rng() if seed is None else np.random.default_rng([seed, sid, shard])
    # candidates: same protein and same split, so train/val/test pairs stay disjoint
    group = rows["protein"].astype(np.int64) * 8 + rows["split"].astype(np.int64)
    n = sampling.pairs_per_shard or len(rows["index"])
    try:
        drawn = draw_pairs(group, rows["protein"], rows["quaternion"], store.symmetries(), n, sampling, rng)
    except CryoOrientError as exc:
        raise CryoOrientError(f"{store.path}: {exc}") from None
    if drawn is None:
        return None
    i, j, d = drawn
    return {
        "image_i": rows["images"][i],
        "image_j": rows["images"][j],
        "distance": d.astype(np.float32),
        "protein": rows["protein"][i].astype(np.int32),
        "index_i": rows["index"][i].astype(np.int64),
        "index_j": rows["index"][j].astype(np.int64),
        "store_id": np.full(len(i), sid, dtype=np.int32),
        **(
            {"clean_variance_i": rows["clean_variance"][i], "clean_variance_j": rows["clean_variance"][j]}
            if sampling.clean
            else {}
        ),
    }


def _make_pairs_batch(batch: dict, sampling: PairSampling) -> dict:
    outs = []
    size = 0
    for path, sid, shard in zip(batch["store"], batch["store_id"], batch["shard"], strict=True):
        store = ProjectionStore.open(str(path), verify=False)
        size = store.image_size
        pairs = _shard_pairs(store, int(sid), int(shard), sampling)
        if pairs is not None:
            outs.append(pairs)
    if not outs:
        empty = {k: np.zeros(0, np.int64) for k in PAIR_COLUMNS}
        empty.update(image_i=np.zeros((0, size, size), np.float32), image_j=np.zeros((0, size, size), np.float32))
        empty["distance"] = np.zeros(0, np.float32)
        if sampling.clean:
            empty.update(clean_variance_i=np.zeros(0, np.float32), clean_variance_j=np.zeros(0, np.float32))
        return empty
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def pair_dataset(
    stores: Sequence[str | os.PathLike],
    split: str = "train",
    proteins: str = "all",
    pairs_per_shard: int | None = None,
    n_bins: int = PAIR_BINS,
    seed: int | None = 0,
    max_candidates: int = MAX_CANDIDATES,
    num_cpus: float = 0.5,
    clean: bool = False,
    preprocess: dict | None = None,
) -> ray.data.Dataset:
    """Pairs ``(image_i, image_j, distance)`` of one split, distances uniform on [0, π].

    Args:
        stores: projection stores (local paths or URLs).
        split: ``train``, ``val`` or ``test``.
        proteins: ``all``, ``seen`` (not held out) or ``heldout``.
        pairs_per_shard: pairs drawn per shard (default: as many as the shard's rows in the split).
        n_bins: bins of the flattening; 0 keeps the natural distance distribution.
        seed: fixes the pairs; None draws fresh pairs each time the dataset is iterated (each epoch).
        max_candidates: cap on the candidate pairs considered per shard.
        num_cpus: CPUs reserved per read task (fractional, so training workers never starve them).
        clean: pairs of the clean projections, with ``clean_variance_i/j`` (fresh training noise).
        preprocess: applied to the images as they are read (:func:`_read_rows`).
    """
    if n_bins < 0:
        raise CryoOrientError(f"n_bins must be >= 0, got {n_bins}")
    items = shard_descriptors(stores, split, proteins)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if clean:
        for path in stores:
            ProjectionStore.open(path, verify=False).require_clean()
    sampling = PairSampling(split, proteins, pairs_per_shard, n_bins, seed, max_candidates, clean, preprocess)
    return ds.map_batches(_make_pairs_batch, fn_kwargs={"sampling": sampling}, batch_size=1, num_cpus=num_cpus)


# ----------------------------------------------------------------------------- in memory


def _collect(iterator) -> dict[str, np.ndarray]:
    """Every row of a Ray Data iterator (a worker's dataset shard), read once, as numpy columns."""
    parts: dict[str, list] = {}
    for batch in iterator.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclass
class MemorySamples:
    """The training projections a worker holds: images as one tensor, the rest as numpy columns.

    Rows are sorted by ``(store_id, index)``, so the arrival order of the blocks does not matter.
    ``group``: protein group key (``store_id * GROUP_STRIDE + protein``); ``shard``: the rows' shard
    key (``store_id * GROUP_STRIDE + shard``), which stream pairing draws its pairs within.
    """

    images: torch.Tensor
    quaternion: np.ndarray
    group: np.ndarray
    shard: np.ndarray
    clean_variance: torch.Tensor | None = None  # with clean images: their acquisition-box variance

    @classmethod
    def load(cls, iterator) -> MemorySamples:
        cols = _collect(iterator)
        if not cols or len(cols["index"]) == 0:
            raise CryoOrientError("the training dataset of this worker is empty")
        sid = cols["store_id"].astype(np.int64)
        order = np.lexsort((cols["index"], sid))
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(cols["images"][order], dtype=np.float32)),
            quaternion=np.asarray(cols["quaternion"][order], dtype=np.float64),
            group=(sid * GROUP_STRIDE + cols["protein"].astype(np.int64))[order],
            shard=(sid * GROUP_STRIDE + cols["shard"].astype(np.int64))[order],
            clean_variance=(
                torch.from_numpy(cols["clean_variance"][order].astype(np.float64)) if "clean_variance" in cols else None
            ),
        )

    def __len__(self) -> int:
        return len(self.group)


@dataclass
class MemoryPairs:
    """Fixed pairs held in memory with each distinct image once: pair ``k`` is
    ``(images[left[k]], images[right[k]])`` at true distance ``distance[k]``."""

    images: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    distance: torch.Tensor

    @classmethod
    def load(cls, iterator) -> MemoryPairs:
        cols = _collect(iterator)
        if not cols or len(cols["distance"]) == 0:
            size = 0
            empty = torch.zeros(0, dtype=torch.long)
            return cls(torch.zeros(0, size, size), empty, empty, torch.zeros(0))
        n = len(cols["distance"])
        sid = np.tile(cols["store_id"].astype(np.int64), 2)
        keys = sid * (1 << 40) + np.concatenate([cols["index_i"], cols["index_j"]]).astype(np.int64)
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        stacked = np.concatenate([cols["image_i"], cols["image_j"]])
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(stacked[first], dtype=np.float32)),
            left=torch.from_numpy(inverse[:n].astype(np.int64)),
            right=torch.from_numpy(inverse[n:].astype(np.int64)),
            distance=torch.from_numpy(cols["distance"].astype(np.float32)),
        )

    def __len__(self) -> int:
        return len(self.distance)


def batch_plan(order: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This worker's batches of one pass over ``order`` (row or pair indices, every worker the same).

    ``ceil(len / (batch_size · world_size))`` steps of balanced global batches (at most
    ``batch_size · world_size`` each), each split into ``world_size`` consecutive parts; part
    ``rank`` is this worker's. Every worker takes the same number of steps (DDP needs it).
    """
    if len(order) == 0:
        return []
    steps = int(np.ceil(len(order) / (batch_size * world_size)))
    return [np.array_split(g, world_size)[rank] for g in np.array_split(order, steps)]


def grouped_order(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the rows that keeps each group (protein) contiguous: groups in a random
    order, rows shuffled within each. Batches cut from it hold one protein but at boundaries, as
    the shard-by-shard stream does, so almost all pairs of a batch count."""
    keys = np.unique(groups)
    out = [rng.permutation(np.flatnonzero(groups == g)) for g in rng.permutation(keys)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def memory_pairs(
    data: MemorySamples, symmetry: dict[int, str], sampling: PairSampling, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass of stream pairing from memory: per shard, ``sampling.pairs_per_shard`` pairs (default:
    the shard's rows) of the same protein, uniform in d_G, as :func:`pair_dataset` draws them;
    returned as rows ``(i, j)`` of ``data`` and ``d`` (float32), in a random order."""
    parts_i, parts_j, parts_d = [], [], []
    for shard in np.unique(data.shard):
        rows = np.flatnonzero(data.shard == shard)
        n = sampling.pairs_per_shard or len(rows)
        group = data.group[rows]
        drawn = draw_pairs(group, group, data.quaternion[rows], symmetry, n, sampling, rng)
        if drawn is not None:
            parts_i.append(rows[drawn[0]])
            parts_j.append(rows[drawn[1]])
            parts_d.append(drawn[2])
    if not parts_i:
        raise CryoOrientError("no two training images of one protein share a shard: no training pairs")
    i, j, d = np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_d).astype(np.float32)
    perm = rng.permutation(len(i))
    return i[perm], j[perm], d[perm]
