"""The tune command: the Ray Tune search of the distance, its report and best config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryoorient_ray.config import RunConfig, write_stamped_config
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.stages.base import prepare_output_dir, store_path_for
from cryoorient_ray.stages.simulate import stage_simulate

log = logging.getLogger(__name__)


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
    Ends with the report (:func:`cryoorient_ray.distributed.tune_trials.write_tune_report`).
    """
    import shutil

    from cryoorient_ray.config import STAMPED_CONFIG_NAME, load_config
    from cryoorient_ray.distributed.runtime import ray_runtime
    from cryoorient_ray.distributed.tune_trials import (
        SPACE_NAME,
        check_space_fits_store,
        is_experiment,
        load_search_space,
        run_search,
        write_tune_report,
    )
    from cryoorient_ray.io.store import ProjectionStore

    if resume:
        if out_dir is None:
            raise CryoOrientError("--resume needs the experiment folder")
        out = Path(out_dir)
        if not (out / STAMPED_CONFIG_NAME).is_file() or not (out / SPACE_NAME).is_file():
            raise CryoOrientError(
                f"{out} is not a `cryoorient tune` experiment (no {STAMPED_CONFIG_NAME}/{SPACE_NAME})"
            )
        cfg = load_config(out / STAMPED_CONFIG_NAME)
        space = load_search_space(out / SPACE_NAME, cfg.train)
        with ray_runtime(cfg.ray):
            summary = run_search(cfg, list(cfg.train.stores), out, space, resume=True, verbose=1 if progress else 0)
        return out, summary, write_tune_report(out)

    assert cfg is not None
    space = load_search_space(cfg.tune.space, cfg.train)  # bad input stops here, before anything is written
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir)
    if is_experiment(out):
        raise CryoOrientError(f"{out} already holds a Tune experiment; resume it with --resume or use another -o")
    stores = list(cfg.train.stores)
    image_size = ProjectionStore.open(stores[0]).image_size if stores else cfg.simulate.image_size
    check_space_fits_store(space, cfg.train, image_size)
    out = prepare_output_dir(cfg, out, argv)
    if not stores:
        stage_simulate(cfg, out, progress=progress)
        stores = [store_path_for(cfg, out)]
    stores = [s if "://" in s else str(Path(s).resolve()) for s in stores]
    if cfg.tune.metric == "heldout_loss" and not any(
        p.get("heldout") for s in stores for p in ProjectionStore.open(s).proteins
    ):
        raise CryoOrientError("tune.metric heldout_loss needs a store with held-out proteins; these have none")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stores": stores})})
    write_stamped_config(cfg, out, argv)
    shutil.copyfile(cfg.tune.space, out / SPACE_NAME)
    with ray_runtime(cfg.ray):
        summary = run_search(cfg, stores, out, space, verbose=1 if progress else 0)
    return out, summary, write_tune_report(out)
