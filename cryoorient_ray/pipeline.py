"""Stage orchestration: what each CLI command runs, in which order, writing what.

Direction of imports: cli → pipeline → distributed → {io, core}. This module validates
inputs, runs stages, and writes their outputs atomically into the run's output folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cryoorient_ray import __version__
from cryoorient_ray.config import RunConfig, write_stamped_config
from cryoorient_ray.core.sampling import sample_orientations
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_path, atomic_write_text
from cryoorient_ray.io.star import write_orientations_star
from cryoorient_ray.plots import plot_orientations, random_pair_distances

log = logging.getLogger(__name__)

# The end-to-end order of `cryoorient run`. Stages not yet in this version are listed as such.
PIPELINE_STAGES: tuple[str, ...] = ("orientations", "simulate", "train", "recover", "align", "reconstruct")
AVAILABLE_STAGES: frozenset[str] = frozenset({"orientations"})
SUMMARY_NAME = "summary.json"


@dataclass
class StageResult:
    """What a stage did: status, wall time, files written (relative to the run folder), numbers."""

    name: str
    status: str  # "done" | "not available"
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | int | str] = field(default_factory=dict)


def prepare_output_dir(cfg: RunConfig, out_dir: str | os.PathLike | None, argv: list[str] | None) -> Path:
    """Create the run folder and write the stamped config into it. Returns the folder."""
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise CryoOrientError(f"output path exists and is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CryoOrientError(f"cannot create output folder {out}: {exc.strerror}") from None
    write_stamped_config(cfg, out, argv)
    return out


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
    return StageResult(
        name="orientations",
        status="done",
        seconds=round(time.perf_counter() - t0, 3),
        outputs={"star": "orientations.star", "array": "orientations.npy", "plot": "orientations.png"},
        metrics=metrics,
    )


def write_summary(out: Path, cfg: RunConfig, results: list[StageResult]) -> Path:
    """``summary.json``: version, run name, and every stage's result."""
    summary = {
        "cryoorient_ray": __version__,
        "name": cfg.name,
        "stages": [asdict(r) for r in results],
    }
    return atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def run_orientations(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None
) -> tuple[Path, StageResult]:
    """`cryoorient orientations`: only the orientation-sampling stage."""
    out = prepare_output_dir(cfg, out_dir, argv)
    return out, stage_orientations(cfg, out)


def run_pipeline(
    cfg: RunConfig, out_dir: str | os.PathLike | None = None, argv: list[str] | None = None
) -> tuple[Path, list[StageResult]]:
    """`cryoorient run`: every stage in :data:`PIPELINE_STAGES` that this version has, in order."""
    out = prepare_output_dir(cfg, out_dir, argv)
    runners = {"orientations": stage_orientations}
    results = []
    for name in PIPELINE_STAGES:
        if name in runners:
            log.info("stage %s", name)
            results.append(runners[name](cfg, out))
        else:
            results.append(StageResult(name=name, status="not available"))
    write_summary(out, cfg, results)
    return out, results
