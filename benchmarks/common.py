"""Pieces the benchmarks share: simulate a store, train the distance in-process, evaluate, recover.

Distance training here is a plain single-process torch loop with the loss of Ray Train's
``pairing: batch`` (all same-protein pairs of an image batch, weighted uniform in d_q), so a
benchmark's compute goes into the method and not into Ray's per-step overhead on 2 cores; the
pipeline's Ray Train path is what ``full_method`` runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import ROOT, Context

DEMO = ROOT / "configs" / "demo.yaml"
SHARED = ROOT.parent / "shared" / "data"
SMALL_MODEL = {"channels": [16, 32, 64], "n_features": 32, "norm": "group", "head": "so3", "pool": "grid"}
PAPER_MODEL = {"channels": [32, 64, 128, 256, 512], "n_features": 512, "norm": "batch", "head": "so3", "pool": "grid"}


def shared_path(*parts: str) -> Path:
    """A file of ../shared/data (benchmarks only; never committed)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise SystemExit(f"benchmark data {p} is missing (the benchmarks read ../shared/data beside the repository)")
    return p


def simulate(
    ctx: Context,
    tag: str,
    sets: list[str],
    config: Path = DEMO,
    max_in_flight: int | None = None,
    path: Path | None = None,
    seed: int | None = None,
):
    """Simulate the store of ``config`` with ``--set`` overrides ``sets`` into the scratch folder
    (``max_in_flight``: shard tasks running at once; default: the simulation's own).

    ``path``: the store's folder instead (a store already there is removed first, so it is always
    the one these settings make now); ``seed``: the simulation's seed (default: the benchmark's).
    """
    import shutil

    from cryoorient_ray.config import load_config
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    ctx.ray()
    cfg = load_config(config, None, sets)
    if path is None:
        path = ctx.work / f"{tag}.zarr"
    else:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = simulate_store(
        cfg.simulate, ctx.seed if seed is None else seed, path, progress=False, max_in_flight=max_in_flight
    )
    ctx.say(
        f"simulated {tag}: {len(store.done_rows())} projections of {store.image_size}² "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return store


def split_rows(store, split: str, proteins: list[int] | None = None) -> np.ndarray:
    from cryoorient_ray.io.store import SPLIT_CODES

    rows = store.done_rows()
    meta = store.read_metadata(rows, names=["split", "protein"])
    keep = meta["split"] == SPLIT_CODES[split]
    if proteins is not None:
        keep &= np.isin(meta["protein"], proteins)
    return rows[keep]


def train_plain(
    store,
    steps: int,
    model: dict | None = None,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    proteins: list[int] | None = None,
    device: str = "cpu",
    noise: dict | None = None,
    preprocess: dict | None = None,
):
    """Train the Siamese distance on the train split (of ``proteins``) for ``steps`` Adam steps.

    Every batch holds images of one protein (picked at random), so all its pairs count; one-cycle
    learning rate. ``noise`` and ``preprocess`` are ``train.noise`` / ``train.preprocess`` settings
    (:class:`~cryoorient_ray.config.TrainNoiseConfig`, :class:`~cryoorient_ray.config.PreprocessConfig`;
    None = their defaults: fresh noise/CTF on the clean projections every batch when the store has
    them, phase flip with a CTF, the SNR-matched Wiener filter), exactly as Ray Train applies them
    (:func:`~cryoorient_ray.distributed.train_workers.fresh_corruption`, ``store_preprocess``); the
    preprocessing travels with the returned model (``net.preprocess``, saved by :func:`save_model`).
    Returns the model (eval mode, on the CPU) and the seconds it took.
    """
    import torch

    from cryoorient_ray.config import PreprocessConfig, TrainNoiseConfig
    from cryoorient_ray.core.learning.model import SiameseDistance, SiameseSpec
    from cryoorient_ray.distributed.train_workers import batch_pair_loss, fresh_corruption, store_preprocess

    rows = split_rows(store, "train", proteins)
    meta = store.read_metadata(rows, names=["protein", "quaternion", "defocus_u", "defocus_v", "defocus_angle"])
    corruption = fresh_corruption(store, TrainNoiseConfig(**(noise or {})))
    pre = store_preprocess(store, rows, corruption, PreprocessConfig(**(preprocess or {})), seed)
    if corruption is not None:
        clean, clean_var = store.read_clean(rows)
        x = torch.from_numpy(np.asarray(clean, dtype=np.float32)).to(device)
        clean_var = torch.from_numpy(np.asarray(clean_var, dtype=np.float64))
    else:  # the store's fixed images, preprocessed once
        x = torch.from_numpy(store.read_images(rows).astype(np.float32))
        if pre is not None:
            parts = [(x[a : a + 1024], _rows_ctf(store, meta, slice(a, a + 1024))) for a in range(0, len(x), 1024)]
            x = torch.cat([pre.apply(images, ctf) for images, ctf in parts])
        x = x.to(device)
    q = torch.from_numpy(meta["quaternion"])
    prot = meta["protein"]
    by_protein = [torch.from_numpy(np.flatnonzero(prot == p)) for p in np.unique(prot)]
    symmetries = store.symmetries()
    torch.manual_seed(seed)
    net = SiameseDistance(SiameseSpec(**(model or SMALL_MODEL))).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed * 7919 + 1)
    t0 = time.perf_counter()
    for step in range(steps):
        members = by_protein[int(torch.randint(0, len(by_protein), (1,), generator=gen))]
        idx = members[torch.randint(0, len(members), (batch,), generator=gen)]
        p = int(prot[idx[0]])
        groups = torch.full((batch,), p, dtype=torch.long)
        xb = x[idx.to(device)]
        if corruption is not None:
            out = corruption.apply(xb, clean_var[idx], step / max(1, steps), noise_gen)
            xb = out.images if pre is None else pre.apply(out.images, out.ctf)
        loss, _ = batch_pair_loss(net(xb), q[idx], groups, symmetries, net.distance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.preprocess = pre
    return net.cpu().eval(), time.perf_counter() - t0


def _rows_ctf(store, meta: dict, sel: slice) -> dict | None:
    """The CTF parameters of ``meta``'s rows ``sel`` (None when the store has no CTF)."""
    return store.ctf_parameters({k: meta[k][sel] for k in ("defocus_u", "defocus_v", "defocus_angle")})


def save_model(ctx: Context, net, tag: str) -> Path:
    from cryoorient_ray.core.learning.model import save_distance_model

    path = ctx.work / f"{tag}.pt"
    save_distance_model(path, net)
    return path


def distance_quality(
    store,
    model_path: Path | None,
    split: str = "test",
    n_pairs: int = 2000,
    seed: int = 0,
    proteins: str = "all",
    euclidean: bool = False,
) -> dict:
    """L_DE, MAE and r of the learned distance (and/or the fitted Euclidean one) on pairs uniform in d_q.

    Returns ``{estimator: {"L_DE", "mae", "pearson", "true", "pred"}}`` (arrays for scatter plots).
    """
    from cryoorient_ray.core.learning.model import load_distance_model
    from cryoorient_ray.stages.evaluate import distance_report, fit_euclidean, predict_pairs, sample_pairs

    row_i, row_j, true = sample_pairs(store, split, n_pairs, seed, proteins)
    out = {}
    ests = {}
    if model_path is not None:
        ests["learned"] = load_distance_model(model_path)[0]
    if euclidean:
        ests["euclidean"] = fit_euclidean(store, n_pairs=max(500, n_pairs), seed=seed + 1)
    for name, est in ests.items():
        pred = predict_pairs(est, store, row_i, row_j)
        out[name] = {**distance_report(pred, true), "true": true, "pred": pred}
    return out


def recover(store, model_path: Path | None, estimator: str = "model", gauge: bool = True, seed: int = 0, **cfg) -> dict:
    """``recover_store`` on the test split; returns its metrics plus the per-image O(4) errors."""
    from cryoorient_ray.config import RecoverConfig
    from cryoorient_ray.stages.recover import recover_store

    rc = RecoverConfig(estimator=estimator, model=str(model_path) if model_path else None, **cfg)
    rc.gauge.enabled = gauge
    t0 = time.perf_counter()
    outcome = recover_store(store.path, rc, model_path=str(model_path) if model_path else None, seed=seed)
    m = dict(outcome.metrics)
    m["wall_s"] = round(time.perf_counter() - t0, 2)
    if "o4" in outcome.errors:
        m["o4_errors"] = np.asarray(outcome.errors["o4"].errors)
        m["reg_errors"] = np.asarray(outcome.errors["registration"].errors)
    m["outcome"] = outcome
    return m


def public(metrics: dict) -> dict:
    """The JSON-safe scalars of a metrics dict."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def rel(path: Path) -> str:
    return str(Path(path).resolve().relative_to(ROOT))


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


PAPER_5J0N = ROOT / "configs" / "paper_5j0n.yaml"


def paper_sets(
    ctx: Context, n: int, snr_db: float | None, max_shift: float = 0.0, small_size: int = 40, small_voxel: float = 7.5
) -> list[str]:
    """``--set`` overrides of configs/paper_5j0n.yaml: the paper's 116² at 3.667 Å/px (paper scale) or
    ``small_size``² at ``small_voxel`` Å/px (small scale: the same field of view, ≈ 300 Å, coarser)."""
    sets = [f"simulate.n_per_map={n}", "simulate.shard_size=1000"]
    sets.append("simulate.noise.snr_db=null" if snr_db is None else f"simulate.noise.snr_db={snr_db}")
    sets.append(f"simulate.shifts.max_shift={max_shift}")
    if ctx.small:
        sets += [f"simulate.image_size={small_size}", f"simulate.voxel_size={small_voxel}"]
    return sets


def neighbour_quality(distance, q_true: np.ndarray, k: int = 10, symmetry: str = "C1", block: int = 256) -> dict:
    """How good the k nearest neighbours by d̂ are: what a pair graph's kNN edges are built from.

    ``distance(i (E,), j (E,)) -> d̂ (E,)`` is the estimator recovery uses (indices into ``q_true``,
    e.g. :func:`cryoorient_ray.stages.recover.make_estimator`'s ``distance``), so estimators without
    features (exact, perturbed) are measured too: each image's ``k`` nearest others by d̂ (all
    ``P − 1`` candidates, ``block`` images at a time) go to
    :func:`cryoorient_ray.core.recovery.graph.neighbour_quality` (what recovered.json reports).
    Returns (radians):

    * ``knn_dq``: median over images of the mean true d_G of the ``k`` nearest by d̂;
    * ``ideal_dq``: the same for the true ``k`` nearest (the floor: the grid's own spacing);
    * ``knn_close``: fraction of the kNN pairs with a true d_G below 0.5 rad.
    """
    from cryoorient_ray.core.recovery.graph import neighbour_quality as graph_quality

    p = len(q_true)
    if p <= k:
        raise ValueError(f"neighbour quality needs more than k = {k} images; got {p}")
    cols = np.arange(p)
    tables = []
    for a in range(0, p, block):
        rows = np.arange(a, min(p, a + block))
        i, j = np.repeat(rows, p), np.tile(cols, len(rows))
        d_hat = np.asarray(distance(i, j), dtype=np.float64).reshape(len(rows), p)
        d_hat[np.arange(len(rows)), rows] = np.inf
        tables.append(np.argpartition(d_hat, k, axis=1)[:, :k])
    r = graph_quality(None, q_true, k=k, symmetry=symmetry, near=0.5, nn=np.concatenate(tables))
    return {"knn_dq": r["median_knn_dq"], "ideal_dq": r["ideal_median_knn_dq"], "knn_close": r["near_fraction"]}


def recovery_neighbour_quality(store, rec: dict, model_path: Path | None, k: int = 10, seed: int = 0) -> dict:
    """:func:`neighbour_quality` of the estimator :func:`recover` used, on the projections it selected."""
    from cryoorient_ray.config import RecoverConfig
    from cryoorient_ray.stages.recover import make_estimator

    outcome = rec["outcome"]
    sel = outcome.selection
    rc = RecoverConfig(estimator=outcome.estimator, model=str(model_path) if model_path else None)
    est = make_estimator(store, sel, rc, str(model_path) if model_path else None, seed)
    return neighbour_quality(est.distance, sel.q_true, k=k, symmetry=sel.symmetry)


def oracle(store, rows: np.ndarray, n_candidates: int = 20000, seed: int = 0, device=None) -> dict:
    """The oracle's error on the store's images ``rows`` (one protein): exhaustive assignment against
    the store's own working map (:func:`cryoorient_ray.core.recovery.oracle.oracle_error`), the
    images' CTF and shifts included; the floor no method that sees only the images can beat."""
    from cryoorient_ray.core.recovery.oracle import oracle_error

    meta = store.read_metadata(rows, names=["protein", "quaternion"])
    proteins = np.unique(meta["protein"])
    if len(proteins) != 1:
        raise ValueError(f"the oracle runs on one protein's images; rows hold proteins {proteins.tolist()}")
    pid = int(proteins[0])
    symmetry = store.proteins[pid].get("symmetry", "C1") or "C1"
    t0 = time.perf_counter()
    mean, median = oracle_error(
        store.particles(rows),
        store.read_volume(pid),
        meta["quaternion"],
        symmetry=symmetry,
        n_candidates=n_candidates,
        seed=seed,
        device=device,
    )
    return {"mean": mean, "median": median, "n_candidates": int(n_candidates), "seconds": time.perf_counter() - t0}
