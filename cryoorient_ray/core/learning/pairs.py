"""Training pairs: candidate pairs within a protein, resampled so distances are uniform on [0, π].

Uniformly drawn orientations give pair distances with density (1 − cos d)/π, which is skewed
towards large d (the paper's Figure 12b). Training on that would bias the learned distance, so
the paper kept 1 % of the pairs, chosen to flatten the histogram (Appendix A). Here the pairs are
drawn *stratified*: the range [0, π] is cut into ``n_bins`` equal bins and each bin gets the same
number of pairs (with replacement only where a bin has fewer candidates than its quota).
"""

from __future__ import annotations

import math

import numpy as np

from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance
from cryoorient_ray.errors import CryoOrientError


def candidate_pairs(
    groups: np.ndarray, max_pairs: int | None = None, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of rows that share a group label (e.g. the same protein).

    With ``max_pairs`` and more candidates than that, a uniform random subset (with ``rng``).
    """
    groups = np.asarray(groups)
    ii, jj = [], []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if len(rows) < 2:
            continue
        a, b = np.triu_indices(len(rows), k=1)
        ii.append(rows[a])
        jj.append(rows[b])
    if not ii:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    i, j = np.concatenate(ii), np.concatenate(jj)
    if max_pairs is not None and len(i) > max_pairs:
        rng = rng or np.random.default_rng(0)
        keep = rng.choice(len(i), size=max_pairs, replace=False)
        i, j = i[keep], j[keep]
    return i, j


def pair_distances(
    quaternions: np.ndarray, i: np.ndarray, j: np.ndarray, groups: np.ndarray, symmetry: dict[int, str]
) -> np.ndarray:
    """d_G between rows ``i`` and ``j`` (same group), each group with its point group ``symmetry[g]`` (default C1)."""
    g = np.asarray(groups)[i]
    d = np.empty(len(i))
    for key in np.unique(g):
        sel = g == key
        d[sel] = symmetric_quat_distance(quaternions[i[sel]], quaternions[j[sel]], symmetry.get(int(key), "C1"))
    return d


def distance_bins(distances: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the equal-width bin of [0, π] each distance falls in (π goes to the last bin)."""
    return np.clip((np.asarray(distances, dtype=np.float64) / math.pi * n_bins).astype(np.int64), 0, n_bins - 1)


def uniform_resample(
    distances: np.ndarray, n: int, n_bins: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices into ``distances`` (values in [0, π]) whose histogram is flat over ``n_bins`` bins.

    Each non-empty bin gets ``n / (non-empty bins)`` picks (the remainder spread at random);
    within a bin, picks are without replacement while the bin has enough candidates.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1:
        raise CryoOrientError(f"distances must be 1-D, got shape {d.shape}")
    if n < 0 or n_bins < 1:
        raise CryoOrientError(f"need n >= 0 and n_bins >= 1, got {n}, {n_bins}")
    rng = rng or np.random.default_rng(0)
    if n == 0 or len(d) == 0:
        return np.zeros(0, dtype=np.int64)
    bins = distance_bins(d, n_bins)
    members = [np.flatnonzero(bins == b) for b in range(n_bins)]
    filled = [b for b in range(n_bins) if len(members[b])]
    quota = np.full(len(filled), n // len(filled))
    quota[rng.choice(len(filled), size=n % len(filled), replace=False)] += 1
    picks = [
        rng.choice(members[b], size=q, replace=q > len(members[b])) for b, q in zip(filled, quota, strict=True) if q
    ]
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out
