"""`cryoorient run`: the stages in order, each cached by the config sections it depends on, and the headline.

Each stage's runner and the files it writes live in :mod:`cryoorient_ray.stages`. Direction of
imports: cli → pipeline/stages → distributed → {io, core}.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from cryoorient_ray.config import RunConfig
from cryoorient_ray.io.files import atomic_write_text
from cryoorient_ray.stages.base import (
    PIPELINE_STAGES,
    StageResult,
    check_ray_address,
    output_dir_for,
    prepare_output_dir,
    write_summary,
)
from cryoorient_ray.stages.bootstrap import check_bootstrap, stage_bootstrap
from cryoorient_ray.stages.reconstruct import stage_reconstruct
from cryoorient_ray.stages.recover import existing_model_file, stage_recover
from cryoorient_ray.stages.refine import REFINED_NAME, RUN_FOLDER, STATE_DIR, check_refine, stage_refine
from cryoorient_ray.stages.simulate import check_simulate, stage_simulate
from cryoorient_ray.stages.train import check_init_model, stage_train

log = logging.getLogger(__name__)


# The config sections each stage depends on: a stage re-runs when one of them changes. The
# reconstruct stage depends on refine too when refine runs (it then starts from the refined orientations).
STAGE_SECTIONS = {
    "simulate": ("seed", "simulate"),
    "train": ("seed", "simulate", "train"),
    "recover": ("seed", "simulate", "train", "recover"),
    "refine": ("seed", "simulate", "train", "recover", "refine"),
    "reconstruct": ("seed", "simulate", "train", "recover", "reconstruct"),
    "bootstrap": ("seed", "simulate", "train", "recover", "refine", "reconstruct", "bootstrap"),
}
# refine keys that change how the stage runs, not its result (a changed one resumes, not restarts).
REFINE_RUN_KEYS = ("actors", "cpus_per_actor", "gpu", "batch_size")


def stage_key(cfg: RunConfig, name: str) -> str:
    """Hash of the config sections a stage's result depends on (its own and every earlier one)."""
    import hashlib

    data = cfg.model_dump(mode="json")
    sections = STAGE_SECTIONS[name] + (("refine",) if name == "reconstruct" and cfg.refine.enabled else ())
    picked = {k: data.get(k) for k in sections}
    if "refine" in picked:
        picked["refine"] = {k: v for k, v in picked["refine"].items() if k not in REFINE_RUN_KEYS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _cached_stage(out: Path, name: str, key: str) -> StageResult | None:
    marker = out / ".stages" / f"{name}.json"
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    result = StageResult(**data["result"])
    for rel in result.outputs.values():
        if "://" not in rel and not (out / rel.rstrip("/")).exists():
            return None
    if name == "simulate" and _store_damaged(out, result.outputs.get("store")):
        return None  # re-run: simulate renders the damaged shards again
    result.status = "cached"
    return result


def _store_damaged(out: Path, rel: str | None) -> bool:
    """Whether the store a finished simulate stage wrote has lost shard data since."""
    from cryoorient_ray.io.store import ProjectionStore

    if not rel:
        return False
    store = ProjectionStore.open(rel if "://" in rel else out / rel, verify=False)
    return bool(store.missing_arrays() or store.damaged_shards())


def _mark_stage(out: Path, name: str, key: str, result: StageResult) -> None:
    (out / ".stages").mkdir(exist_ok=True)
    atomic_write_text(out / ".stages" / f"{name}.json", json.dumps({"key": key, "result": asdict(result)}) + "\n")


def headline(results: list[StageResult]) -> dict[str, str]:
    """The numbers a user looks at first, in words."""
    m: dict = {}
    for r in results:
        m.update({f"{r.name}.{k}": v for k, v in r.metrics.items()})
    lines = {}
    if "train.test_L_DE" in m:
        lines["learned distance L_DE (test)"] = (
            f"{m['train.test_L_DE']} rad² (Euclidean baseline {m.get('train.euclidean_test_L_DE')})"
        )
    if "recover.e_or_o4" in m:
        lines["orientation error E_OR (O(4), as the paper)"] = f"{m['recover.e_or_o4']} rad"
        lines["orientation error after rotation + hand only"] = (
            f"{m.get('recover.registration')} rad "
            f"(gauge {'physical' if m.get('recover.gauge_physical') else 'NOT physical'})"
        )
    if "refine.halfmap_fsc0143_A" in m:
        line = f"half maps FSC0.143 {m['refine.halfmap_fsc0143_A']} Å after {m.get('refine.iterations')} iterations"
        if "refine.registration" in m:
            line += (
                f"; error {m['refine.registration']} rad after rotation + hand (E_OR {m.get('refine.e_or_o4')} rad), "
                f"from {m.get('refine.start_registration')} rad"
            )
        lines[f"global refinement (from {m.get('refine.start')})"] = line
    if "reconstruct.recovered_fsc05_A" in m:
        lines["resolution FSC0.5 vs true map"] = (
            f"recovered {m['reconstruct.recovered_fsc05_A']} Å, true orientations "
            f"{m.get('reconstruct.true_fsc05_A')} Å, random {m.get('reconstruct.random_fsc05_A')} Å"
        )
    if "reconstruct.halfmap_fsc0143_A" in m:
        lines["half-map resolution (no ground truth)"] = (
            f"FSC0.143 {m['reconstruct.halfmap_fsc0143_A']} Å, FSC0.5 {m.get('reconstruct.halfmap_fsc05_A')} Å"
        )
    if "bootstrap.rounds" in m:
        line = (
            f"half maps FSC0.143 {m.get('bootstrap.refined_halfmap_fsc0143_A')} Å, "
            f"FSC0.5 {m.get('bootstrap.refined_halfmap_fsc05_A')} Å"
        )
        if "bootstrap.refined_registration" in m:
            line += (
                f"; error {m['bootstrap.refined_registration']} rad after rotation + hand "
                f"(E_OR {m.get('bootstrap.refined_e_or_o4')} rad), "
                f"recovered {m.get('bootstrap.recovered_registration')} rad"
            )
        lines[f"bootstrap (after round {m['bootstrap.rounds']})"] = line
    lines["wall time"] = f"{sum(r.seconds for r in results):.0f} s"
    return lines


def _check_model(cfg: RunConfig) -> None:
    """Before anything runs: a given ``recover.model`` (a file or ``pretrained[:NAME]``) exists."""
    if cfg.recover.estimator == "model":
        existing_model_file(cfg.recover.model, "recover.model")


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> tuple[Path, list[StageResult]]:
    """`cryoorient run`: every stage of :data:`PIPELINE_STAGES`, skipping those already done.

    A stage is skipped when ``<out>/.stages/<stage>.json`` records the same hash of the config
    sections it depends on and its outputs still exist (``force`` re-runs everything). Ends with
    ``summary.json`` and ``report.html``.
    """
    from cryoorient_ray.report import write_report

    check_ray_address(cfg)
    check_simulate(cfg, output_dir_for(cfg, out_dir))  # before config.yaml is (re)written
    check_refine(cfg)
    _check_model(cfg)
    check_init_model(cfg)
    check_bootstrap(cfg)
    out = prepare_output_dir(cfg, out_dir, argv)
    if force:  # re-run refine from its start, not from its saved iterations
        shutil.rmtree(out / RUN_FOLDER / STATE_DIR, ignore_errors=True)
    orientations = f"{RUN_FOLDER}/{REFINED_NAME}" if cfg.refine.enabled else "recovered_orientations.npz"
    runners = {
        "simulate": stage_simulate,
        "train": stage_train,
        "recover": stage_recover,
        "refine": stage_refine,
        "reconstruct": functools.partial(stage_reconstruct, orientations=orientations),
        "bootstrap": stage_bootstrap,
    }
    results = []
    for name in PIPELINE_STAGES:
        if name not in runners:
            continue
        if name == "refine" and not cfg.refine.enabled:
            log.info("stage refine: off (refine.enabled false), skipping")
            continue
        if name == "train" and cfg.recover.model is not None and cfg.recover.estimator == "model":
            log.info("stage train: recover.model is %s, nothing to train, skipping", cfg.recover.model)
            continue
        if name == "bootstrap" and cfg.bootstrap.rounds == 0:
            continue
        key = stage_key(cfg, name)
        cached = None if force else _cached_stage(out, name, key)
        if cached is not None:
            log.info("stage %s: already done (cached), skipping", name)
            results.append(cached)
            continue
        log.info("stage %s", name)
        result = runners[name](cfg, out, progress=progress)
        _mark_stage(out, name, key, result)
        results.append(result)
    summary = write_summary(out, cfg, results, headline(results))
    write_report(out, json.loads(summary.read_text()))
    return out, results
