"""Reconstruction from projections with known orientations: geometry, shifts, CTF, symmetry, CG, ASTRA.

The images come from FourierSliceProjector (the project's forward model): reconstructing them
with the true rotations must give back the volume itself, not a mirrored or transposed one.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from cryoorient_ray.core import sample_orientations, unitquat_to_rotmat
from cryoorient_ray.core.imaging.ctf import apply_ctf, ctf_2d
from cryoorient_ray.core.imaging.particles import CTFParams, ParticleStack
from cryoorient_ray.core.imaging.projection import FourierSliceProjector
from cryoorient_ray.core.imaging.projection_astra import astra_available, astra_vectors
from cryoorient_ray.core.reconstruction.fsc import best_hand, fsc, mirror_volume
from cryoorient_ray.core.reconstruction.inversion import (
    half_maps,
    reconstruct,
    reconstruct_astra,
    reconstruct_cg,
    reconstruct_fourier,
)
from cryoorient_ray.errors import CryoOrientError

D = 32
N_IMAGES = 2000
MIRROR = np.diag([1.0, 1.0, -1.0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blob_volume(d=D, seed=0, n=6, sigma=(1.2, 2.5), symmetry=1):
    """A few Gaussian blobs off centre, well inside the box; each repeated ``symmetry`` times about z."""
    rng = np.random.default_rng(seed)
    ax = np.arange(d) - d // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((d, d, d))
    for _ in range(n):
        c = rng.uniform(-d / 5, d / 5, 3)
        s = rng.uniform(*sigma)
        a = rng.uniform(0.5, 1.0)
        for k in range(symmetry):  # rotated by 2πk/n about z through voxel D//2
            phi = 2 * np.pi * k / symmetry
            cx, cy = c[0] * np.cos(phi) - c[1] * np.sin(phi), c[0] * np.sin(phi) + c[1] * np.cos(phi)
            vol += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def data():
    vol = blob_volume()
    rot = unitquat_to_rotmat(sample_orientations(N_IMAGES, seed=1)).astype(np.float32)
    images = FourierSliceProjector(vol)(rot)
    return vol, rot, images


def test_true_orientations_give_back_the_volume(data):
    vol, rot, images = data
    rec = reconstruct_fourier(images, rot)
    assert isinstance(rec, np.ndarray) and rec.shape == (D, D, D) and rec.dtype == np.float32
    res = fsc(rec, vol)
    assert res.resolution(0.5) <= 2.5  # measured 2.0-2.4 px: close to Nyquist (2 px)
    assert corr(rec, vol) > 0.99  # measured 0.9998
    assert (rec * vol).sum() / (vol * vol).sum() == pytest.approx(1.0, abs=0.05)  # amplitude: ≈ +1 %
    # The blob centres are where they were (not transposed): the brightest voxel matches.
    assert np.unravel_index(rec.argmax(), rec.shape) == np.unravel_index(vol.argmax(), vol.shape)


def test_mirrored_or_wrong_orientations_give_a_worse_map(data):
    vol, rot, images = data
    good = fsc(reconstruct_fourier(images, rot), vol)
    # M R M (M = diag(1, 1, -1)) is the other hand: it reconstructs the mirror image z → -z.
    mirrored = reconstruct_fourier(images, MIRROR @ rot @ MIRROR)
    bad = fsc(mirrored, vol)
    assert bad.resolution(0.5) > 3 * good.resolution(0.5) and bad.mean < 0.5
    assert fsc(mirrored, mirror_volume(vol)).resolution(0.5) <= 2.5
    assert fsc(best_hand(mirrored, vol), vol).resolution(0.5) <= 2.5
    # Transposed rotations (the inverse, a classic convention slip) and random ones are far off.
    assert fsc(reconstruct_fourier(images, rot.transpose(0, 2, 1)), vol).resolution(0.5) > 5.0
    wrong = unitquat_to_rotmat(sample_orientations(N_IMAGES, seed=99)).astype(np.float32)
    assert corr(reconstruct_fourier(images, wrong), vol) < 0.9


def test_shifts_are_undone(data):
    vol, rot, _ = data
    rng = np.random.default_rng(5)
    shifts = rng.uniform(-3.0, 3.0, (N_IMAGES, 2)).astype(np.float32)
    images = FourierSliceProjector(vol)(rot, shifts)
    rec = reconstruct_fourier(ParticleStack(images, shifts=shifts), rot)
    assert fsc(rec, vol).resolution(0.5) <= 2.5
    assert corr(rec, vol) > 0.99
    ignored = reconstruct_fourier(images, rot)
    assert corr(ignored, vol) < corr(rec, vol) - 0.1
    # The opposite sign moves every image twice as far instead of back.
    assert corr(reconstruct_fourier(ParticleStack(images, shifts=-shifts), rot), vol) < corr(ignored, vol)


def test_ctf_is_corrected(data):
    vol, rot, images = data
    rng = np.random.default_rng(6)
    px = 4.0  # Å: a few CTF zeros up to Nyquist (0.125 1/Å)
    du = rng.uniform(8000.0, 20000.0, N_IMAGES)
    ctf = {
        "defocus_u": du,
        "defocus_v": du - rng.uniform(0, 400, N_IMAGES),
        "defocus_angle": rng.uniform(0, 180, N_IMAGES),
    }
    blurred = apply_ctf(images, px, **ctf)
    rec = reconstruct_fourier(ParticleStack(blurred, ctf=CTFParams.from_dict(ctf), pixel_size_A=px), rot)
    plain = reconstruct_fourier(blurred, rot)
    assert corr(rec, vol) > 0.97  # measured ≈ 0.99
    assert corr(plain, vol) < corr(rec, vol) - 0.1
    assert fsc(rec, vol).resolution(0.5) < fsc(plain, vol).resolution(0.5)
    # The same CTF as an array on the padded grid (N = 2 L), as a torch stack.
    grid = ctf_2d(2 * D, px, **ctf)
    rec_t = reconstruct_fourier(torch.from_numpy(blurred), torch.from_numpy(rot), ctf_grid=grid)
    assert isinstance(rec_t, torch.Tensor)
    np.testing.assert_allclose(rec_t.numpy(), rec, atol=1e-4 * np.abs(rec).max())
    with pytest.raises(CryoOrientError, match="pixel_size"):
        reconstruct_fourier(ParticleStack(blurred, ctf=CTFParams.from_dict(ctf)), rot)
    with pytest.raises(CryoOrientError, match="unknown CTF"):
        reconstruct_fourier(
            ParticleStack(blurred, ctf=CTFParams.from_dict({**ctf, "defocus": 1.0}), pixel_size_A=px), rot
        )
    with pytest.raises(CryoOrientError, match="padded rfft grid"):
        reconstruct_fourier(blurred, rot, ctf_grid=ctf_2d(D, px, **ctf))


def test_symmetry_fills_in_missing_views():
    # A C4-symmetric map from 150 views: with the group every view counts 4 times.
    vol = blob_volume(seed=3, n=3, symmetry=4)
    rot = unitquat_to_rotmat(sample_orientations(150, seed=4)).astype(np.float32)
    images = FourierSliceProjector(vol)(rot)
    plain = fsc(reconstruct_fourier(images, rot), vol)
    sym = fsc(reconstruct_fourier(images, rot, symmetry="C4"), vol)
    assert sym.mean > plain.mean + 0.02
    assert sym.resolution(0.5) < plain.resolution(0.5)


def test_half_maps_and_dispatch(data):
    vol, rot, images = data
    h1, h2 = half_maps(images, rot, split=7, method="fourier")
    res = fsc(h1, h2)
    assert res.resolution(0.143) <= 2.5 and corr(h1, vol) > 0.99 and corr(h2, vol) > 0.99
    split = np.zeros(N_IMAGES, bool)
    split[::2] = True
    a, b = half_maps(images, rot, split=split, method="fourier")
    np.testing.assert_allclose(a, reconstruct_fourier(images[1::2], rot[1::2]), atol=1e-5)
    np.testing.assert_allclose(b, reconstruct_fourier(images[::2], rot[::2]), atol=1e-5)
    # "auto" without a GPU is the Fourier inversion.
    if not astra_available():
        np.testing.assert_array_equal(reconstruct(images, rot), reconstruct_fourier(images, rot))
    masked = reconstruct(images, rot, method="fourier", mask_radius=10.0)
    assert masked[0, 0, 0] == 0.0 and corr(masked, vol) > 0.99
    with pytest.raises(CryoOrientError, match="method"):
        reconstruct(images, rot, method="wbp")
    with pytest.raises(CryoOrientError, match="takes no option"):
        reconstruct(images, rot, method="fourier", iterations=3)
    with pytest.raises(CryoOrientError, match="each half"):
        half_maps(images, rot, split=np.zeros(N_IMAGES, bool))


def test_cg_refines_the_fourier_map(data):
    vol, rot, images = data
    sub = slice(0, 400)
    start = reconstruct_fourier(images[sub], rot[sub])
    rec, residuals = reconstruct_cg(images[sub], rot[sub], iterations=3, init=start, return_residuals=True)
    assert rec.shape == (D, D, D)
    assert residuals[-1] < 0.5 * residuals[0]  # the least-squares objective falls
    assert corr(rec, vol) >= corr(start, vol) - 1e-4
    assert fsc(rec, vol).resolution(0.5) <= 2.5


def test_bad_input():
    images = np.zeros((10, 16, 16), np.float32)
    rot = np.repeat(np.eye(3, dtype=np.float32)[None], 10, 0)
    with pytest.raises(CryoOrientError, match="differ in length"):
        reconstruct_fourier(images, rot[:9])
    with pytest.raises(CryoOrientError, match="differ in length"):
        half_maps(images, rot[:9])
    with pytest.raises(CryoOrientError, match="differ in length"):
        reconstruct_cg(images, rot[:9])
    with pytest.raises(CryoOrientError, match="square"):
        reconstruct_fourier(np.zeros((10, 16, 15)), rot)
    with pytest.raises(CryoOrientError, match="empty"):
        reconstruct_fourier(np.zeros((0, 16, 16)), rot[:0])
    with pytest.raises(CryoOrientError, match="rotation"):
        reconstruct_fourier(images, 2 * rot)
    with pytest.raises(CryoOrientError, match="shifts"):
        reconstruct_fourier(ParticleStack(images, shifts=np.zeros((10, 3))), rot)
    with pytest.raises(CryoOrientError, match="wiener"):
        reconstruct_fourier(images, rot, wiener=-1)
    with pytest.raises(CryoOrientError, match="point group"):
        reconstruct_fourier(images, rot, symmetry="X3")
    with pytest.raises(CryoOrientError, match="CTF"):
        ctf = CTFParams.from_dict({"defocus_u": 1e4, "defocus_v": 1e4, "defocus_angle": 0.0})
        reconstruct(ParticleStack(images, ctf=ctf, pixel_size_A=1.0), rot, method="astra")


def test_edge_of_the_nyquist_sphere_and_nearly_orthonormal_rotations():
    # Points at |k| = N/2 with rotations slightly longer than unit rows (accepted up to 1e-3)
    # stay inside the grid; the identity and axis swaps land exactly on the edge planes.
    images = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    perm = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    rot = np.stack(
        [np.eye(3), perm, perm @ perm, np.diag([1.0, -1.0, -1.0]), *unitquat_to_rotmat(sample_orientations(2))]
    )
    for scale in (1.0, 1.0004, 0.9996):
        rec = reconstruct_fourier(images, (rot * scale).astype(np.float32))
        assert rec.shape == (16, 16, 16) and np.isfinite(rec).all()
    odd = reconstruct_fourier(np.random.default_rng(1).random((6, 15, 15)), rot)
    assert odd.shape == (15, 15, 15) and odd.dtype == np.float64


def _fake_astra(monkeypatch, recorded):
    """A CPU stand-in for astra: records what reconstruct_astra hands to CGLS3D_CUDA."""
    real_astra = pytest.importorskip("astra")  # only its pure-Python geometry builders are used
    store = {}

    def create(kind, geom, data):
        key = len(store) + 1
        store[key] = (kind, geom, np.array(data))
        recorded.setdefault("created", []).append((kind, key))
        return key

    def run(alg, iterations):
        recorded["iterations"] = iterations
        cfg = recorded["cfg"]
        _, vol_geom, _ = store[cfg["ReconstructionDataId"]]
        d = vol_geom["GridSliceCount"]
        store[cfg["ReconstructionDataId"]] = ("-vol", vol_geom, np.arange(d**3, dtype=np.float32).reshape(d, d, d))

    def alg_create(cfg):
        recorded["cfg"] = dict(cfg)
        return 99

    fake = types.SimpleNamespace(
        use_cuda=lambda: True,
        create_vol_geom=real_astra.create_vol_geom,
        create_proj_geom=real_astra.create_proj_geom,
        astra_dict=real_astra.astra_dict,
        data3d=types.SimpleNamespace(
            create=create,
            get=lambda i: store[i][2],
            delete=lambda i: recorded.setdefault("deleted", []).append(i),
        ),
        algorithm=types.SimpleNamespace(
            create=alg_create, run=run, delete=lambda i: recorded.setdefault("deleted_alg", []).append(i)
        ),
    )
    monkeypatch.setitem(sys.modules, "astra", fake)
    return store


def test_astra_path_under_an_emulated_astra(monkeypatch):
    """The CGLS3D_CUDA plumbing (geometry, sinogram layout, ids, clean-up) without a GPU."""
    recorded = {}
    store = _fake_astra(monkeypatch, recorded)
    rng = np.random.default_rng(0)
    rot = unitquat_to_rotmat(sample_orientations(5, seed=2))
    shifts = rng.uniform(-2, 2, (5, 2))
    images = rng.random((5, 12, 12)).astype(np.float32)
    out = reconstruct(ParticleStack(images, shifts=shifts), rot, method="astra", iterations=7)
    assert recorded["cfg"]["type"] == "CGLS3D_CUDA" and recorded["iterations"] == 7
    kinds = dict(recorded["created"])
    _, vol_geom, _ = store[kinds["-vol"]]
    assert vol_geom["option"]["WindowMinX"] == -6.5 and vol_geom["option"]["WindowMaxX"] == 5.5  # voxel D//2 at 0
    _, proj_geom, sino = store[kinds["-sino"]]
    np.testing.assert_allclose(proj_geom["Vectors"], astra_vectors(rot, shifts, 12))
    np.testing.assert_array_equal(sino, images.transpose(1, 0, 2))  # (rows, angles, cols)
    assert recorded["cfg"]["ReconstructionDataId"] == kinds["-vol"]
    assert recorded["cfg"]["ProjectionDataId"] == kinds["-sino"]
    assert sorted(recorded["deleted"]) == sorted(kinds.values()) and recorded["deleted_alg"] == [99]
    np.testing.assert_array_equal(out, np.arange(12**3, dtype=np.float32).reshape(12, 12, 12))
    # "auto" takes ASTRA when it reports CUDA, but not with a CTF (it has no CTF model).
    recorded.clear()
    reconstruct(images, rot, method="auto", iterations=1)
    assert recorded["cfg"]["type"] == "CGLS3D_CUDA"
    recorded.clear()
    ctf = {"defocus_u": 1e4, "defocus_v": 1e4, "defocus_angle": 0.0}
    reconstruct(ParticleStack(images, ctf=CTFParams.from_dict(ctf), pixel_size_A=2.0), rot, method="auto")
    assert "cfg" not in recorded
    reconstruct(images, rot, method="auto", wiener=0.1)  # an option ASTRA does not take
    assert "cfg" not in recorded
    # A symmetry group repeats every image once per element.
    recorded.clear()
    reconstruct_astra(images, rot, symmetry="C2", iterations=1)
    _, proj_geom, sino = store[dict(recorded["created"])["-sino"]]
    assert sino.shape == (12, 10, 12) and len(proj_geom["Vectors"]) == 10


def test_astra_raises_without_cuda():
    if astra_available():
        pytest.skip("ASTRA with CUDA is available here")
    with pytest.raises(CryoOrientError, match="ASTRA"):
        reconstruct_astra(np.zeros((2, 8, 8)), np.repeat(np.eye(3)[None], 2, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not astra_available(), reason="needs astra-toolbox with CUDA and a GPU")
def test_astra_cgls_gives_back_the_volume(data):
    vol, rot, images = data
    rng = np.random.default_rng(8)
    shifts = rng.uniform(-2.0, 2.0, (N_IMAGES, 2))
    images = FourierSliceProjector(vol)(rot, shifts.astype(np.float32))
    rec = reconstruct(ParticleStack(images, shifts=shifts), rot, method="astra", iterations=30)
    assert rec.shape == (D, D, D)
    assert corr(rec, vol) > 0.98
    assert fsc(rec, vol).resolution(0.5) <= 3.0
    mirrored = reconstruct(ParticleStack(images, shifts=shifts), MIRROR @ rot @ MIRROR, method="astra", iterations=30)
    assert fsc(mirrored, vol).mean < 0.5
