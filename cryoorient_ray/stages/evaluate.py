"""Distance quality on a store: learned d̂ (or the Euclidean baseline) against the true d_q.

No Ray here: embeddings are computed once per image (one forward pass each), then every pair's
distance costs a vector operation. Pairs are drawn within one protein and one split, resampled
so that true distances are uniform on [0, π] (as in training), with the protein's point group.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoorient_ray.core.learning.model import EuclideanDistance
from cryoorient_ray.core.learning.pairs import candidate_pairs, pair_distances, uniform_resample
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import ProjectionStore, split_codes


def embed_rows(model, store: ProjectionStore, rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Embeddings ``(len(rows), n)`` of store images, one forward pass per image (with each image's
    CTF when the model's preprocessing phase-flips)."""
    out = []
    model.eval()
    needs_ctf = bool(getattr(model, "needs_ctf", False))
    with torch.no_grad():
        for a in range(0, len(rows), batch_size):
            part = rows[a : a + batch_size]
            imgs = torch.as_tensor(store.read_images(part), dtype=torch.float32)
            if needs_ctf:
                ctf = store.ctf_parameters(store.read_metadata(part, names=["defocus_u", "defocus_v", "defocus_angle"]))
                out.append(model.embed(imgs, ctf))
            else:
                out.append(model.embed(imgs))
    return torch.cat(out) if out else torch.zeros((0, 1))


def sample_pairs(
    store: ProjectionStore, split: str, n_pairs: int, seed: int = 0, proteins: str = "all"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row_i, row_j, d_q)`` for ``n_pairs`` pairs of completed rows of ``split``, uniform in d_q.

    ``proteins``: ``all``, ``seen`` (not held out from training) or ``heldout``.
    """
    split_codes(split)
    if not store.manifest.get("has_orientations", True):
        raise CryoOrientError(f"{store.path} has no true orientations: distances cannot be compared to d_q")
    rows = store.select_rows(split=split, proteins=proteins)
    meta = store.read_metadata(rows, names=["protein", "quaternion"])
    prot, quat = meta["protein"], meta["quaternion"]
    if len(rows) < 2:
        raise CryoOrientError(
            f"{store.path} has fewer than 2 completed projections of {proteins} proteins in split '{split}'"
        )
    rng = np.random.default_rng(seed)
    i, j = candidate_pairs(prot, max_pairs=500_000, rng=rng)
    d = pair_distances(quat, i, j, prot, store.symmetries())
    pick = uniform_resample(d, n_pairs, 32, rng)
    return rows[i[pick]], rows[j[pick]], d[pick]


def predict_pairs(model, store: ProjectionStore, row_i: np.ndarray, row_j: np.ndarray) -> np.ndarray:
    """d̂ for row pairs, embedding each distinct image once."""
    uniq, inv = np.unique(np.concatenate([row_i, row_j]), return_inverse=True)
    emb = embed_rows(model, store, uniq)
    a, b = emb[inv[: len(row_i)]], emb[inv[len(row_i) :]]
    with torch.no_grad():
        return model.distance(a, b).double().numpy()


def fit_euclidean(
    store: ProjectionStore, n_pairs: int = 2000, seed: int = 0, split: str = "train"
) -> EuclideanDistance:
    """The Euclidean baseline with its scale fitted by least squares on ``split`` pairs."""
    i, j, d = sample_pairs(store, split, n_pairs, seed)
    model = EuclideanDistance()
    imgs_i = torch.as_tensor(store.read_images(np.asarray(i)), dtype=torch.float32)
    imgs_j = torch.as_tensor(store.read_images(np.asarray(j)), dtype=torch.float32)
    model.fit(imgs_i, imgs_j, torch.as_tensor(d))
    return model


def distance_report(pred: np.ndarray, true: np.ndarray) -> dict:
    """L_DE (mean squared error), mean absolute error and the correlation of d̂ with d_q."""
    err = pred - true
    return {
        "L_DE": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "pearson": float(np.corrcoef(pred, true)[0, 1]) if np.std(pred) > 0 else 0.0,
        "pairs": int(len(true)),
    }
