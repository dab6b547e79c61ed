"""Align recovered orientations to the truth and measure the orientation error.

Two error measures, both in radians, per image and as mean/median:

- **E_OR** (Banjac et al. 2021, Eq. 5), :func:`align_o4`: distances fix orientations only up to
  the distance-preserving maps of S³/±1, i.e. ``T ∈ O(4)``. Its two components act as

      SO(4):      q → a ⊗ q ⊗ b       (R → R_a · R · R_b)
      conjugate:  q → a ⊗ q* ⊗ b      (R → R_a · Rᵀ · R_b)

  and ``E_OR = min_T mean_i d_q(q_i, T(q̂_i))``. The paper minimised this with 50 minutes of FTRL;
  here a closed form gives the start and a few hundred cheap steps refine it.
- **Registration** (cryoSPARC, RELION, ASPIRE comparisons), :func:`align_rotation`: only a global
  rotation of the object (``R̂_i → R̂_i · G``, in quaternions ``q̂_i → q̂_i ⊗ g``) and, optionally,
  the mirrored hand (the map mirrored along z gives the same projections: ``R̂ → J R̂ J``,
  ``J = diag(1, 1, -1)``, in quaternions ``q̂ → z ⊗ q̂ ⊗ z`` with ``z = (0, 0, 0, 1) = Rz(π)``).
  Left multiplications (``R̂ → A · R̂``: tilted viewing directions, in-plane rotations) are *not*
  removed: the images fix them. Registration error ≥ E_OR always.

With a point group G the truth is only defined up to ``q_i → q_i ⊗ g_i`` (one ``g_i ∈ G`` per
image) and every error is the symmetry-aware ``d_G`` (:func:`~cryoorient_ray.core.geometry.symmetry.
symmetric_quat_distance`).

How :func:`align_o4` finds T (float64, on the device of the input; above 4000 images steps 1–3
run on a random subset of 4000 and only the last refinement sees all images):

1. Closed form, C1 part. For image pairs, ``q_i ⊗ q_j* = a ⊗ (q̂_i ⊗ q̂_j*) ⊗ a*``: the relative
   rotations on the left side are conjugated by ``a`` (``b`` cancels), so their axial vectors
   ``u = sin θ · n`` (the skew part of ``R_i R_jᵀ``; sign-free and small for the ambiguous θ ≈ π)
   obey ``u_ij = R_a û_ij``; ``R_a`` is the Kabsch/Procrustes rotation over **all** N² pairs,
   computed in O(N) from the 9 × 9 moment ``Σ_i w_i R_i ⊗ R̂_i``. Likewise
   ``q_i* ⊗ q_j = b* ⊗ (q̂_i* ⊗ q̂_j) ⊗ b`` gives ``R_bᵀ``. Repeated twice with image weights
   ``1 / (1 + (d_i / s)²)`` (s = 2 × median error) so that outliers fade out. Done for ``q̂`` and
   for ``q̂*`` (the conjugate component).
2. Symmetric starts (|G| > 1 only). The pair relations above hold only where ``g_i = g_j``, so
   ``n_anchors`` anchor images ``k`` are tried on a screening subset of ≤ 1000 images: with
   ``g_k = e`` (which only picks ``b`` within ``b ⊗ G``), ``g_j`` is the element whose
   ``q_k* ⊗ q_j ⊗ g`` has the rotation angle of ``q̂_k* ⊗ q̂_j``, Kabsch gives ``R_b`` and
   the ``g_j`` are re-picked from the predicted relative rotations (twice); the anchor's own
   equation gives ``a``. The geodesic median of the anchors' ``(a, b)`` is one more start. Each
   start gets 12 rounds of step 3 and the best is kept (with the start of step 1 if better).
3. Refinement: iteratively reweighted alternating eigen-solutions of
   ``max Σ w_i ⟨q_i ⊗ g_i, a ⊗ q̂_i ⊗ b⟩²`` (``a`` = top eigenvector of a 4 × 4 matrix, then
   ``b``; ``g_i`` re-picked; weights ``1 / sin d_i`` make the fixed point a stationary point of
   ``Σ d_i`` for the images with ``d_i < π/2``), for both components; the better one wins; then
   on all images, and L-BFGS on the exact mean ``d_G`` polishes ``(a, b)``.

It is a non-convex problem: the minimum found is not guaranteed to be global, but every start is
closed-form and the result is never worse than the best start. In tests the C1 and small-group
(C2, D2, T) cases reach the optimum with 30° errors and 30 % outliers; for large groups (O, I)
and errors ≳ 25° per image the symmetric starts can all miss (E_OR is then an upper bound).

On CPU both functions run torch single-threaded while they work (restored after): the work is
hundreds of small tensor operations, for which thread hand-offs cost more than they save.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cryoorient_ray.core._array import ArrayLike, as_tensor, check_last_dim, safe_norm, to_output
from cryoorient_ray.core.geometry.quaternion import (
    quat_canonicalize,
    quat_conjugate,
    quat_product,
    rotmat_to_unitquat,
    special_procrustes,
    unitquat_to_rotmat,
)
from cryoorient_ray.core.geometry.symmetry import SymmetryGroup, symmetry_group
from cryoorient_ray.errors import CryoOrientError

__all__ = ["AlignResult", "RegistrationResult", "align_o4", "align_rotation", "orientation_errors"]

_Z = (0.0, 0.0, 0.0, 1.0)  # Rz(π): the hand flip J R J = Rz(π) R Rz(π)
_FIT_SUBSET = 4000  # images used for the closed forms, their scores and the first refinement
_SCREEN_SUBSET = 1000  # images used to screen the symmetric starts
_SHORT_ITER = 12  # refinement rounds each symmetric start gets before they are compared


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AlignResult:
    """An alignment ``T`` of estimates ``q̂`` onto the truth, and the errors it leaves.

    Attributes:
        a, b: unit quaternions ``(4,)`` (wxyz, float64, canonical ``w >= 0``).
        conjugate: ``False``: ``T(q) = a ⊗ q ⊗ b`` (SO(4)); ``True``: ``T(q) = a ⊗ q* ⊗ b``.
        errors: ``(N,)`` per-image distances ``d_G(q_i, T(q̂_i))`` in radians (float64 numpy).
        mean, median: of ``errors`` (radians). For :func:`align_o4` ``mean`` is E_OR.
        symmetry: the point group the errors were measured with.
    """

    a: np.ndarray
    b: np.ndarray
    conjugate: bool
    errors: np.ndarray
    mean: float
    median: float
    symmetry: str

    def apply(self, q: ArrayLike) -> ArrayLike:
        """Map estimates ``(..., 4)`` into the frame of the truth: ``a ⊗ q ⊗ b`` or ``a ⊗ q* ⊗ b``.

        With a point group the result matches the truth up to ``q_i ⊗ g_i``. Returns the type it
        was given (numpy or torch).
        """
        t, was_np = as_tensor(q)
        check_last_dim(t, 4, "q")
        a = torch.as_tensor(self.a, dtype=t.dtype, device=t.device)
        b = torch.as_tensor(self.b, dtype=t.dtype, device=t.device)
        src = quat_conjugate(t) if self.conjugate else t
        return to_output(quat_product(quat_product(a, src), b), was_np)


@dataclass(frozen=True)
class RegistrationResult(AlignResult):
    """:func:`align_rotation`'s result: ``T(q̂) = q̂ ⊗ g`` (same hand) or ``z ⊗ q̂ ⊗ z ⊗ g`` (mirrored).

    Attributes (besides :class:`AlignResult`'s; ``a`` is ``1`` or ``z``, ``b`` is ``g`` or ``z ⊗ g``,
    ``conjugate`` is ``False``):
        g: the global object rotation ``(4,)`` (wxyz): ``R_i ≈ R̂'_i · R(g)``, ``R̂'`` the estimate in
            the chosen hand.
        mirrored: whether the mirrored hand (``R̂ → J R̂ J``, ``J = diag(1, 1, -1)``) fits better.
    """

    g: np.ndarray
    mirrored: bool

    @property
    def hand(self) -> str:
        """``"mirrored"`` or ``"same"``."""
        return "mirrored" if self.mirrored else "same"


# ----------------------------------------------------------------------------------------------- input


@contextmanager
def _cpu_single_thread(device: torch.device) -> Iterator[None]:
    """Run torch on one CPU thread inside (restored after).

    The alignment is hundreds of small tensor operations; with several intra-op threads the
    hand-offs cost more than the work, and on a busy machine far more (measured on 2 shared
    cores: 19 s instead of 0.5 s for 1,650 images with D2).
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _group(symmetry: SymmetryGroup | str) -> SymmetryGroup:
    return symmetry if isinstance(symmetry, SymmetryGroup) else symmetry_group(symmetry)


def _check_inputs(q_true: ArrayLike, q_est: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float64 ``(N, 4)`` unit quaternions on one device; one clear error line otherwise."""
    tensors = []
    for name, q in (("q_true", q_true), ("q_est", q_est)):
        try:
            t, _ = as_tensor(q)
        except (TypeError, ValueError) as exc:
            raise CryoOrientError(f"{name} must be an (N, 4) array of quaternions; {exc}") from None
        if t.ndim != 2 or t.shape[1] != 4:
            raise CryoOrientError(f"{name} must have shape (N, 4) (wxyz quaternions); got {tuple(t.shape)}")
        tensors.append(t)
    qt, qe = tensors
    if qt.shape[0] != qe.shape[0]:
        raise CryoOrientError(f"q_true and q_est must have the same length; got {qt.shape[0]} and {qe.shape[0]}")
    if qt.shape[0] < 3:
        raise CryoOrientError(f"need at least 3 orientations to align; got {qt.shape[0]}")
    qe = qe.to(device=qt.device)
    out = []
    for name, t in (("q_true", qt), ("q_est", qe)):
        t = t.detach().to(torch.float64)
        if not torch.isfinite(t).all():
            raise CryoOrientError(f"{name} contains NaN or infinite values")
        norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
        if (norm < 1e-12).any():
            raise CryoOrientError(f"{name} contains zero quaternions")
        out.append(t / norm)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------- helpers
# Lean float64 primitives on (N, 4) tensors: the refinement loops call them hundreds of times, and the
# broadcasting core functions (with their checks and reorderings) cost several times more per call.


def _hamilton_tables() -> dict[str, np.ndarray]:
    """Constant tables: ``L[i]``, ``R[i]`` are ``L(e_i)``, ``R(e_i)`` (``a ⊗ q = L(a) q``, ``q ⊗ b = R(b) q``)."""
    lm = np.zeros((4, 4, 4))
    rm = np.zeros((4, 4, 4))
    # (w, x, y, z) Hamilton product: rows of L(a) and R(b) as (component, sign) per column
    l_rows = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
    l_sign = ((1, -1, -1, -1), (1, 1, -1, 1), (1, 1, 1, -1), (1, -1, 1, 1))
    r_sign = ((1, -1, -1, -1), (1, 1, 1, -1), (1, -1, 1, 1), (1, 1, -1, 1))
    for row in range(4):
        for col in range(4):
            lm[l_rows[row][col], row, col] = l_sign[row][col]
            rm[l_rows[row][col], row, col] = r_sign[row][col]
    bil = np.einsum("kmj,ljn->klmn", lm, rm).reshape(16, 16)  # [(k, l), (m, n)] = (L(e_k) R(e_l))_mn
    return {"L": lm.reshape(4, 16), "R": rm.reshape(4, 16), "B": bil}


_TABLES = _hamilton_tables()
_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _table(name: str, like: torch.Tensor) -> torch.Tensor:
    key = (name, like.dtype, like.device)
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = torch.tensor(_TABLES[name], dtype=like.dtype, device=like.device)
    return _TABLE_CACHE[key]


def _lmat(a: torch.Tensor) -> torch.Tensor:
    """``L(a)`` with ``a ⊗ q = L(a) q`` (differentiable in ``a``)."""
    return (a @ _table("L", a)).view(4, 4)


def _rmat(b: torch.Tensor) -> torch.Tensor:
    """``R(b)`` with ``q ⊗ b = R(b) q`` (differentiable in ``b``)."""
    return (b @ _table("R", b)).view(4, 4)


def _qmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Hamilton product ``x_i ⊗ y_i`` of two ``(N, 4)`` tensors.

    The same as :func:`~cryoorient_ray.core.geometry.quaternion.quat_product` (to 2e-15), but one
    matrix product instead of roma's reordered cross products: 3.5–4× faster for N = 10³–4·10³,
    and :func:`_assign` calls it at every refinement round.
    """
    return torch.bmm((x @ _table("L", x)).view(-1, 4, 4), y.unsqueeze(-1)).squeeze(-1)


def _transform(qe: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ⊗ q̂_i ⊗ b`` for all rows: one matrix product."""
    return qe @ (_lmat(a) @ _rmat(b)).T


def _bilinear(t: torch.Tensor, qe: torch.Tensor) -> torch.Tensor:
    """``M_i (N, 4, 4)`` with ``⟨t_i, a ⊗ q̂_i ⊗ b⟩ = aᵀ M_i b``."""
    outer = (t.unsqueeze(-1) * qe.unsqueeze(-2)).reshape(-1, 16)
    return (outer @ _table("B", t).T).view(-1, 4, 4)


def _dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d_q`` of unit rows, the accurate ``4·atan2(‖x − s y‖, ‖x + s y‖)`` form (finite gradients)."""
    s = torch.where((x * y).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(x.dtype)
    return 4.0 * torch.atan2(safe_norm(x - s * y), safe_norm(x + s * y))


def _assign(qt: torch.Tensor, p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_G(q_i, p_i), q_i ⊗ g_i)`` with ``g_i`` the group element that attains the minimum."""
    if g.shape[0] == 1:
        return _dist(qt, p), qt
    r = _qmul(quat_conjugate(qt), p)  # ⟨q ⊗ g, p⟩ = ⟨g, q* ⊗ p⟩, and the distance is norm-based
    idx = (r @ g.T).abs().argmax(dim=-1)
    return _dist(r, g[idx]), _qmul(qt, g[idx])


def _score(qt, qe, a, b, g) -> float:
    return float(_assign(qt, _transform(qe, a, b), g)[0].mean())


def _top_eigvec(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Chordal mean of ±r: the unit ``x`` maximising ``Σ w_i ⟨x, r_i⟩²``."""
    m = (r * w[:, None]).T @ r
    return torch.linalg.eigh(m)[1][:, -1]


def _levi_civita(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    eps = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        eps[i, j, k], eps[i, k, j] = 1.0, -1.0
    return eps


def _axial_cross(p: torch.Tensor, ph: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``H = Σ_{i,j} w_i w_j axial(P_i P_jᵀ) axial(P̂_i P̂_jᵀ)ᵀ`` over all pairs, in O(N).

    ``axial(M) = ½ (M₃₂ − M₂₃, M₁₃ − M₃₁, M₂₁ − M₁₂)`` is ``sin θ · n`` for a rotation. With the
    moment ``C = Σ_i w_i P_i ⊗ P̂_i`` (9 × 9), ``Σ_ij w_i w_j (P_i P_jᵀ)_lm (P̂_i P̂_jᵀ)_rs =
    Σ_tn C_ltrn C_mtsn``.
    """
    n = p.shape[0]
    c = ((p * w[:, None, None]).reshape(n, 9).T @ ph.reshape(n, 9)).view(3, 3, 3, 3)
    k = torch.einsum("ltrn,mtsn->lmrs", c, c)
    eps = _levi_civita(p.dtype, p.device)
    return 0.25 * torch.einsum("klm,prs,lmrs->kp", eps, eps, k)


def _robust_weights(d: torch.Tensor) -> torch.Tensor:
    s = (2.0 * d.median()).clamp_min(1e-6)
    return 1.0 / (1.0 + (d / s) ** 2)


# ----------------------------------------------------------------------------------------------- starts


def _closed_form_c1(qt: torch.Tensor, qe: torch.Tensor, g: torch.Tensor, rounds: int = 2):
    """``(a, b)`` from all-pairs Kabsch on both sides (module docstring, step 1), reweighted ``rounds`` times."""
    rt, re = unitquat_to_rotmat(qt), unitquat_to_rotmat(qe)
    rtt, ret = rt.transpose(-1, -2), re.transpose(-1, -2)
    w = torch.ones(qt.shape[0], dtype=qt.dtype, device=qt.device)
    best = None
    for _ in range(rounds + 1):
        ra = special_procrustes(_axial_cross(rt, re, w))  # u(q_i q_j*) = R_a u(q̂_i q̂_j*)
        rbt = special_procrustes(_axial_cross(rtt, ret, w))  # u(q_i* q_j) = R_bᵀ u(q̂_i* q̂_j)
        a, b = rotmat_to_unitquat(ra), rotmat_to_unitquat(rbt.T)
        d, _ = _assign(qt, _transform(qe, a, b), g)
        mean = float(d.mean())
        if best is None or mean < best[0]:
            best = (mean, a, b)
        w = _robust_weights(d)
    return best[1], best[2]


def _robust_mean(q: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Geodesic median of ±quaternions ``(K, 4)``: Weiszfeld from the medoid (outliers barely count)."""
    d = _dist(q[:, None, :].expand(-1, q.shape[0], -1), q[None, :, :].expand(q.shape[0], -1, -1))
    m = q[d.sum(dim=1).argmin()]
    for _ in range(iters):
        w = 1.0 / _dist(q, m.expand_as(q)).clamp_min(1e-6)
        m = _top_eigvec(q, w)
    return m


def _anchor_starts(qt: torch.Tensor, qe: torch.Tensor, g: torch.Tensor, anchors: list[int], rounds: int = 2):
    """Starts for |G| > 1 (module docstring, step 2): one ``(a, b)`` per anchor, and their consensus.

    For an anchor ``k``, ``g_k = e`` may be taken (``b`` is only defined within ``b ⊗ G``); then
    ``q_k* ⊗ q_j ⊗ g_j = s ⊗ (q̂_k* ⊗ q̂_j) ⊗ s*`` with ``s = b*``: the axial vectors obey
    ``u_t = R(s) u_e`` once ``g_j`` is known. ``g_j`` is first the element matching the rotation angle
    (pairs weighted by how clearly it wins), then, for ``rounds`` more Kabsch fits, the element closest
    to the predicted ``s ⊗ (q̂_k* ⊗ q̂_j) ⊗ s*``. The anchor's own equation gives ``a = q_k ⊗ s ⊗ q̂_k*``.
    Each anchor carries its own noise into ``(a, b)``; ``a`` is the same for all anchors, so their
    geodesic median is a better start, and ``b`` is the median of the anchors' ``b`` after moving each
    to the element of its coset ``b ⊗ G`` closest to the median anchor's.
    """
    starts = []
    for k in anchors:
        rel_t = qt @ _lmat(quat_conjugate(qt[k])).T  # q_k* ⊗ q_j        (N, 4)
        rel_e = qe @ _lmat(quat_conjugate(qe[k])).T  # q̂_k* ⊗ q̂_j       (N, 4)
        u_e = rel_e[:, 1:] * rel_e[:, :1]  # sign-free axial vectors sin θ · n / 2
        # w(x ⊗ g) = ⟨x*, g⟩: the g whose |cos(θ/2)| matches the estimate's
        gap = ((quat_conjugate(rel_t) @ g.T).abs() - rel_e[:, :1].abs()).abs()
        two = gap.topk(2, dim=-1, largest=False)
        idx = two.indices[:, 0]
        w = ((two.values[:, 1] - two.values[:, 0]) / 0.1).clamp(max=1.0)
        rel = _qmul(rel_t, g[idx])
        s_q = rotmat_to_unitquat(special_procrustes((rel[:, 1:] * rel[:, :1] * w[:, None]).T @ u_e))
        for _ in range(rounds):  # re-pick g_j from the predicted s ⊗ rel_e ⊗ s*, now counting every pair
            pred = rel_e @ (_lmat(s_q) @ _rmat(quat_conjugate(s_q))).T
            rel = _qmul(rel_t, g[(_qmul(quat_conjugate(rel_t), pred) @ g.T).abs().argmax(dim=-1)])
            s_q = rotmat_to_unitquat(special_procrustes((rel[:, 1:] * rel[:, :1]).T @ u_e))
        a = _lmat(qt[k]) @ _rmat(quat_conjugate(qe[k])) @ s_q  # q_k ⊗ s ⊗ q̂_k*
        starts.append((a, quat_conjugate(s_q)))
    if len(starts) > 1:
        a_all = torch.stack([a for a, _ in starts])
        b_all = torch.stack([b for _, b in starts])
        a_med = _robust_mean(a_all)
        ref = b_all[_dist(a_all, a_med.expand_as(a_all)).argmin()]
        cands = torch.stack([b_all @ _rmat(h).T for h in g], dim=1)  # (K, |G|, 4): b_k ⊗ h
        pick = (cands @ ref).abs().argmax(dim=1)
        moved = cands[torch.arange(len(starts), device=cands.device), pick]
        starts.insert(0, (a_med, _robust_mean(moved)))
    return starts


# ----------------------------------------------------------------------------------------------- refinement


def _irls(qt, qe, a, b, g, fix_a: bool, max_iter: int = 100, tol: float = 1e-10):
    """Iteratively reweighted alternating eigen-steps towards ``min Σ d_G`` (module docstring, step 3).

    Maximises ``Σ w_i ⟨t_i, a ⊗ q̂_i ⊗ b⟩² = Σ w_i (aᵀ M_i b)²`` for ``a`` (top eigenvector of
    ``Σ w_i M_i b bᵀ M_iᵀ``), then for ``b``; ``t_i = q_i ⊗ g_i`` and ``w_i ∝ 1 / sin d_i`` (``d_i``
    clamped to ``[floor, π/2]``) are updated each round. Returns ``(mean d_G, a, b)``, the best seen.
    """
    best = (float("inf"), a, b)
    stall = 0
    m = _bilinear(qt, qe) if g.shape[0] == 1 else None
    for _ in range(max_iter):
        d, target = _assign(qt, _transform(qe, a, b), g)
        mean = float(d.mean())
        improved = best[0] == float("inf") or mean < best[0] - tol * max(best[0], 1e-3)
        if mean < best[0]:
            best = (mean, a, b)
        stall = 0 if improved else stall + 1
        if stall >= 3 or mean < 1e-13:
            break
        if g.shape[0] > 1:
            m = _bilinear(target, qe)
        floor = max(1e-3 * float(d.median()), 1e-12)
        w = 1.0 / torch.sin(d.clamp(min=floor, max=torch.pi / 2))
        w = w / w.max()
        if not fix_a:
            a = _top_eigvec(m @ b, w)
        b = _top_eigvec(a @ m, w)
    return best


def _cayley(v: torch.Tensor) -> torch.Tensor:
    q = torch.cat([torch.ones_like(v[:1]), v])
    return q / torch.linalg.vector_norm(q)


def _polish(qt, qe, a, b, g, fix_a: bool, max_iter: int = 40):
    """L-BFGS on the exact mean ``d_G`` over small rotations ``a ⊗ δa`` and ``δb ⊗ b``.

    The ``g_i`` are those of the start (the step is small); the result is re-scored with free
    ``g_i`` and returned as ``(mean d_G, a, b)``.
    """
    with torch.no_grad():
        _, target = _assign(qt, _transform(qe, a, b), g)
    va = torch.zeros(3, dtype=qt.dtype, device=qt.device, requires_grad=not fix_a)
    vb = torch.zeros(3, dtype=qt.dtype, device=qt.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [vb] if fix_a else [va, vb],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        p = _transform(qe, _lmat(a) @ _cayley(va), _rmat(b) @ _cayley(vb))
        loss = _dist(target, p).mean()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # a degenerate line search: keep the start
        return float("inf"), a, b
    with torch.no_grad():
        a_new, b_new = _lmat(a) @ _cayley(va), _rmat(b) @ _cayley(vb)
        return _score(qt, qe, a_new, b_new, g), a_new, b_new


def _refine(qt, qe, a, b, g, fix_a: bool, max_iter: int):
    """IRLS on all images from ``(a, b)``, then the L-BFGS polish; returns the best ``(mean, a, b)``."""
    mean, a, b = _irls(qt, qe, a, b, g, fix_a, max_iter=max_iter)
    if mean > 1e-9:
        p_mean, pa, pb = _polish(qt, qe, a, b, g, fix_a, max_iter=40 if qt.shape[0] <= 20000 else 15)
        if p_mean < mean:
            mean, a, b = p_mean, pa, pb
    return mean, a, b


def _subsets(n: int, n_anchors: int, seed: int, device: torch.device):
    """Seeded ``(fit subset, screening subset, anchors)``: a subset is None when all images fit in it;
    the anchors index the screening subset."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(device)
    fit = None if n <= _FIT_SUBSET else perm[:_FIT_SUBSET]
    screen = None if n <= _SCREEN_SUBSET else perm[:_SCREEN_SUBSET]
    anchors = torch.randperm(min(n, _SCREEN_SUBSET), generator=gen)[: max(1, n_anchors)].tolist()
    return fit, screen, anchors


def _take(t: torch.Tensor, sub: torch.Tensor | None) -> torch.Tensor:
    return t if sub is None else t[sub]


# ----------------------------------------------------------------------------------------------- public API


def _finish(qt, qe_src, a, b, g, name, conjugate) -> dict:
    d, _ = _assign(qt, _transform(qe_src, a, b), g)
    errors = d.detach().cpu().numpy()
    return dict(
        a=quat_canonicalize(a.detach().cpu().numpy()),
        b=quat_canonicalize(b.detach().cpu().numpy()),
        conjugate=conjugate,
        errors=errors,
        mean=float(errors.mean()),
        median=float(np.median(errors)),
        symmetry=name,
    )


def align_o4(
    q_true: ArrayLike,
    q_est: ArrayLike,
    symmetry: SymmetryGroup | str = "C1",
    refine: bool = True,
    n_anchors: int = 16,
    seed: int = 0,
) -> AlignResult:
    """The paper's orientation error E_OR: the best ``T ∈ O(4)`` mapping estimates onto the truth.

    Args:
        q_true: ``(N, 4)`` true orientations (wxyz; normalised here; the sign of each is free).
        q_est: ``(N, 4)`` estimated orientations, e.g. recovered from distances.
        symmetry: point group of the protein: errors are ``d_G`` and the truth is matched up to
            ``q_i ⊗ g_i``.
        refine: ``False`` returns the best closed-form start (module docstring, steps 1–2) without
            the iterative refinement (step 3).
        n_anchors: anchor images tried for the symmetric starts (used only when |G| > 1).
        seed: for the choice of anchors and, above 4000 images, of the subset used for the
            closed forms and the first refinement.

    Returns:
        :class:`AlignResult` with ``T`` (``a``, ``b``, ``conjugate``), per-image errors ``(N,)`` and
        their mean (E_OR) and median, in radians. Arrays are float64 numpy, whatever came in.

    Raises:
        CryoOrientError: inputs not ``(N, 4)``, of different lengths, with N < 3, NaN/inf or zeros.
    """
    qt, qe = _check_inputs(q_true, q_est)
    grp = _group(symmetry)
    with _cpu_single_thread(qt.device):
        return _align_o4(qt, qe, grp, refine, n_anchors, seed)


def _align_o4(
    qt: torch.Tensor, qe: torch.Tensor, grp: SymmetryGroup, refine: bool, n_anchors: int, seed: int
) -> AlignResult:
    g = torch.tensor(np.array(grp.quaternions), dtype=qt.dtype, device=qt.device)
    sub, screen, anchors = _subsets(qt.shape[0], n_anchors, seed, qt.device)
    qt_s, qt_c = _take(qt, sub), _take(qt, screen)

    fits = {}
    for conjugate in (False, True):
        src = quat_conjugate(qe) if conjugate else qe
        src_s, src_c = _take(src, sub), _take(src, screen)
        start = _closed_form_c1(qt_s, src_s, g)
        fit = (_score(qt_c, src_c, *start, g), *start)
        if grp.order > 1:
            # the g_i of the anchors' starts are unsure: each gets a few rounds of re-picking them
            for a, b in _anchor_starts(qt_c, src_c, g, anchors):
                cand = _irls(qt_c, src_c, a, b, g, fix_a=False, max_iter=_SHORT_ITER) if refine else None
                cand = cand or (_score(qt_c, src_c, a, b, g), a, b)
                fit = min(fit, cand, key=lambda x: x[0])
        if refine:  # both components on the fitting subset: the wrong one is far off
            fit = _irls(qt_s, src_s, fit[1], fit[2], g, fix_a=False)
        else:
            fit = (_score(qt_s, src_s, fit[1], fit[2], g), fit[1], fit[2])
        fits[conjugate] = (fit, src)
    conjugate = min(fits, key=lambda c: fits[c][0][0])
    (_, a, b), src = fits[conjugate]
    if refine:
        _, a, b = _refine(qt, src, a, b, g, fix_a=False, max_iter=100 if sub is None else 30)
    return AlignResult(**_finish(qt, src, a, b, g, grp.name, conjugate))


def align_rotation(
    q_true: ArrayLike,
    q_est: ArrayLike,
    symmetry: SymmetryGroup | str = "C1",
    allow_mirror: bool = True,
    refine: bool = True,
    n_anchors: int = 16,
    seed: int = 0,
) -> RegistrationResult:
    """Registration as peers report it: one global object rotation ``g`` and, optionally, the hand.

    Finds ``min_{g, hand} mean_i d_G(q_i, q̂'_i ⊗ g)`` with ``q̂' = q̂`` (same hand) or
    ``q̂' = z ⊗ q̂ ⊗ z`` (mirrored: ``R̂ → J R̂ J``, ``J = diag(1, 1, -1)``). Start: the chordal
    quaternion mean of ``q̂'_i* ⊗ q_i`` (and, with symmetry, anchor images' ``q̂'_k* ⊗ q_k``); then the
    refinement of :func:`align_o4` with ``a`` held fixed.

    Args:
        q_true, q_est: ``(N, 4)`` orientations (wxyz).
        symmetry: point group (errors are ``d_G``).
        allow_mirror: also try the mirrored hand and keep the better one.
        refine, n_anchors, seed: as in :func:`align_o4`.

    Returns:
        :class:`RegistrationResult` (``g``, ``mirrored``/``hand``, per-image ``errors``, ``mean``,
        ``median``; ``apply`` maps estimates into the truth's frame).

    Raises:
        CryoOrientError: as :func:`align_o4`.
    """
    qt, qe = _check_inputs(q_true, q_est)
    grp = _group(symmetry)
    with _cpu_single_thread(qt.device):
        return _align_rotation(qt, qe, grp, allow_mirror, refine, n_anchors, seed)


def _align_rotation(
    qt: torch.Tensor, qe: torch.Tensor, grp: SymmetryGroup, allow_mirror: bool, refine: bool, n_anchors: int, seed: int
) -> RegistrationResult:
    g = torch.tensor(np.array(grp.quaternions), dtype=qt.dtype, device=qt.device)
    sub, screen, anchors = _subsets(qt.shape[0], n_anchors, seed, qt.device)
    qt_s, qe_s = _take(qt, sub), _take(qe, sub)
    qt_c, qe_c = _take(qt, screen), _take(qe, screen)

    fits = {}
    for mirrored in (False, True) if allow_mirror else (False,):
        a = qt.new_tensor(_Z if mirrored else (1.0, 0.0, 0.0, 0.0))
        ratios = _qmul(quat_conjugate(qe_s @ _lmat(a).T), qt_s)  # (a ⊗ q̂_i)* ⊗ q_i = b ⊗ g_i*
        b = _top_eigvec(ratios, torch.ones_like(ratios[:, 0]))
        fit = (_score(qt_c, qe_c, a, b, g), a, b)
        if grp.order > 1:  # an anchor's ratio is b itself (g_k = e), with the anchor's noise
            ratios_c = _qmul(quat_conjugate(qe_c @ _lmat(a).T), qt_c)
            for k in anchors:
                cand = _irls(qt_c, qe_c, a, ratios_c[k], g, fix_a=True, max_iter=_SHORT_ITER) if refine else None
                cand = cand or (_score(qt_c, qe_c, a, ratios_c[k], g), a, ratios_c[k])
                fit = min(fit, cand, key=lambda x: x[0])
        if refine:
            fit = _irls(qt_s, qe_s, a, fit[2], g, fix_a=True)
        else:
            fit = (_score(qt_s, qe_s, a, fit[2], g), a, fit[2])
        fits[mirrored] = fit
    mirrored = min(fits, key=lambda m: fits[m][0])
    _, a, b = fits[mirrored]
    if refine:
        _, a, b = _refine(qt, qe, a, b, g, fix_a=True, max_iter=100 if sub is None else 30)
    fields = _finish(qt, qe, a, b, g, grp.name, False)
    gq = _lmat(qt.new_tensor(_Z)) @ b if mirrored else b  # b = z ⊗ g  ⇔  g = z* ⊗ b = ±z ⊗ b
    return RegistrationResult(**fields, g=quat_canonicalize(gq.detach().cpu().numpy()), mirrored=mirrored)


def error_report(o4: AlignResult, reg: RegistrationResult) -> dict:
    """The numbers of both alignments for a report: E_OR (O(4)) and the rotation + hand error, in radians.

    A registration is one of the O(4) maps, so if it fits better than what :func:`align_o4` found
    (possible only where that search ended in a local minimum), it is reported as E_OR too.
    """
    if reg.mean < o4.mean:
        o4 = reg
    return {
        "e_or_o4": float(o4.mean),
        "e_or_o4_median": float(o4.median),
        "o4_component": "conjugate" if o4.conjugate else "SO(4)",
        "registration": float(reg.mean),
        "registration_median": float(reg.median),
        "hand": reg.hand,
        "symmetry": o4.symmetry,
    }


def orientation_errors(
    q_true: ArrayLike, q_est: ArrayLike, symmetry: SymmetryGroup | str = "C1", seed: int = 0
) -> dict:
    """Both error measures for a report, in radians (:func:`error_report` of both alignments).

    Returns:
        ``{"e_or_o4", "e_or_o4_median"}`` (:func:`align_o4`), ``{"registration",
        "registration_median"}`` (:func:`align_rotation` with the hand free), ``"hand"``
        (``"same"``/``"mirrored"``), ``"o4_component"`` (``"SO(4)"``/``"conjugate"``) and
        ``"symmetry"``.
    """
    o4 = align_o4(q_true, q_est, symmetry=symmetry, seed=seed)
    reg = align_rotation(q_true, q_est, symmetry=symmetry, allow_mirror=True, seed=seed)
    return error_report(o4, reg)
