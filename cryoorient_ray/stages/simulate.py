"""The simulate stage: the projection store (Ray tasks), its preview PNG and summary."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from cryoorient_ray.config import RunConfig
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text
from cryoorient_ray.plots import plot_image_grid
from cryoorient_ray.stages.base import StageResult, _ray_nodes_metric, run_standalone, store_path_for

log = logging.getLogger(__name__)


def _sample_titles(meta: dict, proteins: list[dict]) -> list[str]:
    titles = []
    for p, e, s in zip(meta["protein"], meta["euler"], meta["shift"], strict=True):
        name = proteins[p]["name"] if 0 <= p < len(proteins) else "?"
        angles = "no angles" if np.isnan(e).any() else f"{e[0]:.0f},{e[1]:.0f},{e[2]:.0f}"
        titles.append(f"{name[:14]}\n{angles} t={s[0]:+.1f},{s[1]:+.1f}")
    return titles


def write_store_preview(store, path: str | os.PathLike, n: int = 24, seed: int = 0) -> Path:
    """PNG grid of ``n`` random completed projections with protein, angles and shift."""
    rows = store.done_rows()
    if len(rows) == 0:
        raise CryoOrientError(f"{store.path} has no completed shard to show")
    pick = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))
    meta = store.read_metadata(pick, names=["protein", "euler", "shift"])
    title = (
        f"{Path(store.path).name}: {store.n_samples} projections of {store.image_size}² at {store.pixel_size:.3g} Å/px"
    )
    return plot_image_grid(store.read_images(pick), path, _sample_titles(meta, store.proteins), title=title)


def stage_simulate(cfg: RunConfig, out: Path, progress: bool = True) -> StageResult:
    """Simulate (or finish) the projection store on Ray; write a preview PNG and its summary."""
    from cryoorient_ray.distributed.runtime import clear_nodes_used, ray_runtime
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    t0 = time.perf_counter()
    path = store_path_for(cfg, out)
    clear_nodes_used("simulate")
    with ray_runtime(cfg.ray):
        store = simulate_store(cfg.simulate, cfg.seed, path, progress=progress, cache_dir=out / "cache")
    write_store_preview(store, out / "projections.png", seed=cfg.seed)
    summary = store.summary()
    atomic_write_text(out / "store_summary.json", json.dumps(summary, indent=2) + "\n")
    return StageResult.done(
        "simulate",
        t0,
        outputs={"store": os.path.relpath(path, out) if "://" not in path else path, "preview": "projections.png"},
        metrics={
            "proteins": len(summary["proteins"]),
            "projections": summary["samples"],
            "shards": summary["shards"],
            **_ray_nodes_metric("simulate"),
        },
    )


def check_simulate(cfg: RunConfig, out: Path) -> None:
    """Bad input of the simulate stage, found before Ray starts and before anything is written."""
    from cryoorient_ray.distributed.simulate_tasks import check_simulate_inputs

    check_simulate_inputs(cfg.simulate, cfg.seed, store_path_for(cfg, out))


def run_simulate(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None, progress: bool = True
) -> tuple[Path, StageResult]:
    """`cryoorient simulate`: the simulation stage alone."""
    stage = lambda o: stage_simulate(cfg, o, progress=progress)  # noqa: E731
    out, results = run_standalone(cfg, out_dir, argv, [stage], checks=[lambda o: check_simulate(cfg, o)])
    return out, results[0]
