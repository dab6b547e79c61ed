"""Density-map container and preparation: invariants on synthetic maps and on real EMDB/paper maps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cryoorient_ray.core.density.volume import (
    DensityMap,
    center_of_mass,
    center_of_mass_to_center,
    fit_box,
    molecule_weights,
    noise_floor,
    normalize_map,
    prepare_map,
    resample,
    to_cube,
)
from cryoorient_ray.errors import CryoOrientError


def _blob(shape, center_zyx, sigma, voxel_size=1.0):
    """Gaussian blob at ``center_zyx`` (Å from voxel ``n // 2``), ``sigma`` in Å; voxel size per axis or one."""
    sizes = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(shape, sizes, strict=True)], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, center_zyx, strict=True))
    return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ----------------------------------------------------------------------------- DensityMap


def test_density_map_converts_and_reports_sizes():
    d = DensityMap(np.ones((4, 6, 8), dtype=np.int8), 2.5, name="x")
    assert d.data.dtype == np.float32 and d.data.flags.c_contiguous
    assert d.shape == (4, 6, 8) and not d.is_cubic
    assert d.box_size == 8 and d.extent_angstrom == pytest.approx(20.0)
    assert "shape=(4, 6, 8)" in repr(d)


@pytest.mark.parametrize(
    "data,voxel,match",
    [
        (np.full((4, 4, 4), np.nan), 1.0, "NaN or infinite"),
        (np.pad(np.full((1, 1, 1), np.inf), 1), 1.0, "NaN or infinite"),
        (np.zeros((4, 4, 4)), 1.0, "all zero"),
        (np.ones((4, 4)), 1.0, "must be 3D"),
        (np.ones((2, 2, 2, 2)), 1.0, "must be 3D"),
        (np.ones((0, 4, 4)), 1.0, "empty"),
        (np.ones((4, 4, 4)), 0.0, "positive"),
        (np.ones((4, 4, 4)), -1.0, "positive"),
        (np.ones((4, 4, 4)), float("nan"), "positive"),
        (np.ones((4, 4, 4)), "abc", "number"),
        (np.array([[["a"]]]), 1.0, "real numbers"),
    ],
)
def test_density_map_rejects_bad_input(data, voxel, match):
    with pytest.raises(CryoOrientError, match=match) as info:
        DensityMap(data, voxel, source="some/file.mrc")
    assert "some/file.mrc" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("shape", [(5, 6, 7), (8, 8, 8), (9, 4, 11)])
@pytest.mark.parametrize("box", [3, 6, 7, 12, 13])
def test_fit_box_keeps_the_centre_voxel(shape, box):
    data = np.zeros(shape, np.float32)
    data[tuple(n // 2 for n in shape)] = 1.0
    out = fit_box(data, box)
    assert out.shape == (box, box, box)
    assert out[box // 2, box // 2, box // 2] == 1.0 and out.sum() == 1.0


def test_fit_box_pad_then_crop_is_identity():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 10, 9)).astype(np.float32)
    back = fit_box(fit_box(data, 16), 10)
    np.testing.assert_array_equal(fit_box(data, 10), back)


def test_to_cube_pads_symmetrically():
    rng = np.random.default_rng(1)
    data = rng.random((69, 57, 75)).astype(np.float32)  # 5j0n's shape
    cube = to_cube(data)
    assert cube.shape == (75, 75, 75)
    assert cube.sum() == pytest.approx(data.sum(), rel=1e-6)
    assert cube[75 // 2, 75 // 2, 75 // 2] == data[69 // 2, 57 // 2, 75 // 2]
    assert cube[:3].sum() == 0 and cube[-3:].sum() == 0  # 3 voxels each side on z
    with pytest.raises(CryoOrientError, match="3D"):
        to_cube(np.ones((3, 3)))


@pytest.mark.parametrize("bad", [0, 1, 2.5, True, "64"])
def test_fit_box_rejects_bad_box_size(bad):
    with pytest.raises(CryoOrientError, match="box size"):
        fit_box(np.ones((4, 4, 4)), bad)


# ----------------------------------------------------------------------------- resample


def test_resample_keeps_position_and_mass():
    shape, vs = (48, 50, 52), 1.5
    data = _blob(shape, (6.0, -9.0, 4.5), 4.0, vs)
    for new in (2.5, 1.0):
        out = resample(data, vs, new)
        assert out.shape == tuple(round(n * vs / new) for n in shape)
        com_old = (center_of_mass(data) - np.array(shape) // 2) * vs
        com_new = (center_of_mass(out) - np.array(out.shape) // 2) * new
        np.testing.assert_allclose(com_new, com_old, atol=0.05)
        assert out.sum() * new**3 == pytest.approx(data.sum() * vs**3, rel=1e-3)
    np.testing.assert_array_equal(resample(data, vs, vs), data)


def test_resample_does_not_alias():
    """A wave finer than the new Nyquist must vanish, not fold back as a coarse wave."""
    n = 64
    x = np.arange(n)
    wave = np.cos(2 * np.pi * x / 2.5).astype(np.float32)  # period 2.5 voxels
    data = np.broadcast_to(wave, (n, n, n)).copy() + 10.0
    out = resample(data, 1.0, 2.0)  # new Nyquist: period 4 old voxels
    core = out[8:-8, 8:-8, 8:-8]
    naive = data[:, :, ::2]  # plain decimation aliases to period 5 with full amplitude
    assert np.ptp(naive[0, 0]) > 1.5
    assert np.abs(core - 10.0).max() < 0.05


def test_resample_anisotropic_voxels():
    vs = (3.0, 2.0, 2.0)  # (z, y, x)
    data = _blob((30, 40, 40), (9.0, 0.0, -8.0), 4.0, vs)
    out = resample(data, vs, 2.0)
    assert out.shape == (45, 40, 40)
    com = (center_of_mass(out) - np.array(out.shape) // 2) * 2.0
    np.testing.assert_allclose(com, (9.0, 0.0, -8.0), atol=0.05)
    assert _ncc(out, _blob((45, 40, 40), (9.0, 0.0, -8.0), 4.0, 2.0)) > 0.999
    with pytest.raises(CryoOrientError, match="voxel size"):
        resample(data, (1.0, 2.0), 2.0)
    with pytest.raises(CryoOrientError, match="positive"):
        resample(data, 1.0, 0.0)


def test_resampled_model_map_matches_a_map_computed_at_that_voxel_size(shared_data):
    """Real data: gemmi's 5A1A map at 2 Å, resampled to 4 Å, is gemmi's map at 4 Å."""
    from cryoorient_ray.io.models import map_from_model

    path = shared_data / "paper" / "5a1a.cif.gz"
    fine = map_from_model(path, 2.0, 10.0, box_size=120)
    coarse = map_from_model(path, 4.0, 10.0, box_size=60)
    out = resample(fine.data, 2.0, 4.0)
    assert out.shape == coarse.shape
    assert _ncc(out, coarse.data) > 0.995


# ----------------------------------------------------------------------------- centring, weights


@pytest.mark.parametrize("shape", [(40, 40, 40), (33, 41, 38)])
def test_center_of_mass_to_center(shape):
    data = _blob(shape, (5.3, -7.6, 3.2), 3.0)
    out = center_of_mass_to_center(data)
    assert out.shape == shape
    np.testing.assert_allclose(center_of_mass(out), np.array(shape) // 2, atol=0.02)
    assert out.sum() == pytest.approx(data.sum(), rel=1e-4)


def test_noise_floor_ignores_background_noise():
    rng = np.random.default_rng(2)
    clean = 5 * _blob((48, 48, 48), (0, 0, 0), 4.0)
    assert noise_floor(clean) < 1e-5 * clean.max()  # only the Gaussian's far tails
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    floor = noise_floor(noisy)
    assert 0.1 < floor < 0.25  # about 3 σ
    off = _blob((48, 48, 48), (0, 0, 12.0), 4.0) * 5 + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    np.testing.assert_allclose(center_of_mass(off), (24, 24, 36), atol=0.1)  # not pulled to the middle
    with pytest.raises(CryoOrientError, match="no positive density"):
        molecule_weights(-np.abs(noisy))


def test_normalize_map():
    data = 3.7 * _blob((32, 32, 32), (0, 0, 0), 3.0)
    data[:4] = 0.0
    out = normalize_map(data)
    assert out[out > 0.1 * out.max()].mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(normalize_map(0.01 * data), out, rtol=1e-5)  # units do not matter
    assert not out[:4].any()  # a zero background stays zero
    with pytest.raises(CryoOrientError, match="no positive density"):
        normalize_map(-data)


# ----------------------------------------------------------------------------- prepare_map


def test_prepare_map_on_the_paper_map(shared_data):
    from cryoorient_ray.io.mrc import read_map

    d = read_map(shared_data / "paper" / "5j0n.mrc.gz")
    out = prepare_map(d, 64)
    assert out.shape == (64, 64, 64) and out.voxel_size == pytest.approx(3.6667, abs=1e-3)
    assert out.name == "5j0n" and out.source.endswith("5j0n.mrc.gz")
    np.testing.assert_allclose(center_of_mass(out.data), 32, atol=0.1)
    assert out.data[out.data > 0.1 * out.data.max()].mean() == pytest.approx(1.0, rel=1e-4)
    # the same molecule, box and voxel size: a coarser version correlates with a downsampled one
    coarse = prepare_map(d, 48, voxel_size=5.0)
    assert coarse.voxel_size == 5.0 and coarse.shape == (48, 48, 48)
    np.testing.assert_allclose(center_of_mass(coarse.data), 24, atol=0.1)
    ref = resample(out.data, out.voxel_size, 5.0)
    assert _ncc(fit_box(ref, 48), coarse.data) > 0.98


def test_prepare_map_refuses_a_box_that_cuts_the_molecule(shared_data):
    from cryoorient_ray.io.mrc import read_map

    d = read_map(shared_data / "paper" / "5j0n.mrc.gz")
    with pytest.raises(CryoOrientError, match="does not fit a 40-voxel box") as info:
        prepare_map(d, 40)
    msg = str(info.value)
    assert "5j0n.mrc.gz" in msg and "% of its mass lies outside" in msg and "\n" not in msg
    need = int(msg.split("at least ")[1].split()[0])
    prepare_map(d, need)  # the size it asks for works
    prepare_map(d, 40, voxel_size=6.0)  # so does a larger voxel size


def test_prepare_map_noisy_experimental_map(shared_data):
    """betaGal (100³, 3.54 Å, noise in the background): fits a 64 box at 4.5 Å, centred."""
    from cryoorient_ray.io.mrc import read_map

    d = read_map(shared_data / "paper" / "betagal_ngl_3.54A.mrc.gz")
    out = prepare_map(d, 64, voxel_size=4.5)
    np.testing.assert_allclose(center_of_mass(out.data), 32, atol=0.2)
    assert np.isfinite(out.data).all()


def test_prepare_map_without_centring_keeps_the_offset():
    data = _blob((40, 40, 40), (0.0, 0.0, 6.0), 2.0)
    out = prepare_map(DensityMap(data, 1.0), 32, center=False)
    np.testing.assert_allclose(center_of_mass(out.data), (16, 16, 22), atol=0.05)
    centred = prepare_map(DensityMap(data, 1.0), 32)
    np.testing.assert_allclose(center_of_mass(centred.data), 16, atol=0.05)


def test_prepare_map_bad_input():
    d = DensityMap(_blob((16, 16, 16), (0, 0, 0), 2.0), 1.0)
    with pytest.raises(CryoOrientError, match="box size"):
        prepare_map(d, 0)
    with pytest.raises(CryoOrientError, match="voxel size"):
        prepare_map(d, 16, voxel_size=-2)
    with pytest.raises(CryoOrientError, match="DensityMap"):
        prepare_map(np.ones((4, 4, 4)), 16)
    with pytest.raises(CryoOrientError, match="no positive density"):
        prepare_map(DensityMap(-d.data, 1.0), 16)


def test_volume_module_imports_only_numeric_libraries():
    code = (
        "import sys, cryoorient_ray.core.density.volume, cryoorient_ray.core.density.phantom;"
        "bad = [m for m in ('ray', 'zarr', 'gemmi', 'mrcfile') if m in sys.modules]; print(bad);"
        "sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
