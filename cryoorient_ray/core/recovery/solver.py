"""Orientation recovery: unit quaternions whose distances match the estimated ones on a pair graph.

Minimises the paper's objective (Banjac et al. 2021, eq. 5) over the edges ``(i, j)`` of a sparse
pair graph (:mod:`cryoorient_ray.core.recovery.graph`)

    L_OR = mean_edges |d̂_ij − d_q(q̂_i, q̂_j)|²,      d_q = 2·arccos|⟨q̂_i, q̂_j⟩|,

with Adam on ``(P, 4)`` quaternions, renormalised to S³ after every step. Two options (off by
default) make it robust to bad distances: per-edge weights ``w_ij`` (e.g. the confidence
``1/σ²(d̂)`` of :mod:`cryoorient_ray.core.learning.calibration`) in ``mean w_ij·ρ(r_ij)``, and a
robust ``ρ`` (``loss="huber"`` or ``"cauchy"`` with a scale δ in radians, instead of ``r²``) for
the L_OR phase, so that a few wrong d̂ (false neighbours) pull less.

Two things make it fast and reliable where the paper's recovery took hours:

- **Analytic gradients on edge lists.** ``∂L/∂q_i`` is ``∂ℓ/∂⟨q_i, q_j⟩ · q_j`` summed over the
  edges with ``index_add_``: one pass over ``E`` edges, no autograd graph. :class:`EdgeObjective`
  holds one *partition* of the edges and returns ``(loss sum, gradient)``; partitions add up, so
  the same optimiser runs in-process (one partition) or with partitions on Ray actors
  (:mod:`cryoorient_ray.distributed.recover_actors`), the driver summing their gradients (synchronous
  data parallelism: every step sees the gradient of the whole graph, so results do not depend on
  the number of actors).
- **A start near the solution.** By default (``init="gram"``) a rank-9 Gram completion: unit
  vectors ``y_i ∈ R⁹`` with ``⟨y_i, y_j⟩ ≈ (1 + 2 cos d̂_ij)/3 = ⟨vec R_i, vec R_j⟩/3``, a smooth
  problem without the arccos, rounded to rotations (:func:`round_to_rotations`). With
  ``init="random"`` (the paper's start) random quaternions first minimise the smooth
  ``|cos d̂_ij − cos d_q|²``, where ``cos d_q = 2⟨q̂_i, q̂_j⟩² − 1`` is a polynomial of the
  quaternions. ``restarts`` starts run and the one with the lowest ``L_OR`` goes on; the
  paper's ``L_OR`` then finishes.

The optimiser's settings are one frozen :class:`RecoverySettings` (the run config's
``recover`` keys build it: :meth:`cryoorient_ray.config.SolverConfig.settings`).

``L_OR`` is tracked at every step; the paper shows it is a usable proxy for the orientation error
when no ground truth exists. The solution is defined up to the O(4) transformations of S³ that
preserve all distances; :mod:`cryoorient_ray.core.recovery.gauge` picks the physical one from the images.

Quaternions are scalar-first ``(w, x, y, z)``. This module never imports ray.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoorient_ray.core.geometry.quaternion import random_unitquat, rotmat_to_unitquat
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "EdgeObjective",
    "RecoveryResult",
    "RecoverySettings",
    "check_distances",
    "recover_orientations",
    "round_to_rotations",
]

LOSSES = ("paper", "cosine", "gram")
ROBUST = ("l2", "huber", "cauchy")
INITS = ("gram", "random")
# sin(d/2) below which the arccos gradient is capped (d ≈ 1e-3 rad): keeps steps finite at d → 0.
_MIN_SIN = 5e-4


class EdgeObjective:
    """Loss and gradient of one partition of the pair graph.

    Args:
        i, j: ``(E,)`` node indices of the edges.
        d: ``(E,)`` target distances d̂ in radians (finite, in ``[0, π]``; see
            :func:`check_distances`).
        weights: optional ``(E,)`` non-negative weights (default 1).
        chunk_size: edges per pass (bounds memory).
        device: torch device of the edges and of the gradient (default CPU).
        robust: ``ρ`` of the L_OR phase's residuals ``r = d_q − d̂``: ``"l2"`` (``r²``, the
            paper's), ``"huber"`` (``r²`` up to ``|r| = scale``, linear beyond) or ``"cauchy"``
            (``scale²·log(1 + r²/scale²)``).
        scale: δ of the robust loss, in radians.
    """

    def __init__(
        self,
        i,
        j,
        d,
        weights=None,
        chunk_size: int = 1 << 20,
        device=None,
        robust: str = "l2",
        scale: float = 0.2,
    ):
        if robust not in ROBUST:
            raise CryoOrientError(f"unknown robust loss {robust!r}; use one of {', '.join(ROBUST)}")
        if not (math.isfinite(scale) and scale > 0):
            raise CryoOrientError(f"the robust loss scale must be > 0 rad; got {scale!r}")
        self.robust, self.scale = robust, float(scale)
        self.device = torch.device(device or "cpu")
        self.i = torch.as_tensor(np.asarray(i), dtype=torch.int64, device=self.device)
        self.j = torch.as_tensor(np.asarray(j), dtype=torch.int64, device=self.device)
        self.d = torch.as_tensor(np.asarray(d), dtype=torch.float32, device=self.device)
        if not (self.i.shape == self.j.shape == self.d.shape) or self.i.ndim != 1:
            raise CryoOrientError(
                f"edge arrays must be (E,) of one length; got {tuple(self.i.shape)}, "
                f"{tuple(self.j.shape)}, {tuple(self.d.shape)}"
            )
        self.w = (
            None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=self.device)
        )
        if self.w is not None and (
            self.w.shape != self.d.shape or not bool(torch.isfinite(self.w).all()) or bool((self.w < 0).any())
        ):
            raise CryoOrientError(f"edge weights must be ({self.n_edges},) finite and >= 0")
        self.cos_d = torch.cos(self.d)
        self.chunk_size = int(chunk_size)

    @property
    def n_edges(self) -> int:
        return int(self.i.shape[0])

    def loss_and_grad(self, q, loss: str = "paper") -> tuple[float, float, np.ndarray | torch.Tensor]:
        """``(sum of squared L_OR residuals, sum of the optimised loss, gradient (P, m))``.

        ``q`` is ``(P, 4)`` quaternions — or ``(P, 9)`` unit vectors for ``loss="gram"`` — assumed
        unit (the optimiser renormalises). The gradient is of the *sum* over this partition's
        edges of the loss named by ``loss`` (``"paper"``: L_OR; ``"cosine"``: the smooth loss
        ``|2⟨q_i, q_j⟩² − 1 − cos d̂|²``; ``"gram"``: ``|⟨y_i, y_j⟩ − (1 + 2 cos d̂)/3|²``, the
        rank-9 Gram completion of the initialisation, for which the first value is that loss
        too), with the type of ``q`` (numpy or torch).
        """
        if loss not in LOSSES:
            raise CryoOrientError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
        was_np = not isinstance(q, torch.Tensor)
        qt = torch.as_tensor(np.asarray(q) if was_np else q, dtype=torch.float32, device=self.device)
        grad = torch.zeros_like(qt)
        l_or = 0.0
        l_used = 0.0
        for a in range(0, self.n_edges, self.chunk_size):
            sl = slice(a, a + self.chunk_size)
            i, j, d = self.i[sl], self.j[sl], self.d[sl]
            qi, qj = qt[i], qt[j]
            dot = (qi * qj).sum(1)
            w = None if self.w is None else self.w[sl]
            if loss == "gram":
                rg = dot - (1.0 + 2.0 * self.cos_d[sl]) / 3.0
                val = float(((rg * rg) if w is None else w * rg * rg).sum())
                l_or += val
                l_used += val
                g_dot = 2.0 * rg if w is None else 2.0 * rg * w
                grad.index_add_(0, i, g_dot[:, None] * qj)
                grad.index_add_(0, j, g_dot[:, None] * qi)
                continue
            c = dot.abs().clamp(max=1.0)
            s = torch.sqrt((1.0 - c * c).clamp_min(0.0))  # sin(d_q / 2)
            dq = 2.0 * torch.atan2(s, c)
            res = dq - d
            l_or += float(((res * res) if w is None else w * res * res).sum())
            if loss == "paper":
                # ∂d_q/∂⟨qi,qj⟩ = −2·sign(dot)/sin(d_q/2)
                if self.robust == "l2":
                    g_dot = 2.0 * res * (-2.0 * torch.sign(dot) / s.clamp_min(_MIN_SIN))
                    l_used = l_or
                else:
                    rho, drho = self._robust(res)
                    l_used += float(rho.sum() if w is None else (w * rho).sum())
                    g_dot = drho * (-2.0 * torch.sign(dot) / s.clamp_min(_MIN_SIN))
            else:
                rc = 2.0 * dot * dot - 1.0 - self.cos_d[sl]
                l_used += float(((rc * rc) if w is None else w * rc * rc).sum())
                g_dot = 2.0 * rc * 4.0 * dot
            if w is not None:
                g_dot = g_dot * w
            grad.index_add_(0, i, g_dot[:, None] * qj)
            grad.index_add_(0, j, g_dot[:, None] * qi)
        if was_np:
            return l_or, l_used, grad.cpu().numpy()
        return l_or, l_used, grad.to(q.device)

    def _robust(self, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ρ(res), ρ'(res))`` of the robust loss (not ``"l2"``)."""
        delta = self.scale
        if self.robust == "huber":
            a = res.abs()
            rho = torch.where(a <= delta, res * res, 2.0 * delta * a - delta * delta)
            return rho, 2.0 * res.clamp(-delta, delta)
        u = res * res / (delta * delta)
        return delta * delta * torch.log1p(u), 2.0 * res / (1.0 + u)


GradientFn = Callable[[torch.Tensor, str], tuple[float, float, torch.Tensor]]


def check_distances(d) -> np.ndarray:
    """Distances as float32 in ``[0, π]``; NaN or infinite values are a clear error."""
    d = np.asarray(d, dtype=np.float64)
    bad = ~np.isfinite(d)
    if bad.any():
        raise CryoOrientError(
            f"{int(bad.sum())} of {d.size} estimated distances are NaN or infinite (check the model and images)"
        )
    return np.clip(d, 0.0, math.pi).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class RecoverySettings:
    """Optimiser settings (defaults measured on exact and noisy distances, docs/BENCHMARKS.md).

    These defaults are the only ones: the ``recover`` section of the run config
    (:class:`cryoorient_ray.config.SolverConfig`) takes its defaults from here and builds this
    object with :meth:`~cryoorient_ray.config.SolverConfig.settings`.

    Attributes:
        init: ``"gram"`` (default): the rank-9 Gram-completion start, rounded to rotations;
            ``"random"``: random quaternions with the smooth cosine warm-up (``warmup_steps``).
        lr: Adam step size (components of unit vectors, renormalised after each step).
        init_steps: steps of the Gram completion at most (it stops earlier on convergence).
        rounding_starts: random orthogonal starts of the rounding to rotations.
        warmup_steps: with ``init="random"``: steps of the cosine loss before L_OR.
        max_steps: L_OR steps at most.
        min_steps: L_OR steps before the convergence test may stop.
        tol: stop when the loss improved by less than this fraction over ``window`` steps.
        window: steps of the convergence test.
        restarts: starts of the initialisation; the lowest L_OR after it goes on.
        lr_final: the L_OR step size decays geometrically from ``lr`` to ``lr_final`` over ``max_steps``.
        chunk_size: edges per pass of the gradient (bounds memory: ~100 bytes per edge).
        seed: of the random starts.
        device: torch device of the optimiser state and of in-process edge partitions
            (``None``: CPU; ``"cuda"`` on a GPU machine).
        loss: ``ρ`` of the L_OR residuals in the edge partitions built from these settings
            (:class:`EdgeObjective`'s ``robust``): ``"l2"`` (the paper's), ``"huber"``, ``"cauchy"``.
        loss_scale: δ of the robust loss, in radians.
    """

    init: str = "gram"
    lr: float = 0.05
    init_steps: int = 1500
    rounding_starts: int = 32
    warmup_steps: int = 300
    max_steps: int = 2000
    min_steps: int = 200
    tol: float = 1e-3
    window: int = 100
    restarts: int = 1
    lr_final: float = 0.002
    chunk_size: int = 1 << 20
    seed: int = 0
    device: str | None = None
    loss: str = "l2"
    loss_scale: float = 0.2

    def __post_init__(self) -> None:
        if self.loss not in ROBUST:
            raise CryoOrientError(f"unknown recovery loss {self.loss!r}; use one of {', '.join(ROBUST)}")
        if not (self.loss_scale > 0):
            raise CryoOrientError("recovery loss_scale must be > 0")
        if self.init not in INITS:
            raise CryoOrientError(f"unknown recovery init {self.init!r}; use one of {', '.join(INITS)}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise CryoOrientError("recovery lr and lr_final must be > 0")
        for name in ("init_steps", "warmup_steps", "max_steps", "min_steps", "window"):
            if getattr(self, name) < 0:
                raise CryoOrientError(f"recovery {name} must be >= 0")
        if self.restarts < 1 or self.rounding_starts < 1 or self.chunk_size < 1:
            raise CryoOrientError("recovery restarts, rounding_starts and chunk_size must be >= 1")

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a torch device (CPU when ``None``)."""
        return torch.device(self.device or "cpu")


@dataclass
class RecoveryResult:
    """Recovered quaternions and the optimisation trace.

    Attributes:
        quaternions: ``(P, 4)`` float64 unit quaternions (wxyz), canonical ``w ≥ 0``.
        loss: the loss at each step: the initialisation's (Gram completion or cosine warm-up)
            then L_OR (mean over edges).
        phase: ``"init"`` or ``"paper"`` for each entry of ``loss``.
        restart_losses: L_OR right after each start's initialisation.
        steps: steps taken in all (all restarts included).
        seconds: wall time.
        converged: whether the convergence test stopped L_OR before ``max_steps``.
        start: the start L_OR ran from where one was chosen among several (recovery on SO(3)/G:
            ``"anchors"`` or ``"spectral"``); None otherwise.
    """

    quaternions: np.ndarray
    loss: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    restart_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    converged: bool = False
    start: str | None = None

    @property
    def final_loss(self) -> float:
        return self.loss[-1] if self.loss else float("nan")


# ----------------------------------------------------------------------------------------------- optimiser


@dataclass(frozen=True)
class _Graph:
    """The whole pair graph to the optimiser: ``grad_fn(x, loss)`` (sums over all edges) and ``E``."""

    grad_fn: GradientFn
    n_edges: int

    def l_or(self, x: torch.Tensor) -> float:
        """L_OR (mean over the edges) of unit quaternions ``x (P, 4)``."""
        return self.grad_fn(x, "paper")[0] / self.n_edges


def _sum_partitions(parts: list[EdgeObjective], x: torch.Tensor, loss: str) -> tuple[float, float, torch.Tensor]:
    """``loss_and_grad`` of the whole graph: the sums over its partitions."""
    tot_or, tot, grad = 0.0, 0.0, None
    for p in parts:
        a, b, g = p.loss_and_grad(x, loss)
        tot_or, tot = tot_or + a, tot + b
        grad = g if grad is None else grad + g
    return tot_or, tot, grad


def _whole_graph(grad_fn: GradientFn | Sequence[EdgeObjective] | EdgeObjective, n_edges: int | None) -> _Graph:
    """The :class:`_Graph` of a gradient function or of in-process partitions; no edges is an error."""
    if isinstance(grad_fn, EdgeObjective):
        grad_fn = [grad_fn]
    if isinstance(grad_fn, (list, tuple)):
        parts = list(grad_fn)
        if n_edges is None:
            n_edges = sum(p.n_edges for p in parts)
        grad_fn = functools.partial(_sum_partitions, parts)
    if not n_edges:
        raise CryoOrientError("the pair graph has no edges: nothing to recover from")
    return _Graph(grad_fn, int(n_edges))


@dataclass(frozen=True)
class _Phase:
    """One optimisation phase: the loss minimised, at most ``steps`` Adam steps with the step size
    decaying geometrically from ``lr`` to ``lr_final``, and an optional convergence test on the trace."""

    loss: str
    steps: int
    lr: float
    lr_final: float
    stop: Callable[[list[float]], bool] | None = None


def _converged(s: RecoverySettings) -> Callable[[list[float]], bool]:
    """The convergence test: less than ``tol`` relative improvement over ``window`` steps (after ``min_steps``)."""

    def test(trace: list[float]) -> bool:
        n = len(trace)
        if n < max(s.min_steps, s.window + 1):
            return False
        old, new = trace[-s.window - 1], trace[-1]
        return old - new <= s.tol * max(old, 1e-12)

    return test


def _run_phase(
    x: torch.Tensor,
    graph: _Graph,
    phase: _Phase,
    trace: list[float],
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, int, bool]:
    """Riemannian Adam on the unit rows of ``x (P, m)``; appends the mean loss of each step to ``trace``.

    Returns ``(x, steps taken, whether phase.stop ended it)``.
    """
    param = x.clone().requires_grad_(False)
    opt = torch.optim.Adam([param], lr=phase.lr)
    gamma = (phase.lr_final / phase.lr) ** (1.0 / max(phase.steps, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    taken = 0
    for _ in range(phase.steps):
        _, l_used, g = graph.grad_fn(param, phase.loss)
        trace.append(l_used / graph.n_edges)
        g = torch.as_tensor(g, dtype=param.dtype, device=param.device)
        # Riemannian gradient: drop the radial part (the norm is fixed by the renormalisation).
        g = g - (g * param).sum(1, keepdim=True) * param
        param.grad = g / graph.n_edges
        opt.step()
        sched.step()
        with torch.no_grad():
            param /= param.norm(dim=1, keepdim=True).clamp_min(1e-12)
        taken += 1
        if on_step is not None:
            on_step(taken, trace[-1])
        if phase.stop is not None and phase.stop(trace):
            return param, taken, True
    return param, taken, False


ProgressFn = Callable[[str, int, int, float], None]


def _reporter(progress: ProgressFn | None, label: str, total: int) -> Callable[[int, float], None] | None:
    """``on_step(step, loss)`` of one phase for ``progress(label, step, total, loss)``."""
    if progress is None:
        return None
    return lambda k, val: progress(label, k, total, val)


# ----------------------------------------------------------------------------------------------- starts


def _project_to_rotations(m: torch.Tensor) -> torch.Tensor:
    """Nearest rotation matrices (Frobenius) to ``(P, 3, 3)`` CPU matrices (SVD, det +1).

    The same rotations as :func:`~cryoorient_ray.core.geometry.quaternion.special_procrustes` (to
    5e-14), kept for the rounding's sake: many of its random starts reach the same residual in
    different gauges, and the round-off of this projection decides which one is kept. roma's
    (Horn's method, or its SVD) picks other ones: an equivalent start, but another trajectory
    (the exact benchmark's E_OR 9.7e-6 → 1.3e-5 rad, 21 fewer steps).
    """
    u, _, vh = torch.linalg.svd(m)
    det = torch.det(u @ vh)
    d = torch.ones(m.shape[0], 3, dtype=m.dtype)
    d[:, 2] = det
    return u @ torch.diag_embed(d) @ vh


def _rounding_iterations(x: torch.Tensor, w: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    """Alternating projections from ``W``: rows of ``x·W`` to SO(3), then ``W`` by O(9) Procrustes."""
    r = _project_to_rotations((x @ w).reshape(-1, 3, 3))
    for _ in range(iters):
        u, _, vh = torch.linalg.svd(x.T @ r.reshape(-1, 9))  # O(9), not SO(9): no det correction
        w = u @ vh
        r = _project_to_rotations((x @ w).reshape(-1, 3, 3))
    res = float(((x @ w).reshape(-1, 3, 3) - r).pow(2).sum((1, 2)).mean())
    return w, res


def round_to_rotations(
    y: torch.Tensor, starts: int = 32, iters: int = 50, subset: int = 1000, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Rotations ``R_i`` with ``vec(R_i) ≈ √3·y_i·W`` for the best ``W ∈ O(9)``.

    ``y`` ``(P, 9)`` (unit rows) solves the Gram completion, which fixes ``vec(R_i)`` only up to
    an orthogonal map of R⁹. Alternating projections find one that makes every row a rotation:
    project ``y·W`` row-wise to SO(3), then ``W`` = orthogonal Procrustes onto those rotations.
    ``W`` is global, so the ``starts`` random starts run on a random ``subset`` of rows; the best
    (smallest mean ‖√3·y_i·W − R_i‖²) is refined on a larger subset and applied to every row.

    Returns ``(rotations (P, 3, 3) float64, residual)``.
    """
    x = y.detach().to(torch.float64) * math.sqrt(3.0)
    gen = torch.Generator().manual_seed(int(seed))
    p = x.shape[0]
    small = x if p <= subset else x[torch.randperm(p, generator=gen)[:subset]]
    best_res, best_w = math.inf, None
    for _ in range(starts):
        w0, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))
        w, res = _rounding_iterations(small, w0, iters)
        if res < best_res:
            best_res, best_w = res, w
    big = x if p <= 4 * subset else x[torch.randperm(p, generator=gen)[: 4 * subset]]
    w, res = _rounding_iterations(big, best_w, iters // 2)
    return _project_to_rotations((x @ w).reshape(-1, 3, 3)).numpy(), res


def _gram_start(n_nodes, graph: _Graph, s: RecoverySettings, seed: int, trace: list[float], on_step):
    """Rank-9 Gram completion (unit vectors in R⁹, target (1 + 2 cos d̂)/3), rounded to quaternions.

    Returns ``(quaternions (P, 4) float32, steps taken)``.
    """
    g = torch.Generator().manual_seed(int(seed))
    y0 = torch.randn(n_nodes, 9, generator=g)
    y0 = (y0 / y0.norm(dim=1, keepdim=True)).to(s.torch_device)
    phase = _Phase("gram", s.init_steps, s.lr, s.lr_final * 5, _converged(s))
    y, taken, _ = _run_phase(y0, graph, phase, trace, on_step)
    rot, _ = round_to_rotations(y.cpu(), starts=s.rounding_starts, seed=seed)
    q = torch.as_tensor(np.asarray(rotmat_to_unitquat(rot)), dtype=torch.float32, device=s.torch_device)
    return q, taken


def _random_start(n_nodes, graph: _Graph, s: RecoverySettings, seed: int, trace: list[float], on_step):
    """Random quaternions and ``warmup_steps`` of the smooth cosine loss; ``(quaternions (P, 4), steps)``."""
    q0 = random_unitquat(n_nodes, seed=seed).to(s.torch_device)
    q, taken, _ = _run_phase(q0, graph, _Phase("cosine", s.warmup_steps, s.lr, s.lr), trace, on_step)
    return q, taken


@dataclass
class _Start:
    """Where L_OR starts: ``(P, 4)`` quaternions, the initialisation's loss trace, each restart's
    L_OR and the steps the initialisation took."""

    q: torch.Tensor
    trace: list[float] = field(default_factory=list)
    restart_losses: list[float] = field(default_factory=list)
    steps: int = 0


def _given_start(init: np.ndarray, n_nodes: int, s: RecoverySettings) -> _Start:
    """A start given by the caller (normalised; no initialisation)."""
    init_t = torch.as_tensor(np.asarray(init), dtype=torch.float32, device=s.torch_device)
    if init_t.shape != (n_nodes, 4):
        raise CryoOrientError(f"init must be ({n_nodes}, 4); got {tuple(init_t.shape)}")
    return _Start(init_t / init_t.norm(dim=1, keepdim=True))


def _best_start(n_nodes: int, graph: _Graph, s: RecoverySettings, progress: ProgressFn | None) -> _Start:
    """``s.restarts`` initialisations (``s.init``); the one with the lowest L_OR is kept."""
    if s.init == "gram":
        start_fn, label, total = _gram_start, "init (Gram)", s.init_steps
    else:
        start_fn, label, total = _random_start, "warm-up", s.warmup_steps
    best, best_loss = _Start(q=None), math.inf
    for r in range(s.restarts):
        trace: list[float] = []
        suffix = f" {r + 1}/{s.restarts}" if s.restarts > 1 else ""
        on_step = _reporter(progress, label + suffix, total)
        q, taken = start_fn(n_nodes, graph, s, s.seed * 1000 + r, trace, on_step)
        best.steps += taken
        final = graph.l_or(q)
        best.restart_losses.append(final)
        if final < best_loss:
            best.q, best.trace, best_loss = q, trace, final
    return best


def _canonical(q: torch.Tensor) -> np.ndarray:
    """``(P, 4)`` float64 unit quaternions with ``w ≥ 0``."""
    qn = q.detach().cpu().double()
    qn = qn / qn.norm(dim=1, keepdim=True)
    return torch.where(qn[:, :1] < 0, -qn, qn).numpy()


def recover_orientations(
    n_nodes: int,
    grad_fn: GradientFn | Sequence[EdgeObjective] | EdgeObjective,
    n_edges: int | None = None,
    settings: RecoverySettings | None = None,
    init: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> RecoveryResult:
    """Minimise L_OR over ``n_nodes`` unit quaternions.

    Args:
        n_nodes: number of projections ``P``.
        grad_fn: ``f(x (P, m) tensor, loss) -> (L_OR sum, loss sum, gradient (P, m))`` over the
            whole graph — or one or several :class:`EdgeObjective` partitions, summed in-process.
        n_edges: number of edges of the whole graph (default: summed from the partitions).
        settings: :class:`RecoverySettings`.
        init: optional ``(P, 4)`` start (skips the initialisation and its restarts).
        progress: ``progress(phase, step, total, loss)`` after every step.

    Returns:
        :class:`RecoveryResult`.
    """
    s = settings or RecoverySettings()
    graph = _whole_graph(grad_fn, n_edges)
    t0 = time.perf_counter()
    start = _best_start(n_nodes, graph, s, progress) if init is None else _given_start(init, n_nodes, s)
    # The random start's warm-up leaves L_OR far off: full steps. From the Gram start (or a given
    # one) L_OR only refines: a fifth of them.
    lr = s.lr if init is None and s.init == "random" else s.lr * 0.2
    trace: list[float] = []
    phase = _Phase("paper", s.max_steps, lr, s.lr_final, _converged(s))
    q, taken, converged = _run_phase(start.q, graph, phase, trace, _reporter(progress, "L_OR", s.max_steps))
    return RecoveryResult(
        quaternions=_canonical(q),
        loss=start.trace + trace + [graph.l_or(q)],
        phase=["init"] * len(start.trace) + ["paper"] * (len(trace) + 1),
        restart_losses=start.restart_losses,
        steps=start.steps + taken,
        seconds=time.perf_counter() - t0,
        converged=converged,
    )
