"""Reading maps (MRC/CCP4), computing maps from models (gemmi) and dispatching density sources."""

from __future__ import annotations

import gzip
import time

import gemmi
import mrcfile
import numpy as np
import pytest

from cryoorient_ray.core.density.volume import DensityMap, center_of_mass, prepare_map
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.maps import expand_sources, load_density, source_kind
from cryoorient_ray.io.models import map_from_model, molmap_blur
from cryoorient_ray.io.mrc import read_map, write_map


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _write_raw_mrc(path, file_data, axes=(1, 2, 3), voxel_xyz=(1.0, 1.0, 1.0), shape_zyx=None, angles=(90, 90, 90)):
    """An MRC file whose array is stored as given, with the header's axis order and cell set by hand.

    ``axes`` = (mapc, mapr, maps); ``shape_zyx`` = the map's (Z, Y, X) size, for mx/my/mz and the cell.
    """
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(file_data, dtype=np.float32))
        h = mrc.header
        h.mapc, h.mapr, h.maps = axes
        z, y, x = shape_zyx if shape_zyx is not None else file_data.shape
        h.mx, h.my, h.mz = x, y, z
        h.cella = (x * voxel_xyz[0], y * voxel_xyz[1], z * voxel_xyz[2])
        h.cellb = angles


# ----------------------------------------------------------------------------- read_map: real files


def test_read_paper_map_matches_gemmi(shared_data):
    path = shared_data / "paper" / "5j0n.mrc.gz"
    d = read_map(path)
    assert d.shape == (69, 57, 75) and d.data.dtype == np.float32
    assert d.voxel_size == pytest.approx(3.6667, abs=1e-3)
    assert d.name == "5j0n" and d.source == str(path)
    ccp4 = gemmi.read_ccp4_map(str(path))
    ccp4.setup(float("nan"))
    np.testing.assert_array_equal(np.array(ccp4.grid).transpose(2, 1, 0), d.data)  # gemmi is [x, y, z]


def test_read_int8_map(shared_data):
    d = read_map(shared_data / "maps" / "emd_1155.ccp4.gz")
    assert d.shape == (281, 91, 141) and d.data.dtype == np.float32
    assert d.voxel_size == pytest.approx(16.4, abs=1e-3)
    assert d.data.min() == -128 and d.data.max() == 127  # int8 values kept exactly


def test_read_tiny_map(shared_data):
    d = read_map(shared_data / "maps" / "emd_3197.map.gz")
    assert d.shape == (20, 20, 20) and d.voxel_size == pytest.approx(11.4, abs=1e-3)
    out = prepare_map(d, 24)
    assert out.shape == (24, 24, 24)


def test_header_without_voxel_size(shared_data):
    path = shared_data / "maps" / "ribosome70S_aspire_65px.mrc.gz"
    with pytest.raises(CryoOrientError, match="no voxel size") as info:
        read_map(path)
    assert str(path) in str(info.value) and "voxel_size=" in str(info.value)
    d = read_map(path, voxel_size=5.0)
    assert d.voxel_size == 5.0 and d.shape == (65, 65, 65)
    assert read_map(path, default_voxel_size=4.0).voxel_size == 4.0


def test_override_beats_the_header(shared_data):
    d = read_map(shared_data / "maps" / "emd_3197.map.gz", voxel_size=2.0)
    assert d.voxel_size == 2.0
    with pytest.raises(CryoOrientError, match="positive"):
        read_map(shared_data / "maps" / "emd_3197.map.gz", voxel_size=0)


def test_crystal_map_is_refused(shared_data):
    """EMD-3001: a MicroED crystal map (axis order 3,1,2, non-cubic voxels, β = 94.3°)."""
    path = shared_data / "maps" / "emd_3001.map.gz"
    with pytest.raises(CryoOrientError, match="non-orthogonal unit cell") as info:
        read_map(path)
    assert "94.326" in str(info.value) and str(path) in str(info.value)
    with mrcfile.open(path) as mrc:  # the refusal is about the cell, not the axis order
        assert (int(mrc.header.mapc), int(mrc.header.mapr), int(mrc.header.maps)) == (3, 1, 2)


@pytest.mark.parametrize("name", ["emd_1461_crop_1.23A.mrc.gz", "emd_2513_crop_1.32A.mrc.gz"])
def test_read_cropped_emdb_maps(shared_data, name):
    d = read_map(shared_data / "maps" / name)
    ccp4 = gemmi.read_ccp4_map(str(shared_data / "maps" / name))
    ccp4.setup(float("nan"))
    np.testing.assert_array_equal(np.array(ccp4.grid).transpose(2, 1, 0), d.data)


# ----------------------------------------------------------------------------- read_map: axis order, voxels


@pytest.mark.parametrize("axes", [(1, 2, 3), (3, 1, 2), (2, 3, 1), (3, 2, 1), (1, 3, 2)])
def test_axis_order_is_undone(tmp_path, axes):
    rng = np.random.default_rng(0)
    vol = rng.random((6, 7, 8)).astype(np.float32)  # [z, y, x]
    mapc, mapr, maps = axes
    # the file's array is [sections, rows, columns] = [axis maps, axis mapr, axis mapc]
    zyx_axis = {3: 0, 2: 1, 1: 2}  # x=1, y=2, z=3 -> position in [z, y, x]
    file_data = vol.transpose(zyx_axis[maps], zyx_axis[mapr], zyx_axis[mapc])
    path = tmp_path / "axes.mrc"
    _write_raw_mrc(path, file_data, axes=axes, voxel_xyz=(1.5, 1.5, 1.5), shape_zyx=vol.shape)
    d = read_map(path)
    np.testing.assert_array_equal(d.data, vol)
    ccp4 = gemmi.read_ccp4_map(str(path))  # an independent reader agrees
    ccp4.setup(float("nan"))
    np.testing.assert_array_equal(np.array(ccp4.grid).transpose(2, 1, 0), vol)


def test_non_cubic_voxels_are_resampled(tmp_path):
    vx, vy, vz = 2.0, 2.0, 3.0
    shape = (24, 32, 32)
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * v for n, v in zip(shape, (vz, vy, vx), strict=True)], indexing="ij")
    blob = np.exp(-((grids[0] - 6) ** 2 + grids[1] ** 2 + (grids[2] + 4) ** 2) / (2 * 4.0**2))
    path = tmp_path / "aniso.mrc"
    _write_raw_mrc(path, blob, voxel_xyz=(vx, vy, vz))
    d = read_map(path)
    assert d.voxel_size == pytest.approx(2.0) and d.shape == (36, 32, 32)
    com = (center_of_mass(d.data) - np.array(d.shape) // 2) * d.voxel_size
    np.testing.assert_allclose(com, (6.0, 0.0, -4.0), atol=0.05)


def test_bad_map_files(tmp_path):
    text = tmp_path / "notes.mrc"
    text.write_text("this is not a density map\n" * 50)
    with pytest.raises(CryoOrientError, match="not a readable MRC/CCP4 map") as info:
        read_map(text)
    assert str(text) in str(info.value) and "\n" not in str(info.value)
    empty = tmp_path / "empty.map"
    empty.write_bytes(b"")
    with pytest.raises(CryoOrientError, match="not a readable"):
        read_map(empty)
    broken = tmp_path / "broken.mrc.gz"
    broken.write_bytes(gzip.compress(b"MAP " * 100)[:40])
    with pytest.raises(CryoOrientError, match="not a readable"):
        read_map(broken)
    with pytest.raises(CryoOrientError, match="not found"):
        read_map(tmp_path / "missing.mrc")
    flat = tmp_path / "image.mrc"
    with mrcfile.new(flat) as mrc:
        mrc.set_data(np.ones((8, 8), np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(CryoOrientError, match="3D"):
        read_map(flat)
    zero = tmp_path / "zero.mrc"
    with mrcfile.new(zero) as mrc:
        mrc.set_data(np.zeros((4, 4, 4), np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(CryoOrientError, match="all zero"):
        read_map(zero)


@pytest.mark.parametrize("name", ["out.mrc", "out.map.gz"])
def test_write_read_roundtrip(tmp_path, name):
    rng = np.random.default_rng(3)
    d = DensityMap(rng.normal(size=(10, 12, 14)).astype(np.float32), 1.77, name="rt")
    path = write_map(tmp_path / name, d)
    back = read_map(path)
    np.testing.assert_array_equal(back.data, d.data)
    assert back.voxel_size == pytest.approx(1.77, rel=1e-6)
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.mode) == 2 and tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary files left


# ----------------------------------------------------------------------------- models


def _polymer_atoms(path):
    st = gemmi.read_structure(str(path))
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    return np.array([cra.atom.pos.tolist() for cra in st[0].all()])


@pytest.mark.parametrize("name", ["1crn.pdb.gz", "8zpm.cif.gz", "4gyt.pdb.gz", "1d66.pdb.gz", "2beg.cif.gz"])
@pytest.mark.parametrize("voxel,res", [(3.0, 8.0), (5.0, 12.0)])
def test_model_map_is_centred_and_as_large_as_the_model(shared_data, name, voxel, res):
    path = shared_data / "models" / name
    d = map_from_model(path, voxel, res)
    assert d.is_cubic and d.voxel_size == voxel and d.name == name.split(".")[0]
    np.testing.assert_allclose(center_of_mass(d.data), d.box_size // 2, atol=0.5)
    xyz = _polymer_atoms(path)
    atoms_zyx = (xyz.max(0) - xyz.min(0))[::-1]
    mask = d.data > 0.05 * d.data.max()
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        extent = (idx[-1] - idx[0] + 1) * voxel
        assert -voxel <= extent - atoms_zyx[axis] <= res + 2 * voxel, (axis, extent, atoms_zyx)


def test_model_map_reproduces_the_recorded_5a1a_map(shared_data):
    """The derived paper map was made with this recipe (SOURCES.md): same settings, same map."""
    start = time.perf_counter()
    d = map_from_model(shared_data / "paper" / "5a1a.cif.gz", 220 / 60, 11.0, box_size=60)
    assert time.perf_counter() - start < 10
    ref = read_map(shared_data / "paper" / "5a1a_gemmi_molmap11A_3.667A.mrc.gz")
    assert _ncc(d.data, ref.data) > 0.999
    # and with our own box choice, after preparing both the same way
    auto = map_from_model(shared_data / "paper" / "5a1a.cif.gz", 3.667, 11.0)
    assert _ncc(prepare_map(auto, 64).data, prepare_map(ref, 64).data) > 0.99
    assert molmap_blur(11.0) == pytest.approx(8 * np.pi**2 * (0.225 * 11) ** 2)


def test_assembly(shared_data):
    """4OYN: one ferritin chain plus the operators of its 24-mer."""
    path = shared_data / "models" / "4oyn.pdb.gz"
    one = map_from_model(path, 6.0, 12.0)
    full = map_from_model(path, 6.0, 12.0, assembly=True)
    assert full.box_size > one.box_size
    assert full.data.sum() / one.data.sum() == pytest.approx(24, rel=0.02)
    with pytest.raises(CryoOrientError, match="no biological assembly"):
        map_from_model(shared_data / "models" / "1tii.pdb.gz", 6.0, 12.0, assembly=True)


def test_model_box_too_small(shared_data):
    with pytest.raises(CryoOrientError, match="does not fit a 16-voxel box") as info:
        map_from_model(shared_data / "models" / "8zpm.cif.gz", 3.0, 8.0, box_size=16)
    assert "8zpm.cif.gz" in str(info.value) and "\n" not in str(info.value)
    d = map_from_model(shared_data / "models" / "8zpm.cif.gz", 3.0, 8.0, box_size=61)
    assert d.shape == (61, 61, 61)
    np.testing.assert_allclose(center_of_mass(d.data), 30, atol=0.5)


def test_bad_model_files(tmp_path):
    garbage = tmp_path / "garbage.cif"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CryoOrientError, match="garbage.cif") as info:
        map_from_model(garbage, 3.0, 8.0)
    assert "\n" not in str(info.value)
    text = tmp_path / "notes.pdb"
    text.write_text("hello\nthis is not a structure\n")
    with pytest.raises(CryoOrientError, match="no protein or nucleic-acid atoms"):
        map_from_model(text, 3.0, 8.0)
    water = tmp_path / "water.pdb"
    water.write_text(
        "HETATM    1  O   HOH A   1      10.000  10.000  10.000  1.00 20.00           O\n"
        "HETATM    2  O   HOH A   2      13.000  10.000  10.000  1.00 20.00           O\n"
        "END\n"
    )
    with pytest.raises(CryoOrientError, match=r"water\.pdb: no protein or nucleic-acid atoms"):
        map_from_model(water, 3.0, 8.0)
    with pytest.raises(CryoOrientError, match="not found"):
        map_from_model(tmp_path / "missing.cif.gz", 3.0, 8.0)
    with pytest.raises(CryoOrientError, match="resolution"):
        map_from_model(water, 3.0, 0)


# ----------------------------------------------------------------------------- load_density / expand_sources


def test_dispatch_on_real_files(shared_data):
    model = load_density(shared_data / "models" / "1crn.pdb.gz", voxel_size=3.0, resolution=8.0)
    assert model.name == "1crn" and model.voxel_size == 3.0
    default_res = load_density(str(shared_data / "models" / "1crn.pdb.gz"), voxel_size=4.0)
    assert default_res.voxel_size == 4.0  # resolution defaults to 2 × voxel size
    np.testing.assert_allclose(
        default_res.data, map_from_model(shared_data / "models" / "1crn.pdb.gz", 4.0, 8.0).data, rtol=1e-6
    )
    mrc = load_density(str(shared_data / "paper" / "5j0n.mrc.gz"), voxel_size=2.0)
    assert mrc.name == "5j0n" and mrc.voxel_size == pytest.approx(3.6667, abs=1e-3)  # the header wins
    ccp4 = load_density(shared_data / "maps" / "emd_1155.ccp4.gz")
    assert ccp4.shape == (281, 91, 141)
    no_header = load_density(shared_data / "maps" / "ribosome70S_aspire_65px.mrc.gz", voxel_size=5.0)
    assert no_header.voxel_size == 5.0  # ... unless it has none
    with pytest.raises(CryoOrientError, match="needs a voxel size"):
        load_density(shared_data / "models" / "1crn.pdb.gz")


def test_dispatch_pseudo():
    d = load_density("pseudo")
    assert d.name == "pseudo:0" and d.shape == (64, 64, 64) and d.voxel_size == 3.0
    e = load_density("Pseudo:7", voxel_size=4.0, box_size=48)
    assert e.name == "pseudo:7" and e.shape == (48, 48, 48) and e.voxel_size == 4.0
    with pytest.raises(CryoOrientError, match="seed"):
        load_density("pseudo:abc")
    # a shape by name; the default shape's name is plain pseudo:SEED
    r = load_density("pseudo-random:3", box_size=48)
    assert r.name == "pseudo-random:3" and not np.array_equal(r.data, load_density("pseudo:3", box_size=48).data)
    assert load_density("pseudo-domains:3", box_size=48).name == "pseudo:3"
    assert load_density("pseudo-dumbbell").name == "pseudo-dumbbell:0"
    with pytest.raises(CryoOrientError, match="unknown shape 'blob'"):
        load_density("pseudo-blob:1")


def test_pseudo_seed_ranges_expand(tmp_path):
    """pseudo[-SHAPE]:A-B is B - A + 1 distinct pseudo-proteins (training sets that never repeat)."""
    from cryoorient_ray.io.maps import check_source

    out = expand_sources(["pseudo-random:10-13", "pseudo:2-3", "pseudo"])
    assert out == [
        "pseudo-random:10",
        "pseudo-random:11",
        "pseudo-random:12",
        "pseudo-random:13",
        "pseudo:2",
        "pseudo:3",
        "pseudo",
    ]
    maps = [load_density(s, box_size=48).data for s in out[:4]]
    assert all(not np.array_equal(a, b) for k, a in enumerate(maps) for b in maps[k + 1 :])
    for source in out:
        check_source(source)
    for bad, why in (
        ("pseudo:5-2", "first seed is above"),
        ("pseudo:1-x", "FIRST-LAST"),
        ("pseudo:0-100000", "more than"),
    ):
        with pytest.raises(CryoOrientError, match=why):
            expand_sources([bad])
    # a file whose name starts with pseudo- stays a file
    (tmp_path / "pseudo-map.mrc").write_text("")
    assert expand_sources([str(tmp_path / "pseudo-map.mrc")]) == [str(tmp_path / "pseudo-map.mrc")]
    check_source(str(tmp_path / "pseudo-map.mrc"))


def test_dispatch_errors(tmp_path, shared_data):
    with pytest.raises(CryoOrientError, match="is a folder; pass the model or map files"):
        load_density(shared_data / "models")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    expected = "cannot tell what .* is \\(expected a .pdb/.cif model, a .mrc/.map map, an id like 5j0n or EMD-1234"
    for source in (str(other), "hello world", "12345", ""):
        with pytest.raises(CryoOrientError, match=expected):
            load_density(source)
    with pytest.raises(CryoOrientError, match="file not found"):
        load_density(str(tmp_path / "missing.cif.gz"), voxel_size=3.0)
    with pytest.raises(CryoOrientError, match="path or a string"):
        load_density(42)


def test_source_kind():
    assert source_kind("a/B.PDB.GZ") == "model" and source_kind("x.ent") == "model"
    assert source_kind("x.mmcif") == "model" and source_kind("x.cif.gz") == "model"
    assert source_kind("x.mrcs") == "map" and source_kind("x.ccp4.gz") == "map"
    assert source_kind("x.fasta") is None and source_kind("x.gz") is None


def test_expand_sources(tmp_path, shared_data):
    for name in ("b.cif.gz", "a.mrc", "c.txt", ".hidden.pdb"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.pdb").write_text("")
    out = expand_sources(["pseudo", str(tmp_path), "5j0n"])
    assert out == ["pseudo", str(tmp_path / "a.mrc"), str(tmp_path / "b.cif.gz"), "5j0n"]
    real = expand_sources([str(shared_data / "maps")])
    names = [p.rsplit("/", 1)[1] for p in real]
    assert names == sorted(names) and "emd_1461.fasta" not in names and "emd_3197.map.gz" in names
    assert "3j6b_chain9.pdb.gz" in names
    assert expand_sources([str(tmp_path / "sub")]) == [str(tmp_path / "sub" / "d.pdb")]  # not recursive
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "readme.txt").write_text("")
    with pytest.raises(CryoOrientError, match="folder .*none has no model or map files"):
        expand_sources(["pseudo", str(tmp_path / "none")])


def test_every_shared_model_loads(shared_data):
    """All ~55 models at 6 Å/voxel, 12 Å: a map or a one-line CryoOrientError naming the file."""
    start = time.perf_counter()
    paths = sorted((shared_data / "models").glob("*.gz"))
    assert len(paths) >= 50
    failures = {}
    for path in paths:
        try:
            d = load_density(str(path), voxel_size=6.0, resolution=12.0)
        except CryoOrientError as exc:
            msg = str(exc)
            assert path.name in msg and "\n" not in msg
            failures[path.name] = msg
            continue
        assert d.is_cubic and d.voxel_size == 6.0
        np.testing.assert_allclose(center_of_mass(d.data), d.box_size // 2, atol=0.5)
    assert len(failures) <= 2, failures  # every model in shared/data loads today
    assert time.perf_counter() - start < 60
