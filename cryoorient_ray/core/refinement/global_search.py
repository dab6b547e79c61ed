"""Global, coarse-to-fine projection matching against the data's own half maps (gold standard).

The local refiner (:mod:`cryoorient_ray.core.refinement.local`) searches a ±12° ball around the
start and cannot repair images that start far off. This module searches all of SO(3) every
iteration, coarse to fine, as cryoSPARC, RELION's auto-refine and cryoDRGN's pose search do:

1. **Two independent halves.** The images are split once into two fixed random halves
   (:func:`~cryoorient_ray.core.reconstruction.inversion.split_halves`, seeded). Each half is matched
   only against its own half map and reconstructed only from its own orientations; the halves
   share only the band (from the FSC between them, as in RELION), so that FSC is an honest
   (gold-standard) resolution. From given start orientations each half starts from its own half
   map; from random ones both start from one common map (RELION's common initial model: two
   independent blobs would settle in two gauges): with ``ab_initio`` ``auto``/``on`` the stochastic
   ab initio map of :mod:`~cryoorient_ray.core.refinement.ab_initio` low-passed to its last band
   (also for a given start whose half maps are no better than random orientations', ``auto``),
   with ``off`` the blob of all images at the random orientations, scored on the lowest band.
2. **The band.** The reference's Fourier coefficients are weighted by
   ``w(s) = sqrt(2 FSC(s) / (1 + FSC(s)))`` of the half maps (Rosenthal & Henderson's ``C_ref``) up
   to the band's edge and by 0 beyond. The first band is ``start_resolution_A`` (default: a quarter
   of Nyquist, or the start map's FSC 0.143 when the start is not random); each iteration the edge
   moves to the half maps' new FSC 0.143 frequency plus two shells, never below the last one and
   at most 1.5× the last one plus a shell, so it widens while the FSC improves.
3. **The search.** Level 0 is the whole near-uniform SO(3) grid of
   :mod:`cryoorient_ray.core.geometry.grids` at ``start_deg`` (≈ 5,000 orientations at 15°) turned by a
   random rotation each iteration, times a grid of shifts when ``max_shift_px > 0``. Its reference
   slices (projection-slice theorem) are sampled once per level and half, so scoring every image
   against every grid point is two matrix products per batch. The ``keep`` best (orientation,
   shift) pairs per image are subdivided (8 children each, the shift step halved with ±1 step
   around the parent's shift) level by level until the step is ``≤ final_deg``; the finer levels
   sample the children's slices per image. The CTF multiplies every slice.
4. **The score** is the normalised cross-correlation over the band (the local refiner's, by
   Parseval the correlation of the low-passed image with the low-passed, CTF-modulated
   projection). ``mode="hard"`` takes the best candidate of the last level; ``mode="soft"``
   reconstructs with every candidate of the last level weighted by its posterior
   ``∝ exp(dof · NCC² / (1 − NCC_best²))`` (white Gaussian noise, amplitude fitted), RELION-style.
5. **Convergence.** An iteration that improves neither the half maps' FSC 0.143 resolution
   (``best_fsc_A``) nor the sum of their FSC over all shells (``best_fsc_area``: it still moves
   once the 0.143 crossing sits at Nyquist) by at least 1 % counts against ``patience``; the run stops when that count
   reaches ``patience`` or after ``iterations``. Then ``local_polish_rounds`` rounds of the local
   refiner run on each half separately (against that half's map).

Scoring is delegated to a :class:`Scorer`: :class:`InProcessScorer` here, or
:class:`~cryoorient_ray.distributed.refine_actors.RayScorer` (image batches on Ray actors). Both
call :func:`search_batch` on the same fixed batches (:func:`make_batches`), so they give the same
numbers. State after each iteration (:class:`GlobalRefineState`) is enough to resume.

This module never imports ray or zarr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cryoorient_ray.core.geometry.grids import (
    grid_asymmetric_unit,
    grid_children,
    grid_level_for_step,
    grid_rotmats,
    grid_size,
)
from cryoorient_ray.core.geometry.quaternion import (
    quat_canonicalize,
    quat_distance,
    rotmat_to_unitquat,
    unitquat_to_rotmat,
)
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.geometry.symmetry import normalize_symmetry_name
from cryoorient_ray.core.imaging.fourier import centred_volume_ft, phase_ramp
from cryoorient_ray.core.imaging.particles import ParticleStack, as_particle_stack
from cryoorient_ray.core.reconstruction.fsc import FSCResult, fsc, fsc_area, soft_mask
from cryoorient_ray.core.reconstruction.inversion import reconstruct_fourier, split_halves
from cryoorient_ray.core.reconstruction.symmetrise import symmetry_frame
from cryoorient_ray.core.recovery.align import align_rotation
from cryoorient_ray.core.refinement.local import RefineSettings, _quats, _volume, _working_stack, refine_orientations
from cryoorient_ray.core.refinement.matching import BAND_THRESHOLD, SliceMatcher
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "BatchCandidates",
    "GlobalRefineResult",
    "GlobalRefineSettings",
    "GlobalRefineState",
    "ImageBatch",
    "InProcessScorer",
    "Scorer",
    "SearchPlan",
    "global_refine",
    "level_radius",
    "make_batches",
    "prepare_references",
    "resolve_device",
    "score_batches",
    "search_batch",
]

MODES = ("hard", "soft")
SYMMETRY_MODES = ("impose", "c1_then_symmetrise")
DEVICES = ("auto", "cpu", "cuda")
# An iteration "improves" when the half maps' FSC 0.143 resolution drops by at least this fraction.
_IMPROVEMENT = 0.01
# The band edge moves to the half maps' FSC 0.143 shell plus this many shells (never back).
_WIDEN_SHELLS = 2
# ... but by at most this factor (plus one shell) per iteration: from a blob (ab initio) the half
# maps agree early on features both halves took from the common start, and a band that jumps to
# Nyquist locks the search onto them.
_GROWTH = 1.5
# Level l is scored up to |k| = _LEVEL_BAND / step_l (cycles per box, step in rad): a rotation by
# half a step moves the point at that radius by ~1/2 cycle, where the correlation of a finer
# frequency with the grid point's slice is lost anyway (cryoDRGN's pose search raises its band
# per level the same way). At least _MIN_LEVEL_RADIUS.
_LEVEL_BAND = 2.0
_MIN_LEVEL_RADIUS = 4.0
# Finer levels whose whole grid has at most this many (orientation × band point) slice samples
# are sampled once per iteration for every grid point (a table), not per image: level 1 of the
# 15° grid (41,472 orientations) at a 32² box (≤ 350 band points) is 8× cheaper that way for
# 5,000 images.
_TABLE_SAMPLES = 1 << 24
# Scores held at once at level 0 (images × shifts × grid points): ~64 MB of float32.
_LEVEL0_SCORES = 1 << 24
# Soft assignment: candidates whose posterior is below this are left out of the reconstruction.
_MIN_POSTERIOR = 1e-3
# Search radius of the local polish, in finest grid steps.
_POLISH_STEPS = 2.0


@dataclass(frozen=True)
class GlobalRefineSettings:
    """The search of :func:`global_refine`.

    Attributes:
        iterations: maximum number of iterations (each: match every image, reconstruct the half maps).
        start_deg: angular step of the coarsest SO(3) grid (degrees; the finest grid of
            :mod:`~cryoorient_ray.core.geometry.grids` with a step ``≤ start_deg``: 15° → 5,184 points).
        final_deg: the subdivision stops at the first level whose step is ``≤ final_deg``.
        keep: candidates kept per image at every level (each gets 8 children at the next).
        max_shift_px: radius (pixels at the working box) of the shift search; 0: the stack's own
            shifts (or none) are used as they are.
        shift_step_px: the finest shift step; level 0 uses ``L / (3 r₀)`` pixels (``r₀`` its band edge
            in cycles per box; at least ``shift_step_px``, at most ``max_shift_px``), each finer
            level ±1 step of half the previous one (at least ``shift_step_px``) around the parent.
        mode: ``"hard"`` (best candidate) or ``"soft"`` (posterior-weighted reconstruction).
        wiener: Wiener constant of the reconstructions.
        mask_radius: soft spherical mask radius (pixels) on every map; None: ``L / 2 − 4``.
        start_resolution_A: first band limit (Å); None: a quarter of Nyquist for a random start,
            else the start orientations' half-map FSC 0.143 (at least a quarter of Nyquist's band).
        patience: iterations in a row without a half-map FSC improvement (1 %) before stopping.
        local_polish_rounds: rounds of the local refiner on each half at the end (0: none).
        batch_size: images per scoring batch.
        seed: of the halves, the random start and the grid's turns.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        symmetry: the particle's point group (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``); errors
            against the truth are symmetry-aware whatever ``symmetry_mode``.
        symmetry_mode: with a point group, ``"impose"``: level 0 searches the asymmetric unit only
            (:func:`~cryoorient_ray.core.geometry.grids.grid_asymmetric_unit`, ≈ 1/|G| of the grid)
            and every map is reconstructed with the group imposed; ``"c1_then_symmetrise"``
            (RELION's advice): the search and the maps in C1, the final maps symmetrised
            (:func:`~cryoorient_ray.core.reconstruction.symmetrise.symmetrise_volume`).
        ab_initio: ``"auto"``, ``"on"`` or ``"off"``: start from the stochastic ab initio map of
            :mod:`~cryoorient_ray.core.refinement.ab_initio` (``auto``: from random orientations, and
            from a given start whose half maps' FSC area is below
            :data:`~cryoorient_ray.core.refinement.ab_initio.GOOD_START_FRACTION` of the way from
            random orientations' area to the shell count, when the ab initio poses' area is larger).
        ab_initio_steps, ab_initio_batch_size: the ab initio phase's minibatch steps and images per step.
    """

    iterations: int = 8
    start_deg: float = 15.0
    final_deg: float = 1.5
    keep: int = 8
    max_shift_px: float = 0.0
    shift_step_px: float = 1.0
    mode: str = "hard"
    wiener: float = 1e-2
    mask_radius: float | None = None
    start_resolution_A: float | None = None
    patience: int = 1
    local_polish_rounds: int = 1
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    symmetry: str = "C1"
    symmetry_mode: str = "impose"
    ab_initio: str = "auto"
    ab_initio_steps: int = 60
    ab_initio_batch_size: int = 300

    def checked(self) -> GlobalRefineSettings:
        """The settings, checked (CryoOrientError naming the first bad field)."""
        _int_field(self.iterations, "iterations", 0)
        _int_field(self.keep, "keep", 1)
        _int_field(self.patience, "patience", 1)
        _int_field(self.local_polish_rounds, "local_polish_rounds", 0)
        _int_field(self.batch_size, "batch_size", 1)
        _int_field(self.seed, "seed", 0)
        _int_field(self.ab_initio_steps, "ab_initio_steps", 1)
        _int_field(self.ab_initio_batch_size, "ab_initio_batch_size", 2)
        if self.ab_initio not in ("auto", "on", "off"):
            raise CryoOrientError(f"ab_initio must be one of auto, on, off; got {self.ab_initio!r}")
        for name in ("start_deg", "final_deg"):
            v = getattr(self, name)
            if not _number(v) or not 0 < v <= 90:
                raise CryoOrientError(f"{name} must be a number of degrees in (0, 90]; got {v!r}")
        if self.final_deg > self.start_deg:
            raise CryoOrientError(f"final_deg ({self.final_deg}) must not exceed start_deg ({self.start_deg})")
        if not _number(self.max_shift_px) or self.max_shift_px < 0:
            raise CryoOrientError(f"max_shift_px must be a non-negative number of pixels; got {self.max_shift_px!r}")
        if not _number(self.shift_step_px) or self.shift_step_px <= 0:
            raise CryoOrientError(f"shift_step_px must be a positive number of pixels; got {self.shift_step_px!r}")
        if self.mode not in MODES:
            raise CryoOrientError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not _number(self.wiener) or self.wiener < 0:
            raise CryoOrientError(f"wiener must be a non-negative number; got {self.wiener!r}")
        if self.start_resolution_A is not None and (
            not _number(self.start_resolution_A) or self.start_resolution_A <= 0
        ):
            raise CryoOrientError(f"start_resolution_A must be a positive number of Å; got {self.start_resolution_A!r}")
        if self.device not in DEVICES:
            raise CryoOrientError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        normalize_symmetry_name(self.symmetry)
        if self.symmetry_mode not in SYMMETRY_MODES:
            raise CryoOrientError(
                f"symmetry_mode must be one of {', '.join(SYMMETRY_MODES)}; got {self.symmetry_mode!r}"
            )
        return self


def _number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def _int_field(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise CryoOrientError(f"{name} must be an integer >= {minimum}; got {v!r}")
    return int(v)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CryoOrientError("device 'cuda' asked for, but torch sees no CUDA device (use 'auto' or 'cpu')")
    if name not in ("cpu", "cuda"):
        raise CryoOrientError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# state and result


@dataclass
class GlobalRefineState:
    """Everything needed to resume :func:`global_refine` after a finished iteration.

    Attributes:
        iteration: iterations finished (0: only the start).
        quaternions: ``(P, 4)`` current orientations (wxyz; the best candidate of each image).
        shifts: ``(P, 2)`` current shifts ``(tx, ty)`` pixels, or None (no shift search).
        halves: ``(P,)`` int8, 0 or 1: the fixed gold-standard split.
        band_A: the band edge (Å) the next iteration scores up to.
        best_fsc_A: best half-map FSC 0.143 resolution so far (Å; inf before the first iteration
            of a random start).
        history: the per-iteration entries so far (see :class:`GlobalRefineResult`).
        stale: iterations in a row without improvement (for ``patience``).
        done: the iterations stopped (converged or ``iterations`` reached); the polish is next.
        soft_quaternions, soft_shifts, soft_weights: in soft mode, every image's candidates
            ``(P, keep, 4)``, ``(P, keep, 2)`` and their posterior ``(P, keep)``; else None.
        best_fsc_area: best sum of the half maps' FSC over the shells ``1 … L/2`` so far (the
            improvement criterion once the FSC 0.143 resolution sits at Nyquist).
    """

    iteration: int
    quaternions: np.ndarray
    shifts: np.ndarray | None
    halves: np.ndarray
    band_A: float
    best_fsc_A: float
    history: list[dict] = field(default_factory=list)
    stale: int = 0
    done: bool = False
    soft_quaternions: np.ndarray | None = None
    soft_shifts: np.ndarray | None = None
    soft_weights: np.ndarray | None = None
    best_fsc_area: float = 0.0

    _ARRAYS = ("quaternions", "shifts", "halves", "soft_quaternions", "soft_shifts", "soft_weights")

    def to_npz(self, path: str | Path) -> None:
        """Write the state to ``path`` (a ``.npz``; written to a temporary name and renamed, so an
        interrupted write leaves the previous state)."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in self._ARRAYS if getattr(self, k) is not None}
        meta = {
            "iteration": self.iteration,
            "band_A": self.band_A,
            "best_fsc_A": self.best_fsc_A,
            "history": self.history,
            "stale": self.stale,
            "done": self.done,
            "best_fsc_area": self.best_fsc_area,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta, default=_json_value)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def from_npz(cls, path: str | Path) -> GlobalRefineState:
        """Read a state written by :meth:`to_npz` (CryoOrientError when unreadable)."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: (np.array(z[k]) if k in z.files else None) for k in cls._ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise CryoOrientError(f"cannot read the refinement state {path}: {exc}") from None
        if arrays["quaternions"] is None or arrays["halves"] is None:
            raise CryoOrientError(f"the refinement state {path} lacks quaternions or halves")
        return cls(**meta, **arrays)


def _json_value(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class GlobalRefineResult:
    """The outcome of :func:`global_refine`.

    Attributes:
        quaternions: ``(P, 4)`` refined orientations (wxyz, canonical ``w ≥ 0``).
        shifts: ``(P, 2)`` refined shifts (pixels at the stack's box), or None without shift
            search (the stack's own shifts, if any, were used as given).
        volume: ``(L, L, L)`` map from all images at the refined poses (masked), numpy.
        half_maps: the two half maps (each from its own half only), numpy.
        fsc: :class:`~cryoorient_ray.core.reconstruction.fsc.FSCResult` between the half maps.
        history: one dict per iteration: ``iteration``, ``band_A``, ``resolution_0143_A`` (half maps),
            ``resolution_05_A`` (half maps), ``change_rad`` (mean angle moved), ``seconds``,
            ``n_candidates`` (scored per image), ``levels``; with ``q_true`` also ``error_rad``
            (rotation + hand registration, :func:`~cryoorient_ray.core.recovery.align.align_rotation`),
            with ``reference`` also ``resolution_05_true_A`` (FSC 0.5 of the map against
            ``reference``). Entry ``iteration = 0`` is the start; the local polish, when run, adds
            a last entry with ``iteration = "polish"``.
        state: the final :class:`GlobalRefineState`.
        seconds: wall time of the call.
    """

    quaternions: np.ndarray
    shifts: np.ndarray | None
    volume: np.ndarray
    half_maps: tuple[np.ndarray, np.ndarray]
    fsc: FSCResult
    history: list[dict]
    state: GlobalRefineState
    seconds: float


# ----------------------------------------------------------------------------------------------
# the search of one batch


@dataclass(frozen=True)
class ImageBatch:
    """One scoring batch: the images ``index`` (sorted, global rows) of half ``half`` (0 or 1)."""

    half: int
    index: np.ndarray


@dataclass(frozen=True)
class SearchPlan:
    """What one iteration's search needs besides the images and the references (small; pickled to actors).

    Attributes:
        band_radius: band edge in cycles per box (points ``0 < |k| ≤ band_radius`` are scored).
        band_weights: ``w`` per integer shell ``0 … L // 2`` (interpolated linearly in ``|k|``).
        base: resolution ``n`` of the level-0 grid (:mod:`~cryoorient_ray.core.geometry.grids`);
            level ``l`` is the grid ``base · 2^l``.
        levels: number of levels (≥ 1).
        level_radii: the band edge (cycles per box) each level scores up to (``≤ band_radius``).
        turn: ``(3, 3)`` rotation turning the whole grid this iteration (``R → R · turn``).
        keep: candidates kept per image per level.
        shift_radius: shift search radius (pixels); 0: no search.
        shift_step: the level-0 shift step (pixels); level ``l`` searches ±1 step of
            ``max(shift_min_step, shift_step / 2^l)`` around each parent's shift.
        tables: the finer levels whose whole grid is sampled once per half map (a table the
            children are read from) instead of per image: where that is fewer samples
            (:func:`_table_levels`). Part of the plan, so every scorer takes the same path.
        level0: the level-0 grid indices searched (sorted): the asymmetric unit of the point group
            under ``turn`` when it is imposed; None: the whole grid.
    """

    band_radius: float
    band_weights: np.ndarray
    base: int
    levels: int
    level_radii: tuple[float, ...]
    turn: np.ndarray
    keep: int
    shift_radius: float
    shift_step: float
    shift_min_step: float = 0.0
    tables: tuple[int, ...] = ()
    level0: np.ndarray | None = None

    def level0_index(self) -> torch.Tensor:
        """The level-0 grid indices searched (int64): ``level0``, or the whole grid."""
        if self.level0 is None:
            return torch.arange(grid_size(self.base))
        return torch.as_tensor(np.asarray(self.level0, dtype=np.int64))

    def weight_of_radius(self, r: np.ndarray) -> np.ndarray:
        return np.interp(r, np.arange(len(self.band_weights)), self.band_weights)

    def level0_shifts(self) -> torch.Tensor:
        """``(T, 2)`` float64 shifts of level 0: the square grid of step ``shift_step`` inside the radius."""
        if self.shift_radius <= 0:
            return torch.zeros(1, 2, dtype=torch.float64)
        k = int(math.floor(self.shift_radius / self.shift_step + 1e-9))
        ax = torch.arange(-k, k + 1, dtype=torch.float64) * self.shift_step
        g = torch.stack(torch.meshgrid(ax, ax, indexing="xy"), -1).reshape(-1, 2)
        return g[(g * g).sum(1) <= self.shift_radius**2 + 1e-9]

    def shift_offsets(self, level: int) -> torch.Tensor:
        """``(J, 2)`` offsets around each parent's shift at ``level ≥ 1`` (9, or the single 0 without search)."""
        if self.shift_radius <= 0:
            return torch.zeros(1, 2, dtype=torch.float64)
        ax = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * max(self.shift_min_step, self.shift_step / 2**level)
        return torch.stack(torch.meshgrid(ax, ax, indexing="xy"), -1).reshape(-1, 2)

    @property
    def n_candidates(self) -> int:
        """Orientation × shift candidates scored per image over all levels."""
        t0 = len(self.level0_shifts())
        j = len(self.shift_offsets(1))
        return len(self.level0_index()) * t0 + (self.levels - 1) * self.keep * 8 * j


@dataclass
class BatchCandidates:
    """The last level's candidates of one batch: ``index (b,)``, ``quaternions (b, keep, 4)``,
    ``shifts (b, keep, 2)``, ``scores (b, keep)`` (NCC, best first), and ``dof``: half the weighted
    number of band coefficients of the last level (for the posterior)."""

    index: np.ndarray
    quaternions: np.ndarray
    shifts: np.ndarray
    scores: np.ndarray
    dof: float


@dataclass(frozen=True)
class PreparedReference:
    """One half map ready for scoring: its padded centred FT, the level-0 slices ``(K0, 2 m0)`` and
    their power ``(K0, m0)``, and ``tables``: level → the slices ``(K_l, 2, m_l)`` of every point of
    that level's grid (the levels small enough, ``_TABLE_SAMPLES``)."""

    ft: torch.Tensor
    slices0: torch.Tensor
    power0: torch.Tensor
    tables: dict = field(default_factory=dict)


def level_radius(step_deg: float, band_radius: float) -> float:
    """The band edge (cycles per box) a level of step ``step_deg`` scores up to (see ``_LEVEL_BAND``)."""
    return float(min(band_radius, max(_MIN_LEVEL_RADIUS, _LEVEL_BAND / math.radians(step_deg))))


def prepare_references(matcher: SliceMatcher, references: np.ndarray, plan: SearchPlan) -> list[PreparedReference]:
    """The two half maps ``(2, L, L, L)`` as :class:`PreparedReference` on the matcher's device
    (after ``matcher.set_band``): the padded FT and the whole level-0 grid's slices, once per iteration."""
    out = []
    base = plan.level0_index()
    rows = (grid_rotmats(plan.base, base) @ torch.from_numpy(plan.turn))[:, :2, :].float().to(matcher.device)
    m0 = matcher.points_within(plan.level_radii[0])
    table_rows = {}
    for level in plan.tables:
        n_l = plan.base * 2**level
        m_l = matcher.points_within(plan.level_radii[level])
        r = grid_rotmats(n_l, torch.arange(grid_size(n_l))) @ torch.from_numpy(plan.turn)
        table_rows[level] = (r[:, :2, :].float().to(matcher.device), m_l)
    for ref in references:
        vol = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).to(matcher.device)
        ft = centred_volume_ft(vol, 2 * matcher.lsize)
        s = matcher.sample(ft, rows, m0)  # (2, K0, m0)
        tables = {lv: matcher.sample(ft, r, m).permute(1, 0, 2).contiguous() for lv, (r, m) in table_rows.items()}
        out.append(
            PreparedReference(
                ft=ft, slices0=s.permute(1, 0, 2).reshape(s.shape[1], -1), power0=(s * s).sum(0), tables=tables
            )
        )
    return out


def _ncc(num: torch.Tensor, norm_p: torch.Tensor, norm_i: torch.Tensor) -> torch.Tensor:
    return num / torch.sqrt((norm_p * norm_i).clamp_min(1e-30))


def _level0(matcher, ref: PreparedReference, plan: SearchPlan, img, ctf, norm_i) -> tuple:
    """The ``keep`` best grid points (and their best level-0 shift) of each image."""
    m0 = ref.power0.shape[1]
    dev = matcher.device
    shifts = plan.level0_shifts()
    kxy = matcher.kxy[:m0].double()
    ramp = phase_ramp(shifts, kxy[:, 0].cpu(), kxy[:, 1].cpu(), sign=1.0, period=matcher.lsize).to(dev)  # (T, m0)
    w2 = matcher.w2[:m0]
    b, t, k0 = img.shape[0], shifts.shape[0], ref.slices0.shape[0]
    level0 = plan.level0_index().to(dev)  # row k of the slices is grid point level0[k]
    norm_p = (ctf[:, :m0] ** 2 * w2) @ ref.power0.T  # (b | 1, K0)
    norm_p = norm_p.expand(b, -1)
    chunk = max(1, _LEVEL0_SCORES // (t * k0))
    best_val, best_rot, best_shift = [], [], []
    for s0 in range(0, b, chunk):
        sl = slice(s0, min(b, s0 + chunk))
        it = img[sl, None, :m0] * ramp[None].to(img.dtype)  # (c, T, m0)
        a = torch.stack([it.real, it.imag], 2) * (w2 * ctf[sl if ctf.shape[0] > 1 else slice(0, 1), :m0])[:, None, None]
        num = (a.reshape(-1, 2 * m0) @ ref.slices0.T).reshape(-1, t, k0)
        sc = _ncc(num, norm_p[sl, None, :], norm_i[sl, None, None])  # (c, T, K0)
        val, ti = sc.max(1)  # best shift per grid point
        v, r = torch.topk(val, plan.keep, dim=1)
        best_val.append(v)
        best_rot.append(level0[r])
        best_shift.append(shifts.to(dev)[torch.gather(ti, 1, r)])
    return torch.cat(best_rot), torch.cat(best_shift), torch.cat(best_val)


def _subdivide(matcher, ref: PreparedReference, plan: SearchPlan, level: int, parents, shifts, img, ctf, turn):
    """Level ``level ≥ 1``: the 8 children of each parent × shift offsets; the ``keep`` best children."""
    n_parent = plan.base * 2 ** (level - 1)
    m = matcher.points_within(plan.level_radii[level])
    b, keep = parents.shape
    children = grid_children(n_parent, parents.cpu()).to(matcher.device)  # (b, keep, 8)
    if level in ref.tables:
        s = ref.tables[level][children].permute(3, 0, 1, 2, 4)  # (2, b, keep, 8, m)
    else:
        rows = (grid_rotmats(2 * n_parent, children.cpu()) @ turn)[..., :2, :].float().to(matcher.device)
        s = matcher.sample(ref.ft, rows.reshape(b, keep * 8, 2, 3), m).reshape(2, b, keep, 8, m)
    offsets = plan.shift_offsets(level).to(matcher.device)
    cand_shifts = shifts[:, :, None, :] + offsets  # (b, keep, J, 2)
    j = offsets.shape[0]
    kxy = matcher.kxy[:m].double()
    ramp = phase_ramp(cand_shifts.reshape(-1, 2), kxy[:, 0], kxy[:, 1], sign=1.0, period=matcher.lsize)
    w2c = matcher.w2[:m] * ctf[:, :m]  # (b | 1, m)
    it = img[:, None, None, :m] * ramp.reshape(b, keep, j, m).to(img.dtype)  # (b, keep, J, m)
    w2c4 = w2c[:, None, None, :]
    num = torch.einsum("bkjm,bkrm->bkjr", it.real * w2c4, s[0]) + torch.einsum("bkjm,bkrm->bkjr", it.imag * w2c4, s[1])
    norm_p = torch.einsum("bm,bkrm->bkr", (ctf[:, :m] ** 2 * matcher.w2[:m]).expand(b, -1), s[0] ** 2 + s[1] ** 2)
    norm_i = (matcher.w2[:m] * (img[:, :m].real ** 2 + img[:, :m].imag ** 2)).sum(-1)
    sc = _ncc(num, norm_p[:, :, None, :], norm_i[:, None, None, None])  # (b, keep, J, 8)
    val, ji = sc.max(2)  # (b, keep, 8): best shift per child
    v, flat = torch.topk(val.reshape(b, -1), keep, dim=1)
    new_idx = torch.gather(children.reshape(b, -1), 1, flat)
    ji_best = torch.gather(ji.reshape(b, -1), 1, flat)  # (b, keep)
    parent_of = flat // 8
    new_shifts = cand_shifts[torch.arange(b, device=matcher.device)[:, None], parent_of, ji_best]
    return new_idx, new_shifts, v, float(0.5 * matcher.w2[:m].sum())


def search_batch(
    matcher: SliceMatcher, references: Sequence[PreparedReference], plan: SearchPlan, batch: ImageBatch
) -> BatchCandidates:
    """The coarse-to-fine search of one batch (the one function both scorers run).

    ``matcher`` holds the images (``set_band`` done for ``plan``), ``references`` the two half maps
    (:func:`prepare_references`); the batch is scored against ``references[batch.half]`` only.
    """
    ref = references[batch.half]
    idx = torch.from_numpy(np.asarray(batch.index, dtype=np.int64))
    with torch.no_grad():
        img = matcher.band_images(idx)  # (b, M) complex
        ctf = matcher.ctf(idx)  # (b | 1, M)
        m0 = ref.power0.shape[1]
        norm_i0 = (matcher.w2[:m0] * (img[:, :m0].real ** 2 + img[:, :m0].imag ** 2)).sum(-1)
        rot, shifts, val = _level0(matcher, ref, plan, img, ctf, norm_i0)
        dof = float(0.5 * matcher.w2[:m0].sum())
        turn = torch.from_numpy(plan.turn)
        for level in range(1, plan.levels):
            rot, shifts, val, dof = _subdivide(matcher, ref, plan, level, rot, shifts, img, ctf, turn)
        n_final = plan.base * 2 ** (plan.levels - 1)
        mats = grid_rotmats(n_final, rot.cpu()) @ turn  # (b, keep, 3, 3) float64
        quats = np.asarray(rotmat_to_unitquat(mats.reshape(-1, 3, 3)), dtype=np.float64).reshape(*rot.shape, 4)
    return BatchCandidates(
        index=np.asarray(batch.index),
        quaternions=quats,
        shifts=shifts.cpu().numpy().astype(np.float64),
        scores=val.cpu().double().numpy(),
        dof=dof,
    )


def make_batches(halves: np.ndarray, batch_size: int) -> list[ImageBatch]:
    """The fixed batches: each half's sorted rows cut into runs of ``batch_size``."""
    halves = np.asarray(halves)
    out = []
    for h in (0, 1):
        rows = np.flatnonzero(halves == h)
        out.extend(ImageBatch(h, rows[s : s + batch_size]) for s in range(0, len(rows), batch_size))
    return out


def score_batches(
    matcher: SliceMatcher,
    references: np.ndarray,
    plan: SearchPlan,
    batches: Sequence[ImageBatch],
    progress: Callable[[int, int], None] | None = None,
) -> list[BatchCandidates]:
    """Every batch searched in order (what :class:`InProcessScorer` and each Ray actor run)."""
    matcher.set_band(plan.weight_of_radius, plan.band_radius)
    refs = prepare_references(matcher, references, plan)
    out = []
    for k, batch in enumerate(batches):
        out.append(search_batch(matcher, refs, plan, batch))
        if progress is not None:
            progress(k + 1, len(batches))
    return out


class Scorer(Protocol):
    """Scores the fixed image batches against one iteration's two half maps.

    ``prepare`` is called once per :func:`global_refine` with the working stack (float32 CPU; its
    shifts are undone before scoring), the batches (:func:`make_batches`) and the device;
    ``score`` once per iteration with the masked half maps ``(2, L, L, L)`` float32 and the plan,
    and returns one :class:`BatchCandidates` per batch, in the batches' order (batch ``k`` scored
    against ``references[batches[k].half]`` only), calling ``progress(done, total)`` (batches) as
    they finish. ``close`` releases what ``prepare`` took.
    """

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None: ...

    def score(
        self, references: np.ndarray, plan: SearchPlan, progress: Callable[[int, int], None] | None = None
    ) -> list[BatchCandidates]: ...

    def close(self) -> None: ...


class InProcessScorer:
    """:class:`Scorer` in this process (on the settings' device)."""

    def __init__(self) -> None:
        self.matcher: SliceMatcher | None = None
        self.batches: list[ImageBatch] = []

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None:
        self.matcher = SliceMatcher(stack, device)
        self.batches = list(batches)

    def score(
        self, references: np.ndarray, plan: SearchPlan, progress: Callable[[int, int], None] | None = None
    ) -> list[BatchCandidates]:
        if self.matcher is None:
            raise CryoOrientError("the scorer was not prepared")
        return score_batches(self.matcher, references, plan, self.batches, progress)

    def close(self) -> None:
        self.matcher = None


# ----------------------------------------------------------------------------------------------
# the iterations


@dataclass
class _Poses:
    """One iteration's poses: the best ``q (P, 4)`` and ``shifts (P, 2) | None``; in soft mode also
    every candidate ``soft_q (P, k, 4)``, ``soft_t (P, k, 2)`` and its posterior ``soft_w (P, k)``."""

    q: np.ndarray
    shifts: np.ndarray | None
    soft_q: np.ndarray | None = None
    soft_t: np.ndarray | None = None
    soft_w: np.ndarray | None = None


class _Maps:
    """Half maps (each from its own half), the full map, the FSC, and the measures against the truth."""

    def __init__(self, work: ParticleStack, halves: np.ndarray, settings: GlobalRefineSettings, device) -> None:
        self.work, self.device = work, device
        self.rows = [np.flatnonzero(halves == h) for h in (0, 1)]
        self.px = work.pixel_size_A
        self.wiener = settings.wiener
        lsize = work.image_size
        radius = lsize / 2 - 4 if settings.mask_radius is None else settings.mask_radius
        if not _number(radius) or radius <= 0:
            raise CryoOrientError(f"mask_radius must be a positive number of pixels; got {settings.mask_radius!r}")
        self.mask = torch.from_numpy(soft_mask(lsize, radius, 3.0))
        self.group = normalize_symmetry_name(settings.symmetry)
        imposed = settings.symmetry_mode == "impose" and self.group != "C1"
        self.imposed = self.group if imposed else None  # reconstructions with the group imposed
        self.symmetrise_at_end = self.group != "C1" and not imposed

    def _stack(self, rows: np.ndarray, shifts: np.ndarray | None) -> ParticleStack:
        part = self.work.subset(rows)
        if shifts is not None:
            part = dataclasses.replace(part, shifts=torch.from_numpy(np.asarray(shifts, dtype=np.float32)))
        return part

    def reconstruct(self, poses: _Poses, rows: np.ndarray) -> torch.Tensor:
        """The masked map from images ``rows`` at ``poses`` (soft: every candidate, weighted)."""
        if poses.soft_q is None:
            part = self._stack(rows, None if poses.shifts is None else poses.shifts[rows])
            rot, weights = unitquat_to_rotmat(torch.from_numpy(poses.q[rows])), None
        else:
            w = poses.soft_w[rows]
            r_img, r_cand = np.nonzero(w >= _MIN_POSTERIOR)
            part = self._stack(rows[r_img], poses.soft_t[rows][r_img, r_cand] if poses.shifts is not None else None)
            rot = unitquat_to_rotmat(torch.from_numpy(poses.soft_q[rows][r_img, r_cand]))
            weights = torch.from_numpy(w[r_img, r_cand])
        vol = reconstruct_fourier(
            part, rot.float(), wiener=self.wiener, device=self.device, weights=weights, symmetry=self.imposed
        )
        return vol.cpu().float() * self.mask

    def halves_and_fsc(self, poses: _Poses) -> tuple[list[torch.Tensor], FSCResult]:
        half = [self.reconstruct(poses, rows) for rows in self.rows]
        return half, fsc(half[0], half[1], self.px)

    def full(self, poses: _Poses) -> torch.Tensor:
        return self.reconstruct(poses, np.arange(len(self.work)))

    def final(self, poses: _Poses, half_maps: list[torch.Tensor], curve: FSCResult):
        """``(full map, half maps, their FSC)`` of the result: in ``c1_then_symmetrise`` mode symmetrised."""
        full = self.full(poses)
        if not self.symmetrise_at_end:
            return full, half_maps, curve
        from cryoorient_ray.core.reconstruction.symmetrise import symmetrise_volume

        half_maps = [symmetrise_volume(h, self.group) for h in half_maps]
        return symmetrise_volume(full, self.group), half_maps, fsc(half_maps[0], half_maps[1], self.px)

    def truth(self, poses: _Poses, q_true: np.ndarray | None, reference: torch.Tensor | None) -> dict:
        """``error_rad`` (with ``q_true``) and ``resolution_05_true_A`` (with both, or the hand-matched map)."""
        out: dict = {}
        if q_true is None:
            return out
        reg = align_rotation(q_true, poses.q, symmetry=self.group)
        out["error_rad"] = float(reg.mean)
        out["error_median_rad"] = float(reg.median)
        if reference is not None:
            registered = dataclasses.replace(poses, q=np.asarray(reg.apply(poses.q), dtype=np.float64), soft_q=None)
            vol = self.full(registered)
            out["resolution_05_true_A"] = fsc(vol, reference, self.px).resolution_05
        return out


def _shell_edge(curve: np.ndarray) -> int:
    """The last shell (cycles per box) before the FSC first falls below 0.143."""
    below = np.flatnonzero(np.asarray(curve)[1:] < BAND_THRESHOLD)
    return int(below[0]) if below.size else len(curve) - 1


def _band_weights(curve: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 1.0)
    return np.maximum(np.sqrt(2 * c / (1 + c)), 0.05)


def _table_levels(base: int, radii: Sequence[float], keep: int, n_images: int) -> tuple[int, ...]:
    """Levels ``≥ 1`` where sampling the whole grid for both half maps takes fewer samples than
    sampling every image's ``8 · keep`` children, within the memory bound ``_TABLE_SAMPLES``."""
    out = []
    for level in range(1, len(radii)):
        k = grid_size(base * 2**level)
        m = math.pi * radii[level] ** 2 / 2  # band points of the rfft half-plane, about
        if 2 * k < n_images * keep * 8 and k * m <= _TABLE_SAMPLES:
            out.append(level)
    return tuple(out)


def _plan(
    settings: GlobalRefineSettings, lsize: int, edge: float, curve: np.ndarray, iteration: int, n_images: int = 0
) -> SearchPlan:
    base = grid_level_for_step(settings.start_deg)
    levels = 1
    while 90.0 / (base * 2 ** (levels - 1)) > settings.final_deg + 1e-9:
        levels += 1
    steps = [90.0 / (base * 2**lv) for lv in range(levels)]
    q = np.random.default_rng([settings.seed, 3, iteration]).standard_normal(4)
    turn = np.asarray(unitquat_to_rotmat(q / np.linalg.norm(q)), dtype=np.float64)
    shift_radius = float(settings.max_shift_px)
    radii = tuple(level_radius(s, edge) for s in steps)
    # Level 0's shift step: a shift off by half a step turns the phase at its band edge by ≤ ~π/3.
    shift_step = min(shift_radius, max(settings.shift_step_px, lsize / (3 * radii[0]))) if shift_radius > 0 else 0.0
    return SearchPlan(
        band_radius=float(edge),
        band_weights=_band_weights(curve),
        base=base,
        levels=levels,
        level_radii=radii,
        turn=turn,
        keep=int(settings.keep),
        shift_radius=shift_radius,
        shift_step=float(shift_step),
        shift_min_step=float(settings.shift_step_px),
        tables=_table_levels(base, radii, int(settings.keep), n_images),
        level0=_level0_unit(settings, base, turn),
    )


def _level0_unit(settings: GlobalRefineSettings, base: int, turn: np.ndarray) -> np.ndarray | None:
    """The asymmetric unit of the turned level-0 grid when the point group is imposed, else None."""
    if settings.symmetry_mode != "impose" or normalize_symmetry_name(settings.symmetry) == "C1":
        return None
    return grid_asymmetric_unit(base, settings.symmetry, turn).numpy()


def _assemble(cands: list[BatchCandidates], p: int, keep: int, soft: bool, shifted: bool) -> _Poses:
    q = np.zeros((p, keep, 4))
    t = np.zeros((p, keep, 2))
    sc = np.zeros((p, keep))
    dof = np.zeros(p)
    for c in cands:
        q[c.index], t[c.index], sc[c.index], dof[c.index] = c.quaternions, c.shifts, c.scores, c.dof
    poses = _Poses(q=np.asarray(quat_canonicalize(q[:, 0])), shifts=t[:, 0].copy() if shifted else None)
    if soft:
        best = sc[:, :1]
        logit = dof[:, None] * np.clip(sc, 0, None) ** 2 / np.clip(1 - best**2, 1e-12, None)
        w = np.exp(logit - logit.max(1, keepdims=True))
        poses.soft_q, poses.soft_t, poses.soft_w = q, t, w / w.sum(1, keepdims=True)
    return poses


def _check_resume(resume: GlobalRefineState, p: int, halves: np.ndarray, shifted: bool) -> None:
    if resume.quaternions.shape != (p, 4) or resume.halves.shape != (p,):
        raise CryoOrientError(f"the refinement state is for {len(resume.halves)} images; this stack has {p}")
    if not np.array_equal(resume.halves, halves):
        raise CryoOrientError("the refinement state was made with another seed (its half split differs)")
    if (resume.shifts is not None) != shifted:
        raise CryoOrientError("the refinement state and the settings disagree on the shift search")


def _start(work, start, settings, p, shifted) -> _Poses:
    if start is None:
        q0 = sample_orientations(p, seed=np.random.default_rng([settings.seed, 2]))
    else:
        q0 = _quats(start, p, "start").numpy()
    return _Poses(q=np.asarray(quat_canonicalize(q0), dtype=np.float64), shifts=np.zeros((p, 2)) if shifted else None)


def _initial_model(work, start, settings, maps: _Maps, curve: FSCResult, device, q_true, q_start):
    """:func:`~cryoorient_ray.core.refinement.ab_initio.initial_model` with this module's half maps."""
    from cryoorient_ray.core.refinement.ab_initio import initial_model  # it imports this module

    def area_of(q: np.ndarray, shifts: np.ndarray | None) -> float:
        poses = _Poses(q=np.asarray(q, dtype=np.float64), shifts=shifts if settings.max_shift_px > 0 else None)
        return fsc_area(maps.halves_and_fsc(poses)[1].fsc)

    area = None if start is None else fsc_area(curve.fsc)
    return initial_model(
        work, settings, start_area=area, area_of=area_of, device=device, q_true=q_true, q_start=q_start
    )


def _polish(maps: _Maps, poses: _Poses, half_maps, settings: GlobalRefineSettings, step_deg: float) -> _Poses:
    """``local_polish_rounds`` of the local refiner on each half against that half's map."""
    q = poses.q.copy()
    local = RefineSettings(
        rounds=settings.local_polish_rounds,
        search_deg=min(60.0, _POLISH_STEPS * step_deg),
        wiener=settings.wiener,
        mask_radius=settings.mask_radius,
        seed=settings.seed,
        batch_size=64,
    )
    for rows, vol in zip(maps.rows, half_maps, strict=True):
        part = maps._stack(rows, None if poses.shifts is None else poses.shifts[rows])
        res = refine_orientations(part, q[rows], local, volume=vol)
        q[rows] = res.quaternions
    return _Poses(q=np.asarray(quat_canonicalize(q)), shifts=poses.shifts)


def global_refine(
    stack: ParticleStack,
    start: np.ndarray | None,
    settings: GlobalRefineSettings,
    *,
    scorer: Scorer | None = None,
    resume: GlobalRefineState | None = None,
    on_iteration: Callable[[GlobalRefineState, dict], None] | None = None,
    q_true: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> GlobalRefineResult:
    """Global, coarse-to-fine, gold-standard projection matching (module docstring).

    Args:
        stack: the particles at the working box (images, CTF, pixel size — 1 Å when not given;
            shifts are used as given when ``max_shift_px == 0`` and searched from 0 otherwise).
        start: ``(P, 4)`` starting orientations (any gauge), or None for random ones (seeded by
            ``settings.seed``: the ab-initio control).
        settings: :class:`GlobalRefineSettings`.
        scorer: None (in-process, :class:`InProcessScorer`) or a :class:`Scorer` such as
            :class:`~cryoorient_ray.distributed.refine_actors.RayScorer`; prepared here, closed at the end.
        resume: a state from ``on_iteration`` / :meth:`GlobalRefineState.from_npz`: continue after
            its last finished iteration (same stack and settings; the half split is checked).
        on_iteration: ``on_iteration(state, entry)`` after every iteration (save the state here).
        q_true: optional ``(P, 4)`` true orientations (adds ``error_rad`` to the history).
        reference: optional ``(L, L, L)`` true-orientation map (adds ``resolution_05_true_A``).
        progress: ``progress(label, done, total)`` as batches finish (label ``"iteration k"``).

    Returns:
        :class:`GlobalRefineResult`.

    Raises:
        CryoOrientError: bad settings, mismatched shapes, a resume state that does not fit.
    """
    t_start = time.perf_counter()
    settings = settings.checked()
    work = _working_stack(as_particle_stack(stack))
    p, lsize = len(work), work.image_size
    shifted = settings.max_shift_px > 0
    device = resolve_device(settings.device)
    qt = None if q_true is None else _quats(q_true, p, "q_true").numpy()
    ref_vol = _volume(reference, lsize, "reference")
    first, _second = split_halves(np.random.default_rng([settings.seed, 1]), p)
    halves = np.ones(p, dtype=np.int8)
    halves[first] = 0
    maps = _Maps(work, halves, settings, device)
    nyquist_edge = lsize / 2 - 1
    resolution_of = lambda edge: lsize * work.pixel_size_A / edge  # noqa: E731  (Å of a band edge)

    if resume is not None:
        _check_resume(resume, p, halves, shifted)
        state = dataclasses.replace(resume, history=list(resume.history))
        poses = _Poses(state.quaternions, state.shifts, state.soft_quaternions, state.soft_shifts, state.soft_weights)
        half_maps, curve = maps.halves_and_fsc(poses)
        refs = half_maps
    else:
        poses = _start(work, start, settings, p, shifted)
        half_maps, curve = maps.halves_and_fsc(poses)
        init = _initial_model(work, start, settings, maps, curve, device, qt, poses.q)
        frame = None
        if init.kind == "ab initio":  # both halves start from the ab initio map, from its poses
            res0 = init.result
            q0 = res0.quaternions
            if maps.group != "C1":
                # the C1 ab initio map's axes are wherever its random start put them: turn them onto
                # the declared ones, or imposing (or finally averaging) the group blurs the map
                frame = symmetry_frame(init.reference, maps.group)
                q0 = np.asarray(quat_canonicalize(frame.orientations(q0)), dtype=np.float64)
                init.reference = np.asarray(frame.volume(init.reference), dtype=np.float32)
            poses = _Poses(q=q0, shifts=res0.shifts if shifted else None)
            half_maps, curve = maps.halves_and_fsc(poses)
        if settings.start_resolution_A is not None:
            edge = lsize * work.pixel_size_A / settings.start_resolution_A
        elif init.kind == "ab initio":
            edge = init.result.band_radius
        elif start is None:
            edge = lsize / 8
        else:
            edge = max(lsize / 8, _shell_edge(curve.fsc))
        edge = float(min(max(edge, 2.0), nyquist_edge))
        state = GlobalRefineState(
            iteration=0,
            quaternions=poses.q,
            shifts=poses.shifts,
            halves=halves,
            band_A=resolution_of(edge),
            best_fsc_A=math.inf if init.kind != "given" else curve.resolution_0143,
            best_fsc_area=0.0 if init.kind != "given" else fsc_area(curve.fsc),
        )
        entry0 = {
            "iteration": 0,
            **init.summary(),
            **({} if frame is None else {"symmetry_frame": frame.summary()}),
            "band_A": state.band_A,
            "resolution_0143_A": curve.resolution_0143,
            "resolution_05_A": curve.resolution_05,
            **maps.truth(poses, qt, ref_vol),
            "seconds": time.perf_counter() - t_start,
        }
        state.history.append(entry0)
        if init.reference is not None:
            ab_map = torch.from_numpy(init.reference) * maps.mask
            refs = [ab_map, ab_map]
        elif start is None:
            # From random orientations both halves start from the same blob (RELION's common initial
            # model), else each would settle in its own gauge and the half maps could not be compared.
            full0 = maps.full(poses)
            refs = [full0, full0]
        else:
            refs = half_maps  # each half from its own map: nothing shared but the FSC's band
        state.done = settings.iterations == 0

    scorer = scorer if scorer is not None else InProcessScorer()
    batches = make_batches(halves, settings.batch_size)
    score_work = work if not shifted else dataclasses.replace(work, shifts=None)
    plan = None
    try:
        if not state.done:
            scorer.prepare(score_work, batches, device.type)
        while not state.done:
            it = state.iteration + 1
            t0 = time.perf_counter()
            edge = lsize * work.pixel_size_A / state.band_A
            plan = _plan(settings, lsize, edge, curve.fsc, it, p)
            label = f"iteration {it}"
            report = None if progress is None else (lambda done, total, lab=label: progress(lab, done, total))
            cands = scorer.score(np.stack([r.numpy() for r in refs]).astype(np.float32), plan, report)
            new = _assemble(cands, p, plan.keep, settings.mode == "soft", shifted)
            change = float(np.mean(np.asarray(quat_distance(poses.q, new.q))))
            poses = new
            half_maps, curve = maps.halves_and_fsc(poses)
            seconds = time.perf_counter() - t0
            res = curve.resolution_0143
            area = fsc_area(curve.fsc)
            improved = res < state.best_fsc_A * (1 - _IMPROVEMENT) or area > state.best_fsc_area * (1 + _IMPROVEMENT)
            state.stale = 0 if improved else state.stale + 1
            state.best_fsc_A = min(state.best_fsc_A, res)
            state.best_fsc_area = max(state.best_fsc_area, area)
            wanted = max(edge, _shell_edge(curve.fsc) + _WIDEN_SHELLS)
            next_edge = float(min(nyquist_edge, wanted, _GROWTH * edge + 1))
            entry = {
                "iteration": it,
                "band_A": state.band_A,
                "resolution_0143_A": res,
                "resolution_05_A": curve.resolution_05,
                "change_rad": change,
                "n_candidates": plan.n_candidates,
                "levels": plan.levels,
                "seconds": seconds,
                **maps.truth(poses, qt, ref_vol),
            }
            state.history.append(entry)
            state.iteration = it
            state.quaternions, state.shifts = poses.q, poses.shifts
            state.soft_quaternions, state.soft_shifts, state.soft_weights = poses.soft_q, poses.soft_t, poses.soft_w
            state.band_A = resolution_of(next_edge)
            state.done = state.stale >= settings.patience or it >= settings.iterations
            refs = half_maps
            if on_iteration is not None:
                on_iteration(state, entry)
    finally:
        scorer.close()

    if settings.local_polish_rounds > 0 and state.iteration > 0:
        t0 = time.perf_counter()
        step = 90.0 / (plan.base * 2 ** (plan.levels - 1)) if plan is not None else settings.final_deg
        polished = _polish(maps, poses, half_maps, settings, step)
        change = float(np.mean(np.asarray(quat_distance(poses.q, polished.q))))
        poses = polished
        half_maps, curve = maps.halves_and_fsc(poses)
        state.history.append(
            {
                "iteration": "polish",
                "band_A": state.band_A,
                "resolution_0143_A": curve.resolution_0143,
                "resolution_05_A": curve.resolution_05,
                "change_rad": change,
                "seconds": time.perf_counter() - t0,
                **maps.truth(poses, qt, ref_vol),
            }
        )
    full, half_maps, curve = maps.final(poses, half_maps, curve)
    return GlobalRefineResult(
        quaternions=np.asarray(quat_canonicalize(poses.q), dtype=np.float64),
        shifts=None if poses.shifts is None else np.asarray(poses.shifts, dtype=np.float64),
        volume=full.numpy(),
        half_maps=(half_maps[0].numpy(), half_maps[1].numpy()),
        fsc=curve,
        history=state.history,
        state=state,
        seconds=time.perf_counter() - t_start,
    )
