"""The procedural pseudo-protein: deterministic, centred, inside its box, and without symmetry."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoorient_ray.core.density.phantom import CA_STEP, SHAPES, _build_chain, pseudo_protein
from cryoorient_ray.core.density.volume import center_of_mass, prepare_map
from cryoorient_ray.errors import CryoOrientError


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _grid_ops(volume):
    """The 48 maps ``v(M p)`` for M in O and -O (rotations and improper), about voxel D // 2.

    O's matrices permute and flip the axes, so they act exactly on the grid (no interpolation).
    Yields ``(M, transformed)`` with M acting on ``(x, y, z)``.
    """
    d = volume.shape[0]
    idx = np.indices(volume.shape).reshape(3, -1)[::-1] - d // 2  # (x, y, z) rows
    for sign in (1, -1):
        for m in Rotation.create_group("O").as_matrix():
            mat = sign * np.rint(m).astype(int)
            src = (mat.T @ idx + d // 2) % d  # out(p) = in(Mᵀ p); the wrapped edge voxels are empty
            yield mat, volume[src[2], src[1], src[0]].reshape(volume.shape)


def _rotated_ncc(volume: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """NCC of ``v`` with ``v(R p)`` (trilinear, about voxel D // 2) for each ``(3, 3)`` R acting on (x, y, z)."""
    d = volume.shape[0]
    c = d // 2
    ax = torch.arange(d, dtype=torch.float32) - c
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.stack([x, y, z], -1).reshape(-1, 3)
    vol = torch.from_numpy(volume).float()
    ref = (vol - vol.mean()).reshape(-1)
    out = []
    for a in range(0, len(rotations), 200):
        m = torch.from_numpy(rotations[a : a + 200]).float()
        grid = ((pts @ m.transpose(1, 2) + c) * 2 / (d - 1) - 1).reshape(len(m), d, d, d, 3)
        moved = torch.nn.functional.grid_sample(
            vol.expand(len(m), 1, d, d, d), grid, align_corners=True, padding_mode="zeros"
        ).reshape(len(m), -1)
        moved = moved - moved.mean(1, keepdim=True)
        out.append(moved @ ref / (moved.norm(dim=1) * ref.norm()))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_no_near_symmetry_once_blurred(seed):
    """At the demo's scale (32³, 6 Å) no rotation by more than 0.8 rad maps the default shape near
    itself: the max NCC with its rotated self is clearly below the former dumbbell's (whose
    half-turn near-symmetry made poses ambiguous under noise)."""
    rot = Rotation.random(1500, random_state=7)
    mats = rot.as_matrix()[rot.magnitude() > 0.8]
    new = _rotated_ncc(pseudo_protein(seed=seed, box_size=32, voxel_size=6.0).data, mats).max()
    old = _rotated_ncc(pseudo_protein(seed=seed, box_size=32, voxel_size=6.0, shape="dumbbell").data, mats).max()
    assert new < 0.7 and new < old - 0.1, (seed, new, old)
    # the check is sharp: a small rotation keeps the map close to itself
    small = Rotation.from_rotvec([[0.1, 0.0, 0.0], [0.0, 0.0, 0.1]]).as_matrix()
    assert _rotated_ncc(pseudo_protein(seed=seed, box_size=32, voxel_size=6.0).data, small).min() > 0.9


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_seeded_and_named(shape):
    a = pseudo_protein(seed=5, box_size=48, voxel_size=4.0, shape=shape)
    np.testing.assert_array_equal(a.data, pseudo_protein(seed=5, box_size=48, voxel_size=4.0, shape=shape).data)
    assert _ncc(a.data, pseudo_protein(seed=6, box_size=48, voxel_size=4.0, shape=shape).data) < 0.9
    assert a.name == ("pseudo:5" if shape == "domains" else f"pseudo-{shape}:5")
    np.testing.assert_allclose(center_of_mass(a.data), 24, atol=1.0)


def test_random_shapes_vary_in_their_domains():
    """shape="random" draws 3 to 5 domains: seeds give different numbers of domains and sizes."""
    from cryoorient_ray.core.density.phantom import _domain_fractions

    counts = {len(_domain_fractions(np.random.default_rng(s), "random")) for s in range(30)}
    assert counts == {3, 4, 5}
    f = _domain_fractions(np.random.default_rng(0), "domains")
    assert len(f) == 4 and np.all(np.diff(f) < 0) and abs(f.sum() - 1) < 1e-9


def test_same_seed_same_map_other_seed_other_shape():
    a = pseudo_protein(seed=3)
    b = pseudo_protein(seed=3)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.name == "pseudo:3" and a.voxel_size == 3.0 and a.shape == (64, 64, 64)
    for other in (0, 4):
        assert _ncc(a.data, pseudo_protein(seed=other).data) < 0.9


@pytest.mark.parametrize("seed,box,voxel", [(0, 64, 3.0), (1, 48, 4.0), (2, 81, 2.5)])
def test_centred_and_inside_the_box(seed, box, voxel):
    d = pseudo_protein(seed=seed, box_size=box, voxel_size=voxel)
    assert d.shape == (box, box, box) and d.data.dtype == np.float32
    np.testing.assert_allclose(center_of_mass(d.data), box // 2, atol=1.0)
    shell = d.data.copy()
    shell[2:-2, 2:-2, 2:-2] = 0
    assert shell.sum() < 1e-4 * d.data.sum()  # nothing reaches the edge of the box
    assert d.data.min() >= 0
    prepared = prepare_map(d, box)  # the simulator's step accepts it as it is
    np.testing.assert_allclose(prepared.data, d.data, atol=1e-3 * float(d.data.max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_chain_geometry_is_protein_like(shape):
    xyz = _build_chain(np.random.default_rng(0), 300, shape)
    steps = np.linalg.norm(np.diff(xyz, axis=0), axis=1)
    np.testing.assert_allclose(steps, CA_STEP, atol=0.05)
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
    far = dist[np.triu_indices(len(xyz), 2)]
    assert far.min() > 3.0  # self-avoiding (Cα–Cα across the chain, i–i+2 included)
    assert (far < 4.0).mean() < 1e-3
    rg = np.sqrt(((xyz - xyz.mean(0)) ** 2).sum(1).mean())
    assert 15 < rg < 40  # compact, with an arm: between a globule (≈19 Å) and a coil (≈60 Å)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_symmetry_and_a_distinct_hand(seed):
    """No rotation of O maps the map onto itself, and no rotation maps its mirror image onto it."""
    v = pseudo_protein(seed=seed).data
    for mat, moved in _grid_ops(v):
        if np.array_equal(mat, np.eye(3, dtype=int)):
            continue
        assert _ncc(v, moved) < 0.9, (seed, mat.tolist())
    mirror = v[:, :, ::-1]  # x -> -x (about the edge, not the centre: shift checked too)
    for shift in (0, 1):
        assert _ncc(v, np.roll(mirror, shift, axis=2)) < 0.9


def test_fast_enough():
    start = time.perf_counter()
    pseudo_protein(seed=11)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"box_size": 4}, "box size"),
        ({"n_residues": 5}, "residues"),
        ({"voxel_size": 0}, "voxel size"),
        ({"resolution": float("nan")}, "resolution"),
        ({"shape": "blob"}, "unknown pseudo-protein shape"),
        ({"n_residues": 3000, "box_size": 32}, "use a larger box size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(CryoOrientError, match=match):
        pseudo_protein(**kwargs)
