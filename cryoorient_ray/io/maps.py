"""One entry point for density sources: models, maps, database ids and the pseudo-protein.

:func:`load_density` dispatches on what ``source`` is:

  ==============================================  ==========================================
  ``*.pdb``, ``*.ent``, ``*.cif``, ``*.mmcif``    :func:`~cryoorient_ray.io.models.map_from_model`
  (optionally ``.gz``)
  ``*.mrc``, ``*.map``, ``*.ccp4``, ``*.mrcs``    :func:`~cryoorient_ray.io.mrc.read_map`
  (optionally ``.gz``)
  ``pseudo[-SHAPE][:SEED]``                       :func:`~cryoorient_ray.core.density.phantom.pseudo_protein`
  a PDB id (``5j0n``) or EMDB id (``EMD-1234``)   :func:`~cryoorient_ray.io.fetch.fetch_entry`, then
                                                  the downloaded file as above
  ==============================================  ==========================================

An existing file is always taken as a file (its extension decides); an id is only downloaded
when no file of that name exists (and only from a ``str``: a ``pathlib.Path`` is never an id).
Folders are refused: :func:`expand_sources` turns them into the files they hold first, and a
seed range ``pseudo[-SHAPE]:A-B`` into the ``B − A + 1`` pseudo-proteins ``A … B`` (training sets of
many procedural structures that never repeat; ``SHAPE`` one of
:data:`~cryoorient_ray.core.density.phantom.SHAPES`, default ``domains``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoorient_ray.core.density.phantom import SHAPES, pseudo_protein
from cryoorient_ray.core.density.volume import DensityMap
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.fetch import default_cache_dir, fetch_entry, is_entry_id
from cryoorient_ray.io.models import MODEL_SUFFIXES, map_from_model
from cryoorient_ray.io.mrc import MAP_SUFFIXES, read_map

PSEUDO_DEFAULTS = {"box_size": 64, "voxel_size": 3.0, "resolution": 8.0}
MIN_MAP_EDGE = 4  # voxels: a smaller map has no structure to project
MAX_PSEUDO_RANGE = 100_000  # pseudo-proteins one seed range may expand to


def source_kind(path: str | os.PathLike) -> str | None:
    """``"model"``, ``"map"`` or ``None`` from a file name (``.gz`` allowed, case ignored)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(MODEL_SUFFIXES):
        return "model"
    if name.endswith(MAP_SUFFIXES):
        return "map"
    return None


def _cannot_tell(source) -> CryoOrientError:
    return CryoOrientError(
        f"cannot tell what {str(source)!r} is (expected a .pdb/.cif model, a .mrc/.map map, "
        "an id like 5j0n or EMD-1234, or pseudo[-SHAPE][:SEED])"
    )


def _pseudo_parts(text: str) -> tuple[str, str] | None:
    """``(shape, seed text)`` of ``pseudo[-SHAPE][:SEED]`` (seed text ``"0"`` when absent); ``None`` if
    ``text`` is not a pseudo source."""
    low = text.strip().lower()
    head, _, seed = low.partition(":")
    if head == "pseudo":
        shape = "domains"
    elif head.startswith("pseudo-"):
        shape = head[len("pseudo-") :]
        if any(c in shape for c in "./\\"):
            return None  # a file's name (pseudo-map.mrc), not a shape
        if shape not in SHAPES:
            raise CryoOrientError(
                f"invalid pseudo-protein source {text!r}: unknown shape {shape!r} (use one of {', '.join(SHAPES)})"
            )
    else:
        return None
    return shape, (seed.strip() if ":" in low else "0")


def is_pseudo_source(text: str | os.PathLike) -> bool:
    """Whether ``text`` names the built-in pseudo-protein (``pseudo[-SHAPE][:SEED]``)."""
    return _pseudo_parts(str(text)) is not None


def _pseudo_source(text: str) -> tuple[str, int] | None:
    """``(shape, seed)`` of ``pseudo[-SHAPE][:SEED]``; ``None`` if not a pseudo source."""
    parts = _pseudo_parts(text)
    if parts is None:
        return None
    shape, seed = parts
    if not seed.isdigit():
        raise CryoOrientError(f"invalid pseudo-protein source {text!r}: the seed must be a non-negative integer")
    return shape, int(seed)


def pseudo_range(text: str) -> list[str] | None:
    """The sources ``pseudo[-SHAPE]:A`` … ``:B`` of a seed range ``pseudo[-SHAPE]:A-B``; ``None`` if
    ``text`` is not a range.

    Raises:
        CryoOrientError: a range with ``A > B``, bad seeds or more than :data:`MAX_PSEUDO_RANGE` seeds.
    """
    parts = _pseudo_parts(text) if isinstance(text, str) else None
    if parts is None or "-" not in parts[1]:
        return None
    shape, seeds = parts
    lo, _, hi = seeds.partition("-")
    if not (lo.strip().isdigit() and hi.strip().isdigit()):
        raise CryoOrientError(f"invalid pseudo-protein range {text!r}: write pseudo[-SHAPE]:FIRST-LAST")
    first, last = int(lo), int(hi)
    if first > last:
        raise CryoOrientError(f"invalid pseudo-protein range {text!r}: the first seed is above the last")
    if last - first + 1 > MAX_PSEUDO_RANGE:
        raise CryoOrientError(f"pseudo-protein range {text!r} holds more than {MAX_PSEUDO_RANGE:,} seeds")
    prefix = "pseudo" if shape == "domains" else f"pseudo-{shape}"
    return [f"{prefix}:{k}" for k in range(first, last + 1)]


def _load_file(
    path: Path,
    kind: str,
    voxel_size: float | None,
    resolution: float | None,
    box_size: int | None,
) -> DensityMap:
    if kind == "model":
        if voxel_size is None:
            raise CryoOrientError(f"{path}: making a map from a model needs a voxel size (voxel_size, Å)")
        res = 2.0 * float(voxel_size) if resolution is None else resolution
        return map_from_model(path, voxel_size=voxel_size, resolution=res, box_size=box_size)
    return check_has_structure(read_map(path, default_voxel_size=voxel_size))


def check_has_structure(density: DensityMap) -> DensityMap:
    """Refuse a map with nothing to project: fewer than :data:`MIN_MAP_EDGE` voxels along an axis, or constant.

    Raises:
        CryoOrientError: one line naming the map and what is wrong with it.
    """
    data = np.asarray(density.data)
    if min(data.shape) < MIN_MAP_EDGE:
        raise CryoOrientError(
            f"{density.source or density.name}: a map of {'×'.join(map(str, data.shape))} voxels has no structure "
            f"to project (need at least {MIN_MAP_EDGE} voxels along each axis)"
        )
    if float(np.ptp(data)) == 0.0:
        raise CryoOrientError(
            f"{density.source or density.name}: the map is constant ({float(data.flat[0]):g}); nothing to project"
        )
    return density


def load_density(
    source: str | os.PathLike,
    voxel_size: float | None = None,
    resolution: float | None = None,
    box_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DensityMap:
    """Load a density map from a model, a map, a database id or the pseudo-protein.

    Args:
        source: a file path, ``pseudo[-SHAPE][:SEED]``, or a PDB / EMDB id (module docstring).
        voxel_size: Å per voxel.
            Models: the grid spacing (required).
            Maps: used only when the file's header has no voxel size (0); a header voxel size
            is always kept (:func:`~cryoorient_ray.core.density.volume.prepare_map` resamples later).
            Pseudo-protein: its voxel size (default 3 Å).
        resolution: Å. Models: the molmap resolution, default ``2 · voxel_size`` (Nyquist).
            Pseudo-protein: default ``max(8 Å, 2 · voxel_size)``. Maps: not used.
        box_size: voxels. Models: the box edge (default: one that holds the molecule).
            Pseudo-protein: the box edge (default 64). Maps: not used (``prepare_map`` fits them).
        cache_dir: download folder for ids (default
            :func:`~cryoorient_ray.io.fetch.default_cache_dir`).

    Returns:
        A :class:`DensityMap`, not yet prepared for the simulator (see ``prepare_map``).

    Raises:
        CryoOrientError: a folder, a missing file, an unknown kind of source, or any error of
            the loader it dispatches to.
    """
    if isinstance(source, os.PathLike):
        text = os.fspath(source)
        as_path_only = True
    elif isinstance(source, str):
        text = source.strip()
        as_path_only = False
    else:
        raise CryoOrientError(f"a density source must be a path or a string; got {type(source).__name__}")
    if not text:
        raise _cannot_tell(source)

    if not as_path_only:
        pseudo = _pseudo_source(text)
        if pseudo is not None:
            vs = PSEUDO_DEFAULTS["voxel_size"] if voxel_size is None else voxel_size
            res = max(PSEUDO_DEFAULTS["resolution"], 2.0 * float(vs)) if resolution is None else resolution
            box = PSEUDO_DEFAULTS["box_size"] if box_size is None else box_size
            return pseudo_protein(seed=pseudo[1], box_size=box, voxel_size=vs, resolution=res, shape=pseudo[0])

    path = Path(text).expanduser()
    if path.is_dir():
        raise CryoOrientError(f"{path} is a folder; pass the model or map files in it (e.g. {path}/*.cif.gz)")
    kind = source_kind(path)
    if path.exists():
        if kind is None:
            raise _cannot_tell(source)
        return _load_file(path, kind, voxel_size, resolution, box_size)
    if kind is not None:
        raise CryoOrientError(f"file not found: {path}")
    if not as_path_only and is_entry_id(text):
        folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
        downloaded = fetch_entry(text, folder)
        downloaded_kind = source_kind(downloaded)
        if downloaded_kind is None:
            raise CryoOrientError(f"{downloaded}: downloaded for {text}, but its kind is unknown from its name")
        return _load_file(downloaded, downloaded_kind, voxel_size, resolution, box_size)
    raise _cannot_tell(source)


def check_source(source: str | os.PathLike) -> None:
    """Refuse, without loading anything, a source :func:`load_density` would refuse at once.

    Catches a missing file, a folder, a file of unknown kind, a malformed ``pseudo[-SHAPE][:SEED]`` and a
    string that is neither a file nor an id; ids are not looked up (that needs the network).

    Raises:
        CryoOrientError: as :func:`load_density` would for that source.
    """
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else ""
    if not text:
        raise _cannot_tell(source)
    if isinstance(source, str) and _pseudo_source(text) is not None:
        return
    path = Path(text).expanduser()
    if path.is_dir():
        raise CryoOrientError(f"{path} is a folder; pass the model or map files in it (e.g. {path}/*.cif.gz)")
    kind = source_kind(path)
    if path.exists() and kind is not None:
        return
    if kind is not None:
        raise CryoOrientError(f"file not found: {path}")
    if path.exists() or not (isinstance(source, str) and is_entry_id(text)):
        raise _cannot_tell(source)


def expand_sources(items: list[str]) -> list[str]:
    """Replace every folder in ``items`` by the model and map files directly in it (sorted by name,
    not recursive) and every seed range ``pseudo[-SHAPE]:A-B`` by its pseudo-proteins; keep every
    other item (files, ids, ``pseudo``) as it is, in order.

    Raises:
        CryoOrientError: a folder with no model or map file in it; a bad seed range.
    """
    out: list[str] = []
    for item in items:
        seeds = pseudo_range(item) if isinstance(item, str) else None
        if seeds is not None:
            out.extend(seeds)
            continue
        path = Path(os.fspath(item)).expanduser()
        if path.is_dir():
            files = sorted(
                (f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and source_kind(f)),
                key=lambda f: f.name,
            )
            if not files:
                raise CryoOrientError(
                    f"folder {path} has no model or map files (.pdb/.ent/.cif/.mmcif, .mrc/.map/.ccp4/.mrcs, "
                    "optionally .gz)"
                )
            out.extend(str(f) for f in files)
        else:
            out.append(item if isinstance(item, str) else os.fspath(item))
    return out
