"""A procedural pseudo-protein: the project's own asymmetric demo structure (no data files).

:func:`pseudo_protein` grows a self-avoiding chain of Cα-like points, 3.8 Å apart, through
four regions, and renders it as a sum of Gaussians:

  1. a large ellipsoidal lobe (about 45 % of the residues),
  2. a smaller, off-axis lobe fused to it (about 30 %) — the body is a lopsided "bean",
  3. a linker (4 % of the residues, 3 to 12) leaving the body in a seed-dependent direction,
  4. a small protruding domain at its end (the rest).

Inside the lobes and the domain, right-handed α-helix-like segments (1.5 Å rise, 100° per
residue, 2.3 Å radius) are grown now and then. No rotation maps the result onto itself, nor
onto its mirror image (the helices and the chain are chiral and the lobes and arm break every
axis). The same seed gives the same array; different seeds give different shapes.

Each residue is one Gaussian of width ``σ = sqrt((0.225·resolution)² + (1.5 Å)²)`` (Chimera
``molmap``'s width for ``resolution``, widened by the size of a residue around its Cα),
integrated over each voxel (so the sampling never aliases, and the mass and centre are exact).
Pure numpy.
"""

from __future__ import annotations

import math

import numpy as np

from cryoorient_ray.core.density.volume import DensityMap, normalize_map
from cryoorient_ray.errors import CryoOrientError

CA_STEP = 3.8  # Å between consecutive Cα
MIN_DIST = 4.0  # Å, closest approach of non-neighbouring residues
RESIDUE_VOLUME = 136.0  # Å³ per residue in a protein (≈ 110 Da at 1.35 g/cm³)
PACKING_SLACK = 1.25  # a Cα-only chain needs room to stay self-avoiding
HELIX_RISE, HELIX_TURN, HELIX_RADIUS = 1.5, math.radians(100.0), 2.3
RESIDUE_SIGMA = 1.5  # Å, spread of a residue's mass around its Cα


class _Region:
    """An ellipsoid ``|A (p - c)| <= 1`` with semi-axes ``radii`` along the columns of ``axes``."""

    def __init__(self, center: np.ndarray, radii: np.ndarray, axes: np.ndarray) -> None:
        self.center = center
        self.proj = (axes / radii).T  # rows: axis / radius

    def excess(self, p: np.ndarray) -> np.ndarray:
        """How far outside (in units of the radii) each point of ``p`` ``(..., 3)`` lies; 0 inside."""
        r = np.linalg.norm((p - self.center) @ self.proj.T, axis=-1)
        return np.maximum(r - 1.0, 0.0)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Chain:
    def __init__(self, rng: np.random.Generator, capacity: int) -> None:
        self.rng = rng
        self.points = np.zeros((capacity, 3))
        self.n = 1  # starts at the origin

    @property
    def last(self) -> np.ndarray:
        return self.points[self.n - 1]

    def _clearance(self, cand: np.ndarray) -> np.ndarray:
        """Closest distance of each candidate ``(K, 3)`` to the chain, except its last point."""
        others = self._near(cand)
        if len(others) == 0:
            return np.full(len(cand), np.inf)
        d = np.linalg.norm(cand[:, None, :] - others[None, :, :], axis=-1)
        return d.min(axis=1)

    def _near(self, pts: np.ndarray) -> np.ndarray:
        """Residues (but the last) that could lie within ``MIN_DIST`` of ``pts`` ``(K, 3)``."""
        others = self.points[: max(self.n - 1, 0)]
        lo, hi = pts.min(axis=0) - MIN_DIST, pts.max(axis=0) + MIN_DIST
        return others[np.all((others > lo) & (others < hi), axis=1)]

    def step(self, region: _Region, target: np.ndarray | None = None) -> None:
        """One 3.8 Å step, at least ``MIN_DIST`` from every earlier residue but the last.

        Inside ``region``: a random such step that stays inside. Outside it (or with a
        ``target``): the such step that gets closest to the region's centre (or the target).
        If every direction clashes, the one with the most room.
        """
        dirs = _unit(self.rng.normal(size=(64, 3)))
        cand = self.last + CA_STEP * dirs
        clear = self._clearance(cand)
        free = clear >= MIN_DIST
        excess = region.excess(cand)
        if not free.any():
            best = int(np.argmax(clear))
        elif target is not None or region.excess(self.last[None])[0] > 0:
            goal = region.center if target is None else target
            best = int(np.argmin(np.where(free, np.linalg.norm(cand - goal, axis=1), np.inf)))
        elif (free & (excess == 0)).any():
            best = int(self.rng.choice(np.flatnonzero(free & (excess == 0))))
        else:
            best = int(np.argmin(np.where(free, excess, np.inf)))
        self.points[self.n] = cand[best]
        self.n += 1

    def try_helix(self, region: _Region, length: int) -> bool:
        """Append a right-handed α-helix of ``length`` residues if one fits; True if it did."""
        for _ in range(8):
            u = _unit(self.rng.normal(size=3))
            e1 = _unit(np.cross(u, self.rng.normal(size=3)))
            e2 = np.cross(u, e1)
            k = np.arange(1, length + 1)[:, None]
            ang = HELIX_TURN * k
            # start on the helix at angle 0, i.e. at the last point; e1 × e2 = u: right-handed.
            pts = self.last + HELIX_RISE * k * u + HELIX_RADIUS * ((np.cos(ang) - 1) * e1 + np.sin(ang) * e2)
            if np.any(region.excess(pts) > 0):
                continue
            others = self._near(pts)
            if len(others) and np.linalg.norm(pts[:, None] - others[None], axis=-1).min() < MIN_DIST:
                continue
            self.points[self.n : self.n + length] = pts
            self.n += length
            return True
        return False

    def grow(self, region: _Region, count: int, helices: bool = True) -> None:
        """Grow ``count`` residues inside ``region`` (walking into it first if outside)."""
        stop = self.n + count
        while self.n < stop:
            room = stop - self.n
            if helices and room >= 8 and region.excess(self.last[None])[0] == 0 and self.rng.random() < 0.08:
                if self.try_helix(region, int(self.rng.integers(8, min(16, room) + 1))):
                    continue
            self.step(region)


def _build_chain(rng: np.random.Generator, n_residues: int) -> np.ndarray:
    """Cα coordinates ``(n_residues, 3)`` in Å of the four-part pseudo-protein, centred at 0."""
    n_a = round(0.45 * n_residues)
    n_b = round(0.30 * n_residues)
    n_link = min(12, max(3, round(0.04 * n_residues)))
    n_arm = n_residues - 1 - n_a - n_b - n_link  # the first residue sits at the origin
    rot = _random_rotation(rng)  # the body's frame: seed-dependent, not along the box axes

    def radii(count: int, shape: tuple[float, float, float]) -> np.ndarray:
        vol = max(count, 1) * RESIDUE_VOLUME * PACKING_SLACK
        s = np.array(shape)
        return s * (vol / (4 / 3 * math.pi * np.prod(s))) ** (1 / 3)

    ra = radii(n_a, (1.5, 1.0, 0.75))
    lobe_a = _Region(np.zeros(3), ra, rot)
    rb = radii(n_b, (1.0, 0.85, 0.7))
    # lobe B overlaps lobe A off every principal axis of A
    dir_b = _unit(rot @ np.array([0.75, 0.55, 0.35]))
    lobe_b = _Region(dir_b * (0.8 * ra[0]), rb, _random_rotation(rng))

    chain = _Chain(rng, n_residues)
    chain.grow(lobe_a, n_a)
    chain.grow(lobe_b, n_b)

    # the linker leaves lobe B away from the body's centre, in a seed-dependent direction
    out = _unit(_unit(lobe_b.center) + 0.9 * _unit(rng.normal(size=3)) + 0.6 * (rot @ np.array([0.0, 0.0, 1.0])))
    surface = lobe_b.center + out * (rb.max() + 2.0)
    r_arm = radii(n_arm, (1.0, 0.8, 0.8))
    arm_center = surface + out * (n_link * CA_STEP * 0.5 + r_arm.max())
    arm = _Region(arm_center, r_arm, _random_rotation(rng))
    for _ in range(n_link):
        chain.step(arm, target=arm_center)
    chain.grow(arm, n_arm)
    pts = chain.points[: chain.n]
    return pts - pts.mean(axis=0)


def _voxel_gaussians(coords: np.ndarray, box_size: int, voxel_size: float, sigma: float) -> np.ndarray:
    """``(N, D)``: the mass of 1D Gaussians at ``coords`` (Å, 0 = centre voxel) in each voxel."""
    edges = (np.arange(box_size + 1) - box_size // 2 - 0.5) * voxel_size
    z = (edges[None, :] - coords[:, None]) / (sigma * math.sqrt(2.0))
    cdf = 0.5 * (1.0 + _erf(z).astype(np.float64))
    return np.diff(cdf, axis=1)


_erf = np.frompyfunc(math.erf, 1, 1)


def pseudo_protein(
    seed: int = 0,
    box_size: int = 64,
    voxel_size: float = 3.0,
    n_residues: int = 300,
    resolution: float = 8.0,
) -> DensityMap:
    """A deterministic, asymmetric pseudo-protein density, centred in a cube.

    Args:
        seed: non-negative integer; the same seed gives the identical array.
        box_size: edge of the cube in voxels (``>= 8``).
        voxel_size: Å per voxel.
        n_residues: number of Cα-like points (``>= 20``); about 45 Å across for 300.
        resolution: Å; sets the Gaussian width (see the module docstring).

    Returns:
        :class:`DensityMap` ``(box_size,)*3`` float32 ``[z, y, x]``, named ``pseudo:SEED``,
        normalised by :func:`~cryoorient_ray.core.density.volume.normalize_map`, with the centre of
        mass of the residues on voxel ``box_size // 2``.

    Raises:
        CryoOrientError: bad arguments, or a molecule that does not fit the box.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CryoOrientError(f"pseudo-protein seed must be a non-negative integer; got {seed!r}")
    if isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer)) or box_size < 8:
        raise CryoOrientError(f"pseudo-protein box size must be an integer >= 8 voxels; got {box_size!r}")
    if isinstance(n_residues, bool) or not isinstance(n_residues, (int, np.integer)) or n_residues < 20:
        raise CryoOrientError(f"pseudo-protein needs an integer number of residues >= 20; got {n_residues!r}")
    for what, value in (("voxel size", voxel_size), ("resolution", resolution)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value <= 0:
            raise CryoOrientError(f"pseudo-protein {what} must be a positive number of Å; got {value!r}")
    box_size, n_residues = int(box_size), int(n_residues)
    voxel_size, resolution = float(voxel_size), float(resolution)

    rng = np.random.default_rng(int(seed))
    xyz = _build_chain(rng, n_residues)  # (N, 3) Å, columns x, y, z
    sigma = math.hypot(0.225 * resolution, RESIDUE_SIGMA)
    reach = float(np.abs(xyz).max()) + 3 * sigma
    room = (box_size // 2 - 1) * voxel_size
    if reach > room:
        raise CryoOrientError(
            f"a {n_residues}-residue pseudo-protein reaches {reach:.0f} Å from its centre, more than the "
            f"{room:.0f} Å a {box_size}-voxel box at {voxel_size:g} Å/voxel leaves; "
            "use a larger box size or voxel size, or fewer residues"
        )
    gx, gy, gz = (_voxel_gaussians(xyz[:, i], box_size, voxel_size, sigma) for i in range(3))
    plane = (gy[:, :, None] * gx[:, None, :]).reshape(n_residues, -1)  # (N, D*D) [y, x]
    data = (gz.T @ plane).reshape(box_size, box_size, box_size)
    data = normalize_map(data.astype(np.float32))
    return DensityMap(data, voxel_size, name=f"pseudo:{int(seed)}", source=f"pseudo:{int(seed)}")
