"""What every stage shares: its result record, the run folder, the store path, the summary."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryoorient_ray import __version__
from cryoorient_ray.config import RunConfig, write_stamped_config
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text

log = logging.getLogger(__name__)


# The end-to-end order of `cryoorient run` (refine only when refine.enabled, bootstrap when bootstrap.rounds > 0).
PIPELINE_STAGES: tuple[str, ...] = ("simulate", "train", "recover", "refine", "reconstruct", "bootstrap")
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


def output_dir_for(cfg: RunConfig, out_dir: str | os.PathLike | None) -> Path:
    """The run folder a command writes to: ``out_dir`` if given, else ``cfg.output_dir`` (not created)."""
    return Path(out_dir) if out_dir is not None else Path(cfg.output_dir)


def enclosing_store(path: str | os.PathLike) -> Path | None:
    """The Zarr store (a folder with ``zarr.json``) that ``path`` is, or lies inside; None if none."""
    here = Path(os.path.abspath(path))
    for folder in (here, *here.parents):
        if (folder / "zarr.json").is_file():
            return folder
    return None


def check_output_dir(out: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be one: a file, a folder inside a store, not writable.

    Raises:
        CryoOrientError: one line saying which.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CryoOrientError(f"output path exists and is not a folder: {out}")
    store = enclosing_store(out)
    if store is not None:
        raise CryoOrientError(f"output folder {out} is inside the projection store {store}; choose a folder outside it")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CryoOrientError(f"cannot write to the output folder {out}: {existing} is not writable")


def prepare_output_dir(cfg: RunConfig, out_dir: str | os.PathLike | None, argv: list[str] | None) -> Path:
    """Create the run folder and write the stamped config into it. Returns the folder."""
    out = output_dir_for(cfg, out_dir)
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_stamped_config(cfg, out, argv)
    except OSError as exc:
        raise CryoOrientError(f"cannot write to the output folder {out}: {exc.strerror or exc}") from None
    return out


def remove_fresh_output(out: Path) -> None:
    """Undo :func:`prepare_output_dir` for a folder it created, if nothing but the stamped config was written.

    A folder with anything else in it (a partly rendered store, downloads) is kept whole, with its
    ``config.yaml``, so that re-running the command resumes it.
    """
    from cryoorient_ray.config import STAMPED_CONFIG_NAME

    if any(p.name != STAMPED_CONFIG_NAME for p in out.rglob("*") if not p.is_dir()):
        return
    shutil.rmtree(out, ignore_errors=True)


def store_path_for(cfg: RunConfig, out: Path) -> str:
    """Where the simulated store goes: ``simulate.store`` if set, else ``<out>/projections.zarr``.

    Local paths come back absolute (Ray workers do not share the driver's working directory);
    URLs (``s3://``, ``gs://``) unchanged.
    """
    from cryoorient_ray.io.store import absolute_store_path

    return absolute_store_path(cfg.simulate.store or out / STORE_NAME)


def _snr_text(snr_db: float | None) -> str:
    return "noiseless" if snr_db is None else f"{snr_db:g} dB"


def training_mismatch(training: dict, store) -> str | None:
    """One line saying how ``store`` differs from what a model was trained on (box, pixel size, SNR), or None.

    ``training`` is the ``training`` record of a ``model.pt`` (``image_size``, ``pixel_size`` and,
    for models trained since it is recorded, ``snr_db``: one value per training store, None = noiseless).
    """
    diffs = []
    size, pix = training.get("image_size"), training.get("pixel_size")
    if size is not None and int(size) != store.image_size:
        diffs.append(f"{size}² px images, not {store.image_size}²")
    if pix is not None and abs(float(pix) - store.pixel_size) > 0.01 * float(pix):
        diffs.append(f"{float(pix):g} Å/px, not {store.pixel_size:g}")
    trained = training.get("snr_db")
    fresh = (training.get("fresh_noise") or {}).get("snr_db")
    span = None
    if fresh is not None:  # fresh noise every batch: the SNR (or range) it was drawn at, not the store's
        trained = list(fresh) if isinstance(fresh, (list, tuple)) else [fresh]
        span = f"{_snr_text(trained[0])} to {_snr_text(trained[-1])}" if len(trained) == 2 else None
    snr = store.manifest.get("config", {}).get("noise", {}).get("snr_db", "unknown")
    if trained and snr != "unknown":
        level = [math.inf if v is None else float(v) for v in trained]
        here = math.inf if snr is None else float(snr)
        if not min(level) - 1.0 <= here <= max(level) + 1.0:
            said = span or ", ".join(sorted({_snr_text(v) for v in trained}))
            diffs.append(f"SNR {said}, not {_snr_text(snr)}")
    if not diffs:
        return None
    return f"the model was trained on {'; '.join(diffs)} of {store.path}: its distances will not fit these images"


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
    checks: Sequence[Callable[[Path], None]] = (),
) -> tuple[Path, list[StageResult]]:
    """One command's stages outside `cryoorient run`: check, make the run folder, run, write the summary.

    ``checks`` (each given the run folder, not yet created) refuse bad input before Ray starts
    and before anything is written. A folder made here is removed again when a stage stops on
    bad input before writing anything but the stamped config.
    """
    if needs_ray:
        check_ray_address(cfg)
    target = output_dir_for(cfg, out_dir)
    check_output_dir(target)
    for check in checks:
        check(target)
    created = not target.exists()
    out = prepare_output_dir(cfg, target, argv)
    try:
        results = [stage(out) for stage in stages]
    except CryoOrientError:
        if created:
            remove_fresh_output(out)
        raise
    write_summary(out, cfg, results)
    return out, results
