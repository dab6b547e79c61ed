"""Orientation recovery: unit quaternions whose distances match the estimated ones on a pair graph.

Minimises the paper's objective (Banjac et al. 2021, eq. 5) over the edges ``(i, j)`` of a sparse
pair graph (:mod:`cryoorient_ray.core.recovery.graph`)

    L_OR = mean_edges |d̂_ij − d_q(q̂_i, q̂_j)|²,      d_q = 2·arccos|⟨q̂_i, q̂_j⟩|,

with Adam on ``(P, 4)`` quaternions, renormalised to S³ after every step.

Two things make it fast and reliable where the paper's recovery took hours:

- **Analytic gradients on edge lists.** ``∂L/∂q_i`` is ``∂ℓ/∂⟨q_i, q_j⟩ · q_j`` summed over the
  edges with ``index_add_``: one pass over ``E`` edges, no autograd graph. :class:`EdgeObjective`
  holds one *partition* of the edges and returns ``(loss sum, gradient)``; partitions add up, so
  the same optimiser runs in-process (one partition) or with partitions on Ray actors
  (:mod:`cryoorient_ray.distributed.recover_actors`), the driver summing their gradients (synchronous
  data parallelism: every step sees the gradient of the whole graph, so results do not depend on
  the number of actors).
- **A smooth warm start.** The first phase minimises ``|cos d̂_ij − cos d_q|²`` where
  ``cos d_q = 2⟨q̂_i, q̂_j⟩² − 1`` is a polynomial of the quaternions: no arccos singularity,
  large basins. The paper's ``L_OR`` then finishes. Several random starts run the warm phase
  and the one with the lowest ``L_OR`` is kept (restarts).

``L_OR`` is tracked at every step; the paper shows it is a usable proxy for the orientation error
when no ground truth exists. The solution is defined up to the O(4) transformations of S³ that
preserve all distances; :mod:`cryoorient_ray.core.recovery.gauge` picks the physical one from the images.

Quaternions are scalar-first ``(w, x, y, z)``. This module never imports ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "EdgeObjective",
    "RecoveryResult",
    "RecoverySettings",
    "random_unit_quaternions",
    "recover_orientations",
]

LOSSES = ("paper", "cosine", "gram")
INITS = ("gram", "random")
# sin(d/2) below which the arccos gradient is capped (d ≈ 1e-3 rad): keeps steps finite at d → 0.
_MIN_SIN = 5e-4


def random_unit_quaternions(n: int, seed: int | None = 0, dtype=torch.float32) -> torch.Tensor:
    """``(n, 4)`` quaternions uniform on S³ (normalised Gaussians), scalar-first."""
    g = torch.Generator().manual_seed(int(seed) if seed is not None else int(time.time_ns() % 2**31))
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return (q / q.norm(dim=1, keepdim=True)).to(dtype)


class EdgeObjective:
    """Loss and gradient of one partition of the pair graph.

    Args:
        i, j: ``(E,)`` node indices of the edges.
        d: ``(E,)`` target distances d̂ in radians (finite, in ``[0, π]``; see
            :func:`check_distances`).
        weights: optional ``(E,)`` non-negative weights (default 1).
        chunk_size: edges per pass (bounds memory).
    """

    def __init__(self, i, j, d, weights=None, chunk_size: int = 1 << 20, device=None):
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
                g_dot = 2.0 * res * (-2.0 * torch.sign(dot) / s.clamp_min(_MIN_SIN))
                l_used = l_or
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


@dataclass
class RecoverySettings:
    """Optimiser settings (defaults measured on exact and noisy distances, docs/BENCHMARKS.md).

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
        seed: of the random starts.
        device: torch device of the optimiser state and of in-process edge partitions
            (``None``: CPU; ``"cuda"`` on a GPU machine).
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
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise CryoOrientError(f"unknown recovery init {self.init!r}; use one of {', '.join(INITS)}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise CryoOrientError("recovery lr and lr_final must be > 0")
        for name in ("init_steps", "warmup_steps", "max_steps", "min_steps", "window"):
            if getattr(self, name) < 0:
                raise CryoOrientError(f"recovery {name} must be >= 0")
        if self.restarts < 1 or self.rounding_starts < 1:
            raise CryoOrientError("recovery restarts and rounding_starts must be >= 1")


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
    """

    quaternions: np.ndarray
    loss: list[float] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    restart_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    converged: bool = False

    @property
    def final_loss(self) -> float:
        return self.loss[-1] if self.loss else float("nan")


def _converged(s: RecoverySettings, min_steps: int):
    def test(trace: list[float]) -> bool:
        n = len(trace)
        if n < max(min_steps, s.window + 1):
            return False
        old, new = trace[-s.window - 1], trace[-1]
        return old - new <= s.tol * max(old, 1e-12)

    return test


def _run_phase(
    q: torch.Tensor,
    grad_fn: GradientFn,
    n_edges: int,
    loss: str,
    steps: int,
    lr: float,
    lr_final: float,
    trace: list[float],
    on_step: Callable[[int, float], None] | None,
    stop: Callable[[list[float]], bool] | None = None,
) -> tuple[torch.Tensor, int, bool]:
    param = q.clone().requires_grad_(False)
    opt = torch.optim.Adam([param], lr=lr)
    gamma = (lr_final / lr) ** (1.0 / max(steps, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    taken = 0
    for _ in range(steps):
        _, l_used, g = grad_fn(param, loss)
        trace.append(l_used / n_edges)
        g = torch.as_tensor(g, dtype=param.dtype, device=param.device)
        # Riemannian gradient: drop the radial part (the norm is fixed by the renormalisation).
        g = g - (g * param).sum(1, keepdim=True) * param
        param.grad = g / n_edges
        opt.step()
        sched.step()
        with torch.no_grad():
            param /= param.norm(dim=1, keepdim=True).clamp_min(1e-12)
        taken += 1
        if on_step is not None:
            on_step(taken, trace[-1])
        if stop is not None and stop(trace):
            return param, taken, True
    return param, taken, False


def project_to_rotations(m: torch.Tensor) -> torch.Tensor:
    """Nearest rotation matrices (Frobenius) to ``(P, 3, 3)`` matrices (SVD, det +1)."""
    u, _, vh = torch.linalg.svd(m)
    det = torch.det(u @ vh)
    d = torch.ones(m.shape[0], 3, dtype=m.dtype)
    d[:, 2] = det
    return u @ torch.diag_embed(d) @ vh


def _rounding_iterations(x: torch.Tensor, w: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    r = project_to_rotations((x @ w).reshape(-1, 3, 3))
    for _ in range(iters):
        u, _, vh = torch.linalg.svd(x.T @ r.reshape(-1, 9))
        w = u @ vh
        r = project_to_rotations((x @ w).reshape(-1, 3, 3))
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
    return project_to_rotations((x @ w).reshape(-1, 3, 3)).numpy(), res


def _gram_start(n_nodes, grad_fn, n_edges, s: RecoverySettings, seed: int, trace: list[float], on_step):
    """Rank-9 Gram completion (unit vectors in R⁹, target (1 + 2 cos d̂)/3), rounded to quaternions."""
    from cryoorient_ray.core.geometry.quaternion import rotmat_to_unitquat

    g = torch.Generator().manual_seed(int(seed))
    y0 = torch.randn(n_nodes, 9, generator=g)
    y0 = (y0 / y0.norm(dim=1, keepdim=True)).to(s.device or "cpu")
    y, taken, _ = _run_phase(
        y0, grad_fn, n_edges, "gram", s.init_steps, s.lr, s.lr_final * 5, trace, on_step, _converged(s, s.min_steps)
    )
    rot, _ = round_to_rotations(y.cpu(), starts=s.rounding_starts, seed=seed)
    q = torch.as_tensor(np.asarray(rotmat_to_unitquat(rot)), dtype=torch.float32, device=s.device or "cpu")
    return q, taken


def recover_orientations(
    n_nodes: int,
    grad_fn: GradientFn | Sequence[EdgeObjective] | EdgeObjective,
    n_edges: int | None = None,
    settings: RecoverySettings | None = None,
    init: np.ndarray | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
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
    if isinstance(grad_fn, EdgeObjective):
        grad_fn = [grad_fn]
    if isinstance(grad_fn, (list, tuple)):
        parts = list(grad_fn)
        if n_edges is None:
            n_edges = sum(p.n_edges for p in parts)

        def fn(q, loss):
            tot_or, tot, grad = 0.0, 0.0, None
            for p in parts:
                a, b, g = p.loss_and_grad(q, loss)
                tot_or, tot = tot_or + a, tot + b
                grad = g if grad is None else grad + g
            return tot_or, tot, grad

        grad_fn = fn
    if not n_edges:
        raise CryoOrientError("the pair graph has no edges: nothing to recover from")
    t0 = time.perf_counter()
    result = RecoveryResult(quaternions=np.zeros((n_nodes, 4)))
    total_steps = 0

    def reporter(phase: str, total: int):
        if progress is None:
            return None
        return lambda k, val: progress(phase, k, total, val)

    if init is not None:
        init_t = torch.as_tensor(np.asarray(init), dtype=torch.float32, device=s.device or "cpu")
        if init_t.shape != (n_nodes, 4):
            raise CryoOrientError(f"init must be ({n_nodes}, 4); got {tuple(init_t.shape)}")
        best = init_t / init_t.norm(dim=1, keepdim=True)
        best_trace: list[float] = []
    else:
        best, best_trace, best_loss = None, [], math.inf
        for r in range(s.restarts):
            trace: list[float] = []
            suffix = f" {r + 1}/{s.restarts}" if s.restarts > 1 else ""
            if s.init == "gram":
                q, taken = _gram_start(
                    n_nodes,
                    grad_fn,
                    n_edges,
                    s,
                    s.seed * 1000 + r,
                    trace,
                    reporter("init (Gram)" + suffix, s.init_steps),
                )
            else:
                q0 = random_unit_quaternions(n_nodes, seed=s.seed * 1000 + r).to(s.device or "cpu")
                q, taken, _ = _run_phase(
                    q0,
                    grad_fn,
                    n_edges,
                    "cosine",
                    s.warmup_steps,
                    s.lr,
                    s.lr,
                    trace,
                    reporter("warm-up" + suffix, s.warmup_steps),
                )
            total_steps += taken
            final = grad_fn(q, "paper")[0] / n_edges
            result.restart_losses.append(final)
            if final < best_loss:
                best, best_trace, best_loss = q, trace, final

    paper_trace: list[float] = []
    q, taken, conv = _run_phase(
        best,
        grad_fn,
        n_edges,
        "paper",
        s.max_steps,
        s.lr if init is None and s.init == "random" else s.lr * 0.2,
        s.lr_final,
        paper_trace,
        reporter("L_OR", s.max_steps),
        stop=_converged(s, s.min_steps),
    )
    total_steps += taken
    final_or = grad_fn(q, "paper")[0] / n_edges
    qn = q.detach().cpu().double()
    qn = qn / qn.norm(dim=1, keepdim=True)
    qn = torch.where(qn[:, :1] < 0, -qn, qn)
    result.quaternions = qn.numpy()
    result.loss = best_trace + paper_trace + [final_or]
    result.phase = ["init"] * len(best_trace) + ["paper"] * (len(paper_trace) + 1)
    result.steps = total_steps
    result.seconds = time.perf_counter() - t0
    result.converged = conv
    return result
