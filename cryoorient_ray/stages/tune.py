"""The tune command: the Ray Tune search of the distance, its report and best config.

The search runs on Ray (:mod:`cryoorient_ray.distributed.tune_trials`); the report is read from
the files of the experiment folder alone (no Ray: it works on an interrupted experiment too) and
written here: ``tune_report.png`` (:func:`cryoorient_ray.plots.plot_tune_summary`),
``tune_report.html``, ``trials.csv``, ``tune_report.json`` and ``best_config.yaml``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from cryoorient_ray.config import STAMPED_CONFIG_NAME, RunConfig, dump_config, load_config, write_stamped_config
from cryoorient_ray.distributed.tune_trials import (
    SPACE_NAME,
    TRIAL_TRAIN_DIR,
    check_space_fits_store,
    is_experiment,
    load_search_space,
    run_search,
    trial_train_config,
)
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text
from cryoorient_ray.stages.base import output_dir_for, prepare_output_dir, store_path_for
from cryoorient_ray.stages.simulate import stage_simulate

log = logging.getLogger(__name__)

BEST_CONFIG_NAME = "best_config.yaml"
TRIAL_STATUSES = ("complete", "stopped early", "error", "unfinished")


# ----------------------------------------------------------------------------- the search


def _check_experiment_folder(exp: Path) -> None:
    if not (exp / STAMPED_CONFIG_NAME).is_file() or not (exp / SPACE_NAME).is_file():
        raise CryoOrientError(f"{exp} is not a `cryoorient tune` experiment (no {STAMPED_CONFIG_NAME}/{SPACE_NAME})")


def _resume_search(out_dir: str | os.PathLike | None, progress: bool) -> tuple[Path, dict]:
    """Go on with the experiment in ``out_dir``, from its own stamped config and space."""
    from cryoorient_ray.distributed.runtime import ray_runtime

    if out_dir is None:
        raise CryoOrientError("--resume needs the experiment folder")
    out = Path(out_dir)
    _check_experiment_folder(out)
    cfg = load_config(out / STAMPED_CONFIG_NAME)
    space = load_search_space(out / SPACE_NAME, cfg.train)
    with ray_runtime(cfg.ray):
        summary = run_search(cfg, list(cfg.train.stores), out, space, resume=True, verbose=1 if progress else 0)
    return out, summary


def _searched_stores(cfg: RunConfig, out: Path, progress: bool) -> list[str]:
    """The stores every trial trains on (simulated first when ``train.stores`` is empty), absolute."""
    from cryoorient_ray.io.store import ProjectionStore

    stores = list(cfg.train.stores)
    if not stores:
        stage_simulate(cfg, out, progress=progress)
        stores = [store_path_for(cfg, out)]
    stores = [s if "://" in s else str(Path(s).resolve()) for s in stores]
    if cfg.tune.metric == "heldout_loss" and not any(
        p.get("heldout") for s in stores for p in ProjectionStore.open(s).proteins
    ):
        raise CryoOrientError("tune.metric heldout_loss needs a store with held-out proteins; these have none")
    return stores


def _new_search(
    cfg: RunConfig, out_dir: str | os.PathLike | None, argv: list[str] | None, progress: bool
) -> tuple[Path, dict]:
    """Check the space against the config and the store, prepare the folder, then search."""
    from cryoorient_ray.distributed.runtime import ray_runtime
    from cryoorient_ray.io.store import ProjectionStore

    space = load_search_space(cfg.tune.space, cfg.train)  # bad input stops here, before anything is written
    out = output_dir_for(cfg, out_dir)
    if is_experiment(out):
        raise CryoOrientError(f"{out} already holds a Tune experiment; resume it with --resume or use another -o")
    given = list(cfg.train.stores)
    image_size = ProjectionStore.open(given[0]).image_size if given else cfg.simulate.image_size
    check_space_fits_store(space, cfg.train, image_size)
    out = prepare_output_dir(cfg, out, argv)
    stores = _searched_stores(cfg, out, progress)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stores": stores})})
    write_stamped_config(cfg, out, argv)
    shutil.copyfile(cfg.tune.space, out / SPACE_NAME)
    with ray_runtime(cfg.ray):
        summary = run_search(cfg, stores, out, space, verbose=1 if progress else 0)
    return out, summary


def run_tune(
    cfg: RunConfig | None,
    out_dir: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> tuple[Path, dict, dict]:
    """`cryoorient tune`: search the distance's hyper-parameters with Ray Tune; ``(folder, search summary, report)``.

    A new search checks the search space (``cfg.tune.space``) before anything starts, simulates
    the store when ``train.stores`` is empty, stamps the config with the stores it searched on
    (so ``cryoorient tune report`` can write a config that trains on them) and keeps a copy of the
    space. With ``resume`` the experiment in ``out_dir`` goes on from its own config and space.
    Ends with the report (:func:`write_tune_report`).
    """
    if resume:
        out, summary = _resume_search(out_dir, progress)
    else:
        assert cfg is not None
        out, summary = _new_search(cfg, out_dir, argv, progress)
    return out, summary, write_tune_report(out)


# ----------------------------------------------------------------------------- reading an experiment


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
    return rows


def _tune_statuses(experiment_dir: Path) -> dict[str, str]:
    """Tune's own status of each trial (TERMINATED, RUNNING, ERROR, ...) from the newest
    ``experiment_state-*.json``; empty when it cannot be read (the layout is Tune's, not ours)."""
    files = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text(encoding="utf-8"))
        out = {}
        for entry in data["trial_data"]:
            trial = json.loads(entry[0])
            out[str(trial["trial_id"])] = str(trial["status"])
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def _trial_status(trial_dir: Path, tune_status: str | None, epochs_run: int, max_epochs: int) -> str:
    """complete, stopped early (by ASHA), error, or unfinished (interrupted: ``--resume`` goes on)."""
    if tune_status == "ERROR" or (trial_dir / "error.txt").exists():
        return "error"
    if epochs_run >= max_epochs or (trial_dir / TRIAL_TRAIN_DIR / "model.pt").exists():
        return "complete"
    if tune_status in (None, "TERMINATED"):
        return "stopped early"
    return "unfinished"


def _trial_record(tdir: Path, metric: str, tune_status: str | None, max_epochs: int) -> dict:
    """One trial: its parameters, the metric per epoch (``curve``, rad²), its best and last values, status."""
    params = json.loads((tdir / "params.json").read_text(encoding="utf-8"))
    history = [r for r in _read_jsonl(tdir / "result.json") if metric in r]
    history.sort(key=lambda r: r.get("training_iteration", 0))
    values = [float(r[metric]) for r in history if r.get(metric) is not None and math.isfinite(r[metric])]
    best = min(values) if values else None
    model = tdir / TRIAL_TRAIN_DIR / "model.pt"
    return {
        "trial_id": tdir.name.removeprefix("trial_"),
        "dir": str(tdir),
        "params": params,
        "epochs": len(history),
        "curve": values,
        "best": best,
        "best_epoch": values.index(best) + 1 if best is not None else None,
        "last": values[-1] if values else None,
        "status": _trial_status(tdir, tune_status, len(history), max_epochs),
        "model": str(model) if model.exists() else None,
    }


def collect_trials(experiment_dir: str | os.PathLike) -> tuple[RunConfig, list[dict]]:
    """The base config and one record per trial (parameters, per-epoch metrics, status) read from
    the files of an experiment folder (no Ray needed; works on an interrupted experiment too)."""
    exp = Path(experiment_dir)
    if not exp.is_dir():
        raise CryoOrientError(f"experiment folder not found: {exp}")
    _check_experiment_folder(exp)
    cfg = load_config(exp / STAMPED_CONFIG_NAME)
    statuses = _tune_statuses(exp)
    trials = [
        _trial_record(f.parent, cfg.tune.metric, statuses.get(f.parent.name.removeprefix("trial_")), cfg.train.epochs)
        for f in sorted(exp.glob("trial_*/params.json"))
    ]
    if not trials:
        raise CryoOrientError(f"{exp} has no trial results yet")
    return cfg, trials


def best_run_config(cfg: RunConfig, trial: dict, stores: list[str], output_dir: Path) -> RunConfig:
    """A full run config that ``cryoorient train`` accepts as is: the base config, its train
    section set to the best trial's values and to the stores the search used."""
    train = trial_train_config(cfg.train.model_dump(mode="json"), trial["params"])
    train = train.model_copy(update={"stores": list(stores)})
    return cfg.model_copy(update={"train": train, "stamp": None, "output_dir": output_dir})


# ----------------------------------------------------------------------------- the report


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _write_trials_csv(path: Path, ranked: list[dict], keys: list[str], metric: str) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial_id", "status", "epochs", f"best_{metric}", "best_epoch", f"last_{metric}", *keys])
    for t in ranked:
        writer.writerow(
            [t["trial_id"], t["status"], t["epochs"], t["best"], t["best_epoch"], t["last"]]
            + [_format(t["params"].get(k, "")) for k in keys]
        )
    atomic_write_text(path, buf.getvalue())


def _trials_table(ranked: list[dict], keys: list[str], metric: str) -> str:
    """The HTML table of the trials, best first, one column per searched parameter."""
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in ("trial", "status", "epochs", f"best {metric}", "best epoch", *keys)
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                t["trial_id"],
                t["status"],
                t["epochs"],
                f"{t['best']:.4f}" if t["best"] is not None else "",
                t["best_epoch"] or "",
            )
        )
        + "".join(f"<td>{html.escape(_format(t['params'].get(k, '')))}</td>" for k in keys)
        + "</tr>"
        for t in ranked
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _report_page(exp: Path, out: Path, report: dict, table: str, best_cfg: RunConfig) -> str:
    """The self-contained ``tune_report.html``: summary line, figure, trial table, best train section."""
    from cryoorient_ray.report import png_to_img_tag

    best, metric = report["best"], report["metric"]
    counts = ", ".join(f"{n} {s}" for s, n in report["status"].items() if n)
    best_path = html.escape(str(out / BEST_CONFIG_NAME))
    best_train = html.escape(yaml.safe_dump(best_cfg.train.model_dump(mode="json"), sort_keys=False))
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Tune report: {html.escape(exp.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;font-size:85%}pre{background:#f6f6f6;padding:.5em}</style>"
        "</head><body>"
        f"<h1>Hyper-parameter search: {html.escape(exp.name)}</h1>"
        f"<p>{report['trials']} trials: {counts}. "
        f"Best: trial <b>{html.escape(best['trial_id'])}</b>, {metric} <b>{best['best']:.4f}</b> rad² "
        f"at epoch {best['best_epoch']}. Train it with <code>cryoorient train {best_path}"
        "</code>. TensorBoard: <code>tensorboard --logdir "
        f"{html.escape(str(exp))}</code>.</p>"
        f"{png_to_img_tag(out / 'tune_report.png')}"
        f"<h2>Trials (best first)</h2>{table}"
        f"<h2>Best config (train section)</h2><pre>{best_train}"
        "</pre></body></html>\n"
    )


def _write_best_config(cfg: RunConfig, best: dict, exp: Path, out: Path) -> RunConfig:
    """``best_config.yaml``: the best trial as a run config that ``cryoorient train`` takes as is."""
    if not cfg.train.stores:  # `cryoorient tune` stamps the stores it searched on into config.yaml
        raise CryoOrientError(f"{exp / 'config.yaml'} names no train.stores; cannot write a config to train with")
    best_cfg = best_run_config(cfg, best, list(cfg.train.stores), exp / "best_run")
    header = (
        f"# Best trial {best['trial_id']} of the Tune experiment {exp} ({cfg.tune.metric} {best['best']:.4f} rad²).\n"
        f"# Train it: cryoorient train {out / BEST_CONFIG_NAME}\n"
    )
    atomic_write_text(out / BEST_CONFIG_NAME, header + dump_config(best_cfg))
    return best_cfg


def write_tune_report(experiment_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Figures, table and the best config of an experiment, into ``out_dir`` (default: the experiment).

    Writes ``tune_report.png`` (L_DE per epoch of every trial, the best L_DE per trial, and L_DE
    against n_f as the paper's Figure 17b), ``tune_report.html`` (the figure, the trial table,
    the best config), ``trials.csv``, ``tune_report.json`` and ``best_config.yaml``. Returns the
    content of ``tune_report.json``.
    """
    from cryoorient_ray.plots import plot_tune_summary

    exp = Path(experiment_dir).resolve()
    cfg, trials = collect_trials(exp)
    out = Path(out_dir).resolve() if out_dir is not None else exp
    out.mkdir(parents=True, exist_ok=True)
    metric = cfg.tune.metric
    ranked = sorted(trials, key=lambda t: (t["best"] is None, t["best"] if t["best"] is not None else 0.0))
    best = ranked[0]
    if best["best"] is None:
        raise CryoOrientError(f"{exp}: no trial reported {metric} yet")
    best_cfg = _write_best_config(cfg, best, exp, out)
    keys = sorted({k for t in trials for k in t["params"]})
    _write_trials_csv(out / "trials.csv", ranked, keys, metric)
    fixed_nf = cfg.train.model.n_features
    plot_tune_summary(ranked, out / "tune_report.png", metric=metric, max_epochs=cfg.train.epochs, n_features=fixed_nf)
    report = {
        "experiment_dir": str(exp),
        "metric": metric,
        "trials": len(trials),
        "status": {s: sum(t["status"] == s for t in trials) for s in TRIAL_STATUSES},
        "best": {k: best[k] for k in ("trial_id", "best", "best_epoch", "epochs", "status", "params", "model")},
        "best_config": str(out / BEST_CONFIG_NAME),
    }
    atomic_write_text(out / "tune_report.json", json.dumps(report, indent=2) + "\n")
    page = _report_page(exp, out, report, _trials_table(ranked, keys, metric), best_cfg)
    atomic_write_text(out / "tune_report.html", page)
    return report
