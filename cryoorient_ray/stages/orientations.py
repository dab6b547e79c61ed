"""The `orientations` tool: sample orientations and write them as .star/.npy/.png."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from cryoorient_ray.config import RunConfig
from cryoorient_ray.core.geometry.sampling import sample_orientations
from cryoorient_ray.io.files import atomic_path
from cryoorient_ray.io.star import write_orientations_star
from cryoorient_ray.plots import (
    plot_orientations,
    random_pair_distances,
)
from cryoorient_ray.stages.base import StageResult, run_standalone

log = logging.getLogger(__name__)


def stage_orientations(cfg: RunConfig, out: Path) -> StageResult:
    """Draw ``simulate.n_per_map`` orientations; write .star, .npy and a PNG summary."""
    t0 = time.perf_counter()
    ocfg = cfg.simulate.orientations
    q = sample_orientations(cfg.simulate.n_per_map, ocfg.sampler, ocfg.coverage, seed=cfg.seed)
    with atomic_path(out / "orientations.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, q)
    write_orientations_star(out / "orientations.star", q)
    title = f"{len(q)} orientations: sampler={ocfg.sampler}, coverage={ocfg.coverage}, symmetry={ocfg.symmetry}"
    plot_orientations(q, out / "orientations.png", title=title, symmetry=ocfg.symmetry)
    d = random_pair_distances(q, symmetry=ocfg.symmetry, seed=cfg.seed)
    metrics: dict[str, float | int | str] = {"n": int(len(q)), "sampler": ocfg.sampler, "coverage": ocfg.coverage}
    if len(d):
        metrics["median_pair_distance_rad"] = round(float(np.median(d)), 4)
    return StageResult.done(
        "orientations",
        t0,
        outputs={"star": "orientations.star", "array": "orientations.npy", "plot": "orientations.png"},
        metrics=metrics,
    )


def run_orientations(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None
) -> tuple[Path, StageResult]:
    """`cryoorient orientations`: only the orientation-sampling stage."""
    out, results = run_standalone(cfg, out_dir, argv, [lambda o: stage_orientations(cfg, o)], needs_ray=False)
    return out, results[0]
