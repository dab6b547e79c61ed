"""Recovery under noise (issue 16): 5j0n and the pseudo-protein from ∞ down to −20 dB, with an oracle.

Every row simulates 5,000 projections at the acquisition box, where the SNR is set (the project's
definition: per image, var(clean projection over the acquisition box) / σ²), Fourier-crops them to
the working box, trains the distance in-process (``benchmarks/common.py`` ``train_plain``), and
recovers the test split (sparse pair graph, Gram start, the gauge). Rows, per protein: SNR ∞, −5,
−12 (the paper's σ² = 16) and −20 dB, and −12 dB with CTF (defocus 1–2.5 µm) and shifts; the
−12 dB rows with three seeds (a new store, training and recovery each), reported as mean and sd.

Geometry: 5j0n is the paper's map, 116² at 3.667 Å/px acquisition, full SO(3); the pseudo-protein
(``pseudo:0``, whatever its current shape) 64² at 3 Å/px. Working box: 32² at small scale (13.29
and 6 Å/px), the acquisition box itself at paper scale.

Per row: test L_DE (pairs uniform in d_q), the 10-NN neighbour quality (median over images of the
mean true d_q of its 10 nearest by d̂; the true 10-NN's as the ideal), E_OR (O(4), as the paper)
and the rotation + hand error of the recovery, the **oracle** (exhaustive assignment of 20,000
orientations against the true working map on the same images, their CTF and shifts included: the
floor no method can beat), train and recovery time. Goals (before refinement): 5j0n −12 dB ≤ 0.25
rad, with CTF and shifts ≤ 0.35, pseudo −12 dB ≤ 0.25, −20 dB ≤ 0.6; where 1.5× the oracle is
above a goal, that is the goal.

Every row and seed keeps its store, model and recovery under ``benchmarks/work/noise_<scale>/
<row>/seed<k>/`` (``store.zarr``, ``model.pt``, ``recovered.npz`` with ``rows``, ``quaternions``
after the gauge and ``q_true``, and ``run.json``, the run's row of the table), which the ``refine``
benchmark starts from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.harness import ROOT, Context, register  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
N_PROJECTIONS = 5000
N_SEEDS = 3  # the −12 dB rows
ORACLE_CANDIDATES = 20000  # grid spacing ≈ 0.088 rad
NEIGHBOURS = 10
# Adam steps of 64 images per training. Fresh noise cannot be memorised, so the distance keeps
# improving with steps: on 5j0n at −12 dB, 2,000 steps recover to 1.35 rad and 6,000 to 0.29 rad
# (docs/BENCHMARKS.md, "Fresh noise"). Small scale therefore trains 6,000 steps (≈ 3–4 min each on
# 2 cores) and runs only the rows the goals name (SMALL_SEEDS); paper scale runs every row.
STEPS = {"small": 6000, "paper": 20000}
DEFOCUS_A = (10000.0, 25000.0)  # 1–2.5 µm
SHIFT_FRACTION = 1 / 16  # largest shift, of the working box (2 px of 32², 7.25 px of 116²)
ORACLE_SLACK = 1.5  # where 1.5× the oracle is above a goal, it is the goal
GOALS = {"5j0n_m12": 0.25, "5j0n_m12_ctf": 0.35, "pseudo_m12": 0.25, "5j0n_m20": 0.6, "pseudo_m20": 0.6}
# Acquisition box (px), its Å/px, and the working box at each scale; the config each starts from.
GEOMETRY = {
    "5j0n": {"config": common.PAPER_5J0N, "acquisition": (116, 3.667), "working": {"small": 32, "paper": 116}},
    "pseudo": {"config": common.DEMO, "acquisition": (64, 3.0), "working": {"small": 32, "paper": 64}},
}
COLUMNS = [
    "row",
    "SNR (dB)",
    "CTF + shifts",
    "box (px)",
    "Å/px",
    "seeds",
    "test L_DE",
    "10-NN d_q (rad)",
    "ideal 10-NN d_q (rad)",
    "E_OR (rad)",
    "rot+hand (rad)",
    "rot+hand sd",
    "oracle (rad)",
    "goal (rad)",
    "met",
    "train (s)",
    "recover (s)",
]
SEED_COLUMNS = [
    "row",
    "seed",
    "test L_DE",
    "10-NN d_q (rad)",
    "E_OR (rad)",
    "rot+hand (rad)",
    "hand",
    "gauge physical",
    "oracle (rad)",
    "steps",
    "train (s)",
    "recover (s)",
]


@dataclass(frozen=True)
class Row:
    """One setting of the benchmark: a protein, an acquisition SNR (None = noiseless), CTF + shifts."""

    protein: str
    snr_db: float | None
    ctf_shifts: bool = False

    @property
    def name(self) -> str:
        snr = "inf" if self.snr_db is None else f"m{-self.snr_db:g}" if self.snr_db < 0 else f"p{self.snr_db:g}"
        return f"{self.protein}_{snr}" + ("_ctf" if self.ctf_shifts else "")

    @property
    def seeds(self) -> int:
        return N_SEEDS if self.snr_db == -12.0 else 1


# Small scale (2 CPU cores, ~40 min): the rows with a goal, plus the noiseless 5j0n reference;
# three seeds only where the headline's decisive row is (5j0n at −12 dB). Name → seeds.
SMALL_SEEDS = {"5j0n_inf": 1, "5j0n_m12": N_SEEDS, "5j0n_m12_ctf": 1, "5j0n_m20": 1, "pseudo_m12": 1}

ROWS = tuple(
    Row(protein, snr, ctf)
    for protein in ("5j0n", "pseudo")
    for snr, ctf in ((None, False), (-5.0, False), (-12.0, False), (-20.0, False), (-12.0, True))
)


def effective_goal(goal: float | None, oracle: float | None) -> float | None:
    """The goal a row is held to: its stated goal, or 1.5× the oracle's error where that is above it."""
    if goal is None:
        return None
    if oracle is None or not math.isfinite(oracle):
        return goal
    return max(goal, ORACLE_SLACK * oracle)


def headline(result: dict) -> dict:
    """Per row of the summary table: the rotation + hand error of the recovery (mean over seeds) as
    ``<row>_recovered_rad``, its oracle as ``<row>_oracle_rad``; per row with a goal, ``<row>_goal_met``
    (against :func:`effective_goal` of the stored oracle)."""
    out: dict = {}
    for r in result["tables"][0]["rows"]:
        out[f"{r['row']}_recovered_rad"] = r["rot+hand (rad)"]
        out[f"{r['row']}_oracle_rad"] = r["oracle (rad)"]
    for r in result["tables"][0]["rows"]:
        goal = effective_goal(GOALS.get(r["row"]), r["oracle (rad)"])
        if goal is not None:
            out[f"{r['row']}_goal_met"] = bool(r["rot+hand (rad)"] <= goal)
    return out


def simulate_sets(row: Row, scale: str, n: int | None = None) -> list[str]:
    """``--set`` overrides of the row's config: the acquisition, the working box, noise, CTF, shifts
    (``n`` projections; default :data:`N_PROJECTIONS`)."""
    n = N_PROJECTIONS if n is None else n
    geo = GEOMETRY[row.protein]
    acq_size, acq_pixel = geo["acquisition"]
    size = geo["working"][scale]
    sets = [
        f"simulate.n_per_map={n}",
        "simulate.shard_size=1000",
        f"simulate.image_size={size}",
        "simulate.voxel_size=null",
        f"simulate.acquisition.image_size={acq_size}",
        f"simulate.acquisition.pixel_size={acq_pixel}",
        "simulate.noise.snr_db=null" if row.snr_db is None else f"simulate.noise.snr_db={row.snr_db}",
        f"simulate.shifts.max_shift={SHIFT_FRACTION * size if row.ctf_shifts else 0.0}",
        f"simulate.ctf.enabled={'true' if row.ctf_shifts else 'false'}",
    ]
    if row.protein == "pseudo":
        sets.append('simulate.inputs=["pseudo:0"]')
    if row.ctf_shifts:
        sets += [f"simulate.ctf.defocus_min={DEFOCUS_A[0]}", f"simulate.ctf.defocus_max={DEFOCUS_A[1]}"]
    return sets


def row_folder(scale: str, row: Row, seed: int) -> Path:
    """Where a row's store, model and recovery are kept (the ``refine`` benchmark reads them)."""
    return WORK / f"noise_{scale}" / row.name / f"seed{seed}"


def _run_seed(ctx: Context, row: Row, seed: int, steps: int, model: dict, device: str) -> dict:
    folder = row_folder(ctx.scale, row, seed)
    config = GEOMETRY[row.protein]["config"]
    store = common.simulate(
        ctx, f"{row.name} seed {seed}", simulate_sets(row, ctx.scale), config, path=folder / "store.zarr", seed=seed
    )
    net, train_s = common.train_plain(store, steps, model=model, seed=seed, device=device)
    model_path = folder / "model.pt"
    from cryoorient_ray.core.learning.model import save_distance_model

    save_distance_model(model_path, net)
    q = common.distance_quality(store, model_path, split="test", n_pairs=2000, seed=seed)["learned"]
    rec = common.recover(store, model_path, gauge=True, seed=seed)
    outcome = rec["outcome"]
    nq = common.recovery_neighbour_quality(store, rec, model_path, k=NEIGHBOURS, seed=seed)
    rows = outcome.selection.rows[outcome.nodes]
    q_true = outcome.selection.q_true[outcome.nodes]
    np.savez(folder / "recovered.npz", rows=rows, quaternions=outcome.q_final, q_true=q_true)
    orc = common.oracle(store, rows, n_candidates=ORACLE_CANDIDATES, seed=seed, device=None if ctx.small else device)
    out = {
        "row": row.name,
        "seed": seed,
        "test L_DE": q["L_DE"],
        "10-NN d_q (rad)": nq["knn_dq"],
        "ideal 10-NN d_q (rad)": nq["ideal_dq"],
        "E_OR (rad)": rec["e_or_o4"],
        "rot+hand (rad)": rec["registration"],
        "hand": rec.get("hand"),
        "gauge physical": rec.get("gauge_physical"),
        "oracle (rad)": orc["mean"],
        "steps": steps,
        "train (s)": round(train_s, 1),
        "recover (s)": rec["wall_s"],
        "box (px)": store.image_size,
        "Å/px": round(store.pixel_size, 3),
    }
    (folder / "run.json").write_text(json.dumps(out, indent=2) + "\n")
    ctx.say(
        f"{row.name} seed {seed}: L_DE {q['L_DE']:.3f}, 10-NN d_q {nq['knn_dq']:.3f} (ideal {nq['ideal_dq']:.3f}), "
        f"E_OR {rec['e_or_o4']:.3f}, rot+hand {rec['registration']:.3f}, oracle {orc['mean']:.3f} rad "
        f"(train {train_s:.0f} s, recover {rec['wall_s']:.0f} s, oracle {orc['seconds']:.0f} s)"
    )
    return out


def summarise(row: Row, runs: list[dict]) -> dict:
    """The summary-table row of one setting from its per-seed runs (means; sd of the error)."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    errors = [r["rot+hand (rad)"] for r in runs]
    oracle = mean("oracle (rad)")
    goal = effective_goal(GOALS.get(row.name), oracle)
    return {
        "row": row.name,
        "SNR (dB)": row.snr_db,
        "CTF + shifts": row.ctf_shifts,
        "box (px)": runs[0]["box (px)"],
        "Å/px": runs[0]["Å/px"],
        "seeds": len(runs),
        "test L_DE": mean("test L_DE"),
        "10-NN d_q (rad)": mean("10-NN d_q (rad)"),
        "ideal 10-NN d_q (rad)": mean("ideal 10-NN d_q (rad)"),
        "E_OR (rad)": mean("E_OR (rad)"),
        "rot+hand (rad)": float(np.mean(errors)),
        "rot+hand sd": float(np.std(errors, ddof=1)) if len(errors) > 1 else None,
        "oracle (rad)": oracle,
        "goal (rad)": goal,
        "met": None if goal is None else bool(np.mean(errors) <= goal),
        "train (s)": round(mean("train (s)"), 1),
        "recover (s)": round(mean("recover (s)"), 1),
    }


def _figure(summary: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    inf_x = 0.0  # where the noiseless rows are drawn on the SNR axis
    for protein, colour in (("5j0n", "C0"), ("pseudo", "C1")):
        part = [r for r in summary if r["row"].startswith(protein + "_") and not r["CTF + shifts"]]
        part.sort(key=lambda r: inf_x if r["SNR (dB)"] is None else r["SNR (dB)"])
        x = [inf_x if r["SNR (dB)"] is None else r["SNR (dB)"] for r in part]
        sd = [r["rot+hand sd"] or 0.0 for r in part]
        ax[0].errorbar(x, [r["rot+hand (rad)"] for r in part], yerr=sd, fmt="o-", color=colour, label=f"{protein}")
        ax[0].plot(x, [r["E_OR (rad)"] for r in part], "s:", color=colour, alpha=0.6, label=f"{protein} E_OR (O(4))")
        ax[0].plot(x, [r["oracle (rad)"] for r in part], "--", color=colour, alpha=0.8, label=f"{protein} oracle")
        for r, xi in zip(part, x, strict=True):
            if r["goal (rad)"] is not None:
                ax[0].plot([xi], [r["goal (rad)"]], "*", color=colour, ms=12)
    ax[0].set_xticks([-20, -12, -5, inf_x], ["−20", "−12", "−5", "∞"])
    ax[0].set_xlabel("SNR at acquisition (dB)")
    ax[0].set_ylabel("error (rad)")
    ax[0].set_title("rotation + hand error (stars: goals)")
    ax[0].legend(fontsize=7)
    names = [r["row"] for r in summary]
    xs = np.arange(len(names))
    ax[1].bar(xs - 0.2, [r["rot+hand (rad)"] for r in summary], 0.4, yerr=[r["rot+hand sd"] or 0 for r in summary])
    ax[1].bar(xs + 0.2, [r["oracle (rad)"] for r in summary], 0.4, color="grey")
    ax[1].scatter(xs, [r["goal (rad)"] if r["goal (rad)"] is not None else np.nan for r in summary], marker="*", c="k")
    ax[1].set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax[1].set_ylabel("error (rad)")
    ax[1].set_title("recovered (blue), oracle (grey), goal (star)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register(
    "noise",
    "Recovery under noise, CTF and shifts, with the oracle floor (issue 16)",
    paper_reference="Figure 9b: E_OR ≈ 0.16 rad noiseless, ≈ 0.42 rad at σ² = 16 (5j0n, 116², full network)",
    headline=headline,
)
def run(ctx: Context) -> dict:
    steps = STEPS[ctx.scale]
    model = ctx.pick(common.SMALL_MODEL, common.PAPER_MODEL)
    device = "cpu" if ctx.small else "cuda"
    t0 = time.perf_counter()
    runs, summary = [], []
    rows = [r for r in ROWS if r.name in SMALL_SEEDS] if ctx.small else list(ROWS)
    for row in rows:
        seeds = SMALL_SEEDS[row.name] if ctx.small else row.seeds
        ctx.say(f"{row.name}: {seeds} seed(s), {time.perf_counter() - t0:.0f} s so far")
        mine = [_run_seed(ctx, row, ctx.seed + k, steps, model, device) for k in range(seeds)]
        runs += mine
        summary.append(summarise(row, mine))
    _figure(summary, ctx.figure)
    geo = ", ".join(
        f"{p}: {g['acquisition'][0]}² at {g['acquisition'][1]:g} Å/px acquisition → "
        f"{next(r['box (px)'] for r in summary if r['row'].startswith(p))}² at "
        f"{next(r['Å/px'] for r in summary if r['row'].startswith(p)):g} Å/px working"
        for p, g in GEOMETRY.items()
    )
    return {
        "reduction": f"the small network (channels 16-32-64, n_f 32) trained {steps} steps of 64 images in-process "
        f"(paper: n_f 512, GPU); working box 32² (paper scale: the acquisition box); {geo}",
        "tables": [
            {
                "title": "Recovery under noise (mean over seeds; sd of the rotation + hand error over the seeds)",
                "columns": COLUMNS,
                "rows": summary,
                "note": f"SNR at the acquisition box; {geo}. Oracle: {ORACLE_CANDIDATES:,} random orientations "
                "scored against the true working map (CTF and shifts of each image applied). Goal: the issue's, "
                f"or {ORACLE_SLACK:g}× the oracle where that is larger.",
            },
            {"title": "Every run", "columns": SEED_COLUMNS, "rows": runs},
        ],
        "figure": ctx.figure,
        "benchmark_s": round(time.perf_counter() - t0, 1),
        "notes": [
            f"{N_PROJECTIONS:,} projections per store (50/17/33 % train/val/test); recovery of the 1,650 test "
            f"projections: {NEIGHBOURS} nearest + 20 random partners each, Gram start, L_OR, then the gauge.",
            "CTF + shifts: defocus 1–2.5 µm, shifts up to 1/16 of the working box (2 px of 32²).",
            f"Stores, models and recoveries: benchmarks/work/noise_{ctx.scale}/<row>/seed<k>/ (not committed).",
            *(
                [
                    "Small scale runs the rows with a goal and the noiseless 5j0n row only ("
                    + ", ".join(f"{k} × {v}" for k, v in SMALL_SEEDS.items())
                    + " seeds), at 6,000 steps each, to fit 2 CPU cores; --scale paper runs every row "
                    "(∞, −5, −12, −20 dB and −12 dB with CTF + shifts, both proteins, three seeds at −12 dB)."
                ]
                if ctx.small
                else []
            ),
        ],
    }
