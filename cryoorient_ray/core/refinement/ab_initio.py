"""Stochastic ab initio: a first map from images of unknown orientation (cryoSPARC/RELION style).

Global refinement (:mod:`~cryoorient_ray.core.refinement.global_search`) started from random
orientations does not converge: both halves start from the same blob, whose half-map FSC is high
to Nyquist (the halves agree on what they took from it), the FSC band races out and hard
assignment locks onto the blob. This phase builds a first map instead, as cryoSPARC's ab initio and
RELION's ``relion_refine --denovo_3dref`` (stochastic EM) do:

1. **Minibatches.** Each step draws ``batch_size`` images (a seeded permutation, epoch after
   epoch) and scores them against the current map over the whole near-uniform SO(3) grid of
   ``grid_deg`` (the level 0 of :func:`~cryoorient_ray.core.refinement.global_search.search_batch`,
   turned by a random rotation every step; with ``max_shift_px > 0`` times a grid of shifts), on a
   **low band that rises on a fixed schedule** from ``band_start`` to ``band_end`` cycles per box
   (geometric in the step; not from the half-map FSC, which from a blob is misleading). The score
   is the global search's normalised cross-correlation, CTF included.
2. **Soft assignment, annealed.** The ``keep`` best poses of each image are weighted by the
   posterior ``∝ exp(dof · NCC² / (1 − NCC_best²) / T)`` (white Gaussian noise, as the global
   search's soft mode) at a temperature ``T`` that falls geometrically from ``temperature_start``
   to 1 over the first ``anneal_fraction`` of the steps: early on every image spreads over many
   poses (the map stays smooth and can change its mind), later the poses harden.
3. **Online map.** The minibatch is inserted (trilinear Fourier gridding, weights × CTF) into a
   running numerator ``Σ w c P`` and denominator ``Σ w c²`` that decay by ``decay`` per step
   (an exponential moving average of the recent minibatches: the memory is about
   ``batch_size / (1 − decay)`` images); the map is their Wiener ratio, masked. The first map is the
   minibatch at random orientations (a blob), forgotten as the steps go on.

The result (:class:`AbInitioResult`): the map, each image's best pose of its last visit, the last
band. ``global_refine`` starts both halves from this map low-passed to that band (RELION's common
initial model, low-passed) when ``GlobalRefineSettings.ab_initio`` says so. The map comes in either
hand (the images cannot tell): the error is measured as rotation + hand.

Pure torch/numpy; never imports ray or zarr.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoorient_ray.core.geometry.grids import grid_level_for_step
from cryoorient_ray.core.geometry.quaternion import quat_canonicalize, unitquat_to_rotmat
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.reconstruction.fsc import soft_mask
from cryoorient_ray.core.reconstruction.inversion import fourier_sums, volume_from_sums
from cryoorient_ray.core.recovery.align import align_rotation
from cryoorient_ray.core.refinement.global_search import ImageBatch, SearchPlan, prepare_references, search_batch
from cryoorient_ray.core.refinement.matching import SliceMatcher
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "AB_INITIO_MODES",
    "GOOD_START_FRACTION",
    "AbInitioResult",
    "AbInitioSettings",
    "InitialModel",
    "ab_initio",
    "initial_model",
    "lowpass_volume",
    "settings_from",
]

# Posteriors below this (relative to the image's best) are not inserted.
_MIN_POSTERIOR = 1e-3
# Oversampling of the running Fourier grid (as reconstruct_fourier's default).
_OVERSAMPLING = 2
# The minibatch is inserted up to the step's band edge plus this many cycles per box (the shells the
# next steps score as the band rises; beyond, the map is not used): 3–10× fewer insertions than to Nyquist.
_INSERT_MARGIN = 2.0
_INSERT_CHUNK = 64


@dataclass(frozen=True)
class AbInitioSettings:
    """The stochastic ab initio phase (module docstring).

    Attributes:
        steps: minibatch steps.
        batch_size: images per step.
        grid_deg: step of the SO(3) grid every image is scored on (15°: 5,184 orientations).
        band_start, band_end: the band edge (cycles per box) of the first step and of the last
            ones: it rises geometrically over the first ``rise_fraction`` of the steps, then stays
            (capped at ``L / 2 − 1``).
        rise_fraction: fraction of the steps over which the band rises (in (0, 1]).
        temperature_start: posterior temperature of the first step (≥ 1); it falls geometrically
            to 1 over the first ``anneal_fraction`` of the steps and stays at 1.
        anneal_fraction: fraction of the steps over which the temperature falls (in (0, 1]).
        keep: best poses per image that share its posterior (the rest get 0).
        decay: factor the running numerator and denominator are multiplied by each step (in [0, 1)).
        max_shift_px: shift search radius (pixels at the working box); 0: none.
        shift_step_px: shift grid step (pixels).
        wiener: Wiener constant of the map (relative to one image's weight).
        mask_radius: soft spherical mask radius (pixels); None: ``L / 2 − 4``.
        seed: of the minibatches, the first random poses and the grid's turns.
    """

    steps: int = 40
    batch_size: int = 300
    grid_deg: float = 15.0
    band_start: float = 3.0
    band_end: float = 8.0
    rise_fraction: float = 0.6
    temperature_start: float = 4.0
    anneal_fraction: float = 0.4
    keep: int = 8
    decay: float = 0.75
    max_shift_px: float = 0.0
    shift_step_px: float = 1.0
    wiener: float = 1e-2
    mask_radius: float | None = None
    seed: int = 0

    def checked(self) -> AbInitioSettings:
        """The settings, checked (CryoOrientError naming the first bad field)."""
        for name, minimum in (("steps", 1), ("batch_size", 2), ("keep", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise CryoOrientError(f"ab initio {name} must be an integer >= {minimum}; got {v!r}")
        checks = (
            ("grid_deg", lambda v: 0 < v <= 90, "a number of degrees in (0, 90]"),
            ("band_start", lambda v: v >= 1, "a number of cycles per box >= 1"),
            ("band_end", lambda v: v >= self.band_start, "a number of cycles per box >= band_start"),
            ("temperature_start", lambda v: v >= 1, "a number >= 1"),
            ("anneal_fraction", lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("rise_fraction", lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("decay", lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("max_shift_px", lambda v: v >= 0, "a non-negative number of pixels"),
            ("shift_step_px", lambda v: v > 0, "a positive number of pixels"),
            ("wiener", lambda v: v > 0, "a positive number"),
        )
        for name, ok, what in checks:
            v = getattr(self, name)
            if not _number(v) or not ok(v):
                raise CryoOrientError(f"ab initio {name} must be {what}; got {v!r}")
        if self.mask_radius is not None and (not _number(self.mask_radius) or self.mask_radius <= 0):
            raise CryoOrientError(
                f"ab initio mask_radius must be a positive number of pixels; got {self.mask_radius!r}"
            )
        return self

    def band(self, step: int, lsize: int) -> float:
        """The band edge (cycles per box) of step ``step`` (0-based)."""
        f = min(1.0, step / max(1.0, self.rise_fraction * (self.steps - 1)))
        edge = self.band_start * (self.band_end / self.band_start) ** f
        return float(min(edge, lsize / 2 - 1))

    def temperature(self, step: int) -> float:
        """The posterior temperature of step ``step`` (0-based)."""
        f = min(1.0, step / max(1.0, self.anneal_fraction * (self.steps - 1)))
        return float(self.temperature_start ** (1.0 - f))


def _number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class AbInitioResult:
    """The outcome of :func:`ab_initio`.

    Attributes:
        volume: ``(L, L, L)`` the final map (masked, float32 numpy; not low-passed).
        quaternions: ``(P, 4)`` each image's best orientation at its last visit (random where never visited).
        shifts: ``(P, 2)`` the matching shifts, or None without shift search.
        band_radius: the last step's band edge (cycles per box).
        history: one dict per step: ``step``, ``band`` (cycles per box), ``temperature``,
            ``ncc`` (mean best NCC of the minibatch), ``seconds``; with ``q_true`` every
            ``evaluate_every`` steps also ``error_rad`` (rotation + hand of the poses so far).
        seconds: wall time.
    """

    volume: np.ndarray
    quaternions: np.ndarray
    shifts: np.ndarray | None
    band_radius: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _RunningMap:
    """Decayed Fourier numerator and denominator on the padded grid, and the masked map they give."""

    def __init__(self, stack: ParticleStack, settings: AbInitioSettings) -> None:
        self.stack = stack
        self.lsize = stack.image_size
        self.wiener = settings.wiener
        self.decay = settings.decay
        radius = self.lsize / 2 - 4 if settings.mask_radius is None else settings.mask_radius
        self.mask = torch.from_numpy(soft_mask(self.lsize, radius, 3.0)).float()
        self.data: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None

    def add(
        self, rows: np.ndarray, quats: np.ndarray, weights: np.ndarray, shifts: np.ndarray | None, edge: float
    ) -> None:
        """Decay the sums, then insert images ``rows`` at ``quats`` with ``weights`` (and ``shifts``) up to
        ``edge + _INSERT_MARGIN`` cycles per box."""
        part = self.stack.subset(rows)
        if shifts is not None:
            part = dataclasses.replace(part, shifts=torch.from_numpy(shifts.astype(np.float32)))
        rot = unitquat_to_rotmat(torch.from_numpy(np.asarray(quats, dtype=np.float64))).float()
        data, weight = fourier_sums(
            part,
            rot,
            oversampling=_OVERSAMPLING,
            batch_size=_INSERT_CHUNK,
            weights=np.asarray(weights, dtype=np.float32),
            radius=_OVERSAMPLING * (edge + _INSERT_MARGIN),
        )
        if self.data is None:
            self.data, self.weight = data, weight
        else:
            self.data = self.data * self.decay + data
            self.weight = self.weight * self.decay + weight

    def volume(self) -> torch.Tensor:
        """The masked map ``(L, L, L)`` of the running sums (Wiener ratio, gridding-corrected)."""
        return volume_from_sums(self.data, self.weight, self.wiener, self.lsize).float() * self.mask


def lowpass_volume(volume: np.ndarray, edge: float, width: float = 2.0) -> np.ndarray:
    """``volume`` low-passed to ``edge`` cycles per box (raised-cosine fall-off over ``width`` shells)."""
    v = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    lsize = v.shape[0]
    k = torch.fft.fftfreq(lsize) * lsize
    kz, ky, kx = torch.meshgrid(k, k, torch.fft.rfftfreq(lsize) * lsize, indexing="ij")
    r = torch.sqrt(kx**2 + ky**2 + kz**2)
    f = torch.clamp((r - edge) / width, 0.0, 1.0)
    filt = 0.5 * (1 + torch.cos(math.pi * f))
    return torch.fft.irfftn(torch.fft.rfftn(v) * filt, s=v.shape).numpy()


def _posterior(scores: np.ndarray, dof: float, temperature: float) -> np.ndarray:
    """``(b, keep)`` posterior of each image's candidates (best first), at ``temperature``."""
    best = scores[:, :1]
    logit = dof * np.clip(scores, 0, None) ** 2 / np.clip(1 - best**2, 1e-12, None) / temperature
    w = np.exp(logit - logit.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)


def _step_plan(settings: AbInitioSettings, edge: float, lsize: int, step: int) -> SearchPlan:
    q = np.random.default_rng([settings.seed, 5, step]).standard_normal(4)
    turn = np.asarray(unitquat_to_rotmat(q / np.linalg.norm(q)), dtype=np.float64)
    radius = float(settings.max_shift_px)
    shift_step = min(radius, max(settings.shift_step_px, lsize / (3 * edge))) if radius > 0 else 0.0
    return SearchPlan(
        band_radius=edge,
        band_weights=np.ones(lsize // 2 + 1),
        base=grid_level_for_step(settings.grid_deg),
        levels=1,
        level_radii=(edge,),
        turn=turn,
        keep=int(settings.keep),
        shift_radius=radius,
        shift_step=float(shift_step),
        shift_min_step=float(settings.shift_step_px),
    )


def _minibatches(p: int, settings: AbInitioSettings):
    """The steps' image rows: seeded permutations of all images, epoch after epoch (sorted per batch)."""
    rng = np.random.default_rng([settings.seed, 4])
    b = min(settings.batch_size, p)
    order = np.empty(0, dtype=np.int64)
    for _ in range(settings.steps):
        if order.size < b:
            order = np.concatenate([order, rng.permutation(p)])
        rows, order = np.sort(order[:b]), order[b:]
        yield rows


def ab_initio(
    stack: ParticleStack,
    settings: AbInitioSettings,
    *,
    device: torch.device | str = "cpu",
    q_true: np.ndarray | None = None,
    evaluate_every: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> AbInitioResult:
    """A first map from the images alone (module docstring).

    Args:
        stack: the working stack (float32 CPU images, at least 2; shifts, if any, are undone when
            ``max_shift_px == 0`` and ignored — searched from 0 — otherwise).
        settings: :class:`AbInitioSettings`.
        device: where the scoring runs (the map is accumulated on the CPU).
        q_true: optional ``(P, 4)`` true orientations (adds ``error_rad`` to the history).
        evaluate_every: steps between two ``error_rad`` entries.
        progress: ``progress(step, steps)`` after every step.

    Returns:
        :class:`AbInitioResult`.
    """
    t_start = time.perf_counter()
    settings = settings.checked()
    p, lsize = len(stack), stack.image_size
    shifted = settings.max_shift_px > 0
    work = dataclasses.replace(stack, shifts=None) if shifted else stack
    matcher = SliceMatcher(work, device)
    running = _RunningMap(work, settings)
    rng = np.random.default_rng([settings.seed, 6])
    q = np.asarray(sample_orientations(p, seed=rng), dtype=np.float64)
    t = np.zeros((p, 2)) if shifted else None
    history: list[dict] = []
    edge = settings.band(0, lsize)
    for step, rows in enumerate(_minibatches(p, settings)):
        t0 = time.perf_counter()
        if running.data is None:  # the first map: this minibatch at random orientations (a blob)
            running.add(rows, q[rows], np.ones(len(rows)), None if t is None else t[rows], settings.band(0, lsize))
        edge = settings.band(step, lsize)
        temperature = settings.temperature(step)
        plan = _step_plan(settings, edge, lsize, step)
        matcher.set_band(plan.weight_of_radius, edge)
        refs = prepare_references(matcher, running.volume()[None].numpy(), plan)
        cand = search_batch(matcher, refs, plan, ImageBatch(0, rows))
        w = _posterior(cand.scores, cand.dof, temperature)
        q[rows] = cand.quaternions[:, 0]
        if t is not None:
            t[rows] = cand.shifts[:, 0]
        r_img, r_cand = np.nonzero(w >= _MIN_POSTERIOR)
        running.add(
            rows[r_img],
            cand.quaternions[r_img, r_cand],
            w[r_img, r_cand],
            None if t is None else cand.shifts[r_img, r_cand],
            edge,
        )
        entry = {
            "step": step + 1,
            "band": edge,
            "temperature": temperature,
            "ncc": float(cand.scores[:, 0].mean()),
            "seconds": time.perf_counter() - t0,
        }
        if q_true is not None and ((step + 1) % evaluate_every == 0 or step + 1 == settings.steps):
            entry["error_rad"] = float(align_rotation(np.asarray(q_true, dtype=np.float64), q).mean)
        history.append(entry)
        if progress is not None:
            progress(step + 1, settings.steps)
    return AbInitioResult(
        volume=running.volume().numpy(),
        quaternions=np.asarray(quat_canonicalize(q), dtype=np.float64),
        shifts=t,
        band_radius=edge,
        history=history,
        seconds=time.perf_counter() - t_start,
    )


# ----------------------------------------------------------------------------------------------
# the start of global refinement

AB_INITIO_MODES = ("auto", "on", "off")
# ``auto`` with given start orientations keeps them without running ab initio when their half maps'
# FSC area (the sum of their FSC over the shells 1 … L/2, clipped at 0) is at least this fraction of
# the way from the area of random orientations on the same images (measured each time: a chance
# map's half maps agree more the cleaner the images and the larger the imposed group) to the shell
# count (a correlation of 1 up to Nyquist); below it, ab initio runs and the larger area wins.
# Measured on 5j0n at 32² (16 shells): the noise benchmark's recoveries at ∞, −12 dB and −12 dB with
# CTF and shifts 13.3–15.8 (1,650 images), random orientations 4.6–5.3; the −20 dB recovery at chance
# 5.5. On noiseless images random orientations score ≈ 8 and a chance-level recovery 12–13 (7ddo in
# the ``unseen`` benchmark), which a fraction of the shells alone (0.75 × 16 = 12) kept and refined
# to 1.12 rad.
GOOD_START_FRACTION = 0.75


@dataclass
class InitialModel:
    """How :func:`~cryoorient_ray.core.refinement.global_search.global_refine` starts.

    Attributes:
        kind: ``"given"`` (the start orientations' own half maps), ``"random"`` (the blob of random
            orientations, ab initio off) or ``"ab initio"`` (this module's map).
        reason: why, in words (for the history and the report).
        result: the :class:`AbInitioResult` when ab initio ran (also when its map lost to the start).
        reference: ``(L, L, L)`` the ab initio map low-passed to its last band (both halves start
            from it) when ``kind == "ab initio"``, else None.
        start_area, ab_initio_area: the half maps' FSC area of the given start and of the ab initio
            poses (when measured, for ``auto``).
        start_error: with the truth, the rotation + hand error of the orientations before ab initio.
        random_area: the half maps' FSC area of random orientations on the same images (``auto``
            with a given start: the floor the start's area is judged from).
    """

    kind: str
    reason: str
    result: AbInitioResult | None = None
    reference: np.ndarray | None = None
    start_area: float | None = None
    ab_initio_area: float | None = None
    start_error: float | None = None
    random_area: float | None = None

    def summary(self) -> dict:
        """JSON-safe description (``start``, ``start_reason`` and the ab initio phase's numbers)."""
        out: dict = {"start": self.kind, "start_reason": self.reason}
        for key, value in (
            ("start_fsc_area", self.start_area),
            ("ab_initio_fsc_area", self.ab_initio_area),
            ("start_error_rad", self.start_error),
            ("random_fsc_area", self.random_area),
        ):
            if value is not None:
                out[key] = value
        if self.result is not None:
            last = self.result.history[-1]
            out["ab_initio"] = {
                "steps": len(self.result.history),
                "band": self.result.band_radius,
                "seconds": self.result.seconds,
                **({"error_rad": last["error_rad"]} if "error_rad" in last else {}),
            }
        return out


def settings_from(refine) -> AbInitioSettings:
    """The :class:`AbInitioSettings` of a ``GlobalRefineSettings`` (its ``ab_initio_*``, grid, shift and mask keys)."""
    return AbInitioSettings(
        steps=refine.ab_initio_steps,
        batch_size=refine.ab_initio_batch_size,
        grid_deg=max(refine.start_deg, 15.0),
        keep=refine.keep,
        max_shift_px=refine.max_shift_px,
        shift_step_px=refine.shift_step_px,
        wiener=max(refine.wiener, 1e-6),
        mask_radius=refine.mask_radius,
        seed=refine.seed,
    )


def initial_model(
    stack: ParticleStack,
    refine,
    *,
    start_area: float | None,
    area_of: Callable[[np.ndarray, np.ndarray | None], float],
    device: torch.device | str = "cpu",
    q_true: np.ndarray | None = None,
    q_start: np.ndarray | None = None,
) -> InitialModel:
    """Decide how global refinement starts and, when ab initio, run it.

    Args:
        stack: the working stack.
        refine: the :class:`~cryoorient_ray.core.refinement.global_search.GlobalRefineSettings`
            (``ab_initio``: ``"on"`` always, ``"off"`` never; ``"auto"`` from random orientations,
            and from a given start unless its FSC area is at least ``GOOD_START_FRACTION`` of the
            way from random orientations' area to the shell count: then ab initio runs and its map
            is used when its poses' half maps have the larger FSC area, the data's own verdict).
        start_area: the given start's half-map FSC area, None from random orientations.
        area_of: ``area_of(quaternions, shifts | None)``: the half-map FSC area of poses (the same
            halves and mask as the start's).
        device: of the ab initio scoring.
        q_true: optional true orientations (history only).
        q_start: the orientations before ab initio (given or random; with ``q_true``: ``start_error``).
    """
    mode = refine.ab_initio
    if mode == "off":
        return InitialModel("random" if start_area is None else "given", "ab initio off")
    shells = stack.image_size // 2
    random_area = None
    if mode == "auto" and start_area is not None:
        p = len(stack)
        q_random = np.asarray(sample_orientations(p, seed=np.random.default_rng([refine.seed, 3])), dtype=np.float64)
        random_area = float(area_of(q_random, np.zeros((p, 2))))
        threshold = random_area + GOOD_START_FRACTION * max(shells - random_area, 0.0)
        if start_area >= threshold:
            why = (
                f"start FSC area {start_area:.2f} >= {threshold:.2f} (random orientations {random_area:.2f}, "
                f"{GOOD_START_FRACTION:g} of the way to {shells} shells)"
            )
            return InitialModel("given", why, start_area=start_area, random_area=random_area)
    err = None
    if q_true is not None and q_start is not None:
        err = float(align_rotation(np.asarray(q_true, dtype=np.float64), np.asarray(q_start, dtype=np.float64)).mean)
    res = ab_initio(stack, settings_from(refine), device=device, q_true=q_true)
    ref = lowpass_volume(res.volume, res.band_radius)
    if mode == "on" or start_area is None:
        return InitialModel(
            "ab initio", "ab initio on" if mode == "on" else "random start", res, ref, start_area, None, err
        )
    ab_area = float(area_of(res.quaternions, res.shifts))
    if ab_area > start_area:
        why = f"ab initio poses' FSC area {ab_area:.2f} > the start's {start_area:.2f}"
        return InitialModel("ab initio", why, res, ref, start_area, ab_area, err, random_area)
    why = f"the start's FSC area {start_area:.2f} >= the ab initio poses' {ab_area:.2f}"
    return InitialModel("given", why, res, None, start_area, ab_area, None, random_area)
