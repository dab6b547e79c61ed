"""Hyper-parameter search of the distance with Ray Tune: each trial is one Ray Train run.

The Ray 2.4x+ (Train V2) way of combining the two: a Tune *function trainable*
(:func:`tune_trial`) builds and fits one ``TorchTrainer`` per trial with the same code as
``cryoorient train`` (:func:`~cryoorient_ray.distributed.train_workers.build_trainer`); Tune's
``TuneReportCallback`` forwards every epoch's ``ray.train.report`` to Tune, so
``training_iteration`` is the epoch and ASHA can stop weak trials on the validation L_DE after
``grace_period`` epochs. The trial actor itself only drives its Train run (a fraction of a CPU);
the Train workers take their own resources, and ``max_concurrent_trials`` is bounded by what the
cluster can hold at once.

The search space is a YAML file (``configs/tune_space.yaml``) of ``train.*`` settings, dotted as
with ``--set``, each a fixed value or one of ``{choice: [...]}``, ``{grid: [...]}``,
``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (``hi`` excluded),
``{lograndint: [lo, hi]}``. Every name and every candidate value is checked against the config
models before Ray starts anything.

Layout of an experiment folder (Tune's experiment directory):

- ``config.yaml`` (the base run config, stamped), ``tune_space.yaml`` (the space searched);
- ``trial_<id>/``: Tune's files (``params.json``, ``result.json`` with one line per epoch,
  ``progress.csv``, TensorBoard events) and ``train/``, the trial's Train run as
  ``cryoorient train`` writes it (``tensorboard/``, ``ray_train/`` checkpoints; ``model.pt``,
  ``history.json`` when the trial ran to the end);
- ``experiment_state-*.json``, ``tuner.pkl``: what ``Tuner.restore`` resumes from;
- ``results.csv`` and ``tune_summary.json`` (:func:`run_search`);
- ``trials.csv``, ``tune_report.{png,html,json}``, ``best_config.yaml``: the report, written by
  :func:`cryoorient_ray.stages.tune.write_tune_report` (no plotting or HTML in this Ray layer).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cryoorient_ray.config import RunConfig, SearchConfig, TrainConfig, read_yaml_mapping
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.files import atomic_write_text

log = logging.getLogger(__name__)

SPACE_NAME = "tune_space.yaml"
TRIAL_TRAIN_DIR = "train"
DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint", "lograndint")
# Settings every trial must share: the data, the ASHA budget (epochs = max_t) and the resources
# the concurrency was computed from.
NOT_SEARCHABLE = {
    "train.stores": "every trial trains on the same stores",
    "train.epochs": "epochs is the ASHA budget (max_t); set it in the base config",
    "train.num_workers": "the resources per trial are fixed (they bound the concurrent trials)",
    "train.use_gpu": "the resources per trial are fixed (they bound the concurrent trials)",
    "train.cpus_per_worker": "the resources per trial are fixed (they bound the concurrent trials)",
    "train.max_failures": "fault tolerance is not a hyper-parameter",
}


# ----------------------------------------------------------------------------- search space


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _check_name(key: str, source: str) -> None:
    """``key`` must be a dotted ``train.*`` setting of the run config."""
    parts = key.split(".")
    if parts[0] != "train" or len(parts) < 2:
        raise CryoOrientError(
            f"{source}: cannot search '{key}': only train.* settings can be searched (every trial shares one store)"
        )
    if key in NOT_SEARCHABLE:
        raise CryoOrientError(f"{source}: cannot search '{key}': {NOT_SEARCHABLE[key]}")
    model: Any = TrainConfig
    for depth, part in enumerate(parts[1:], start=1):
        names = _field_names(model) if isinstance(model, type) and issubclass(model, BaseModel) else []
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{'.'.join(parts[:depth] + [close[0]])}'?)" if close else ""
            raise CryoOrientError(f"{source}: unknown parameter '{key}'{hint}")
        model = model.model_fields[part].annotation


def _set(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def trial_train_config(base_train: dict, params: dict[str, Any]) -> TrainConfig:
    """The train section of one trial: ``base_train`` with ``params`` (``{"train.lr": 1e-3, ...}``) set."""
    data = json.loads(json.dumps(base_train))  # a deep copy
    for key, value in params.items():
        _set(data, key.split(".")[1:], value)
    return TrainConfig.model_validate(data)


def _candidates(kind: str, args: list) -> list:
    """Values of a domain worth validating: every choice, or the ends of a range."""
    if kind in ("choice", "grid"):
        return list(args)
    if kind in ("randint", "lograndint"):
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def _check_domain(key: str, spec: Any, source: str) -> tuple[str, Any]:
    """``(kind, args)`` of one parameter; kind ``"value"`` for a fixed value."""
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
        if isinstance(spec, dict) and len(spec) == 1:
            kind = next(iter(spec))
            close = difflib.get_close_matches(str(kind), DOMAINS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (use one of {', '.join(DOMAINS)})"
            raise CryoOrientError(f"{source}: '{key}': unknown domain '{kind}'{hint}")
        return "value", spec
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise CryoOrientError(f"{source}: '{key}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return kind, args
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise CryoOrientError(f"{source}: '{key}': {kind} needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if kind in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
        raise CryoOrientError(f"{source}: '{key}': {kind} needs integer bounds, got {args!r}")
    if not lo < hi:
        raise CryoOrientError(f"{source}: '{key}': {kind} needs low < high, got {args!r}")
    if kind in ("loguniform", "lograndint") and lo <= 0:
        raise CryoOrientError(f"{source}: '{key}': {kind} needs a positive low bound, got {args!r}")
    return kind, args


def load_search_space(path: str | os.PathLike, base_train: TrainConfig | None = None) -> dict[str, tuple[str, Any]]:
    """Read and check a search-space file: ``{dotted key: (kind, args)}``.

    Every key must be a searchable ``train.*`` setting and every candidate value (each choice,
    both ends of a range) must give a valid train config on top of ``base_train``.

    Raises:
        CryoOrientError: a missing/invalid file, an unknown parameter or domain, a bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise CryoOrientError(f"search space file not found: {p}")
    data = read_yaml_mapping(p)
    if set(data) != {"parameters"} or not isinstance(data["parameters"], dict) or not data["parameters"]:
        raise CryoOrientError(f"{p}: expected one top-level key 'parameters' mapping train.* settings to domains")
    base = (base_train or TrainConfig()).model_dump(mode="json")
    space = {}
    for key, spec in data["parameters"].items():
        key = str(key)
        _check_name(key, str(p))
        kind, args = _check_domain(key, spec, str(p))
        for value in [args] if kind == "value" else _candidates(kind, args):
            try:
                trial_train_config(base, {key: value})
            except ValidationError as exc:
                err = exc.errors()[0]
                msg = err["msg"].removeprefix("Value error, ")
                raise CryoOrientError(f"{p}: '{key}' cannot be {value!r}: {msg}") from None
        space[key] = (kind, args)
    return space


def to_tune_space(space: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (flat, dotted keys) from a checked search space."""
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "lograndint": lambda a: tune.lograndint(*a),
    }
    return {key: args if kind == "value" else make[kind](args) for key, (kind, args) in space.items()}


def n_trials(space: dict[str, tuple[str, Any]], num_samples: int) -> int:
    """Trials Tune will run: ``num_samples`` times every combination of the grid values."""
    return num_samples * math.prod(len(args) for kind, args in space.values() if kind == "grid")


def check_space_fits_store(space: dict[str, tuple[str, Any]], base_train: TrainConfig, image_size: int) -> None:
    """Refuse architectures deeper than the images allow before any trial starts."""
    from cryoorient_ray.core.learning.model import SiameseSpec

    kind, args = space.get("train.model.channels", ("value", base_train.model.channels))
    for channels in [args] if kind == "value" else _candidates(kind, args):
        need = SiameseSpec(channels=list(channels)).min_image_size
        if image_size < need:
            raise CryoOrientError(
                f"train.model.channels {channels} needs images of at least {need}² but the store has "
                f"{image_size}²; drop that choice from the search space"
            )


# ----------------------------------------------------------------------------- resources


def trial_concurrency(settings: SearchConfig, train: TrainConfig, resources: dict, trials: int) -> int:
    """How many trials run at once: what the Ray resources hold (one CPU kept for Ray Data's
    read tasks), capped by ``settings.max_concurrent_trials`` and the number of trials."""
    per_trial = settings.driver_cpus + train.num_workers * train.cpus_per_worker
    cpus = float(resources.get("CPU", 0.0))
    fit = int((cpus - 1.0 + 1e-9) // per_trial)
    if train.use_gpu:
        fit = min(fit, int(float(resources.get("GPU", 0.0)) // train.num_workers))
    if fit < 1:
        gpus = f" and {train.num_workers} GPU(s)" if train.use_gpu else ""
        raise CryoOrientError(
            f"one trial needs {per_trial:g} CPUs{gpus} (driver {settings.driver_cpus:g} + {train.num_workers} "
            f"workers × {train.cpus_per_worker:g}) plus 1 CPU for Ray Data, but Ray has {cpus:g} CPUs"
            f"{' and ' + str(resources.get('GPU', 0)) + ' GPUs' if train.use_gpu else ''}"
        )
    if settings.max_concurrent_trials is not None:
        fit = min(fit, settings.max_concurrent_trials)
    return max(1, min(fit, trials))


# ----------------------------------------------------------------------------- the trial


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default puts every parameter value in the name)."""
    return f"trial_{trial.trial_id}"


def tune_trial(config: dict, base_train: dict, stores: list[str], seed: int, experiment_dir: str) -> None:
    """One Tune trial: a Ray Train run of the distance with the trial's settings.

    Every epoch's metrics reach Tune through ``TuneReportCallback``; ASHA stops the trial (and
    with it the Train run it owns) when its validation L_DE falls behind. A trial that runs to
    the end also exports ``model.pt`` like ``cryoorient train``. The Train run is named after the
    trial, so a restored experiment resumes it from its last checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cryoorient_ray.distributed.train_workers import TrainJob, build_trainer, export_trained_model

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_train_config(base_train, config)
    out = Path(experiment_dir) / f"trial_{trial_id}" / TRIAL_TRAIN_DIR
    job = TrainJob(cfg, stores, out, seed=seed, name=f"train-{trial_id}")
    run = build_trainer(job, callbacks=[TuneReportCallback()])
    t0 = time.perf_counter()
    result = run.trainer.fit()
    export_trained_model(run, result.checkpoint, time.perf_counter() - t0)


def _trainable(cfg: RunConfig, stores: list[str], experiment_dir: Path):
    from ray import tune

    fn = tune.with_parameters(
        tune_trial,
        base_train=cfg.train.model_dump(mode="json"),
        stores=[str(s) for s in stores],
        seed=cfg.seed,
        experiment_dir=str(experiment_dir),
    )
    resources = {"CPU": cfg.tune.driver_cpus}
    return tune.with_resources(fn, resources)


def is_experiment(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a Tune experiment that ``Tuner.restore`` can resume."""
    from ray import tune

    return Path(path).is_dir() and tune.Tuner.can_restore(str(Path(path).resolve()))


def _restored_tuner(exp: Path, trainable):
    from ray import tune

    if not is_experiment(exp):
        raise CryoOrientError(f"{exp} holds no Tune experiment to resume")
    return tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)


def _new_tuner(cfg: RunConfig, space: dict[str, tuple[str, Any]], trainable, exp: Path, concurrency: int, verbose: int):
    """A fresh ``Tuner``: ASHA on ``cfg.tune.metric`` over ``train.epochs``, at most ``concurrency`` trials at once."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if is_experiment(exp):
        raise CryoOrientError(f"{exp} already holds a Tune experiment; resume it with --resume or use another -o")
    settings, epochs = cfg.tune, cfg.train.epochs
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(settings.grace_period, epochs),
        reduction_factor=settings.reduction_factor,
        # a trial that reaches max_t ends by itself, after exporting its model.pt
        stop_last_trials=False,
    )
    tune_config = tune.TuneConfig(
        metric=settings.metric,
        mode="min",
        scheduler=scheduler,
        # the variant generator bounds the trials at once itself (Tune ignores
        # max_concurrent_trials with a SearchGenerator such as this one)
        search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
        num_samples=settings.num_samples,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=exp.name,
        storage_path=str(exp.parent),
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        verbose=verbose,
    )
    return tune.Tuner(trainable, param_space=to_tune_space(space), tune_config=tune_config, run_config=run_config)


def _write_search_summary(grid, exp: Path, concurrency: int, seconds: float, resume: bool) -> dict:
    """``results.csv`` (Tune's table) and ``tune_summary.json``; wall time summed over resumed sessions."""
    atomic_write_text(exp / "results.csv", grid.get_dataframe().to_csv(index=False))
    errors = [str(e).splitlines()[0] for e in grid.errors]
    if resume and (exp / "tune_summary.json").is_file():  # wall time over every session of the experiment
        seconds += float(json.loads((exp / "tune_summary.json").read_text()).get("seconds", 0.0))
    summary = {
        "experiment_dir": str(exp),
        "trials": len(grid),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "concurrent_trials": concurrency,
        "seconds": round(seconds, 2),
    }
    atomic_write_text(exp / "tune_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_search(
    cfg: RunConfig,
    stores: list[str],
    experiment_dir: str | os.PathLike,
    space: dict[str, tuple[str, Any]],
    resume: bool = False,
    verbose: int = 1,
) -> dict:
    """Run (or resume) the search; Ray must be initialised. Returns a summary of the trials.

    ``experiment_dir`` is Tune's experiment directory. With ``resume``, the experiment there is
    restored (``Tuner.restore``): finished trials are kept, unfinished and errored ones go on from
    their last checkpoint, the scheduler's state included.
    """
    import ray

    exp = Path(experiment_dir).resolve()
    total = n_trials(space, cfg.tune.num_samples)
    concurrency = trial_concurrency(cfg.tune, cfg.train, ray.cluster_resources(), total)
    trainable = _trainable(cfg, stores, exp)
    t0 = time.perf_counter()
    if resume:
        tuner = _restored_tuner(exp, trainable)
    else:
        tuner = _new_tuner(cfg, space, trainable, exp, concurrency, verbose)
    log.info("Tune: %d trial(s), %d at once, experiment %s", total, concurrency, exp)
    grid = tuner.fit()
    return _write_search_summary(grid, exp, concurrency, time.perf_counter() - t0, resume)
