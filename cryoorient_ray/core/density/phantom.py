"""A procedural pseudo-protein: the project's own asymmetric demo structure (no data files).

:func:`pseudo_protein` grows a self-avoiding chain of Cα-like points, 3.8 Å apart, through
ellipsoidal domains and renders it as a sum of Gaussians. The default shape (``"domains"``) has
four domains of unequal size (about 38, 27, 20 and 15 % of the residues, jittered by the seed),
each with its own proportions and orientation, each attached to an earlier one in a random
direction where it overlaps no other. Of ``ARRANGEMENTS`` such random arrangements the one least
similar to itself under any rotation by more than 0.8 rad is kept (domains as Gaussian blobs: an
analytic overlap), so the blurred map has no near-symmetry: the max over a dense set of
rotations of the normalised correlation of the map (32³ at 6 Å) with its rotated self is
0.54–0.64 for seeds 0–5, against 0.77–0.86 for the former default, ``shape="dumbbell"`` (a
lopsided two-lobe body, a thin linker and a small domain: nearly symmetric under a half-turn once
noise blurs the arm). ``shape="random"`` draws three to five domains of random sizes: a varied
family of shapes over seeds.

Inside the domains, right-handed α-helix-like segments (1.5 Å rise, 100° per residue, 2.3 Å
radius) are grown now and then, so the chain, and the map, are chiral. The same seed gives the
same array; different seeds give different shapes.

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


def _radii(count: int, shape) -> np.ndarray:
    """Semi-axes (Å) in the proportions ``shape`` of an ellipsoid holding ``count`` residues."""
    vol = max(count, 1) * RESIDUE_VOLUME * PACKING_SLACK
    s = np.asarray(shape, dtype=np.float64)
    return s * (vol / (4 / 3 * math.pi * np.prod(s))) ** (1 / 3)


# The default's domain sizes (fractions of the residues), before the seed's jitter: unequal, so
# that no rotation can swap two domains.
DOMAIN_FRACTIONS = (0.38, 0.27, 0.20, 0.15)
DOMAIN_FUSION = 1.15  # centre distance of attached domains, in units of the sum of their radii


def _domain_fractions(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Residue fractions of the domains, largest first, no two within 20 % of each other."""
    for _ in range(1000):
        if shape == "domains":
            f = np.array(DOMAIN_FRACTIONS) * rng.uniform(0.9, 1.1, size=len(DOMAIN_FRACTIONS))
        else:  # random: 3 to 5 domains of Dirichlet sizes
            f = rng.dirichlet(np.full(int(rng.integers(3, 6)), 3.0))
        f = np.sort(f / f.sum())[::-1]
        if f.min() >= 0.08 and np.all(f[1:] <= 0.83 * f[:-1]):
            return f
    raise AssertionError("no domain sizes drawn")  # pragma: no cover - 1000 draws never all fail


def _place_domains(rng: np.random.Generator, radii: list[np.ndarray]) -> np.ndarray:
    """Centres (Å) of the domains: each fused to an earlier one, in a random direction where it
    overlaps no other domain (so the arrangement is irregular: no rotation maps it onto itself)."""
    size = [float(np.prod(r) ** (1 / 3)) for r in radii]  # radius of the sphere of the same volume
    centres = [np.zeros(3)]
    for k in range(1, len(radii)):
        best, best_gap = None, -np.inf
        for _ in range(200):
            parent = int(rng.integers(0, k))
            c = centres[parent] + _unit(rng.normal(size=3)) * DOMAIN_FUSION * (size[parent] + size[k])
            # room left to the other domains (≥ 0: they touch no more than parent and child do)
            gap = min(
                (np.linalg.norm(c - centres[m]) - DOMAIN_FUSION * (size[m] + size[k]) for m in range(k) if m != parent),
                default=0.0,
            )
            if gap >= 0:
                best = c
                break
            if gap > best_gap:
                best, best_gap = c, gap
        centres.append(best)
    return np.array(centres)


BLOB_BLUR = 5.0  # Å added to each domain's spread when arrangements are compared
ARRANGEMENTS = 24  # random domain arrangements drawn; the least self-similar one is kept
_TEST_ROTATIONS = None


def _large_rotations() -> np.ndarray:
    """``(M, 3, 3)``: a fixed, dense set of rotations by more than 0.8 rad."""
    global _TEST_ROTATIONS
    if _TEST_ROTATIONS is None:
        q = _unit(np.random.default_rng(20261201).normal(size=(800, 4)))
        q = q[2 * np.arccos(np.abs(q[:, 0]).clip(max=1.0)) > 0.8]
        w, x, y, z = q.T
        _TEST_ROTATIONS = np.stack(
            [
                np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
                np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
                np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
            ],
            1,
        )
    return _TEST_ROTATIONS


def _self_overlap(centres: np.ndarray, covs: np.ndarray, counts: np.ndarray) -> float:
    """Max over large rotations R of the normalised overlap of the domains, as Gaussian blobs
    (weight ``counts``, covariance ``covs (K, 3, 3)``, about their centre of mass), with
    themselves rotated by R: near 1 when some rotation maps the arrangement near itself."""
    w = counts / counts.sum()
    c = centres - w @ centres
    rots = np.concatenate([np.eye(3)[None], _large_rotations()])
    rc = np.einsum("mij,kj->mki", rots, c)  # (M, K, 3)
    rcov = np.einsum("mij,kjl,mnl->mkin", rots, covs, rots)  # (M, K, 3, 3)
    cov = rcov[:, :, None] + covs[None, None, :]  # (M, K, K, 3, 3)
    d = rc[:, :, None, :] - c[None, None, :, :]
    m2 = (d * np.linalg.solve(cov, d[..., None])[..., 0]).sum(-1)
    val = (w[:, None] * w[None, :] * np.exp(-0.5 * m2) / np.sqrt(np.linalg.det(cov))).sum((1, 2))
    return float(val[1:].max() / val[0])


def _build_domains(rng: np.random.Generator, n_residues: int, shape: str = "domains") -> np.ndarray:
    """Cα coordinates ``(n_residues, 3)`` in Å of a multi-domain pseudo-protein, centred at 0.

    ``shape="domains"`` (the default): four ellipsoidal domains of about 38, 27, 20 and 15 % of
    the residues; ``"random"``: three to five domains of random sizes. Each domain has its own
    proportions and orientation and is fused to an earlier one in a random direction; the chain
    visits them in order, crossing from one to the next.
    """
    fractions = _domain_fractions(rng, shape)
    counts = np.floor(fractions * (n_residues - 1)).astype(int)
    counts[0] += n_residues - 1 - counts.sum()  # the first residue sits at the origin
    radii = [_radii(n, (rng.uniform(1.0, 1.5), rng.uniform(0.8, 1.0), rng.uniform(0.6, 0.8))) for n in counts]
    # the least self-similar of a few random arrangements (domain centres and orientations)
    best, best_score = None, np.inf
    for _ in range(ARRANGEMENTS):
        centres = _place_domains(rng, radii)
        axes = [_random_rotation(rng) for _ in radii]
        # second moments of uniform ellipsoids (r²/5), blurred by a few Å
        covs = np.array([a @ np.diag(r**2 / 5 + BLOB_BLUR**2) @ a.T for a, r in zip(axes, radii, strict=True)])
        score = _self_overlap(centres, covs, counts)
        if score < best_score:
            best, best_score = (centres, axes), score
    regions = [_Region(c, r, a) for c, r, a in zip(best[0], radii, best[1], strict=True)]
    chain = _Chain(rng, n_residues)
    for region, count in zip(regions, counts, strict=True):
        chain.grow(region, int(count))
    pts = chain.points[: chain.n]
    return pts - pts.mean(axis=0)


SHAPES = ("domains", "random", "dumbbell")


def _build_chain(rng: np.random.Generator, n_residues: int, shape: str = "domains") -> np.ndarray:
    """Cα coordinates ``(n_residues, 3)`` in Å of the pseudo-protein ``shape`` (one of :data:`SHAPES`)."""
    if shape == "dumbbell":
        return _build_dumbbell(rng, n_residues)
    return _build_domains(rng, n_residues, shape)


def _build_dumbbell(rng: np.random.Generator, n_residues: int) -> np.ndarray:
    """Cα coordinates ``(n_residues, 3)`` in Å of the former default (``shape="dumbbell"``), centred at 0:
    a lopsided two-lobe body, a thin linker and a small protruding domain."""
    n_a = round(0.45 * n_residues)
    n_b = round(0.30 * n_residues)
    n_link = min(12, max(3, round(0.04 * n_residues)))
    n_arm = n_residues - 1 - n_a - n_b - n_link  # the first residue sits at the origin
    rot = _random_rotation(rng)  # the body's frame: seed-dependent, not along the box axes

    ra = _radii(n_a, (1.5, 1.0, 0.75))
    lobe_a = _Region(np.zeros(3), ra, rot)
    rb = _radii(n_b, (1.0, 0.85, 0.7))
    # lobe B overlaps lobe A off every principal axis of A
    dir_b = _unit(rot @ np.array([0.75, 0.55, 0.35]))
    lobe_b = _Region(dir_b * (0.8 * ra[0]), rb, _random_rotation(rng))

    chain = _Chain(rng, n_residues)
    chain.grow(lobe_a, n_a)
    chain.grow(lobe_b, n_b)

    # the linker leaves lobe B away from the body's centre, in a seed-dependent direction
    out = _unit(_unit(lobe_b.center) + 0.9 * _unit(rng.normal(size=3)) + 0.6 * (rot @ np.array([0.0, 0.0, 1.0])))
    surface = lobe_b.center + out * (rb.max() + 2.0)
    r_arm = _radii(n_arm, (1.0, 0.8, 0.8))
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
    shape: str = "domains",
) -> DensityMap:
    """A deterministic, asymmetric pseudo-protein density, centred in a cube.

    Args:
        seed: non-negative integer; the same seed gives the identical array.
        box_size: edge of the cube in voxels (``>= 8``).
        voxel_size: Å per voxel.
        n_residues: number of Cα-like points (``>= 20``); about 45 Å across for 300.
        resolution: Å; sets the Gaussian width (see the module docstring).
        shape: ``"domains"`` (four fused domains of unequal size), ``"random"`` (three to five
            domains of random sizes: a varied family over seeds) or ``"dumbbell"`` (the former
            default: two fused lobes, a thin linker and a small domain; nearly symmetric under a
            half-turn once blurred).

    Returns:
        :class:`DensityMap` ``(box_size,)*3`` float32 ``[z, y, x]``, named ``pseudo:SEED`` (the
        default shape) or ``pseudo-SHAPE:SEED``,
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
    if shape not in SHAPES:
        raise CryoOrientError(f"unknown pseudo-protein shape {shape!r}; use one of {', '.join(SHAPES)}")
    box_size, n_residues = int(box_size), int(n_residues)
    voxel_size, resolution = float(voxel_size), float(resolution)

    rng = np.random.default_rng(int(seed))
    xyz = _build_chain(rng, n_residues, shape)  # (N, 3) Å, columns x, y, z
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
    name = f"pseudo:{int(seed)}" if shape == "domains" else f"pseudo-{shape}:{int(seed)}"
    return DensityMap(data, voxel_size, name=name, source=name)
