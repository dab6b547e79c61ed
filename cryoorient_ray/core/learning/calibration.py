"""How far the true distance lies from the estimated one: σ(d̂), and confidence weights for recovery.

A learned distance d̂ is not equally reliable everywhere: under noise, a small d̂ is sometimes a
false neighbour, and a large d̂ saturates. :func:`fit_calibration` measures the spread of the
true d_q around d̂ on held-out (validation) pairs: the pairs are cut into ``n_bins`` bins of
equal count along d̂, and each bin's root-mean-square residual ``sqrt(mean (d_q − d̂)²)`` (the
bias counts: it is the error recovery sees) is made monotone in d̂ by the pool-adjacent-violators
algorithm on the binned mean squares, weighted by the counts, in the direction that fits them
better: non-decreasing for a distance that saturates at large d̂, non-increasing for one whose
small d̂ are often false neighbours (a noisy distance, measured: the RMS falls from 0.88 rad at
d̂ ≈ 1 to 0.40 at d̂ ≈ 2.6 for the small network at 0 dB). The
result, a :class:`DistanceCalibration`, interpolates σ(d̂) linearly between the bin centres
(constant beyond them) and gives the recovery's edge weights ``1/σ²(d̂)``.

It is saved with the model (``save_distance_model(..., extra={"calibration": cal.to_dict()})``)
and read back with :meth:`DistanceCalibration.from_dict`. Pure torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryoorient_ray.core._array import as_tensor
from cryoorient_ray.errors import CryoOrientError

__all__ = ["DistanceCalibration", "fit_calibration", "monotone_increasing"]

MIN_SIGMA = 0.02  # rad: the smallest spread a calibration reports (bounds the weights)


def monotone_increasing(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (weights ``counts``):
    the pool-adjacent-violators algorithm."""
    blocks: list[list[float]] = []  # [weighted mean, weight, length]
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        blocks.append([v, c, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, c2, n2 = blocks.pop()
            v1, c1, n1 = blocks.pop()
            w = c1 + c2
            blocks.append([(v1 * c1 + v2 * c2) / w if w > 0 else (v1 + v2) / 2, w, n1 + n2])
    out = [b[0] for b in blocks for _ in range(b[2])]
    return torch.tensor(out, dtype=values.dtype)


@dataclass(frozen=True)
class DistanceCalibration:
    """σ(d̂): the spread of the true distance given the estimated one.

    Attributes:
        centers: ``(B,)`` mean d̂ of each bin (rad), increasing.
        sigma: ``(B,)`` root-mean-square residual of each bin (rad), monotone, ``>= MIN_SIGMA``.
        counts: ``(B,)`` pairs in each bin.
    """

    centers: tuple[float, ...]
    sigma: tuple[float, ...]
    counts: tuple[int, ...]

    def spread(self, d_hat):
        """σ at ``d_hat`` (numpy or torch, any shape; same type back)."""
        d, was_np = as_tensor(d_hat)
        c = torch.tensor(self.centers, dtype=torch.float64)
        s = torch.tensor(self.sigma, dtype=torch.float64)
        x = d.detach().to(torch.float64).reshape(-1)
        if len(c) == 1:
            out = s.expand(len(x)).clone()
        else:
            k = torch.searchsorted(c, x).clamp(1, len(c) - 1)
            t = ((x - c[k - 1]) / (c[k] - c[k - 1]).clamp_min(1e-12)).clamp(0.0, 1.0)
            out = s[k - 1] + t * (s[k] - s[k - 1])
        out = out.reshape(d.shape)
        return out.numpy() if was_np else out.to(d.dtype)

    def weights(self, d_hat, normalise: bool = True):
        """Confidence ``1/σ²(d̂)`` of each distance; scaled to mean 1 when ``normalise``."""
        s = self.spread(d_hat)
        w = 1.0 / (s * s)
        n = w.size if isinstance(w, np.ndarray) else w.numel()
        if normalise and n:
            w = w / w.mean()
        return w

    def to_dict(self) -> dict:
        return {"centers": list(self.centers), "sigma": list(self.sigma), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: dict) -> DistanceCalibration:
        try:
            cal = cls(
                tuple(float(x) for x in data["centers"]),
                tuple(float(x) for x in data["sigma"]),
                tuple(int(x) for x in data["counts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CryoOrientError(f"malformed distance calibration: {exc}") from None
        if not (len(cal.centers) == len(cal.sigma) == len(cal.counts) >= 1):
            raise CryoOrientError("malformed distance calibration: centers, sigma and counts differ in length")
        if any(not math.isfinite(s) or s <= 0 for s in cal.sigma):
            raise CryoOrientError("malformed distance calibration: sigma must be finite and > 0")
        return cal


def fit_calibration(d_hat, d_true, n_bins: int = 12, min_per_bin: int = 20) -> DistanceCalibration:
    """σ(d̂) from pairs ``(d̂, d_q)`` (radians, same shape), in ``n_bins`` equal-count bins of d̂.

    Fewer bins are used when there are fewer than ``min_per_bin`` pairs per bin. The binned
    root-mean-square residuals are made monotone in d̂, in the better-fitting direction (module docstring).
    """
    d = as_tensor(d_hat)[0].detach().to(torch.float64).reshape(-1)
    t = as_tensor(d_true)[0].detach().to(torch.float64).reshape(-1)
    if d.shape != t.shape:
        raise CryoOrientError(f"d_hat and d_true differ in size: {d.numel()} vs {t.numel()}")
    if not (torch.isfinite(d).all() and torch.isfinite(t).all()):
        raise CryoOrientError("calibration pairs contain NaN or infinite distances")
    if d.numel() < min_per_bin:
        raise CryoOrientError(f"calibration needs at least {min_per_bin} pairs; got {d.numel()}")
    bins = max(1, min(int(n_bins), d.numel() // min_per_bin))
    order = torch.argsort(d)
    parts = torch.tensor_split(order, bins)
    centers = torch.stack([d[p].mean() for p in parts])
    ms = torch.stack([((t[p] - d[p]) ** 2).mean() for p in parts])
    counts = torch.tensor([len(p) for p in parts], dtype=torch.float64)
    up = monotone_increasing(ms, counts)
    down = monotone_increasing(ms.flip(0), counts.flip(0)).flip(0)
    best = up if float((counts * (up - ms) ** 2).sum()) <= float((counts * (down - ms) ** 2).sum()) else down
    sigma = best.sqrt().clamp_min(MIN_SIGMA)
    # equal d̂ across a bin boundary would give two equal centres: keep them strictly increasing
    centers = torch.cummax(centers + torch.arange(bins, dtype=torch.float64) * 1e-9, 0).values
    return DistanceCalibration(tuple(centers.tolist()), tuple(sigma.tolist()), tuple(int(c) for c in counts.tolist()))
