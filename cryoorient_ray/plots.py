"""Figures a user can look at (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryoorient_ray.core.euler import unitquat_to_euler_relion  # noqa: E402
from cryoorient_ray.core.quaternion import quat_distance  # noqa: E402
from cryoorient_ray.core.sampling import rotation_angle_pdf  # noqa: E402
from cryoorient_ray.core.symmetry import symmetric_quat_distance  # noqa: E402
from cryoorient_ray.io.files import atomic_path  # noqa: E402


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)
