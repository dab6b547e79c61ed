"""What every stage shares: its result record, the run folder, the store path, the summary."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryoorient_ray import __version__
from cryoorient_ray.config import RunConfig, write_stamped_config
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text

log = logging.getLogger(__name__)


# The end-to-end order of `cryoorient run`.
PIPELINE_STAGES: tuple[str, ...] = ("simulate", "train", "recover", "reconstruct")
MODEL_NAME = "model.pt"
SUMMARY_NAME = "summary.json"
STORE_NAME = "projections.zarr"


@dataclass
class StageResult:
    """What a stage did: status, wall time, files written (relative to the run folder), numbers."""

    name: str
    status: str  # "done", or "cached" when `cryoorient run` reused a finished stage
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float | int | str] = field(default_factory=dict)

    @classmethod
    def done(
        cls, name: str, started: float, outputs: dict[str, str], metrics: dict[str, float | int | str] | None = None
    ) -> StageResult:
        """A finished stage, timed from ``started`` (a :func:`time.perf_counter` reading)."""
        seconds = round(time.perf_counter() - started, 3)
        return cls(name=name, status="done", seconds=seconds, outputs=outputs, metrics=dict(metrics or {}))


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


def store_path_for(cfg: RunConfig, out: Path) -> str:
    """Where the simulated store goes: ``simulate.store`` if set, else ``<out>/projections.zarr``.

    Local paths come back absolute (Ray workers do not share the driver's working directory);
    URLs (``s3://``, ``gs://``) unchanged.
    """
    from cryoorient_ray.io.store import absolute_store_path

    return absolute_store_path(cfg.simulate.store or out / STORE_NAME)


def check_ray_address(cfg: RunConfig) -> None:
    """Fail before writing anything when the configured Ray cluster does not answer (one clear error)."""
    from cryoorient_ray.distributed.runtime import check_address, resolve_address

    address = resolve_address(cfg.ray)
    if address is not None:
        check_address(address, timeout=cfg.ray.connect_timeout)


def _ray_nodes_metric(stage: str) -> dict[str, int]:
    """``{"nodes": k}``: how many Ray nodes ran the stage's tasks/actors (empty when none recorded)."""
    from cryoorient_ray.distributed.runtime import nodes_used

    used = nodes_used(stage)
    return {"nodes": len(used)} if used else {}


def write_summary(out: Path, cfg: RunConfig, results: list[StageResult], head: dict | None = None) -> Path:
    """``summary.json``: version, run name, the headline numbers and every stage's result."""
    summary = {
        "cryoorient_ray": __version__,
        "name": cfg.name,
        "headline": head or {},
        "stages": [asdict(r) for r in results],
    }
    return atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def run_standalone(
    cfg: RunConfig,
    out_dir: str | os.PathLike | None,
    argv: list[str] | None,
    stages: Sequence[Callable[[Path], StageResult]],
    needs_ray: bool = True,
) -> tuple[Path, list[StageResult]]:
    """One command's stages outside `cryoorient run`: check Ray, make the run folder, run, write the summary."""
    if needs_ray:
        check_ray_address(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    results = [stage(out) for stage in stages]
    write_summary(out, cfg, results)
    return out, results
