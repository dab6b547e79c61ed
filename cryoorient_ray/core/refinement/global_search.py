"""Global, coarse-to-fine projection matching against the data's own half maps (gold standard).

The local refiner (:mod:`cryoorient_ray.core.refinement.local`) searches a ±12° ball around the
start and cannot repair images that start far off. This module searches all of SO(3) every
iteration, coarse to fine, as cryoSPARC, RELION's auto-refine and cryoDRGN's pose search do:

1. **Two independent halves.** The images are split once into two fixed random halves
   (:func:`~cryoorient_ray.core.reconstruction.inversion.split_halves`, seeded). Each half is matched
   only against its own half map and reconstructed only from its own orientations: nothing passes
   between the halves after the common, heavily low-passed start map, so the FSC between the two
   half maps is an honest (gold-standard) resolution.
2. **The band.** The reference's Fourier coefficients are weighted by
   ``w(s) = sqrt(2 FSC(s) / (1 + FSC(s)))`` of the half maps (Rosenthal & Henderson's ``C_ref``) up
   to the band's edge and by 0 beyond. The first band is ``start_resolution_A`` (default: a quarter
   of Nyquist, or the start map's FSC 0.143 when the start is not random); each iteration the edge
   moves to the half maps' new FSC 0.143 frequency plus two shells, never below the last one,
   so it widens while the FSC improves.
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
5. **Convergence.** An iteration that does not improve the half maps' FSC 0.143 resolution
   (``best_fsc_A``) by at least 1 % counts against ``patience``; the run stops when that count
   reaches ``patience`` or after ``iterations``. Then ``local_polish_rounds`` rounds of the local
   refiner run on each half separately (against that half's map).

Scoring is delegated to a :class:`Scorer`: :class:`InProcessScorer` here, or
:class:`~cryoorient_ray.distributed.refine_actors.RayScorer` (image batches on Ray actors). Both
call :func:`search_batch` on the same fixed batches (:func:`make_batches`), so they give the same
numbers. State after each iteration (:class:`GlobalRefineState`) is enough to resume.

This module never imports ray or zarr.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cryoorient_ray.core.imaging.particles import ParticleStack

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
    "make_batches",
    "search_batch",
]

MODES = ("hard", "soft")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class GlobalRefineSettings:
    """The search of :func:`global_refine`.

    Attributes:
        iterations: maximum number of iterations (each: match every image, reconstruct the half maps).
        start_deg: angular step of the coarsest SO(3) grid (degrees; the grid's nearest level).
        final_deg: the subdivision stops at the first level whose step is ``≤ final_deg``.
        keep: candidates kept per image at every level (each gets 8 children at the next).
        max_shift_px: radius (pixels at the working box) of the shift search; 0: the stack's own
            shifts (or none) are used as they are.
        shift_step_px: the shift grid's step at level 0 is ``2 · shift_step_px``, halved per level.
        mode: ``"hard"`` (best candidate) or ``"soft"`` (posterior-weighted reconstruction).
        wiener: Wiener constant of the reconstructions.
        mask_radius: soft spherical mask radius (pixels) on every map; None: ``L / 2 − 4``.
        start_resolution_A: first band limit (Å); None: a quarter of Nyquist for a random start,
            else the start map's half-map FSC 0.143 (never finer than a quarter of Nyquist... see
            the module docstring).
        patience: iterations without a half-map FSC improvement before stopping.
        local_polish_rounds: rounds of the local refiner at the end (0: none).
        batch_size: images per scoring batch.
        seed: of the halves, the random start and the grid's turns.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        symmetry: point group; only ``"C1"`` for now.
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


@dataclass
class GlobalRefineState:
    """Everything needed to resume :func:`global_refine` after a finished iteration.

    Attributes:
        iteration: iterations finished (0: only the start).
        quaternions: ``(P, 4)`` current orientations (wxyz).
        shifts: ``(P, 2)`` current shifts ``(tx, ty)`` pixels, or None (no shift search).
        halves: ``(P,)`` int8, 0 or 1: the fixed gold-standard split.
        band_A: the band edge (Å) the next iteration scores up to.
        best_fsc_A: best half-map FSC 0.143 resolution so far (Å).
        history: the per-iteration entries so far (see :class:`GlobalRefineResult`).
        stale: iterations in a row without improvement (for ``patience``).
        done: the iterations stopped (converged or ``iterations`` reached).
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

    def to_npz(self, path: str | Path) -> None:
        """Write the state to ``path`` (a ``.npz``; written to a temporary name and renamed)."""
        raise NotImplementedError

    @classmethod
    def from_npz(cls, path: str | Path) -> GlobalRefineState:
        """Read a state written by :meth:`to_npz` (CryoOrientError when unreadable)."""
        raise NotImplementedError


@dataclass
class GlobalRefineResult:
    """The outcome of :func:`global_refine`.

    Attributes:
        quaternions: ``(P, 4)`` refined orientations (wxyz, canonical ``w ≥ 0``).
        shifts: ``(P, 2)`` refined shifts (pixels at the stack's box), or None without shift search.
        volume: ``(L, L, L)`` map from all images at the refined poses (masked).
        half_maps: the two half maps (each from its own half only).
        fsc: :class:`~cryoorient_ray.core.reconstruction.fsc.FSCResult` between the half maps.
        history: one dict per iteration: ``iteration``, ``band_A``, ``resolution_0143_A`` (half maps),
            ``resolution_05_A`` (half maps), ``change_rad`` (mean angle moved), ``seconds``,
            ``n_candidates`` (scored per image); with ``q_true`` also ``error_rad`` (rotation + hand
            registration, :func:`~cryoorient_ray.core.recovery.align.align_rotation`), with ``reference``
            also ``resolution_05_true_A`` (FSC 0.5 of the map against ``reference``). The local polish,
            when run, adds a last entry with ``iteration = "polish"``.
        state: the final :class:`GlobalRefineState`.
        seconds: wall time of the call.
    """

    quaternions: np.ndarray
    shifts: np.ndarray | None
    volume: np.ndarray
    half_maps: tuple[np.ndarray, np.ndarray]
    fsc: object
    history: list[dict]
    state: GlobalRefineState
    seconds: float


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
        level0: level of the SO(3) grid to start from; ``levels`` how many levels (≥ 1).
        turn: ``(4,)`` quaternion turning the whole grid this iteration (right multiplication).
        keep: candidates kept per image per level.
        shift_radius: shift search radius (pixels); 0: no search. ``shift_step``: level-0 step.
    """

    band_radius: float
    band_weights: np.ndarray
    level0: int
    levels: int
    turn: np.ndarray
    keep: int
    shift_radius: float
    shift_step: float


@dataclass
class BatchCandidates:
    """The last level's candidates of one batch: ``index (b,)``, ``quaternions (b, keep, 4)``,
    ``shifts (b, keep, 2)``, ``scores (b, keep)`` (NCC, best first)."""

    index: np.ndarray
    quaternions: np.ndarray
    shifts: np.ndarray
    scores: np.ndarray


class Scorer(Protocol):
    """Scores the fixed image batches against one iteration's two half maps.

    ``prepare`` is called once per :func:`global_refine` with the working stack and the batches;
    ``score`` once per iteration with the masked half maps ``(2, L, L, L)`` float32 and the plan,
    and returns one :class:`BatchCandidates` per batch, in the batches' order (batch ``k`` scored
    against ``references[batches[k].half]``). ``close`` releases what ``prepare`` took.
    """

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None: ...

    def score(self, references: np.ndarray, plan: SearchPlan) -> list[BatchCandidates]: ...

    def close(self) -> None: ...


def make_batches(halves: np.ndarray, batch_size: int) -> list[ImageBatch]:
    """The fixed batches: each half's sorted rows cut into runs of ``batch_size``."""
    raise NotImplementedError


def search_batch(images, references_ft, plan: SearchPlan, batch: ImageBatch) -> BatchCandidates:
    """The coarse-to-fine search of one batch (the one function both scorers run)."""
    raise NotImplementedError


class InProcessScorer:
    """:class:`Scorer` in this process (on ``settings.device``)."""

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None:
        raise NotImplementedError

    def score(self, references: np.ndarray, plan: SearchPlan) -> list[BatchCandidates]:
        raise NotImplementedError

    def close(self) -> None:
        pass


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
        stack: the particles at the working box (images, CTF, pixel size; shifts are used as
            given when ``max_shift_px == 0`` and searched otherwise).
        start: ``(P, 4)`` starting orientations (any gauge), or None for random ones (seeded:
            the ab-initio control).
        settings: :class:`GlobalRefineSettings`.
        scorer: None (in-process) or a :class:`Scorer` such as ``RayScorer``.
        resume: a state from ``on_iteration`` / :meth:`GlobalRefineState.from_npz`: continue after
            its last finished iteration (the stack, start and settings must be the same).
        on_iteration: ``on_iteration(state, entry)`` after every iteration (save the state here).
        q_true: optional ``(P, 4)`` true orientations (adds ``error_rad`` to the history).
        reference: optional ``(L, L, L)`` true-orientation map (adds ``resolution_05_true_A``).
        progress: ``progress(label, done, total)`` as batches finish.

    Returns:
        :class:`GlobalRefineResult`.

    Raises:
        CryoOrientError: bad settings, mismatched shapes, a resume state that does not fit.
    """
    raise NotImplementedError
