"""Connecting to Ray: an existing cluster (``address``) or a local runtime started here."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from cryoorient_ray.config import RayConfig
from cryoorient_ray.errors import CryoOrientError

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Start or connect to Ray. Returns True if this call started it (and should shut it down).

    If Ray is already initialised in this process (a test session, a notebook) it is reused.
    ``address`` (or the ``RAY_ADDRESS`` environment variable) connects to a running cluster;
    otherwise a new local runtime starts with ``num_cpus``/``num_gpus`` from the config (never
    a silent attach to a cluster some other ``ray start`` left running on this machine).
    """
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    show_logs = cfg.log_to_driver or os.environ.get("CRYOORIENT_RAY_LOGS") == "1"
    kwargs: dict = {"include_dashboard": False, "log_to_driver": show_logs, "configure_logging": False}
    if address is None:
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.num_gpus is not None:
            kwargs["num_gpus"] = cfg.num_gpus
    if not show_logs:  # our own progress bars stand in for Ray Data's log lines
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ray.init(address=address or "local", **kwargs)
    except ConnectionError as exc:
        raise CryoOrientError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    log.debug("Ray %s: %s", "cluster " + address if address else "local", ray.cluster_resources())
    return True


@contextlib.contextmanager
def ray_runtime(cfg: RayConfig | None = None) -> Iterator[dict]:
    """Context manager around :func:`init_ray`; yields ``ray.cluster_resources()``."""
    started = init_ray(cfg)
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
