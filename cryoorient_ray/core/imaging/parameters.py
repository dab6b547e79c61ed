"""Per-projection parameters of a simulated dataset: orientation, shift, CTF, split.

Everything is drawn up front for a protein from ``numpy.random.default_rng([seed, protein])``,
so a dataset is reproducible from its config alone and does not depend on how the work is
split into shards or tasks.
"""

from __future__ import annotations

import numpy as np

from cryoorient_ray.core.geometry.euler import unitquat_to_euler_relion
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.errors import CryoOrientError

SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2


def sample_shifts(n: int, max_shift: float, distribution: str, rng: np.random.Generator) -> np.ndarray:
    """``(n, 2)`` shifts ``(x, y)`` in pixels within ``±max_shift``.

    ``triangular`` (mean 0, mode 0, the paper's Figure 9a) or ``uniform``.
    """
    if max_shift < 0:
        raise CryoOrientError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return np.zeros((n, 2))
    if distribution == "triangular":
        return rng.triangular(-max_shift, 0.0, max_shift, size=(n, 2))
    if distribution == "uniform":
        return rng.uniform(-max_shift, max_shift, size=(n, 2))
    raise CryoOrientError(f"unknown shift distribution {distribution!r}; use triangular or uniform")


def sample_defocus(
    n: int, defocus_min: float, defocus_max: float, astigmatism_max: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION ``(defocus_u, defocus_v, defocus_angle)``: mean defocus uniform in ``[min, max]`` Å,
    astigmatism ``defocus_u - defocus_v`` uniform in ``[0, astigmatism_max]`` Å, angle uniform in ``[0, 180)``."""
    if not 0 <= defocus_min <= defocus_max:
        raise CryoOrientError(f"need 0 <= defocus_min <= defocus_max, got {defocus_min}, {defocus_max}")
    mean = rng.uniform(defocus_min, defocus_max, n)
    astig = rng.uniform(0.0, astigmatism_max, n) if astigmatism_max > 0 else np.zeros(n)
    angle = rng.uniform(0.0, 180.0, n)
    return mean + astig / 2, mean - astig / 2, angle


def assign_splits(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Split codes ``(n,)`` (0 train, 1 val, 2 test) in the given proportions, randomly placed."""
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or np.any(f < 0) or abs(f.sum() - 1) > 1e-6:
        raise CryoOrientError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    n_train = int(round(f[0] * n))
    n_val = min(int(round(f[1] * n)), n - n_train)
    codes = np.full(n, SPLIT_TEST, dtype=np.uint8)
    codes[:n_train] = SPLIT_TRAIN
    codes[n_train : n_train + n_val] = SPLIT_VAL
    return codes[rng.permutation(n)]


def sample_projection_parameters(
    n: int,
    seed: int,
    protein: int,
    *,
    sampler: str = "uniform",
    coverage: str = "full",
    max_shift: float = 0.0,
    shift_distribution: str = "triangular",
    ctf: dict | None = None,
    split_fractions: tuple[float, float, float] = (0.5, 0.17, 0.33),
) -> dict[str, np.ndarray]:
    """All per-projection parameters of one protein, as store metadata arrays.

    Args:
        n: projections of this protein.
        seed, protein: the draw is ``default_rng([seed, protein])``.
        ctf: None for no CTF, else ``{"defocus_min", "defocus_max", "astigmatism_max"}`` in Å.

    Returns:
        ``quaternion (n, 4)`` wxyz, ``euler (n, 3)`` RELION degrees, ``shift (n, 2)`` pixels,
        ``defocus_u``, ``defocus_v``, ``defocus_angle`` ``(n,)`` (zeros without CTF), ``split (n,)``.
    """
    rng = np.random.default_rng([int(seed), int(protein)])
    q = sample_orientations(n, sampler, coverage, seed=rng)
    shifts = sample_shifts(n, max_shift, shift_distribution, rng)
    if ctf:
        du, dv, da = sample_defocus(n, ctf["defocus_min"], ctf["defocus_max"], ctf.get("astigmatism_max", 0.0), rng)
    else:
        du = dv = da = np.zeros(n)
    split = assign_splits(n, split_fractions, rng)
    return {
        "quaternion": q,
        "euler": unitquat_to_euler_relion(q),
        "shift": shifts,
        "defocus_u": du,
        "defocus_v": dv,
        "defocus_angle": da,
        "split": split,
    }
