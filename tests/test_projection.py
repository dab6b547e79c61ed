"""Projectors: analytic line integrals of Gaussian blobs pin the geometry convention.

p(x, y) = ∫ V(Rᵀ (x, y, z)) dz with the origin at voxel D//2 and pixel L//2: a voxel at c lands on
pixel (R c)_xy. Shifts move the object by +t and cut, never wrap.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cryoorient_ray.core import sample_orientations, unitquat_to_rotmat
from cryoorient_ray.core.imaging.projection import (
    FourierSliceProjector,
    make_projector,
    real_space_project,
    shift_images,
)
from cryoorient_ray.core.imaging.projection_astra import astra_available, astra_vectors
from cryoorient_ray.errors import CryoOrientError

EYE = np.eye(3)
RZ90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # +90° about z (counter-clockwise)
RY90 = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # +90° about y


def gaussian_volume(d, center, cov):
    """exp(-½ (r - c)ᵀ Σ⁻¹ (r - c)) on the (D, D, D) grid, [z, y, x], origin at D//2."""
    ax = np.arange(d) - d // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    r = np.stack([x, y, z], -1) - np.asarray(center, float)
    prec = np.linalg.inv(cov)
    return np.exp(-0.5 * np.einsum("...i,ij,...j->...", r, prec, r))


def gaussian_projection(size, center, cov, rotmat):
    """Analytic ∫ V(Rᵀ(x, y, z)) dz of the Gaussian above: a 2D Gaussian at (R c)_xy."""
    c2 = (rotmat @ np.asarray(center, float))[:2]
    cov_r = rotmat @ cov @ rotmat.T
    cov2 = cov_r[:2, :2]
    amp = np.sqrt(2 * np.pi * np.linalg.det(cov_r) / np.linalg.det(cov2))
    ax = np.arange(size) - size // 2
    y, x = np.meshgrid(ax, ax, indexing="ij")
    r = np.stack([x, y], -1) - c2
    return amp * np.exp(-0.5 * np.einsum("...i,ij,...j->...", r, np.linalg.inv(cov2), r))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def centroid(img):
    """(x, y) centroid of an [y, x] image in pixels from the centre L//2."""
    ax = np.arange(img.shape[-1]) - img.shape[-1] // 2
    w = img.sum()
    return np.array([img.sum(0) @ ax / w, img.sum(1) @ ax / w])


def fourier(volume, rotmats, **kw):
    return FourierSliceProjector(volume)(rotmats, **kw)


def fourier_cubic(volume, rotmats, **kw):
    return FourierSliceProjector(volume, interpolation="cubic")(rotmats, **kw)


PROJECTORS = {"fourier": fourier, "fourier_cubic": fourier_cubic, "real": real_space_project}
# Relative L2 error allowed against the analytic images. Measured (D = 32, σ = 2.5, 6 random
# views): fourier (trilinear) ≤ 1.2 %, fourier_cubic ≤ 0.02 %, real ≈ 2.0 % (trilinear smoothing).
TOL = {"fourier": 0.02, "fourier_cubic": 0.002, "real": 0.025}
# Relative error allowed on the total mass: the trilinear kernel's ghosts add ~1-2 %.
MASS_TOL = {"fourier": 0.02, "fourier_cubic": 1e-3, "real": 1e-3}

ISO = 2.5**2 * np.eye(3)
CENTER = np.array([4.0, -3.0, 2.0])


@pytest.mark.parametrize("d", [32, 33])
@pytest.mark.parametrize("name", list(PROJECTORS))
def test_explicit_rotations_put_the_blob_where_the_convention_says(name, d):
    a = 6.0
    cases = [
        ((a, 0, 0), EYE, (a, 0)),  # identity: x stays x
        ((a, 0, 0), RZ90, (0, a)),  # +90° about z: x → y
        ((0, 0, a), RY90, (a, 0)),  # +90° about y: z → x
        ((0, a, 0), RZ90, (-a, 0)),  # +90° about z: y → -x
    ]
    for center, rot, expected in cases:
        img = PROJECTORS[name](gaussian_volume(d, center, 2.0**2 * np.eye(3)), rot[None])[0]
        np.testing.assert_allclose(centroid(img), expected, atol=0.1)
        iy, ix = np.unravel_index(np.argmax(img), img.shape)
        assert (ix - d // 2, iy - d // 2) == expected


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_isotropic_blob_matches_analytic_projection(name):
    d = 32
    vol = gaussian_volume(d, CENTER, ISO)
    rot = unitquat_to_rotmat(sample_orientations(6, seed=11))
    imgs = PROJECTORS[name](vol, rot)
    errs = [rel_err(imgs[i], gaussian_projection(d, CENTER, ISO, rot[i])) for i in range(len(rot))]
    assert max(errs) < TOL[name], errs


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_anisotropic_blob_is_not_transposed(name):
    d = 32
    cov = np.diag([3.5, 2.0, 2.5]) ** 2  # elongated along x, still well inside the box
    rot = unitquat_to_rotmat(sample_orientations(5, seed=3))
    imgs = PROJECTORS[name](gaussian_volume(d, CENTER, cov), rot)
    for i in range(len(rot)):
        good = rel_err(imgs[i], gaussian_projection(d, CENTER, cov, rot[i]))
        transposed = rel_err(imgs[i], gaussian_projection(d, CENTER, cov, rot[i].T))
        assert good < TOL[name], good
        assert transposed > 10 * good


def test_image_size_crops_around_the_same_centre():
    d = 32
    vol = gaussian_volume(d, (2.0, 1.0, -1.0), ISO)
    rot = unitquat_to_rotmat(sample_orientations(3, seed=5))
    proj = FourierSliceProjector(vol)
    for size in (24, 25, 48):
        imgs = proj(rot, image_size=size)
        assert imgs.shape == (3, size, size)
        for i in range(3):
            assert rel_err(imgs[i], gaussian_projection(size, (2.0, 1.0, -1.0), ISO, rot[i])) < TOL["fourier"]
    real = real_space_project(vol, rot, image_size=25)
    np.testing.assert_allclose(real, proj(rot, image_size=25), atol=0.05 * real.max())


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_mass_is_conserved_for_a_blob_well_inside(name):
    d = 32
    vol = gaussian_volume(d, (1.0, -2.0, 1.0), 3.0**2 * np.eye(3))
    rot = unitquat_to_rotmat(sample_orientations(8, seed=7))
    mass = PROJECTORS[name](vol, rot).sum(axis=(1, 2))
    np.testing.assert_allclose(mass, vol.sum(), rtol=MASS_TOL[name])


def test_fourier_and_real_space_agree_on_a_smooth_random_volume():
    d = 32
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.standard_normal((d, d, d)))
    k = torch.fft.fftfreq(d)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    smooth = torch.fft.ifftn(torch.fft.fftn(noise) * torch.exp(-2 * np.pi**2 * 2.0**2 * (kx**2 + ky**2 + kz**2))).real
    ax = torch.arange(d) - d // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    mask = torch.sigmoid((d / 2 - 4 - torch.sqrt((x**2 + y**2 + z**2).double())) / 1.5)
    vol = (smooth * mask).numpy()
    rot = unitquat_to_rotmat(sample_orientations(6, seed=8))
    a = FourierSliceProjector(vol, oversampling=2)(rot)
    b = real_space_project(vol, rot)
    for i in range(len(rot)):
        assert rel_err(a[i], b[i]) < 0.05


def test_shift_moves_the_centroid_by_the_shift():
    d = 32
    vol = gaussian_volume(d, (0, 0, 0), ISO)
    shifts = np.array([[3.0, -2.0], [-1.5, 2.25]])
    for name, imgs in [
        ("fourier", fourier(vol, np.stack([EYE, EYE]), shifts=shifts)),
        ("real", real_space_project(vol, np.stack([EYE, EYE]), shifts=shifts)),
    ]:
        for i in range(2):
            np.testing.assert_allclose(centroid(imgs[i]), shifts[i], atol=0.02, err_msg=name)


def test_shift_of_a_rotated_view_matches_analytic():
    d = 32
    rot = unitquat_to_rotmat(sample_orientations(4, seed=9))
    shifts = np.array([[3.0, -2.0], [0.5, 1.7], [-4.2, 0.0], [2.0, 2.0]])
    imgs = fourier(gaussian_volume(d, CENTER, ISO), rot, shifts=shifts)
    for i in range(len(rot)):
        center = rot[i] @ CENTER + np.array([*shifts[i], 0.0])
        assert rel_err(imgs[i], gaussian_projection(d, center, ISO, EYE)) < TOL["fourier"]


def test_large_shift_cuts_instead_of_wrapping():
    d = 32
    vol = gaussian_volume(d, (8.0, 0.0, 0.0), ISO)
    shifts = np.array([[12.0, 0.0]])  # blob centre to x = 20, beyond the right edge (x = 15)
    for imgs in (fourier(vol, EYE[None], shifts=shifts), real_space_project(vol, EYE[None], shifts=shifts)):
        img = imgs[0]
        full = gaussian_projection(d, (8.0, 0.0, 0.0), ISO, EYE).max()
        assert np.abs(img[:, : d // 2]).max() < 1e-3 * full  # the left half (wrap-around side) stays empty
        assert img[:, -1].max() > 0.1 * full  # the blob's flank is at the right edge, cut
        analytic = gaussian_projection(d, (20.0, 0.0, 0.0), ISO, EYE)
        np.testing.assert_allclose(img, analytic, atol=0.02 * full)


def test_shift_images_matches_the_projector_shift():
    d = 32
    rot = unitquat_to_rotmat(sample_orientations(3, seed=4))
    shifts = np.array([[3.4, -2.7], [-5.0, 1.25], [0.0, 0.0]])
    proj = FourierSliceProjector(gaussian_volume(d, CENTER, ISO), interpolation="cubic")  # no ghosts
    direct = proj(rot, shifts=shifts)
    after = shift_images(proj(rot), shifts)
    np.testing.assert_allclose(after, direct, atol=1e-3 * np.abs(direct).max())
    # integer shifts are exact and cut at the edge
    img = np.arange(25.0).reshape(1, 5, 5)
    out = shift_images(img, np.array([[2.0, -1.0]]))
    expected = np.zeros((1, 5, 5))
    expected[0, :4, 2:] = img[0, 1:, :3]
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_types_devices_and_batching():
    d = 16
    vol = torch.from_numpy(gaussian_volume(d, (1, 2, 3), ISO)).float()
    rot_np = unitquat_to_rotmat(sample_orientations(70, seed=1))
    proj = FourierSliceProjector(vol, batch_size=16)
    out_np = proj(rot_np)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (70, d, d) and out_np.dtype == np.float32
    out_t = proj(torch.from_numpy(rot_np))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-5)
    np.testing.assert_allclose(FourierSliceProjector(vol, batch_size=64)(rot_np), out_np, atol=1e-5)
    assert proj(np.zeros((0, 3, 3))).shape == (0, d, d)
    # gradients reach the rotations
    r = torch.from_numpy(rot_np[:2]).float().requires_grad_(True)
    proj(r).pow(2).sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()


def test_make_projector_backends():
    d = 16
    vol = gaussian_volume(d, (1, 0, -1), ISO)
    rot = unitquat_to_rotmat(sample_orientations(3, seed=2))
    shifts = np.array([[1.0, 0.5], [0.0, -1.0], [2.0, 2.0]])
    torch_p = make_projector(vol, "torch")
    real_p = make_projector(vol, "real")
    auto_p = make_projector(vol)  # no CUDA here: falls back to torch
    assert auto_p.backend == ("astra" if astra_available() else "torch")
    a, b = torch_p(rot, shifts), real_p(rot, shifts)
    assert a.shape == b.shape == (3, d, d)
    np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())
    with pytest.raises(CryoOrientError, match="unknown projection backend"):
        make_projector(vol, "cuda")


@pytest.mark.skipif(astra_available(), reason="checks the error raised without CUDA")
def test_make_projector_astra_raises_without_cuda():
    with pytest.raises(CryoOrientError, match="astra"):
        make_projector(np.zeros((8, 8, 8)), "astra")


def test_astra_available_is_false_without_gpu_and_never_crashes():
    code = "from cryoorient_ray.core.imaging.projection_astra import astra_available as a; print(a())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # a SIGFPE would give a negative return code
    assert out.stdout.strip() in ("True", "False")
    if not torch.cuda.is_available() and not any(p.startswith("nvidia") for p in _dev_entries()):
        assert out.stdout.strip() == "False"


def _dev_entries():
    import os

    try:
        return os.listdir("/dev")
    except OSError:
        return []


def test_astra_vectors_follow_the_convention():
    # Pure geometry, no GPU: pixel (row, col) centre is d + (col - L/2 + 0.5) u + (row - L/2 + 0.5) v,
    # and must see the map point P with R P = (col - L//2 - tx, row - L//2 - ty, ·).
    rot = unitquat_to_rotmat(sample_orientations(4, seed=6))
    shifts = np.array([[1.5, -2.0], [0.0, 0.0], [3.0, 1.0], [-0.5, 0.25]])
    for size in (16, 17):
        vec = astra_vectors(rot, shifts, size)
        for i in range(4):
            ray, det, u, v = vec[i, :3], vec[i, 3:6], vec[i, 6:9], vec[i, 9:]
            np.testing.assert_allclose(ray, rot[i].T @ [0, 0, 1], atol=1e-12)
            for row, col in [(0, 0), (size // 2, size // 2), (3, size - 1)]:
                pixel = det + (col - size / 2 + 0.5) * u + (row - size / 2 + 0.5) * v
                expected = (col - size // 2 - shifts[i, 0], row - size // 2 - shifts[i, 1])
                np.testing.assert_allclose((rot[i] @ pixel)[:2], expected, atol=1e-9)


def astra_test_volume(d):
    """Two smooth blobs (σ ≥ 2.5 voxels): ASTRA's trilinear ray casting stays within ~1 % of the exact images."""
    return gaussian_volume(d, CENTER, 3.0**2 * np.eye(3)) + 0.5 * gaussian_volume(
        d, (-5.0, 4.0, -2.0), np.diag([3.5, 2.5, 3.0]) ** 2
    )


def emulate_astra_par3d_fp(vol, vol_geom, proj_geom):
    """numpy transcription of ASTRA's FP3D_CUDA for ``parallel3d_vec`` (no GPU needed).

    Follows ParallelVecProjectionGeometry3D.cpp (detector centre → corner), astra3d.cu
    (translate by minus the window centre, scale to voxel units) and par3d_fp.cu (step one voxel
    along the dominant ray axis, interpolate the other two, texture coordinate f = index + 0.5,
    multiply by the step length). Returns ASTRA's ``(rows, angles, cols)`` layout.
    """
    from scipy.ndimage import map_coordinates

    o = vol_geom["option"]
    dims = np.array(vol.shape[::-1], float)  # (nx, ny, nz)
    lo = np.array([o["WindowMinX"], o["WindowMinY"], o["WindowMinZ"]])
    hi = np.array([o["WindowMaxX"], o["WindowMaxY"], o["WindowMaxZ"]])
    shift, scale = -(lo + hi) / 2, dims / (hi - lo)
    rows, cols = proj_geom["DetectorRowCount"], proj_geom["DetectorColCount"]
    vecs = np.asarray(proj_geom["Vectors"], float)
    out = np.zeros((rows, len(vecs), cols))
    vv, uu = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for i, vec in enumerate(vecs):
        ray, d, u, v = vec[:3] * scale, vec[3:6], vec[6:9] * scale, vec[9:] * scale
        corner = (d - 0.5 * rows * vec[9:] - 0.5 * cols * vec[6:9] + shift) * scale
        pts = corner + (uu[..., None] + 0.5) * u + (vv[..., None] + 0.5) * v  # pixel centres, (x, y, z)
        ax = int(np.argmax(np.abs(ray)))
        others = [k for k in range(3) if k != ax]
        a = ray[others] / ray[ax]
        b = pts[..., others] - a * pts[..., ax : ax + 1]
        total = np.zeros((rows, cols))
        for s in range(int(dims[ax])):
            c0 = s - 0.5 * dims[ax] + 0.5
            coords = np.zeros((3, rows, cols))
            coords[ax] = s
            for k, ak, bk in zip(others, a, np.moveaxis(b, -1, 0), strict=True):
                coords[k] = ak * c0 + bk + 0.5 * dims[k] - 0.5
            total += map_coordinates(vol, coords[::-1].reshape(3, -1), order=1, mode="constant").reshape(rows, cols)
        out[:, i, :] = total * np.sqrt(1 + (a**2).sum())
    return out


def test_astra_project_under_an_emulated_astra(monkeypatch):
    """The whole astra_project path (window, vectors, batching, layout) against a CPU stand-in for ASTRA."""
    import types

    real_astra = pytest.importorskip("astra")  # only its pure-Python geometry builders are used
    volumes = {}

    def create(kind, geom, data):
        volumes[len(volumes) + 1] = np.array(data)
        return len(volumes)

    fake = types.SimpleNamespace(
        use_cuda=lambda: True,
        create_vol_geom=real_astra.create_vol_geom,
        create_proj_geom=real_astra.create_proj_geom,
        data3d=types.SimpleNamespace(create=create, delete=lambda i: None),
        create_sino3d_gpu=lambda vid, pg, vg: (0, emulate_astra_par3d_fp(volumes[vid], vg, pg)),
    )
    monkeypatch.setitem(sys.modules, "astra", fake)
    from cryoorient_ray.core.imaging.projection_astra import astra_project

    rot = unitquat_to_rotmat(sample_orientations(7, seed=12))
    shifts = np.random.default_rng(0).uniform(-3, 3, (7, 2))
    for d in (32, 33):
        vol = astra_test_volume(d)
        got = astra_project(vol, rot, shifts, batch_size=3)
        ref = FourierSliceProjector(vol, interpolation="cubic")(rot, shifts=shifts)
        assert got.shape == ref.shape == (7, d, d) and got.dtype == np.float32
        errs = [rel_err(got[i], ref[i]) for i in range(len(rot))]
        assert max(errs) < 0.02, errs  # measured ≈ 1 %
        flipped = FourierSliceProjector(vol, interpolation="cubic")(rot, shifts=-shifts)
        assert min(rel_err(got[i], flipped[i]) for i in range(len(rot))) > 0.2
    assert astra_project(astra_test_volume(16), rot, image_size=20).shape == (7, 20, 20)


@pytest.mark.gpu
@pytest.mark.skipif(not astra_available(), reason="needs astra-toolbox with CUDA and a GPU")
def test_astra_matches_torch():
    from cryoorient_ray.core.imaging.projection_astra import astra_project

    rot = unitquat_to_rotmat(sample_orientations(60, seed=12))  # > one ASTRA batch of 50
    shifts = np.random.default_rng(0).uniform(-3, 3, (60, 2))
    for d in (32, 33):
        vol = astra_test_volume(d)
        ref = FourierSliceProjector(vol, interpolation="cubic")(rot, shifts=shifts)
        got = astra_project(vol, rot, shifts)
        assert got.shape == ref.shape
        errs = [rel_err(got[i], ref[i]) for i in range(len(rot))]
        assert max(errs) < 0.02, max(errs)
        via_factory = make_projector(vol, "astra")(rot[:3], shifts[:3])
        np.testing.assert_allclose(via_factory, got[:3], rtol=1e-5, atol=1e-5)
        assert astra_project(vol, rot[:2], image_size=d + 8).shape == (2, d + 8, d + 8)


def test_input_validation():
    vol = np.zeros((8, 8, 8))
    rot = EYE[None]
    with pytest.raises(CryoOrientError, match="cubic"):
        FourierSliceProjector(np.zeros((8, 8, 9)))
    with pytest.raises(CryoOrientError, match="cubic"):
        real_space_project(np.zeros((8, 8)), rot)
    with pytest.raises(CryoOrientError, match="NaN"):
        FourierSliceProjector(np.full((8, 8, 8), np.nan))
    with pytest.raises(CryoOrientError, match="oversampling"):
        FourierSliceProjector(vol, oversampling=0)
    proj = FourierSliceProjector(vol)
    with pytest.raises(CryoOrientError, match=r"\(B, 3, 3\)"):
        proj(EYE)
    with pytest.raises(CryoOrientError, match="rotation"):
        proj(2 * rot)
    with pytest.raises(CryoOrientError, match="rotation"):
        proj(-rot)  # det = -1: a reflection
    with pytest.raises(CryoOrientError, match=r"shifts must have shape"):
        proj(rot, shifts=np.zeros((2, 2)))
    with pytest.raises(CryoOrientError, match="image_size"):
        proj(rot, image_size=0)
    with pytest.raises(CryoOrientError, match="padded size"):
        proj(rot, image_size=17)
    with pytest.raises(CryoOrientError, match="wrap"):
        proj(rot, shifts=np.array([[12.0, 0.0]]))
    with pytest.raises(CryoOrientError, match=r"\(B, L, L\)"):
        shift_images(np.zeros((4, 4)), np.zeros((1, 2)))
    with pytest.raises(CryoOrientError, match="shifts"):
        real_space_project(vol, rot, shifts=np.zeros((1, 3)))
