"""Local refinement of orientations by projection matching against the data's own reconstruction.

Starting from orientations that are roughly right (e.g. ~10° errors from distance-based recovery),
each round

1. reconstructs the map from the images and the current orientations
   (:func:`~cryoorient_ray.core.reconstruction.inversion.reconstruct_fourier`, CTF-corrected when a CTF is
   given, soft spherical mask), and two half maps from a fixed random split of the images;
2. low-passes the reference by the half maps' FSC: every Fourier coefficient is weighted by
   ``w(s) = sqrt(2·FSC(s) / (1 + FSC(s)))`` (Rosenthal & Henderson's ``C_ref``) up to the first
   shell where the FSC falls below 0.143, and by 0 beyond. The filter follows the angular
   accuracy and the noise by itself: shells that the current orientations blur or that noise
   swamps drop out (a fixed Gaussian low-pass tied to the search step was tried too: it made the
   result worse at every width);
3. scores, for every image ``i``, the candidates ``q(δ_k) ⊗ q_i`` for a fixed set of small
   rotations ``δ_k``: rotation vectors on a cubic lattice inside a ball of radius ``search_deg``
   (:func:`candidate_lattice`, the identity included), turned by a random rotation each round.
   Left multiplication rotates in the frame of the image: the ``z`` component of ``δ`` changes
   the in-plane angle, ``x`` and ``y`` tilt the viewing direction. The global gauge of the input
   (an object rotation ``G``, ``R → R·Gᵀ``, and the hand) acts on the other side and is kept;
4. moves each image to a continuous optimum (:func:`_match`): where the scores single out one
   candidate, the vertex of a quadratic fitted to the scores around the best one; where they
   are flat (noisy images), the posterior mean of the candidates.

Scoring happens in Fourier space, without making images: by the projection-slice theorem the
2D DFT of a projection is the central slice ``Rᵀ·(kx, ky, 0)`` of the map's 3D FT (computed once
per round, zero-padded 2× with the trilinear gridding correction, as
:class:`~cryoorient_ray.core.imaging.projection.FourierSliceProjector` does). Only the points of the
images' ``L × L`` rfft half-plane inside the filter's band are sampled (``grid_sample``) and
multiplied by the image's CTF; the images' DFTs (their shifts undone by a phase ramp) are
computed once. The score is the normalised cross-correlation of the low-passed image and the
low-passed projection,

    NCC = Σ_k h w² Re(I* P) / sqrt(Σ_k h w² |I|² · Σ_k h w² |P|²),

over the band without the zero frequency (``h`` counts the Hermitian mates): by Parseval the
correlation over the ``L × L`` box. The CTF is applied on that grid too, i.e. its point-spread
function wraps round the box where :func:`~cryoorient_ray.core.imaging.ctf.apply_ctf` pads 2× first; for
PSFs small against the box this changes nothing (measured: the same errors as on the padded
grid, at a quarter of the cost).

A local search cannot repair starts off by more than about ``search_deg`` of the first round. With
noise the first round does the work; measured accuracy and cost per round are in
docs/BENCHMARKS.md ("Refinement"). This module never imports ray or zarr.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor
from cryoorient_ray.core.geometry.quaternion import (
    quat_canonicalize,
    quat_distance,
    quat_product,
    rotvec_to_unitquat,
    unitquat_to_rotmat,
)
from cryoorient_ray.core.imaging.fourier import centred_volume_ft
from cryoorient_ray.core.imaging.particles import ParticleStack, as_particle_stack
from cryoorient_ray.core.reconstruction.fsc import best_hand, fsc, soft_mask
from cryoorient_ray.core.reconstruction.inversion import reconstruct_fourier, split_halves
from cryoorient_ray.core.recovery.align import align_rotation
from cryoorient_ray.core.refinement.matching import SliceMatcher as _Matcher
from cryoorient_ray.core.refinement.matching import fsc_band as _band
from cryoorient_ray.errors import CryoOrientError

__all__ = ["RefineResult", "RefineSettings", "candidate_lattice", "refine_orientations"]

# A posterior over the candidates whose largest probability exceeds this is "sharp".
_SHARP = 0.5
# Trilinear fetches (candidates × band points) per grid_sample call: bounds memory (~100 MB).
_POINTS_PER_CHUNK = 1 << 21
# Largest lattice radius (in lattice steps) searched for n_candidates.
_LATTICE_RANGE = 6


@dataclass
class RefineResult:
    """Refined orientations, the final map and a per-round trace.

    Attributes:
        quaternions: ``(P, 4)`` float64 unit quaternions (wxyz), canonical ``w ≥ 0``, in the gauge
            (object rotation and hand) of the input.
        volume: ``(L, L, L)`` reconstruction from the refined orientations (masked, unfiltered),
            numpy if the images were numpy, else a tensor.
        history: one dict per round: ``round`` (1-based), ``search_deg``, ``step_deg`` (lattice
            spacing), ``n_candidates``, ``change`` (mean angle between the orientations before and
            after the round, rad), ``correlation`` (mean NCC at the chosen orientations), ``band``
            (highest frequency scored, 1/Å), ``resolution_0143`` (FSC = 0.143 of the half maps
            after the round, Å; optimistic: both halves were aligned to the same reference),
            ``seconds`` (the round's matching and reconstructions, without the measures against
            the truth); with ``q_true`` also ``error`` (:func:`~cryoorient_ray.core.recovery.align.
            align_rotation` mean after the round, rad), with ``reference`` also ``resolution_05``
            (FSC = 0.5 of the map after the round against ``reference``, Å).
        initial: the same measures for the input orientations: ``resolution_0143`` and, when
            given the truth, ``error`` and ``resolution_05``.
        change: mean angle (rad) between the input and the refined orientations.
        seconds: wall time of the whole call.
    """

    quaternions: np.ndarray
    volume: ArrayLike
    history: list[dict] = field(default_factory=list)
    initial: dict = field(default_factory=dict)
    change: float = 0.0
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# candidate rotations


def candidate_lattice(n_candidates: int) -> tuple[np.ndarray, float]:
    """The points of the integer lattice ``Z³`` in the largest ball holding at most ``n_candidates``.

    Whole shells only (so the set is symmetric): the sizes are 1, 7, 19, 27, 33, 57, 81, 93, 123,
    147, 171, 179, 203, 251, … for squared radii 0, 1, 2, 3, 4, 5, 6, 8, 9, ….

    Returns:
        ``(points (K, 3) int64, radius)``: the lattice points (the origin first) and the ball's
        radius in lattice steps (``sqrt`` of the largest squared norm kept).
    """
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 7:
        raise CryoOrientError(f"n_candidates must be an integer >= 7; got {n_candidates!r}")
    r = _LATTICE_RANGE
    ax = np.arange(-r, r + 1)
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    norm2 = (pts * pts).sum(1)
    pts, norm2 = pts[norm2 <= r * r], norm2[norm2 <= r * r]
    order = np.lexsort((pts[:, 2], pts[:, 1], pts[:, 0], norm2))
    pts, norm2 = pts[order], norm2[order]
    levels = np.unique(norm2)
    counts = np.array([(norm2 <= t).sum() for t in levels])
    t = levels[counts <= n_candidates].max()
    keep = norm2 <= t
    return pts[keep].astype(np.int64), math.sqrt(float(t))


_STENCIL = np.array(
    [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if abs(i) + abs(j) + abs(k) <= 2]
)


def _stencil_index(points: np.ndarray) -> np.ndarray:
    """``(K, 19)`` index of ``p + o`` for the 19 offsets ``o`` with ``|o|² ≤ 2`` (``-1`` where absent)."""
    index = {tuple(p): k for k, p in enumerate(points.tolist())}
    out = np.full((len(points), len(_STENCIL)), -1, dtype=np.int64)
    for k, p in enumerate(points.tolist()):
        for j, o in enumerate(_STENCIL.tolist()):
            out[k, j] = index.get((p[0] + o[0], p[1] + o[1], p[2] + o[2]), -1)
    return out


def _quadratic_pinv() -> np.ndarray:
    x, y, z = _STENCIL.T.astype(np.float64)
    design = np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], 1)
    return np.linalg.pinv(design)  # (10, 19)


@dataclass(frozen=True)
class _Lattice:
    """The candidate lattice of :func:`candidate_lattice` (``points (K, 3)`` float64, ``radius`` in
    steps) with the vertex fit's ``stencil (K, 19)`` (:func:`_stencil_index`) and ``pinv (10, 19)``."""

    points: torch.Tensor
    radius: float
    stencil: torch.Tensor
    pinv: torch.Tensor

    @classmethod
    def make(cls, n_candidates: int) -> _Lattice:
        points, radius = candidate_lattice(n_candidates)
        return cls(
            points=torch.from_numpy(points).double(),
            radius=radius,
            stencil=torch.from_numpy(_stencil_index(points)),
            pinv=torch.from_numpy(_quadratic_pinv()),
        )


@dataclass(frozen=True)
class _Candidates:
    """One round's candidate perturbations ``δ_k``: rotation vectors ``vecs (K, 3)`` (rad), the
    lattice points scaled by ``step`` (rad per lattice step) and turned by ``turn (3, 3)``."""

    vecs: torch.Tensor
    lattice: _Lattice
    step: float
    turn: torch.Tensor

    @classmethod
    def make(cls, lattice: _Lattice, radius_deg: float, rng: np.random.Generator) -> _Candidates:
        """The lattice scaled to a ball of ``radius_deg`` and turned by a random rotation drawn from ``rng``."""
        step = math.radians(radius_deg) / lattice.radius
        q = rng.standard_normal(4)
        turn = torch.from_numpy(np.asarray(unitquat_to_rotmat(q / np.linalg.norm(q)), dtype=np.float64))
        return cls(vecs=(lattice.points * step) @ turn.T, lattice=lattice, step=step, turn=turn)


# ----------------------------------------------------------------------------------------------
# Fourier-space matching


def _vertex_offsets(sc: torch.Tensor, best: torch.Tensor, cand: _Candidates) -> torch.Tensor:
    """``(b, 3)`` lattice offsets of the vertex of the quadratic fitted to the best point's 19-point stencil.

    Zero where the stencil leaves the lattice or the fit is not a maximum; at most one lattice step.
    """
    b = sc.shape[0]
    st = cand.lattice.stencil[best]  # (b, 19)
    coef = torch.gather(sc, 1, st.clamp_min(0)) @ cand.lattice.pinv.T  # (b, 10): 1, x, y, z, x², y², z², xy, xz, yz
    grad = coef[:, 1:4]
    c = coef[:, 4:]
    hess = torch.stack(
        [
            torch.stack([2 * c[:, 0], c[:, 3], c[:, 4]], -1),
            torch.stack([c[:, 3], 2 * c[:, 1], c[:, 5]], -1),
            torch.stack([c[:, 4], c[:, 5], 2 * c[:, 2]], -1),
        ],
        1,
    )
    ok = (st >= 0).all(1) & (torch.linalg.eigvalsh(hess).amax(1) < 0)
    eye = torch.eye(3, dtype=hess.dtype).expand(b, 3, 3)
    off = -torch.linalg.solve(torch.where(ok[:, None, None], hess, -eye), grad)
    off = torch.where(ok[:, None], off, torch.zeros_like(off))
    return off / torch.linalg.norm(off, dim=1, keepdim=True).clamp_min(1.0)


def _match(
    matcher: _Matcher, ref_ft: torch.Tensor, q: torch.Tensor, idx: torch.Tensor, cand: _Candidates
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined orientations ``(b, 4)`` and their NCC ``(b,)`` for images ``idx`` at orientations ``q (b, 4)``.

    Scores the candidates ``δ_k ⊗ q_i`` (``cand.vecs``), then picks per image:

    - where the posterior over the candidates is sharp (largest probability > 1/2): the vertex of
      the quadratic least-squares fit to the scores of the best candidate's 19-point stencil
      (lattice offsets with ``|o|² ≤ 2``), at most one lattice step away, kept if it scores at
      least as well as the best candidate (else the best candidate);
    - elsewhere (noisy images, flat scores): the posterior mean of the rotation vectors. The log
      likelihood of candidate ``k`` for white Gaussian noise, with the amplitude fitted and the
      noise power estimated from the best fit, is ``dof · NCC_k² / (1 − NCC_best²)`` (``dof``:
      half the weighted number of band coefficients). The argmax of a flat, noisy landscape
      wanders to the edge of the ball; the mean does not.
    """
    rows_b = torch.arange(idx.numel())
    terms = matcher.image_terms(idx)
    candidates = quat_product(rotvec_to_unitquat(cand.vecs)[None, :, :], q[:, None, :])  # (b, K, 4)
    sc = matcher.scores(ref_ft, unitquat_to_rotmat(candidates)[:, :, :2, :].float(), terms).double()  # (b, K)
    best = sc.argmax(1)
    s_best = sc[rows_b, best]
    dof = 0.5 * float(matcher.w2.sum())
    post = torch.softmax(dof * sc**2 / (1 - s_best[:, None] ** 2).clamp_min(1e-12), 1)
    sharp = post.max(1).values > _SHARP
    v_vertex = ((cand.lattice.points[best] + _vertex_offsets(sc, best, cand)) * cand.step) @ cand.turn.T  # (b, 3)
    v_mean = post @ cand.vecs
    q_fine = quat_product(rotvec_to_unitquat(torch.where(sharp[:, None], v_vertex, v_mean)), q)
    s_fine = matcher.scores(ref_ft, unitquat_to_rotmat(q_fine)[:, None, :2, :].float(), terms).double()[:, 0]
    take = ~sharp | (s_fine >= s_best)
    return torch.where(take[:, None], q_fine, candidates[rows_b, best]), torch.where(take, s_fine, s_best)


# ----------------------------------------------------------------------------------------------
# settings and input checks


@dataclass(frozen=True)
class RefineSettings:
    """The search of :func:`refine_orientations` (every field can also be given to it as a keyword).

    Attributes:
        rounds: number of rounds (≥ 0; 0 only reconstructs).
        search_deg: radius (degrees) of the search ball per round: a number (every round) or a
            sequence (round ``r`` uses entry ``r``, the last one repeating).
        n_candidates: lattice candidates per image and round (≥ 7; rounded down to whole shells
            of :func:`candidate_lattice`: 57 → spacing ``search_deg / √5``).
        wiener: Wiener constant of the reconstructions (``reconstruct_fourier``'s ``wiener``).
        mask_radius: radius (pixels) of the soft spherical mask on every map (3-pixel cosine
            edge); None: ``L / 2 - 4``.
        seed: of the half-map split and of the lattice's random turn each round.
        cross_halves: match each half of the images against the map of the other half instead
            of the full map (no self-reference; measured slightly worse at P = 600, so off).
        batch_size: images scored per batch.
    """

    rounds: int = 3
    search_deg: float | Sequence[float] = (12.0, 6.0, 3.0)
    n_candidates: int = 57
    wiener: float = 1e-2
    mask_radius: float | None = None
    seed: int = 0
    cross_halves: bool = False
    batch_size: int = 64

    def schedule(self) -> list[float]:
        """The search radius (degrees) of every round, checked."""
        rounds = self.rounds
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
            raise CryoOrientError(f"rounds must be an integer >= 0; got {rounds!r}")
        return _search_schedule(self.search_deg, int(rounds))

    def checked_mask_radius(self, lsize: int) -> float:
        radius = lsize / 2 - 4 if self.mask_radius is None else self.mask_radius
        if isinstance(radius, bool) or not isinstance(radius, (int, float, np.number)) or not radius > 0:
            raise CryoOrientError(f"mask_radius must be a positive number of pixels; got {radius!r}")
        return radius

    def checked_batch_size(self) -> int:
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise CryoOrientError(f"batch_size must be a positive integer; got {b!r}")
        return int(b)


def _settings(settings: RefineSettings | None, options: dict) -> RefineSettings:
    known = {f.name for f in dataclasses.fields(RefineSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CryoOrientError(
            f"refine_orientations takes no option(s) {unknown}; the settings are {', '.join(sorted(known))}"
        )
    return dataclasses.replace(settings or RefineSettings(), **options)


def _search_schedule(search_deg, rounds: int) -> list[float]:
    values = [search_deg] if isinstance(search_deg, (int, float, np.number)) else list(search_deg)
    if not values:
        raise CryoOrientError("search_deg must be a positive number or a non-empty sequence of them")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (math.isfinite(v) and 0 < v < 90):
            raise CryoOrientError(f"search_deg values must be numbers in (0, 90) degrees; got {v!r}")
        out.append(float(v))
    return [out[min(r, len(out) - 1)] for r in range(rounds)]


def _quats(q: ArrayLike, p: int, name: str) -> torch.Tensor:
    t, _ = as_tensor(q)
    t = t.detach().cpu().to(torch.float64)
    if t.ndim != 2 or t.shape[1] != 4:
        raise CryoOrientError(f"{name} must have shape (P, 4) (wxyz); got {tuple(t.shape)}")
    if t.shape[0] != p:
        raise CryoOrientError(f"the images and {name} differ in length: {p} images, {t.shape[0]} orientations")
    norm = torch.linalg.norm(t, dim=1, keepdim=True)
    if not torch.isfinite(t).all() or (norm < 1e-8).any():
        raise CryoOrientError(f"{name} must be finite, non-zero quaternions")
    return t / norm


def _volume(volume: ArrayLike | None, lsize: int, name: str) -> torch.Tensor | None:
    if volume is None:
        return None
    v, _ = as_tensor(volume)
    if tuple(v.shape) != (lsize,) * 3:
        raise CryoOrientError(f"{name} must have shape {(lsize,) * 3}; got {tuple(v.shape)}")
    return v.detach().cpu().to(torch.float32)


def _working_stack(stack: ParticleStack) -> ParticleStack:
    """The stack as float32 CPU tensors (images and shifts), checked for refinement."""
    imgs = stack.images
    if imgs.shape[1] < 8:
        raise CryoOrientError(f"images must be a (P, L, L) stack of square images, L >= 8; got {tuple(imgs.shape)}")
    if imgs.shape[0] < 2:
        raise CryoOrientError(f"refinement needs at least 2 images (two half maps); got {imgs.shape[0]}")
    imgs = imgs.detach().cpu().to(torch.float32)
    if not torch.isfinite(imgs).all():
        raise CryoOrientError("images contain NaN or infinite values")
    t = None if stack.shifts is None else stack.shifts.cpu().to(torch.float32)
    return dataclasses.replace(stack, images=imgs, shifts=t, pixel_size_A=stack.pixel_size_A or 1.0, numpy_out=False)


# ----------------------------------------------------------------------------------------------
# the maps of a round


class _Maps:
    """Reconstructions (full and half maps, masked), their FSC, and the measures against the truth."""

    def __init__(self, stack: ParticleStack, settings: RefineSettings, halves, q_true, reference) -> None:
        self.stack, self.halves, self.q_true, self.reference = stack, halves, q_true, reference
        self.px = stack.pixel_size_A
        self.wiener = settings.wiener
        self.mask = torch.from_numpy(soft_mask(stack.image_size, settings.checked_mask_radius(stack.image_size), 3.0))

    def reconstruct(self, q: torch.Tensor, idx: np.ndarray | None = None) -> torch.Tensor:
        rot = unitquat_to_rotmat(q).to(torch.float32)
        if idx is None:
            part = self.stack
        else:
            part, rot = self.stack.subset(idx), rot[torch.as_tensor(idx)]
        return reconstruct_fourier(part, rot, wiener=self.wiener) * self.mask

    def maps(self, q: torch.Tensor) -> dict:
        out = {"full": self.reconstruct(q), "half": [self.reconstruct(q, h) for h in self.halves]}
        out["fsc"] = fsc(out["half"][0], out["half"][1], self.px)
        return out

    def truth_metrics(self, q: torch.Tensor, full: torch.Tensor) -> dict:
        out = {}
        if self.q_true is not None:
            reg = align_rotation(self.q_true.numpy(), q.numpy())
            out["error"] = float(reg.mean)
            if self.reference is not None:
                aligned = torch.as_tensor(reg.apply(q.numpy()))
                out["resolution_05"] = fsc(self.reconstruct(aligned), self.reference, self.px).resolution_05
        elif self.reference is not None:
            out["resolution_05"] = fsc(best_hand(full, self.reference), self.reference, self.px).resolution_05
        return out


# ----------------------------------------------------------------------------------------------
# refinement


def _references(rnd: int, current: dict, init_volume, mask, cross_halves: bool) -> list[torch.Tensor]:
    """The maps the two halves of the images are matched against in round ``rnd``."""
    if rnd == 1 and init_volume is not None:
        return [init_volume * mask] * 2
    if cross_halves:
        return [current["half"][1], current["half"][0]]  # each half against the other half's map
    return [current["full"]] * 2


@dataclass
class _Refinement:
    """What every round of :func:`refine_orientations` shares: the checked inputs and the matcher."""

    work: ParticleStack
    settings: RefineSettings
    schedule: list[float]
    lattice: _Lattice
    rng: np.random.Generator
    halves: tuple[np.ndarray, np.ndarray]
    maps: _Maps
    matcher: _Matcher
    init_volume: torch.Tensor | None
    progress: Callable[[int, int, int, int], None] | None

    def match(self, rnd: int, q: torch.Tensor, refs, cand: _Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image matched in batches: ``(q_new (P, 4), best scores (P,))``."""
        matcher, p = self.matcher, q.shape[0]
        chunk = max(
            1,
            min(
                self.settings.checked_batch_size(),
                _POINTS_PER_CHUNK // max(1, (cand.vecs.shape[0] + 1) * matcher.n_points),
            ),
        )
        q_new = q.clone()
        best_scores = torch.empty(p, dtype=torch.float64)
        done = 0
        with torch.no_grad():
            for half, ref_map in zip(self.halves, refs, strict=True):
                ref_ft = centred_volume_ft(ref_map, 2 * matcher.lsize)
                for s0 in range(0, len(half), chunk):
                    idx = torch.from_numpy(half[s0 : s0 + chunk])
                    q_new[idx], best_scores[idx] = _match(matcher, ref_ft, q[idx], idx, cand)
                    done += idx.numel()
                    if self.progress is not None:
                        self.progress(rnd, len(self.schedule), done, p)
        return quat_canonicalize(q_new / torch.linalg.norm(q_new, dim=1, keepdim=True)), best_scores

    def round(self, rnd: int, radius_deg: float, q: torch.Tensor, current: dict) -> tuple[torch.Tensor, dict, dict]:
        """Round ``rnd``: the new orientations, their maps and the round's history entry."""
        t0 = time.perf_counter()
        lsize = self.work.image_size
        band_weight, max_radius = _band(current["fsc"].fsc, lsize)
        self.matcher.set_band(band_weight, max_radius)
        refs = _references(rnd, current, self.init_volume, self.maps.mask, self.settings.cross_halves)
        cand = _Candidates.make(self.lattice, radius_deg, self.rng)
        q_new, best_scores = self.match(rnd, q, refs, cand)
        change = float(quat_distance(q, q_new).mean())
        current = self.maps.maps(q_new)
        seconds = time.perf_counter() - t0
        entry = {
            "round": rnd,
            "search_deg": radius_deg,
            "step_deg": math.degrees(cand.step),
            "n_candidates": cand.vecs.shape[0],
            "change": change,
            "correlation": float(best_scores.mean()),
            "band": max_radius / lsize / self.work.pixel_size_A,
            "resolution_0143": current["fsc"].resolution_0143,
            **self.maps.truth_metrics(q_new, current["full"]),
            "seconds": seconds,
        }
        return q_new, current, entry


def _setup(stack, quaternions, settings, volume, q_true, reference, progress) -> tuple[_Refinement, torch.Tensor]:
    """Checked inputs of :func:`refine_orientations`: the shared state and the start ``(P, 4)``."""
    work = _working_stack(stack)
    p, lsize = len(work), work.image_size
    q = _quats(quaternions, p, "quaternions")
    qt = None if q_true is None else _quats(q_true, p, "q_true")
    schedule = settings.schedule()
    lattice = _Lattice.make(settings.n_candidates)
    settings.checked_batch_size()
    rng = np.random.default_rng(settings.seed)
    halves = split_halves(rng, p)
    maps = _Maps(work, settings, halves, qt, _volume(reference, lsize, "reference"))
    init_volume = _volume(volume, lsize, "volume")
    state = _Refinement(work, settings, schedule, lattice, rng, halves, maps, _Matcher(work), init_volume, progress)
    return state, q


def refine_orientations(
    stack: ParticleStack | ArrayLike,
    quaternions: ArrayLike,
    settings: RefineSettings | None = None,
    *,
    volume: ArrayLike | None = None,
    q_true: ArrayLike | None = None,
    reference: ArrayLike | None = None,
    progress: Callable[[int, int, int, int], None] | None = None,
    **options,
) -> RefineResult:
    """Refine orientations locally by projection matching (see the module docstring).

    Args:
        stack: the particles (:class:`~cryoorient_ray.core.imaging.particles.ParticleStack`, or bare
            ``(P, L, L)`` images): images indexed ``[y, x]`` (computed in float32), their shifts
            (kept fixed), their CTF (used for the reconstructions and multiplied into the
            projections) and ``pixel_size_A`` (the CTF, and the frequencies and resolutions
            reported; 1 Å when not given).
        quaternions: ``(P, 4)`` starting orientations (wxyz), in any gauge.
        settings: the search (:class:`RefineSettings`); ``options`` override its fields by name
            (``rounds``, ``search_deg``, ``n_candidates``, ``wiener``, ``mask_radius``, ``seed``,
            ``cross_halves``, ``batch_size``).
        volume: optional ``(L, L, L)`` reference for the first round, in the gauge of
            ``quaternions`` (default: the reconstruction from the images at ``quaternions``).
        q_true: optional ``(P, 4)`` true orientations: each round then reports its ``error``.
        reference: optional ``(L, L, L)`` true map: each round reports ``resolution_05``. With
            ``q_true`` the map is reconstructed from the orientations registered onto the truth
            (so any gauge works); without it, only the hand is matched (:func:`~cryoorient_ray.
            core.reconstruction.fsc.best_hand`) and the input must be in the reference's gauge.
        progress: ``progress(round, n_rounds, done, total)`` after each batch of images.

    Returns:
        :class:`RefineResult`.

    Raises:
        CryoOrientError: mismatched lengths or shapes, bad options.
    """
    start_time = time.perf_counter()
    stack = as_particle_stack(stack)
    state, q = _setup(stack, quaternions, _settings(settings, options), volume, q_true, reference, progress)
    current = state.maps.maps(q)
    initial = {"resolution_0143": current["fsc"].resolution_0143, **state.maps.truth_metrics(q, current["full"])}
    q_start = q.clone()
    history = []
    for rnd, radius_deg in enumerate(state.schedule, start=1):
        q, current, entry = state.round(rnd, radius_deg, q, current)
        history.append(entry)
    vol = current["full"]
    return RefineResult(
        quaternions=quat_canonicalize(q).numpy(),
        volume=vol.numpy() if stack.numpy_out else vol,
        history=history,
        initial=initial,
        change=float(quat_distance(q_start, q).mean()),
        seconds=time.perf_counter() - start_time,
    )
