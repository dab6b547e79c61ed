"""Density maps computed from atomic models (PDB / mmCIF, optionally gzipped), via gemmi.

:func:`map_from_model` follows the recipe of ``shared/data/paper/5a1a_gemmi_molmap11A_3.667A``
(and reproduces that file exactly):

  1. ``gemmi.read_structure``; keep model 1 only (NMR ensembles have many);
  2. keep the polymers: remove alternative conformations (first kept), hydrogens, waters and
     ligands (``setup_entities`` + ``remove_ligands_and_waters``) — proteins and nucleic acids
     stay; optionally build the first biological assembly (``gemmi.make_assembly``);
  3. translate the atoms so that their centroid (unweighted mean) lies on the centre voxel
     ``n // 2`` of a P1 cubic cell of ``n`` voxels of ``voxel_size`` Å;
  4. ``gemmi.DensityCalculatorE`` (electron scattering factors, the atoms' own B-factors kept)
     with ``d_min = resolution`` and an extra isotropic blur ``B = 8π²(0.225·resolution)²``,
     which turns it into a Chimera ``molmap`` at ``resolution`` (Gaussians of
     ``σ = 0.225·resolution``, molmap's default sigma factor);
  5. gemmi's grid is ``[x, y, z]``: it is transposed to ``[z, y, x]``.

The cell is periodic, so the box must hold the molecule with a margin (else its density would
wrap around): without ``box_size`` it is chosen as ``2·⌈(r + 1.5·resolution + 2·voxel_size) /
voxel_size⌉`` voxels, ``r`` the largest distance of an atom from the centroid along x, y or z.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gemmi
import numpy as np

from cryoorient_ray.core.density.volume import DensityMap, check_positive_angstrom
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import existing_file, strip_suffixes

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
MIN_MODEL_ATOMS = 10  # fewer polymer atoms than this is not a molecule (a stray atom, a fragment)
SIGMA_FACTOR = 0.225  # Chimera molmap: σ = 0.225 · resolution


def model_stem(path: str | os.PathLike) -> str:
    """The file name without ``.gz`` and the model suffix: ``1crn.pdb.gz`` → ``1crn``."""
    return strip_suffixes(Path(path).name, MODEL_SUFFIXES)


def molmap_blur(resolution: float) -> float:
    """Extra isotropic B-factor (Å²) that makes gemmi's density a molmap at ``resolution`` Å."""
    return 8 * math.pi**2 * (SIGMA_FACTOR * resolution) ** 2


def read_polymer_model(path: str | os.PathLike, assembly: bool = False) -> gemmi.Model:
    """Model 1 of a PDB/mmCIF file with only its polymer atoms (no H, waters, ligands, altlocs).

    With ``assembly=True``, the first biological assembly built from it.

    Raises:
        CryoOrientError: missing or unreadable file, no assembly records (``assembly=True``),
            or no protein/nucleic-acid atoms.
    """
    p = existing_file(path, "model")
    try:
        st = gemmi.read_structure(str(p))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/OSError on bad files
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise CryoOrientError(f"{p}: cannot read it as a PDB/mmCIF model ({reason})") from None
    if len(st) == 0:
        raise CryoOrientError(f"{p}: no atomic model in the file")
    while len(st) > 1:
        del st[len(st) - 1]
    st.setup_entities()
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    st.remove_empty_chains()
    model = st[0]
    if assembly:
        if len(st.assemblies) == 0:
            raise CryoOrientError(f"{p}: the file has no biological assembly records; use assembly=False")
        model = gemmi.make_assembly(st.assemblies[0], model, gemmi.HowToNameCopiedChain.AddNumber)
    if model.count_atom_sites() == 0:
        raise CryoOrientError(f"{p}: no protein or nucleic-acid atoms (after removing hydrogens, waters and ligands)")
    if model.count_atom_sites() < MIN_MODEL_ATOMS:
        raise CryoOrientError(
            f"{p}: only {model.count_atom_sites()} polymer atom(s); "
            f"a molecule to project needs at least {MIN_MODEL_ATOMS}"
        )
    return model


def _positions(model: gemmi.Model) -> np.ndarray:
    return np.array([atom.pos.tolist() for chain in model for res in chain for atom in res], dtype=np.float64)


def map_from_model(
    path: str | os.PathLike,
    voxel_size: float,
    resolution: float,
    box_size: int | None = None,
    assembly: bool = False,
) -> DensityMap:
    """A molmap-like density of the polymers of an atomic model (see the module docstring).

    Args:
        path: ``.pdb``, ``.ent``, ``.cif`` or ``.mmcif`` file, optionally gzipped.
        voxel_size: grid spacing in Å.
        resolution: Å; gemmi's ``d_min`` and the molmap blur ``8π²(0.225·resolution)²``.
        box_size: edge of the cubic box in voxels; ``None`` picks one that holds the molecule.
        assembly: build the first biological assembly (e.g. a capsid from its asymmetric unit).

    Returns:
        A cubic :class:`DensityMap` ``[z, y, x]`` float32 with the atoms' centroid on voxel
        ``n // 2``, named after the file (``1crn``), density in gemmi's units (no normalisation).

    Raises:
        CryoOrientError: unreadable file, no polymer atoms, bad sizes, or a ``box_size`` too
            small for the molecule.
    """
    p = Path(path)
    vs = check_positive_angstrom(voxel_size, f"{p}: voxel size")
    res = check_positive_angstrom(resolution, f"{p}: resolution")
    if box_size is not None and (isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer))):
        raise CryoOrientError(f"{p}: box size must be an integer number of voxels; got {box_size!r}")
    model = read_polymer_model(p, assembly=assembly)

    xyz = _positions(model)
    centroid = xyz.mean(axis=0)
    reach = float(np.abs(xyz - centroid).max())  # Å, along x, y or z
    margin = 1.5 * res + 2 * vs
    if box_size is None:
        n = 2 * math.ceil((reach + margin) / vs)
    else:
        n = int(box_size)
        room = (n // 2) * vs
        if n < 8 or reach + 0.5 * res > room:
            span = 2 * reach
            raise CryoOrientError(
                f"{p}: the model spans {span:.0f} Å; it does not fit a {n}-voxel box at {vs:g} Å/voxel "
                f"({n * vs:.0f} Å) with room for its {res:g} Å blur; "
                f"use box_size >= {2 * math.ceil((reach + 0.5 * res) / vs) + 2} or a larger voxel size"
            )
    if n**3 > 512**3:
        raise CryoOrientError(
            f"{p}: a {n}³ box is too large (the model spans {2 * reach:.0f} Å at {vs:g} Å/voxel); "
            "use a larger voxel size"
        )

    edge = n * vs
    shift = np.full(3, (n // 2) * vs) - centroid
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*shift)))

    calc = gemmi.DensityCalculatorE()
    calc.d_min = res
    calc.blur = molmap_blur(res)
    calc.grid.set_unit_cell(gemmi.UnitCell(edge, edge, edge, 90, 90, 90))
    calc.grid.spacegroup = gemmi.find_spacegroup_by_name("P1")
    calc.grid.set_size(n, n, n)  # exact n (gemmi's own sizing would round up to an FFT-friendly size)
    calc.add_model_density_to_grid(model)
    calc.grid.symmetrize_sum()
    data = np.array(calc.grid, copy=True).transpose(2, 1, 0)  # gemmi [x, y, z] -> [z, y, x]
    return DensityMap(np.ascontiguousarray(data, dtype=np.float32), vs, name=model_stem(p), source=str(p))
