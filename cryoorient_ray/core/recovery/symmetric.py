"""Orientation recovery on SO(3)/G: a point group G, distances that are the minimum over mates.

With a point group G the images fix an orientation only up to ``q ~ q ⊗ g`` (``g ∈ G``) and the
distance they can tell is ``d_G(q_i, q_j) = min_g d_q(q_i, q_j ⊗ g)``
(:func:`~cryoorient_ray.core.geometry.symmetry.symmetric_quat_distance`). Two things of the C1
recovery (:mod:`cryoorient_ray.core.recovery.solver`) break there, and this module replaces them:

- **The loss.** L_OR must compare ``d̂_ij`` with ``d_G``, not ``d_q``:
  :class:`SymmetricEdgeObjective` takes, per edge, the mate ``g*`` with the largest
  ``|⟨q_i, q_j ⊗ g⟩|`` and its gradient flows through that mate (``∂/∂q_i = … q_j ⊗ g*``,
  ``∂/∂q_j = … R(g*)ᵀ q_i`` with ``q ⊗ g = R(g) q``). It is a drop-in partition for
  :func:`~cryoorient_ray.core.recovery.solver.recover_orientations` (losses ``"paper"`` and
  ``"cosine"``).
- **The start.** The Gram start uses ``⟨vec R_i, vec R_j⟩ = 1 + 2 cos d_q``, which holds only
  for the nearest mate of each pair, and there is no G-invariant feature whose inner products
  are a function of ``d_G`` alone; a Gram start on the short edges only (where the nearest mate
  is unambiguous) crumples, because SO(3)/G is not simply connected and admits no global lift.
  Measured with exact D2 distances (P = 1,000): C1 Gram + L_OR 0.88 rad, Gram then symmetric
  L_OR 0.87, Gram on edges < 0.5 rad then symmetric L_OR 0.88, random starts + symmetric L_OR
  0.78–1.03. What works is **anchors and trilateration** (:func:`anchor_start`):

  1. ``K`` anchor projections (default 16), chosen at random, and the ``K(K−1)/2`` distances
     between them: a tiny complete graph, solved by many random starts at once (a batch of
     ``(R, K, 4)`` quaternions, Adam on the symmetric L_OR with an annealed soft minimum over
     mates, :func:`anchor_solutions`). ``3K − 3`` unknowns against ``K(K−1)/2`` distances: rigid.
     About 1 % of the starts succeed; when none did (the residual stays far above 0), another
     set of anchors is tried. With noisy d̂ the anchors' own fit cannot tell the right solution
     from wrong ones that fit the noise as well (D2 at σ² = 0.1: the best anchor fit gave E_OR
     0.84 rad, the true anchors 0.125), so the ``candidates`` best anchor solutions are each
     carried through step 2 and the one whose start fits **all** the distances best (the
     node–anchor and pair-graph edges, :func:`start_residual`) is kept. Even so 16 anchors are
     too few under noise: their 120 distances are fitted better by wrong configurations (mean
     squared residual 0.06) than by the true one (0.10 ≈ σ²); with 32 anchors (496 distances)
     the true configuration fits best, and the second attempt uses twice the anchors.
     Measured (D2, P = 1,000, σ² = 0.1, the ``symmetry`` benchmark's graph): the best anchor fit
     alone 0.84 rad; selection by the start residual 0.72; with 32 anchors 0.107 (the true
     16 anchors gave 0.125).
  2. Every projection's distances to the anchors (``P × K`` more edges, which the estimator can
     give for any pair) place it by a grid search over SO(3)/G: the table ``d_G(c, a_k)`` of
     ``n_candidates`` random rotations ``c`` to the anchors, then the candidate whose row is
     nearest to the projection's own (one matrix product for all projections).
  3. The symmetric L_OR on all edges (the pair graph plus the anchor edges) from there.

  It needs nothing of the full group: it runs for C1 too, and for restricted coverage (where the
  C1 Gram start also stays exact, measured: half and quarter coverage, E_OR 0).

  With *learned* d̂ on D2 the anchors' own fit has wrong minima that no search avoided (the
  ``symmetry`` benchmark's 5a1a: the true 32 anchors fit d̂ at 0.030 rad², the annealed fit found
  0.054, a beam 0.039–0.045; E_OR 0.58). For D2, :func:`recover_symmetric` therefore also runs the
  **spectral start** (:mod:`cryoorient_ray.core.recovery.spectral`: every pair's d̂ of up to 2,000
  projections, the band-2 eigenvectors of a kernel of d̂, no anchors) and keeps the start whose
  :func:`start_residual` over the pair graph is lower; from the spectral start the L_OR phase also
  gets 128 random edges per projection from the d̂ it already has. Measured on that 5a1a store:
  E_OR 0.168 from the spectral start alone, 0.114 after the L_OR phase.

Quaternions are scalar-first ``(w, x, y, z)``. Pure numpy/torch: no ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cryoorient_ray.core.geometry.quaternion import quat_canonicalize, random_unitquat
from cryoorient_ray.core.geometry.symmetry import SymmetryGroup, symmetry_group
from cryoorient_ray.core.recovery.solver import (
    _MIN_SIN,
    EdgeObjective,
    RecoveryResult,
    RecoverySettings,
    recover_orientations,
)
from cryoorient_ray.errors import CryoOrientError

__all__ = [
    "AnchorStart",
    "SymmetricEdgeObjective",
    "anchor_solutions",
    "anchor_start",
    "beam_anchor_starts",
    "choose_anchors",
    "recover_symmetric",
    "right_mult_matrices",
    "solve_anchors",
    "start_residual",
    "trilaterate",
    "with_anchor_edges",
]


def _group(symmetry: SymmetryGroup | str) -> SymmetryGroup:
    return symmetry if isinstance(symmetry, SymmetryGroup) else symmetry_group(symmetry)


def right_mult_matrices(g) -> torch.Tensor:
    """``(G, 4, 4)`` matrices ``M(g)`` with ``q ⊗ g = M(g) q`` for quaternions ``g (G, 4)`` (wxyz)."""
    g = torch.as_tensor(np.asarray(g) if not isinstance(g, torch.Tensor) else g)
    w, x, y, z = g.unbind(-1)
    rows = (
        torch.stack([w, -x, -y, -z], -1),
        torch.stack([x, w, z, -y], -1),
        torch.stack([y, -z, w, x], -1),
        torch.stack([z, y, -x, w], -1),
    )
    return torch.stack(rows, -2)


class SymmetricEdgeObjective(EdgeObjective):
    """Loss and gradient of one partition of the pair graph with the symmetry-aware ``d_G``.

    As :class:`~cryoorient_ray.core.recovery.solver.EdgeObjective`, with ``symmetry`` the point
    group (a name or a :class:`SymmetryGroup`). Per edge the mate ``g*`` maximising
    ``|⟨q_i, q_j ⊗ g⟩|`` is chosen and the loss and gradient are those of ``d_q(q_i, q_j ⊗ g*)``.
    Losses ``"paper"`` (L_OR) and ``"cosine"``; ``"gram"`` (the C1 Gram start) is refused.
    Memory: ``E × G × 4`` floats per chunk (use a smaller ``chunk_size`` for ``I``).
    """

    def __init__(
        self, i, j, d, symmetry: SymmetryGroup | str = "C1", weights=None, chunk_size: int = 1 << 18, device=None
    ):
        super().__init__(i, j, d, weights=weights, chunk_size=chunk_size, device=device)
        self.group = _group(symmetry)
        gq = torch.tensor(np.array(self.group.quaternions), dtype=torch.float32, device=self.device)
        self.mates = right_mult_matrices(gq)  # (G, 4, 4)

    def loss_and_grad(self, q, loss: str = "paper"):
        if loss == "gram":
            raise CryoOrientError("the Gram start assumes the full group: with a point group use the anchor start")
        if loss not in ("paper", "cosine"):
            raise CryoOrientError(f"unknown loss {loss!r}; use paper or cosine")
        was_np = not isinstance(q, torch.Tensor)
        qt = torch.as_tensor(np.asarray(q) if was_np else q, dtype=torch.float32, device=self.device)
        grad = torch.zeros_like(qt)
        l_or = l_used = 0.0
        for a in range(0, self.n_edges, self.chunk_size):
            sl = slice(a, a + self.chunk_size)
            i, j, d = self.i[sl], self.j[sl], self.d[sl]
            qi, qj = qt[i], qt[j]
            qjg = torch.einsum("gab,eb->ega", self.mates, qj)  # q_j ⊗ g for every mate
            dots = (qi[:, None, :] * qjg).sum(-1)
            k = dots.abs().argmax(1)
            rows = torch.arange(len(k), device=self.device)
            dot, mate = dots[rows, k], qjg[rows, k]
            w = None if self.w is None else self.w[sl]
            c = dot.abs().clamp(max=1.0)
            s = torch.sqrt((1.0 - c * c).clamp_min(0.0))
            res = 2.0 * torch.atan2(s, c) - d
            l_or += float(((res * res) if w is None else w * res * res).sum())
            if loss == "paper":
                g_dot = 2.0 * res * (-2.0 * torch.sign(dot) / s.clamp_min(_MIN_SIN))
                l_used = l_or
            else:
                rc = 2.0 * dot * dot - 1.0 - self.cos_d[sl]
                l_used += float(((rc * rc) if w is None else w * rc * rc).sum())
                g_dot = 8.0 * rc * dot
            if w is not None:
                g_dot = g_dot * w
            grad.index_add_(0, i, g_dot[:, None] * mate)
            grad.index_add_(0, j, g_dot[:, None] * torch.einsum("eba,eb->ea", self.mates[k], qi))
        if was_np:
            return l_or, l_used, grad.cpu().numpy()
        return l_or, l_used, grad.to(q.device)


# ----------------------------------------------------------------------------------------------- anchors


def choose_anchors(n_nodes: int, k: int = 12, seed: int = 0) -> np.ndarray:
    """``k`` distinct random node indices (sorted); all nodes when ``n_nodes <= k``."""
    if n_nodes < 3:
        raise CryoOrientError(f"orientation recovery needs at least 3 projections; got {n_nodes}")
    k = min(int(k), n_nodes)
    if k < 4:
        raise CryoOrientError(f"need at least 4 anchors; got {k}")
    return np.sort(np.random.default_rng(seed + 7).choice(n_nodes, k, replace=False))


def _hamilton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ⊗ b`` of broadcast ``(..., 4)`` tensors (wxyz), differentiable, no reordering."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        -1,
    )


def _batched_mate_distances(q: torch.Tensor, group_q: torch.Tensor, iu: torch.Tensor, ju: torch.Tensor) -> torch.Tensor:
    """``d_q(q_i, q_j ⊗ g)``, ``(R, M, G)``, for the pairs ``(iu, ju)`` of each row of ``q (R, K, 4)``, every mate.

    ``⟨q_i, q_j ⊗ g⟩ = ⟨q_j* ⊗ q_i, g⟩``: one relative quaternion per pair, one product with the group.
    """
    conj = q.new_tensor([1.0, -1.0, -1.0, -1.0])
    rel = _hamilton(q[:, ju] * conj, q[:, iu])  # (R, M, 4)
    dots = (rel @ group_q.T).abs().clamp(max=1.0 - 1e-7)
    return 2.0 * torch.acos(dots)


def _batched_fit(
    x: torch.Tensor,
    target: torch.Tensor,
    group_q: torch.Tensor,
    steps: int,
    lr: float,
    temperature: float,
    t_end: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on a batch ``x (R, K, 4)`` of complete graphs against ``target`` (the upper triangle of
    ``(K, K)`` distances); the min over mates is a soft minimum whose temperature anneals from
    ``temperature`` to ``t_end``; the step size decays ×20. Returns ``(x, hard symmetric L_OR (R,))``."""
    k = x.shape[1]
    iu, ju = torch.triu_indices(k, k, 1)
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for step in range(steps):
        frac = step / max(steps, 1)
        temp = temperature * (t_end / temperature) ** frac
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 / 20.0) ** frac
        d = _batched_mate_distances(x, group_q, iu, ju)
        soft = -temp * torch.logsumexp(-d / temp, dim=-1) if group_q.shape[0] > 1 else d[..., 0]
        loss = ((soft - target) ** 2).mean(1)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            x /= x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        res = _batched_mate_distances(x, group_q, iu, ju).amin(-1) - target
        return x.detach(), (res * res).mean(1)


def solve_anchors(
    d_anchors: np.ndarray,
    symmetry: SymmetryGroup | str = "C1",
    restarts: int = 512,
    steps: int = 800,
    lr: float = 0.05,
    temperature: float = 0.3,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Orientations ``(K, 4)`` of ``K`` anchors from their ``(K, K)`` distances, and the final mean squared residual.

    ``restarts`` random starts optimised together (Adam, renormalised to S³ each step, the step
    size decaying ×20 over ``steps``); the one with the lowest symmetric L_OR wins. The min over
    mates is smoothed to a soft minimum ``−T·log Σ_g exp(−d_q(q_i, q_j ⊗ g)/T)`` with ``T``
    annealed from ``temperature`` to 10⁻³. Measured on 12 and 20 D2 anchors: with the hard
    minimum none of 256 starts found the solution (best residual 5·10⁻³), annealed from 0.3
    about 1 % do (residual 10⁻⁸ or less, E_OR 3·10⁻⁴ rad); with 6 or 8 anchors (too few
    distances: spurious exact fits) or from T = 0.6, none did. A failed solve shows as a residual
    far above 0 (:func:`recover_symmetric` then tries other anchors).
    """
    (best_q, best_loss), *_ = anchor_solutions(d_anchors, symmetry, restarts, steps, lr, temperature, seed, top=1)
    return best_q, best_loss


def anchor_solutions(
    d_anchors: np.ndarray,
    symmetry: SymmetryGroup | str = "C1",
    restarts: int = 512,
    steps: int = 800,
    lr: float = 0.05,
    temperature: float = 0.3,
    seed: int = 0,
    top: int = 8,
) -> list[tuple[np.ndarray, float]]:
    """The ``top`` restarts of :func:`solve_anchors` with the lowest anchor residual, best first:
    ``[(orientations (K, 4), mean squared residual), ...]``.

    For groups of order ≥ :data:`BEAM_MIN_ORDER` (O, I) the random starts are replaced by
    :func:`beam_anchor_starts` (``restarts`` of them), polished at a low temperature."""
    dk = torch.as_tensor(np.asarray(d_anchors), dtype=torch.float32)
    k = dk.shape[0]
    if dk.shape != (k, k) or k < 4:
        raise CryoOrientError(f"anchor distances must be (K, K) with K >= 4; got {tuple(dk.shape)}")
    grp = _group(symmetry)
    group_q = torch.tensor(np.array(grp.quaternions), dtype=torch.float32)
    iu, ju = torch.triu_indices(k, k, 1)
    if grp.order >= BEAM_MIN_ORDER:
        x0 = beam_anchor_starts(dk.numpy(), grp, starts=restarts, seed=seed)
        x, loss = _batched_fit(x0, dk[iu, ju], group_q, max(steps, 1000), 0.003, 0.003, t_end=1e-4)
        order = torch.argsort(loss)[: max(1, int(top))]
        return [(x[r].double().numpy(), float(loss[r])) for r in order.tolist()]
    x0 = random_unitquat(restarts * k, seed=seed).view(restarts, k, 4)
    x, loss = _batched_fit(x0, dk[iu, ju], group_q, steps, lr, temperature)
    order = torch.argsort(loss)[: max(1, int(top))]
    return [(x[r].double().numpy(), float(loss[r])) for r in order.tolist()]


# From this group order on (O: 24, I: 60) the anchors start from a beam search instead of random
# starts. SO(3)/I is small (no two orientations farther apart than 0.72 rad) and its 60 mates make
# the annealed fit's landscape rugged: with exact I distances between 16 anchors none of 128 random
# starts reached a residual below 2.6·10⁻³ at temperatures 0.3, 0.1 or 0.03 (800 steps each).
BEAM_MIN_ORDER = 24


def beam_anchor_starts(
    d_anchors: np.ndarray,
    symmetry: SymmetryGroup | str,
    starts: int = 128,
    n_candidates: int = 4000,
    beam: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """``(starts, K, 4)`` anchor configurations placed one anchor at a time on a candidate set.

    Anchor 0 sits at the identity (the distances are invariant under ``q → s ⊗ q``); anchor ``k``
    is every one of ``n_candidates`` random rotations (plus the identity) for each of the ``beam``
    partial configurations kept, scored by the squared residual of its ``d_G`` to anchors
    ``0 … k − 1`` (a table of ``d_G`` between candidates, computed once), and the ``beam`` lowest
    totals go on. The ``starts`` best full configurations are returned for a polish
    (:func:`anchor_solutions`). Measured on exact I distances between 16 anchors (4,000
    candidates): the beam's best configurations fit to a residual of 1.2·10⁻³ rad² (the
    candidates' spacing), and after polishing the 128 best (1,000 steps) one reached 7·10⁻⁸,
    the anchors then within 3·10⁻⁴ rad of the truth; polishing only the 64 best did not reach it.
    """
    grp = _group(symmetry)
    dk = torch.as_tensor(np.asarray(d_anchors), dtype=torch.float32)
    k = dk.shape[0]
    cand = torch.cat([torch.tensor([[1.0, 0.0, 0.0, 0.0]]), random_unitquat(int(n_candidates) - 1, seed=seed + 7)])
    c = cand.shape[0]
    table = _symmetric_distance_table(cand, cand, grp, chunk=256)  # 256 × C × |G| dots at a time
    paths = torch.zeros(1, 1, dtype=torch.long)  # anchor 0 at candidate 0, the identity
    total = torch.zeros(1)
    for a in range(1, k):
        r = ((table[:, paths] - dk[a, :a]) ** 2).sum(-1).T  # (paths, candidates)
        scores = (total[:, None] + r).reshape(-1)
        keep = torch.topk(-scores, min(int(beam), scores.numel())).indices
        paths = torch.cat([paths[keep // c], (keep % c)[:, None]], 1)
        total = scores[keep]
    return cand[paths[: max(1, int(starts))]].clone()


def _symmetric_distance_table(x: torch.Tensor, y: torch.Tensor, grp: SymmetryGroup, chunk: int = 4096) -> torch.Tensor:
    """``(N, M)`` ``d_G(x_n, y_m)`` of float32 quaternions ``x (N, 4)`` and ``y (M, 4)``, ``chunk`` rows at a time."""
    mates = right_mult_matrices(torch.tensor(np.array(grp.quaternions), dtype=torch.float32))
    yg = torch.einsum("gab,kb->kga", mates, y)  # (M, G, 4): every mate of every y
    rows = []
    for s in range(0, x.shape[0], chunk):
        dots = torch.einsum("ca,kga->ckg", x[s : s + chunk], yg).abs().amax(-1).clamp(max=1.0)
        rows.append(2.0 * torch.acos(dots))
    return torch.cat(rows)


def trilaterate(
    d_to_anchors: np.ndarray,
    anchors_q: np.ndarray,
    symmetry: SymmetryGroup | str = "C1",
    n_candidates: int = 60000,
    chunk: int = 4096,
    seed: int = 0,
) -> np.ndarray:
    """Place each node from its distances ``(P, K)`` to anchors at ``anchors_q (K, 4)``: ``(P, 4)``.

    Candidates: ``max(4000, n_candidates / |G|)`` random rotations (SO(3)/G is |G| times smaller,
    so the grid density there is that of ``n_candidates`` on SO(3): ≈ 0.11 rad spacing for 60,000).
    Each node takes the candidate minimising ``Σ_k |d̂_ik − d_G(c, a_k)|²``.
    """
    grp = _group(symmetry)
    dt = torch.as_tensor(np.asarray(d_to_anchors), dtype=torch.float32)
    a = torch.as_tensor(np.asarray(anchors_q), dtype=torch.float32)
    if dt.ndim != 2 or dt.shape[1] != a.shape[0]:
        raise CryoOrientError(f"distances to anchors must be (P, {a.shape[0]}); got {tuple(dt.shape)}")
    n_c = max(4000, int(n_candidates) // grp.order)
    cand = random_unitquat(n_c, seed=seed + 101)
    t = _symmetric_distance_table(cand, a, grp, chunk)  # (C, K)
    # ‖d_i − t_c‖² = ‖d_i‖² − 2 d_i·t_c + ‖t_c‖²; the first term does not change the argmin
    out = torch.empty(dt.shape[0], 4)
    tn = (t * t).sum(1)
    for s in range(0, dt.shape[0], chunk):
        score = tn[None, :] - 2.0 * dt[s : s + chunk] @ t.T
        out[s : s + chunk] = cand[score.argmin(1)]
    return out.double().numpy()


def with_anchor_edges(i, j, d, anchors: np.ndarray, d_to_anchors: np.ndarray):
    """The pair graph's edges plus every node–anchor edge (no self-pairs, no duplicates; the graph's
    own d̂ kept where both have an edge): ``(i, j, d)``."""
    p, k = d_to_anchors.shape
    anchor_edges = (np.repeat(np.arange(p), k), np.tile(np.asarray(anchors), p), np.asarray(d_to_anchors).reshape(-1))
    return _merge_edges((i, j, d), anchor_edges)


def _merge_edges(*edge_sets):
    """Edge lists ``(i, j, d)`` joined, self-pairs and duplicates dropped (the first keeps its d̂)."""
    from cryoorient_ray.core.recovery.graph import unique_edges

    all_i = np.concatenate([np.asarray(e[0], dtype=np.int64) for e in edge_sets])
    all_j = np.concatenate([np.asarray(e[1], dtype=np.int64) for e in edge_sets])
    all_d = np.concatenate([np.asarray(e[2], dtype=np.float32) for e in edge_sets])
    keep = all_i != all_j
    all_i, all_j, all_d = all_i[keep], all_j[keep], all_d[keep]
    lo, hi = np.minimum(all_i, all_j), np.maximum(all_i, all_j)
    ui, uj = unique_edges(lo, hi)
    # the first occurrence of each edge keeps its distance (e.g. the graph's own before the anchors')
    width = int(hi.max(initial=0)) + 1
    _, first = np.unique(lo * width + hi, return_index=True)
    return ui, uj, all_d[first]


def start_residual(q0: np.ndarray, edges, symmetry: SymmetryGroup | str = "C1", chunk: int = 1 << 16) -> float:
    """Mean of ``(d̂_ij − d_G(q0_i, q0_j))²`` over ``edges = (i, j, d̂)``: how well a start fits the distances."""
    from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance

    i, j, d = (np.asarray(x) for x in edges)
    if len(i) == 0:
        return 0.0
    q = torch.as_tensor(np.asarray(q0), dtype=torch.float32)
    grp = _group(symmetry)
    total = 0.0
    for a in range(0, len(i), chunk):
        sl = slice(a, a + chunk)
        dg = symmetric_quat_distance(q[torch.as_tensor(i[sl])], q[torch.as_tensor(j[sl])], grp)
        total += float(((dg.double() - torch.as_tensor(d[sl], dtype=torch.float64)) ** 2).sum())
    return total / len(i)


@dataclass
class AnchorStart:
    """The anchor start: the anchors' indices and orientations, their fit, every node's start and how
    well it fits all the distances (:func:`start_residual` over the node–anchor edges and the graph's;
    ``candidates``: the anchor solutions tried, as ``(anchor residual, start residual)``).

    From :func:`recover_symmetric` also: ``kind``, the start the L_OR phase ran from (``"anchors"``
    or ``"spectral"``); ``graph_residual`` and ``spectral_graph_residual``, the two starts'
    :func:`start_residual` over the pair graph's edges (what chose between them; NaN where that
    start did not run); ``spectral``, the
    :class:`~cryoorient_ray.core.recovery.spectral.SpectralStart` (or None)."""

    anchors: np.ndarray
    anchors_q: np.ndarray
    anchor_loss: float
    quaternions: np.ndarray
    seconds: float
    residual: float = float("nan")
    candidates: tuple = ()
    kind: str = "anchors"
    graph_residual: float = float("nan")
    spectral: object = None
    spectral_graph_residual: float = float("nan")


def anchor_start(
    d_to_anchors: np.ndarray,
    anchors: np.ndarray,
    symmetry: SymmetryGroup | str = "C1",
    restarts: int = 512,
    n_candidates: int = 60000,
    seed: int = 0,
    edges=None,
    candidates: int = 8,
) -> AnchorStart:
    """Steps 1–2 of the module docstring: ``d_to_anchors (P, K)`` (column k: distances to node ``anchors[k]``).

    ``candidates`` anchor solutions (the lowest anchor residuals) are each trilaterated; the start
    kept is the one with the lowest :func:`start_residual` over the node–anchor edges and
    ``edges = (i, j, d̂)`` (the pair graph's; None: the node–anchor edges only).
    """
    t0 = time.perf_counter()
    d_to_anchors = np.asarray(d_to_anchors, np.float64)
    anchors = np.asarray(anchors)
    dk = d_to_anchors[anchors]
    dk = 0.5 * (dk + dk.T)
    np.fill_diagonal(dk, 0.0)
    p, k = d_to_anchors.shape
    ai, aj = np.repeat(np.arange(p), k), np.tile(anchors, p)
    checks = [(ai, aj, d_to_anchors.reshape(-1))]
    if edges is not None:
        checks.append(tuple(np.asarray(x) for x in edges))
    all_edges = tuple(np.concatenate([c[m] for c in checks]) for m in range(3))
    best, tried = None, []
    for aq, aloss in anchor_solutions(dk, symmetry, restarts=restarts, seed=seed, top=candidates):
        q0 = trilaterate(d_to_anchors, aq, symmetry, n_candidates=n_candidates, seed=seed)
        q0[anchors] = aq
        res = start_residual(q0, all_edges, symmetry)
        tried.append((aloss, res))
        if best is None or res < best[2]:
            best = (aq, aloss, res, q0)
    aq, aloss, res, q0 = best
    return AnchorStart(
        anchors, aq, aloss, quat_canonicalize(q0), time.perf_counter() - t0, residual=res, candidates=tuple(tried)
    )


def recover_symmetric(
    n_nodes: int,
    i,
    j,
    d,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
    symmetry: SymmetryGroup | str = "C1",
    settings: RecoverySettings | None = None,
    n_anchors: int = 16,
    attempts: int = 3,
    anchor_tol: float = 1e-4,
    restarts: int = 512,
    n_candidates: int = 60000,
    candidates: int = 8,
    progress=None,
    spectral: str = "auto",
    spectral_nodes: int = 2000,
    spectral_edges: int = 128,
) -> tuple[RecoveryResult, AnchorStart]:
    """Recovery on SO(3)/G: the anchor start (and, for D2, the spectral start), then the symmetric
    L_OR on the graph plus the chosen start's extra edges.

    Args:
        n_nodes: ``P``.
        i, j, d: the pair graph's edges and their d̂ (radians).
        distance: ``distance(i (E,), j (E,)) -> d̂ (E,)`` for any node pairs (the anchor edges).
        symmetry: the point group of the target distances.
        settings: :class:`~cryoorient_ray.core.recovery.solver.RecoverySettings` of the L_OR phase
            (its ``init`` is not used; the start is the anchors').
        n_anchors: anchors ``K``; the second attempt takes ``2 K`` with ``restarts / 2`` starts.
        attempts: anchor sets tried (new random anchors each) while the anchors' residual is
            above ``anchor_tol`` (rad²; with noisy d̂ the residual cannot reach 0, every attempt
            runs and the one whose start fits all distances best is kept).
        restarts, n_candidates: of :func:`solve_anchors` and :func:`trilaterate`.
        candidates: anchor solutions per attempt carried through the trilateration
            (:func:`anchor_start`); the attempt kept is the one whose start has the lowest
            :func:`start_residual` over all the distances it was given.
        progress: as :func:`~cryoorient_ray.core.recovery.solver.recover_orientations`'s.
        spectral: ``"auto"``: where the group has a spectral start
            (:func:`~cryoorient_ray.core.recovery.spectral.spectral_supported`: D2) and there are at
            least 64 nodes, run it beside the anchor start and keep the start with the lower
            :func:`start_residual` over the graph's edges; ``"only"``: the spectral start alone;
            ``"off"``: the anchor start alone.
        spectral_nodes: the spectral start's d̂ of every pair of at most this many nodes (a random
            subset beyond it; the others are trilaterated from 32 of them).
        spectral_edges: random partners per node among those, whose d̂ (already computed) join the
            L_OR phase when the spectral start is kept (measured on 5a1a: the graph plus 32 anchor
            edges per node, E_OR 0.125; plus 128 random ones instead, 0.114).

    Returns:
        ``(RecoveryResult, AnchorStart)`` (the anchor attempt kept, with ``kind`` saying which start
        ran); the result's ``seconds`` include the start and ``restart_losses`` are the attempts'
        anchor residuals.
    """
    from cryoorient_ray.core.recovery.solver import check_distances
    from cryoorient_ray.core.recovery.spectral import spectral_supported

    if spectral not in ("auto", "only", "off"):
        raise CryoOrientError(f"spectral must be 'auto', 'only' or 'off'; got {spectral!r}")
    s = settings or RecoverySettings()
    t0 = time.perf_counter()
    use_spectral = spectral != "off" and spectral_supported(symmetry) and n_nodes >= 64
    if spectral == "only" and not use_spectral:
        raise CryoOrientError(
            f"the spectral start needs point group D2 and at least 64 projections; got {_group(symmetry).name}, "
            f"{n_nodes}"
        )
    graph_edges = (np.asarray(i), np.asarray(j), np.asarray(d))
    spec = None
    if use_spectral:
        spec = _spectral_candidate(n_nodes, distance, symmetry, s.seed, spectral_nodes, spectral_edges, n_candidates)
        spec["graph_residual"] = start_residual(spec["quaternions"], graph_edges, symmetry)
        if progress is not None:
            progress("spectral start", 1, 1, spec["graph_residual"])
    best, tried = None, []
    for attempt in range(0 if spectral == "only" else max(1, int(attempts))):
        # the second attempt (the residual stayed above anchor_tol: noisy d̂, or no restart
        # succeeded) uses twice the anchors with half the restarts: with noisy d̂, 16 anchors' 120
        # distances are fitted better by wrong solutions than by the true ones, 32 anchors' 496
        # are not (module docstring); the third goes back to n_anchors (a failed exact solve)
        wide = attempt % 2 == 1
        anchors = choose_anchors(n_nodes, 2 * n_anchors if wide else n_anchors, s.seed + 1000 * attempt)
        ai, aj = np.repeat(np.arange(n_nodes), len(anchors)), np.tile(anchors, n_nodes)
        d_anchor = check_distances(distance(ai, aj)).reshape(n_nodes, len(anchors))
        start = anchor_start(
            d_anchor,
            anchors,
            symmetry,
            restarts=max(1, restarts // 2) if wide else restarts,
            n_candidates=n_candidates,
            seed=s.seed + attempt,
            edges=(i, j, d),
            candidates=candidates,
        )
        tried.append(start.anchor_loss)
        if progress is not None:
            progress(f"anchors {attempt + 1}/{attempts}", 1, 1, start.anchor_loss)
        if best is None or start.residual < best[0].residual:  # the start that fits all distances best
            best = (start, d_anchor)
        if start.anchor_loss < anchor_tol:
            break
    if best is None:  # spectral == "only"
        empty = np.zeros(0, dtype=np.int64)
        start = AnchorStart(empty, np.zeros((0, 4)), float("nan"), spec["quaternions"], 0.0)
    else:
        start, d_anchor = best
        start.graph_residual = start_residual(start.quaternions, graph_edges, symmetry)
    if spec is not None:
        start.spectral = spec["start"]
        start.spectral_graph_residual = spec["graph_residual"]
    if spec is not None and (best is None or spec["graph_residual"] < start.graph_residual):
        start.kind = "spectral"
        ei, ej, ed = _merge_edges(graph_edges, spec["edges"])
        init = spec["quaternions"]
    else:
        ei, ej, ed = with_anchor_edges(i, j, d, start.anchors, d_anchor)
        init = start.quaternions
    obj = SymmetricEdgeObjective(ei, ej, ed, symmetry, device=s.device)
    res = recover_orientations(n_nodes, [obj], settings=s, init=init, progress=progress)
    res.restart_losses = tried
    res.seconds = time.perf_counter() - t0
    return res, start


def _spectral_candidate(n_nodes, distance, symmetry, seed, max_nodes, n_edges, n_candidates, n_anchors=32, block=256):
    """The spectral start of :func:`recover_symmetric`: ``{"quaternions", "start", "edges"}``.

    d̂ of every pair of ``min(n_nodes, max_nodes)`` nodes (a random subset beyond ``max_nodes``),
    :func:`~cryoorient_ray.core.recovery.spectral.spectral_start` on them; nodes outside the subset
    are trilaterated from ``n_anchors`` of the subset. ``edges``: ``n_edges`` random partners per
    subset node (their d̂ from the matrix), plus the node–anchor edges of the trilaterated nodes."""
    from cryoorient_ray.core.recovery.solver import check_distances
    from cryoorient_ray.core.recovery.spectral import spectral_start

    rng = np.random.default_rng(seed + 7)
    sub = np.arange(n_nodes) if n_nodes <= max_nodes else np.sort(rng.choice(n_nodes, max_nodes, replace=False))
    m = len(sub)
    dm = np.zeros((m, m))
    for a in range(0, m, block):
        rows = np.arange(a, min(m, a + block))
        ri, rj = np.repeat(rows, m), np.tile(np.arange(m), len(rows))
        dm[rows] = check_distances(distance(sub[ri], sub[rj])).reshape(len(rows), m)
    dm = 0.5 * (dm + dm.T)
    np.fill_diagonal(dm, 0.0)
    spec = spectral_start(dm, symmetry, seed=seed)
    q0 = np.zeros((n_nodes, 4))
    q0[sub] = spec.quaternions
    pi = np.repeat(np.arange(m), n_edges)
    pj = (pi + rng.integers(1, m, len(pi))) % m
    edges = [(sub[pi], sub[pj], dm[pi, pj])]
    rest = np.setdiff1d(np.arange(n_nodes), sub)
    if len(rest):
        anchors = sub[np.sort(rng.choice(m, min(n_anchors, m), replace=False))]
        ai, aj = np.repeat(rest, len(anchors)), np.tile(anchors, len(rest))
        d_anchor = check_distances(distance(ai, aj)).reshape(len(rest), len(anchors))
        q0[rest] = trilaterate(d_anchor, q0[anchors], symmetry, n_candidates=n_candidates, seed=seed)
        edges.append((ai, aj, d_anchor.reshape(-1)))
    e = _merge_edges(*edges)
    return {"quaternions": quat_canonicalize(q0), "start": spec, "edges": e}
