"""Figures a user can look at (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cryoorient_ray.core.geometry.euler import unitquat_to_euler_relion  # noqa: E402
from cryoorient_ray.core.geometry.quaternion import quat_distance  # noqa: E402
from cryoorient_ray.core.geometry.sampling import rotation_angle_pdf  # noqa: E402
from cryoorient_ray.core.geometry.symmetry import symmetric_quat_distance  # noqa: E402
from cryoorient_ray.io.files import atomic_path  # noqa: E402


def _save(fig, path: str | os.PathLike, tight: bool = True, dpi: int = 110, savefig_kwargs: dict | None = None) -> Path:
    """Lay out (optionally), write ``fig`` to ``path`` atomically as PNG, close it; return the path."""
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, **(savefig_kwargs or {}))
    plt.close(fig)
    return Path(path)


def random_pair_distances(
    quaternions: np.ndarray, n_pairs: int = 20000, symmetry: str = "C1", seed: int = 0
) -> np.ndarray:
    """d_q (or the symmetry-aware d_G) of ``n_pairs`` random pairs ``i != j``."""
    q = np.asarray(quaternions, dtype=np.float64)
    n = len(q)
    if n < 2:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n
    if symmetry.upper() == "C1":
        return quat_distance(q[i], q[j])
    return symmetric_quat_distance(q[i], q[j], symmetry)


def plot_orientations(quaternions: np.ndarray, path: str | os.PathLike, title: str = "", symmetry: str = "C1") -> Path:
    """Three panels: viewing directions (Mollweide), in-plane angle, and pair distances d_q.

    The pair-distance panel overlays ``(1 - cos d)/π``, the density for uniform SO(3) with no
    symmetry, so a non-uniform sampler or a restricted coverage shows at a glance.
    """
    q = np.asarray(quaternions, dtype=np.float64)
    angles = unitquat_to_euler_relion(q)
    rot, tilt, psi = np.radians(angles[:, 0]), np.radians(angles[:, 1]), angles[:, 2]
    fig = plt.figure(figsize=(15, 4.4))
    ax = fig.add_subplot(1, 3, 1, projection="mollweide")
    lon = (rot + np.pi) % (2 * np.pi) - np.pi
    ax.scatter(lon, np.pi / 2 - tilt, s=2, alpha=0.5)
    ax.set_title("viewing directions (rot, 90° − tilt)")
    ax.grid(True, alpha=0.4)
    ax.tick_params(labelsize=7)

    ax = fig.add_subplot(1, 3, 2)
    ax.hist(psi, bins=36, range=(-180, 180), color="tab:orange", alpha=0.8)
    ax.set_xlabel("psi (degrees)")
    ax.set_ylabel("count")
    ax.set_title("in-plane angle")

    ax = fig.add_subplot(1, 3, 3)
    d = random_pair_distances(q, symmetry=symmetry)
    ax.hist(
        d, bins=45, range=(0, np.pi), density=True, color="tab:green", alpha=0.7, label=f"random pairs ({symmetry})"
    )
    theta = np.linspace(0, np.pi, 200)
    ax.plot(theta, rotation_angle_pdf(theta), "k--", label="uniform SO(3), C1")
    ax.set_xlabel("d_q (radians)")
    ax.set_ylabel("density")
    ax.set_title("pair distances")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_error_histogram(errors_rad: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> Path:
    """Histograms of per-image orientation errors (given in radians, drawn in degrees), one per entry.

    ``errors_rad`` maps a label (e.g. ``"E_OR (O(4))"``, ``"registration"``) to the ``(N,)`` errors of
    :mod:`cryoorient_ray.core.recovery.align`; the legend gives each one's mean and median.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, err in errors_rad.items():
        deg = np.degrees(np.asarray(err, dtype=np.float64).ravel())
        label = f"{name}: mean {deg.mean():.1f}°, median {np.median(deg):.1f}°" if deg.size else f"{name}: no data"
        ax.hist(deg, bins=60, range=(0, 180), alpha=0.55, label=label)
    ax.set_xlim(0, 180)
    ax.set_xlabel("orientation error (degrees)")
    ax.set_ylabel("images")
    ax.set_title(title or "per-image orientation error")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_image_grid(
    images: np.ndarray, path: str | os.PathLike, titles: list[str] | None = None, title: str = "", cols: int = 8
) -> Path:
    """A grid of images ``(N, L, L)`` (each with its own grey scale), with optional captions."""
    images = np.asarray(images)
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows + (0.4 if title else 0)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], cmap="gray", origin="lower")
            if titles:
                ax.set_title(titles[k], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_distance_scatter(panels: dict[str, tuple[np.ndarray, np.ndarray, dict]], path: str | os.PathLike) -> Path:
    """d̂ against d_q, one panel per estimator (as the paper's Figures 8b and 16): ``name -> (true, pred, report)``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, (true, pred, rep)) in zip(axes[0], panels.items(), strict=True):
        ax.scatter(true, pred, s=3, alpha=0.35)
        top = max(np.pi, float(np.max(pred)) if len(pred) else np.pi)
        ax.plot([0, np.pi], [0, np.pi], "k--", lw=1)
        ax.set_xlim(0, np.pi)
        ax.set_ylim(0, top * 1.02)
        ax.set_xlabel("true d_q (rad)")
        ax.set_ylabel("estimated d̂ (rad)")
        ax.set_title(f"{name}: L_DE={rep['L_DE']:.3f}, r={rep['pearson']:.2f} ({rep['pairs']} pairs)", fontsize=9)
    return _save(fig, path)


def plot_recovery_loss(loss: list[float], phase: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """L_OR per step (log scale), the warm-up (smooth cosine loss) shaded: the paper's Figure 6-style curve."""
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(len(loss))
    ph = np.asarray(phase)
    warm = ph == "init"
    if warm.any():
        ax.axvspan(0, int(warm.sum()), color="0.9", label="initialisation (Gram completion / warm-up)")
    ax.plot(steps, np.maximum(np.asarray(loss, dtype=float), 1e-12), lw=1.2, label="L_OR")
    ax.set_xlabel("step")
    ax.set_ylabel("L_OR = mean |d̂ − d_q(q̂_i, q̂_j)|² (rad²)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_training_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """L_DE per epoch: train, validation (seen proteins), held-out proteins; the untrained value at epoch 0."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] + 1 for h in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("heldout_loss", "held-out proteins")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            xs = [e for e, v in zip(epochs, values, strict=True) if v is not None]
            ys = [v for v in values if v is not None]
            if key == "val_loss" and history and history[0].get("initial_val_loss") is not None:
                xs, ys = [0, *xs], [history[0]["initial_val_loss"], *ys]
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("L_DE = mean |d̂ − d_q|² (rad²)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _fsc_axes(ax, fmax: float, ylabel: str) -> None:
    """FSC axes: linear in 1/Å up to ``fmax``, ticks labelled in Å (1/f) as the paper's figure."""
    ax.set_xlim(0, fmax if fmax > 0 else 1)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ticks = np.linspace(0, fmax, 6) if fmax > 0 else np.array([0.0])
    ax.set_xticks(ticks)
    ax.set_xticklabels(["∞" if f == 0 else f"{1 / f:.1f}" for f in ticks])
    ax.set_xlabel("resolution (Å)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_fsc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    thresholds: tuple[float, ...] = (0.5, 0.143),
    title: str = "",
) -> Path:
    """FSC against spatial frequency (as the paper's Figure 11e): ``name -> (frequency 1/Å, fsc)``.

    The x axis is linear in frequency (1/Å) with its ticks labelled in Å (1/f); a dashed line
    marks each threshold, and the legend gives each curve's resolution at every threshold
    (first crossing, interpolated: :func:`cryoorient_ray.core.reconstruction.fsc.fsc_resolution`).
    """
    from cryoorient_ray.core.reconstruction.fsc import fsc_resolution

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fmax = 0.0
    for name, (freq, curve) in curves.items():
        freq = np.asarray(freq, dtype=np.float64)
        curve = np.asarray(curve, dtype=np.float64)
        fmax = max(fmax, float(freq.max()) if len(freq) else 0.0)
        res = ", ".join(f"{fsc_resolution(curve, freq, t):.2f} Å @ {t:g}" for t in thresholds)
        ax.plot(freq, curve, marker="o", ms=2.5, lw=1.4, label=f"{name} ({res})")
    for t, style in zip(thresholds, ("--", ":", "-.", "--"), strict=False):
        ax.axhline(t, color="grey", ls=style, lw=1)
        ax.annotate(f"{t:g}", (fmax, t), xytext=(2, 2), textcoords="offset points", fontsize=7, color="grey")
    _fsc_axes(ax, fmax, "FSC")
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_volume_slices(volumes: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> Path:
    """One row per volume ``(D, D, D)`` ``[z, y, x]``: central slices z, y, x and the sum along z.

    The slices go through voxel ``D // 2`` (the origin). Each panel has its own grey scale; images
    are drawn with the origin at the lower left (x to the right, y up, as :func:`plot_image_grid`).
    """
    rows = max(1, len(volumes))
    fig, axes = plt.subplots(rows, 4, figsize=(8.0, 2.1 * rows + (0.4 if title else 0)), squeeze=False)
    for row, (name, vol) in zip(axes, volumes.items(), strict=False):
        v = np.asarray(vol, dtype=np.float64)
        c = v.shape[0] // 2
        panels = (
            (v[c], "z slice (y, x)"),
            (v[:, c, :], "y slice (z, x)"),
            (v[:, :, c], "x slice (z, y)"),
            (v.sum(0), "projection along z"),
        )
        for ax, (img, label) in zip(row, panels, strict=True):
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=7)
        row[0].set_ylabel(name, fontsize=8)
    for ax in axes.flat[len(volumes) * 4 :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_refinement(history: list[dict], path: str | os.PathLike) -> Path:
    """Projection-matching rounds: orientation error vs truth (when known) and FSC0.5 resolution."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [h.get("round", k + 1) for k, h in enumerate(history)]
    err = [h.get("error") for h in history]
    change = [h.get("change") for h in history]
    if any(e is not None for e in err):
        ax.plot(rounds, np.degrees([np.nan if e is None else e for e in err]), "o-", label="error vs truth (°)")
    if any(c is not None for c in change):
        ax.plot(rounds, np.degrees([np.nan if c is None else c for c in change]), "s--", label="mean change (°)")
    ax.set_xlabel("round")
    ax.set_ylabel("degrees")
    res = [h.get("resolution_05") for h in history]
    if any(r is not None for r in res):
        ax2 = ax.twinx()
        ax2.plot(rounds, [np.nan if r is None else r for r in res], "^:", color="C3", label="FSC0.5 (Å)")
        ax2.set_ylabel("FSC0.5 resolution (Å)")
        ax2.legend(loc="upper center")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)


def plot_bootstrap_rounds(start: dict, rounds: list[dict], path: str | os.PathLike) -> Path:
    """Bootstrap rounds (round 0 = the pipeline's start): half-map FSC0.143 (Å) and, when the truth is
    known, the recovery's and the refinement's error after rotation + hand (rad)."""
    fig, (ax_res, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    x = list(range(len(rounds) + 1))

    def values(key: str, section: str) -> list[float]:
        entries = [start.get(section, {}) if section else start, *[r.get(section, {}) for r in rounds]]
        return [np.nan if e.get(key) is None else float(e[key]) for e in entries]

    res = [start.get("halfmap_fsc0143_A"), *[r.get("refine", {}).get("halfmap_fsc0143_A") for r in rounds]]
    ax_res.plot(x, [np.nan if v is None else v for v in res], "o-", label="half maps FSC0.143")
    fsc05 = values("halfmap_fsc05_A", "refine")
    if np.isfinite(fsc05).any():
        ax_res.plot(x, fsc05, "s--", label="half maps FSC0.5")
    ax_res.set_xlabel("bootstrap round")
    ax_res.set_ylabel("resolution (Å)")
    ax_res.legend()
    for key, section, label, style in (
        ("registration", "recover", "recovered", "o-"),
        ("registration", "refine", "refined", "s-"),
    ):
        v = values(key, section)
        if np.isfinite(v).any():
            ax_err.plot(x, v, style, label=f"{label} (rotation + hand)")
    if ax_err.lines:
        ax_err.legend()
    else:
        ax_err.text(0.5, 0.5, "no true orientations", ha="center", va="center", transform=ax_err.transAxes)
    ax_err.set_xlabel("bootstrap round")
    ax_err.set_ylabel("orientation error (rad)")
    for ax in (ax_res, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_fsc_iterations(
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    thresholds: tuple[float, ...] = (0.5, 0.143),
    title: str = "",
) -> Path:
    """Half-map FSC after every iteration of a refinement: ``[(label, frequency 1/Å, fsc), ...]`` in order.

    One curve per entry, coloured from dark (first) to light (last), the last one thick; the
    legend gives each curve's FSC0.143 resolution. Axes as :func:`plot_fsc` (linear in 1/Å, ticks in Å).
    """
    from cryoorient_ray.core.reconstruction.fsc import fsc_resolution

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, max(1, len(curves))))
    fmax = 0.0
    for k, ((label, freq, curve), colour) in enumerate(zip(curves, colours, strict=True)):
        freq = np.asarray(freq, dtype=np.float64)
        curve = np.asarray(curve, dtype=np.float64)
        fmax = max(fmax, float(freq.max()) if len(freq) else 0.0)
        last = k == len(curves) - 1
        res = fsc_resolution(curve, freq, 0.143)
        ax.plot(freq, curve, color=colour, lw=2.2 if last else 1.1, label=f"{label} ({res:.1f} Å @ 0.143)")
    for t, style in zip(thresholds, ("--", ":"), strict=False):
        ax.axhline(t, color="grey", ls=style, lw=1)
    _fsc_axes(ax, fmax, "half-map FSC")
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(curves) > 8 else 1)
    ax.set_title(title or "half-map FSC per iteration", fontsize=10)
    return _save(fig, path)


def _history_values(history: list[dict], key: str, scale=None) -> list[float] | None:
    """``history[k][key]`` per iteration (NaN where missing, ``scale`` applied); None if none has it."""
    vals = [h.get(key) for h in history]
    if all(v is None for v in vals):
        return None
    return [np.nan if v is None else (scale(v) if scale else float(v)) for v in vals]


def plot_refine_iterations(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """A refinement per iteration: resolutions (Å) on the left, angles (°) on the right.

    Left: the half-map FSC0.143 and FSC0.5 resolutions, the FSC0.5 against the true map (when
    known) and the band the search used. Right: the mean change of the orientations and, when
    the truth is known, their error after rotation + hand (``error_rad``).
    """
    its = [h.get("iteration", k + 1) for k, h in enumerate(history)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (
        ("resolution_0143_A", "half maps, FSC 0.143", "o-"),
        ("resolution_05_A", "half maps, FSC 0.5", "s-"),
        ("resolution_05_true_A", "vs true map, FSC 0.5", "^-"),
        ("band_A", "search band", "x:"),
    ):
        vals = _history_values(history, key)
        if vals is not None:
            ax.plot(its, vals, style, label=label)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("resolution (Å)")
    ax.invert_yaxis()  # better is up
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("resolution per iteration", fontsize=10)
    for key, label, style in (
        ("change_rad", "mean change", "s--"),
        ("error_rad", "error vs truth (rotation + hand)", "o-"),
    ):
        vals = _history_values(history, key, np.degrees)
        if vals is not None:
            ax2.plot(its, vals, style, label=label)
    ax2.set_xlabel("iteration")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylabel("degrees")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    ax2.set_title("orientations per iteration", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


TRIAL_COLOURS = {"complete": "tab:green", "stopped early": "tab:orange", "error": "tab:red", "unfinished": "tab:gray"}


def _plot_trial_curves(ax, trials: list[dict], metric: str, max_epochs: int) -> None:
    for t in trials:
        if t["curve"]:
            xs = np.arange(1, len(t["curve"]) + 1)
            ax.plot(xs, t["curve"], marker="o", ms=3, color=TRIAL_COLOURS.get(t["status"], "k"), alpha=0.7)
    if max_epochs:
        ax.set_xlim(0.5, max_epochs + 0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric}: L_DE (rad²)")
    ax.set_yscale("log")
    ax.set_title("L_DE per epoch of every trial")
    ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", label=s) for s, c in TRIAL_COLOURS.items()]
    ax.legend(handles=[h for h in handles if any(t["status"] == h.get_label() for t in trials)], fontsize=8)


def _plot_trial_bests(ax, done: list[dict], metric: str) -> None:
    ax.bar(
        np.arange(len(done)),
        [t["best"] for t in done],
        color=[TRIAL_COLOURS.get(t["status"], "k") for t in done],
    )
    ax.set_xticks(np.arange(len(done)), [t["trial_id"][-5:] for t in done], rotation=60, fontsize=7)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"best {metric} (rad²)")
    ax.set_title("best L_DE per trial")
    ax.grid(True, axis="y", alpha=0.3)


def _plot_best_vs_n_features(ax, done: list[dict], metric: str, n_features: int) -> None:
    by_nf: dict[int, list[float]] = {}
    for t in done:
        nf = int(t["params"].get("train.model.n_features", n_features))
        by_nf.setdefault(nf, []).append(t["best"])
    keys = sorted(by_nf)
    if keys:
        ax.boxplot([by_nf[k] for k in keys], positions=np.arange(len(keys)), widths=0.5)
        rng = np.random.default_rng(0)
        for x, k in enumerate(keys):
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(by_nf[k])), by_nf[k], s=14, color="tab:blue", zorder=3)
        ax.set_xticks(np.arange(len(keys)), [str(k) for k in keys])
    ax.set_xlabel("n_f (embedding size)")
    ax.set_ylabel(f"best {metric} (rad²)")
    ax.set_title("L_DE vs n_f (paper Fig. 17b)")
    ax.grid(True, axis="y", alpha=0.3)


def plot_tune_summary(
    trials: list[dict], path: str | os.PathLike, metric: str = "val_loss", max_epochs: int = 0, n_features: int = 0
) -> Path:
    """A Ray Tune search at a glance, three panels:

    1. the metric (validation L_DE, rad²) per epoch of every trial: ASHA's early stops show as short curves;
    2. each trial's best L_DE, best first, coloured by status (complete, stopped early, error, unfinished);
    3. best L_DE against n_f as a box plot per n_f with the trials as points (the paper's Figure 17b).

    ``trials`` are records of :func:`cryoorient_ray.stages.tune.collect_trials` (keys
    ``trial_id, params, curve, best, status``); ``n_features`` is the n_f of trials that did not search it.
    """
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    done = sorted((t for t in trials if t["best"] is not None), key=lambda t: t["best"])
    _plot_trial_curves(axes[0], trials, metric, max_epochs)
    _plot_trial_bests(axes[1], done, metric)
    _plot_best_vs_n_features(axes[2], done, metric, n_features)
    return _save(fig, path)
