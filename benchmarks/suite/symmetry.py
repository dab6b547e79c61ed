"""Issue 18: symmetric particles and partial coverage — recovery from exact and perturbed distances.

Rows: C1 with half and quarter coverage of the viewing directions (the C1 Gram start and L_OR,
:mod:`cryoorient_ray.core.recovery.solver`), and the point groups C2, C3, D2, D7 (GroEL-like) and
I (a capsid's group) on full SO(3) (the anchor start and the symmetric L_OR,
:mod:`cryoorient_ray.core.recovery.symmetric`); exact d_G and d_G + N(0, σ² = 0.1), P = 1,000
each, on the pair graph of the other benchmarks (10 nearest + 20 random partners per
projection; the symmetric recovery adds 16 anchor edges per projection). Errors are
symmetry-aware: E_OR (O(4)) and the registration error (rotation + hand), min over mates per
image before the mean. Only orientations are simulated: the groups' rows need no map.

The learned-distance rows on 5a1a (noiseless and −12 dB, before and after refinement) are not
run here yet: their headline keys are ``None``.
"""

from __future__ import annotations

import math
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import Context, register  # noqa: E402

CASES = [  # (label, coverage, point group)
    ("C1 half", "half", "C1"),
    ("C1 quarter", "quarter", "C1"),
    ("C2", "full", "C2"),
    ("C3", "full", "C3"),
    ("D2", "full", "D2"),
    ("D7", "full", "D7"),
    ("I", "full", "I"),
]
SIGMA2 = [0.0, 0.1]
LEARNED_KEYS = ("5a1a_noiseless_rad", "5a1a_m12_rad", "5a1a_noiseless_refined_rad", "5a1a_m12_refined_rad")


def headline(result: dict) -> dict:
    """The worst E_OR of the exact rows, the worst at σ² = 0.1, and the 5a1a keys (None: not run)."""
    rows = result["tables"][0]["rows"]
    out = {
        "exact_max_rad": max(r["E_OR (rad)"] for r in rows if r["σ²"] == 0.0),
        "sigma2_0.1_max_rad": max(r["E_OR (rad)"] for r in rows if r["σ²"] == 0.1),
    }
    for r in rows:
        out[f"{r['case'].replace(' ', '_')}_sigma2_{r['σ²']}_rad"] = r["E_OR (rad)"]
    learned = {r["key"]: r["rad"] for r in result.get("learned_rows", [])}
    out.update({k: learned.get(k) for k in LEARNED_KEYS})
    return out


def _noisy(q: np.ndarray, sym: str, sigma2: float, seed: int):
    """``d̂(i, j) = d_G + ε_ij``: noise fixed per unordered pair (the same whichever edges ask)."""
    from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance

    table = np.random.default_rng([seed, 18]).normal(0.0, math.sqrt(sigma2), size=len(q) * 64)

    def dist(i, j):
        d = np.asarray(symmetric_quat_distance(q[i], q[j], sym), dtype=np.float64)
        if sigma2 > 0:
            key = (np.minimum(i, j) * 2654435761 + np.maximum(i, j) * 40503) % len(table)
            d = d + table[key]
        return np.clip(d, 0.0, math.pi)

    return dist


def _one(p: int, coverage: str, sym: str, sigma2: float, seed: int) -> dict:
    from cryoorient_ray.core.geometry.sampling import sample_orientations
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation
    from cryoorient_ray.core.recovery.graph import build_pair_graph
    from cryoorient_ray.core.recovery.solver import (
        EdgeObjective,
        RecoverySettings,
        check_distances,
        recover_orientations,
    )
    from cryoorient_ray.core.recovery.symmetric import recover_symmetric

    q = sample_orientations(p, coverage=coverage, seed=seed)
    g = build_pair_graph(q, k=10, n_random=20, metric="quaternion", seed=seed)
    dist = _noisy(q, sym, sigma2, seed)
    d = check_distances(dist(g.i, g.j))
    settings = RecoverySettings(seed=seed)
    t0 = time.perf_counter()
    if sym == "C1":
        res = recover_orientations(p, EdgeObjective(g.i, g.j, d), settings=settings)
        anchor = None
    else:
        # with noisy d̂ the anchors' residual never reaches the exact-distance tolerance, so every
        # attempt would run: one attempt of 256 starts (the exact rows: up to 3 of 512)
        kw = {} if sigma2 == 0 else {"attempts": 1, "restarts": 256}
        res, start = recover_symmetric(p, g.i, g.j, d, dist, sym, settings, **kw)
        anchor = float(start.anchor_loss)
    secs = time.perf_counter() - t0
    o4 = align_o4(q, res.quaternions, symmetry=sym, seed=seed)
    reg = align_rotation(q, res.quaternions, symmetry=sym, seed=seed)
    return {
        "E_OR (rad)": float(min(o4.mean, reg.mean)),
        "median (rad)": float(o4.median),
        "registration (rad)": float(reg.mean),
        "hand": reg.hand,
        "L_OR": float(res.final_loss),
        "anchor residual": anchor,
        "steps": int(res.steps),
        "recovery (s)": round(secs, 1),
    }


@register(
    "symmetry",
    "Symmetric particles and partial coverage: exact and perturbed distances (issue 18)",
    needs_gpu_for_paper=False,
    paper_reference="5a1a (D2), quarter-sphere directions with C1 targets: E_OR 0.13 rad after recovery",
    headline=headline,
    small_threads=1,
)
def run(ctx: Context) -> dict:
    import os

    p = 1000
    rows = []
    for label, coverage, sym in CASES:
        for s2 in SIGMA2:
            r = _one(p, coverage, sym, s2, ctx.seed)
            rows.append({"case": label, "coverage": coverage, "group": sym, "σ²": s2, **r})
            ctx.say(
                f"{label} σ² = {s2}: E_OR {r['E_OR (rad)']:.2e} rad, registration {r['registration (rad)']:.2e} "
                f"in {r['recovery (s)']} s (load {os.getloadavg()[0]:.1f})"
            )

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [c[0] for c in CASES]
    xs = np.arange(len(labels))
    for k, s2 in enumerate(SIGMA2):
        vals = [next(r["E_OR (rad)"] for r in rows if r["case"] == lab and r["σ²"] == s2) for lab in labels]
        ax.bar(xs + (k - 0.5) * 0.38, np.maximum(vals, 1e-7), 0.38, label=f"σ² = {s2}")
    ax.axhline(0.01, color="k", ls="--", lw=0.8, label="goal for exact distances (0.01 rad)")
    ax.set_yscale("log")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("symmetry-aware E_OR (rad)")
    ax.set_title(f"Recovery on SO(3)/G and restricted coverage (P = {p})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.figure, dpi=110)
    plt.close(fig)
    exact = [r for r in rows if r["σ²"] == 0.0]
    worst = max(exact, key=lambda r: r["E_OR (rad)"])
    return {
        "P": p,
        "reduction": "none (P = 1,000 per row as the issue asks); the learned-distance 5a1a rows are not run",
        "tables": [
            {
                "title": "Symmetry-aware errors after recovery (P = 1,000, in-process)",
                "columns": [
                    "case",
                    "coverage",
                    "group",
                    "σ²",
                    "E_OR (rad)",
                    "median (rad)",
                    "registration (rad)",
                    "hand",
                    "L_OR",
                    "anchor residual",
                    "steps",
                    "recovery (s)",
                ],
                "rows": rows,
            }
        ],
        "learned_rows": [],
        "figure": ctx.figure,
        "notes": [
            f"Exact distances: worst E_OR {worst['E_OR (rad)']:.1e} rad ({worst['case']}).",
            "C1 with half or quarter coverage was already exact with the Gram start; what failed was the "
            "point groups: the C1 Gram start and d_q instead of d_G (exact D2 distances: 0.88 rad).",
            "Symmetric rows: 16 anchors solved from random starts with an annealed soft minimum over mates, "
            "every projection trilaterated from its distances to them on a grid of SO(3)/G, then the "
            "symmetric L_OR (gradient through the nearest mate) on the graph plus the anchor edges.",
            "The registration error (rotation + hand) is large for every row and means nothing here: "
            "recovery fixes orientations up to the O(4) gauge, and only the images (the gauge stage, not run: "
            "no images in this benchmark) pick the physical one; E_OR is the measure.",
            "Not run: the learned distance on 5a1a (noiseless, −12 dB; after recovery and after "
            "refinement); their headline keys are None.",
        ],
    }
