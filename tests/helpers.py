"""Small builders shared by tests: a synthetic projection store without any projector."""

from __future__ import annotations

import numpy as np

from cryoorient_ray.core.imaging.parameters import sample_projection_parameters
from cryoorient_ray.io.store import ProjectionStore


def make_store(
    path,
    n_per_protein=40,
    proteins=("a", "b"),
    size=8,
    shard_size=16,
    seed=0,
    symmetry="C1",
    heldout=(),
    write_shards=True,
    ctf=True,
    split_fractions=(0.5, 0.17, 0.33),
):
    """A complete store whose images encode their own row (pixel [0, 0] = row) for checks."""
    parts = []
    for k in range(len(proteins)):
        p = sample_projection_parameters(
            n_per_protein,
            seed,
            k,
            max_shift=2.0,
            ctf={"defocus_min": 8000, "defocus_max": 20000, "astigmatism_max": 400} if ctf else None,
            split_fractions=split_fractions,
        )
        p["protein"] = np.full(n_per_protein, k, dtype=np.int32)
        parts.append(p)
    meta = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    n = n_per_protein * len(proteins)
    manifest = {
        "config": {"test": True},
        "config_hash": "test",
        "pixel_size": 2.5,
        "proteins": [
            {
                "name": name,
                "source": "test",
                "symmetry": symmetry,
                "heldout": name in heldout,
                "start": k * n_per_protein,
                "count": n_per_protein,
            }
            for k, name in enumerate(proteins)
        ],
        "has_orientations": True,
        "optics": {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1},
        "ctf_applied": ctf,
    }
    store = ProjectionStore.create(path, manifest, n, size, shard_size)
    store.write_metadata(meta)
    if write_shards:
        rng = np.random.default_rng(seed)
        for k in range(store.n_shards):
            a, b = store.shard_range(k)
            imgs = rng.standard_normal((b - a, size, size)).astype(np.float32)
            imgs[:, 0, 0] = np.arange(a, b)
            store.write_shard(k, imgs, np.ones(b - a))
    return store


def make_projection_store(
    path,
    n=400,
    size=24,
    voxel_size=8.0,
    snr_db=None,
    seed=0,
    split_fractions=(0.0, 0.0, 1.0),
    has_orientations=True,
    symmetry="C1",
):
    """A one-protein store of real projections of the pseudo-protein (no Ray), all rows in ``test``
    (``symmetry``: the pseudo-protein symmetrised to that point group, declared in the manifest)."""
    from cryoorient_ray.core.density.phantom import pseudo_protein
    from cryoorient_ray.core.imaging.forward import render_projections
    from cryoorient_ray.core.reconstruction.symmetrise import symmetrise_volume

    vol = pseudo_protein(seed=0, box_size=size, voxel_size=voxel_size).data.astype(np.float32)
    vol = np.asarray(symmetrise_volume(vol, symmetry), dtype=np.float32)
    meta = sample_projection_parameters(n, seed, 0, split_fractions=split_fractions)
    meta["protein"] = np.zeros(n, dtype=np.int32)
    import torch

    gen = torch.Generator().manual_seed(seed)
    images, noise_var = render_projections(vol, meta["quaternion"], snr_db=snr_db, generator=gen, backend="torch")
    if not has_orientations:
        meta["quaternion"] = np.full((n, 4), np.nan)
        meta["euler"] = np.full((n, 3), np.nan)
    manifest = {
        "config": {"test": True},
        "config_hash": "test",
        "pixel_size": float(voxel_size),
        "proteins": [
            {"name": "pseudo", "source": "test", "symmetry": symmetry, "heldout": False, "start": 0, "count": n}
        ],
        "has_orientations": has_orientations,
        "optics": {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1},
        "ctf_applied": False,
    }
    store = ProjectionStore.create(path, manifest, n, size, max(16, n // 4))
    store.write_metadata(meta)
    for k in range(store.n_shards):
        a, b = store.shard_range(k)
        store.write_shard(k, images[a:b], noise_var[a:b])
    store.write_volume(0, vol)
    return store, vol


def simulate_small_store(path, overrides: list[str], seed: int = 0) -> str:
    """Simulate a real (projected) store at ``path`` with Ray (initialised by the caller) from
    ``simulate.*`` overrides on top of the defaults and the torch projector; returns the path."""
    from cryoorient_ray.config import load_config
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    cfg = load_config(None, None, [*overrides, "simulate.backend=torch"])
    simulate_store(cfg.simulate, seed, path, progress=False)
    return str(path)
