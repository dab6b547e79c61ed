"""Connecting to Ray: an existing cluster (``address``) or a local runtime started here.

The same commands run on a laptop and on a cluster: with ``ray.address`` (``--address`` or the
``RAY_ADDRESS`` environment variable) the driver connects to that cluster and every stage uses
the cluster's nodes; without one a local Ray starts with ``ray.num_cpus``/``ray.num_gpus``.

Stages record which Ray nodes ran their tasks and actors (:func:`record_nodes`), so a run's
summary shows whether the work really spread over the cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Iterator

import ray

from cryoorient_ray.config import RayConfig
from cryoorient_ray.errors import CryoOrientError

log = logging.getLogger(__name__)

# Addresses that ray.init understands without a host: "auto" finds a cluster started on this
# machine with `ray start`; "local" always starts a new local runtime (same as no address).
_NAMED_ADDRESSES = ("auto", "local")


def resolve_address(cfg: RayConfig | None = None) -> str | None:
    """The cluster address to connect to: ``cfg.address``, else ``RAY_ADDRESS``, else None (local).

    ``"local"`` means a new local runtime and resolves to None.
    """
    cfg = cfg or RayConfig()
    address = (cfg.address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    return None if address == "local" else address


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with one clear line, when nothing answers at a ``host:port`` or ``ray://host:port``.

    ``ray.init`` itself waits for minutes (and prints C++ warnings) on an unreachable address;
    a plain TCP connection tells within ``timeout`` seconds. ``"auto"`` is left to Ray.

    Raises:
        CryoOrientError: a malformed address, or nothing listening there.
    """
    if address in _NAMED_ADDRESSES:
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if "://" in target or not sep or not host or not port.isdigit():
        raise CryoOrientError(
            f"Ray address {address!r} must look like host:port (the head's GCS, port 6379 by default), "
            "ray://host:10001 (Ray Client) or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise CryoOrientError(
            f"cannot connect to the Ray cluster at {address!r}: {reason} "
            "(is `ray start --head` running there, and the port open?)"
        ) from None


# Ray loggers that print a banner on every start ("Started a local Ray instance.", the token
# authentication notice): kept out of normal output, shown with --verbose or ray.log_to_driver.
_BANNER_LOGGERS = ("ray._private.worker", "ray._private.authentication.authentication_token_setup")


def _quiet_ray_logs() -> None:
    """Keep Ray's start-up banner and Ray Data/Train chatter out of normal output (not under --verbose)."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in _BANNER_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None) -> bool:
    """Start or connect to Ray. Returns True if this call started it (and should shut it down).

    If Ray is already initialised in this process (a test session, a notebook) it is reused.
    ``address`` (or the ``RAY_ADDRESS`` environment variable) connects to a running cluster
    (``"auto"``: the one started with ``ray start`` on this machine); otherwise a new local
    runtime starts with ``num_cpus``/``num_gpus`` from the config, even if another Ray runs here.

    Raises:
        CryoOrientError: the address is malformed or unreachable, or Ray refuses the connection
            (e.g. a different Ray or Python version on the cluster).
    """
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return False
    address = resolve_address(cfg)
    show_logs = cfg.log_to_driver or os.environ.get("CRYOORIENT_RAY_LOGS") == "1"
    kwargs: dict = {"log_to_driver": show_logs}
    if address is None or not address.startswith("ray://"):  # Ray Client takes fewer options
        kwargs.update(include_dashboard=False, configure_logging=False)
    if address is None:
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
        if cfg.num_gpus is not None:
            kwargs["num_gpus"] = cfg.num_gpus
    else:
        check_address(address, timeout=cfg.connect_timeout)
        if cfg.num_cpus is not None or cfg.num_gpus is not None:
            log.warning("ray.num_cpus/num_gpus apply to a local Ray only; the cluster at %s uses its own", address)
    if not show_logs:  # our own progress bars stand in for Ray Data's log lines
        _quiet_ray_logs()
    try:
        # "local" and not None: ray.init(address=None) would join any Ray already running on this
        # machine (another user's included); without an address we always start our own.
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise CryoOrientError(f"cannot connect to {where}: {first}") from None
    if log.isEnabledFor(logging.DEBUG):
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


# ----------------------------------------------------------------------------- where work ran

_NODES_USED: dict[str, set[str]] = {}


def shutdown_ray() -> None:
    """Stop the Ray runtime this process started (a no-op when none runs)."""
    if ray.is_initialized():
        ray.shutdown()


def current_node_id() -> str:
    """Hex id of the Ray node this task or actor runs on (call inside Ray)."""
    return ray.get_runtime_context().get_node_id()


def record_nodes(stage: str, node_ids: Iterable[str]) -> None:
    """Remember that ``stage`` ran work on these Ray node ids (driver side, this process)."""
    _NODES_USED.setdefault(stage, set()).update(str(n) for n in node_ids if n)


def nodes_used(stage: str) -> list[str]:
    """Sorted node ids recorded for ``stage`` since the last :func:`clear_nodes_used`."""
    return sorted(_NODES_USED.get(stage, ()))


def clear_nodes_used(stage: str | None = None) -> None:
    """Forget the nodes recorded for ``stage`` (or for every stage)."""
    if stage is None:
        _NODES_USED.clear()
    else:
        _NODES_USED.pop(stage, None)


def placement_group_ids() -> set[str]:
    """Ids of every placement group the cluster knows (alive or removed)."""
    return set(ray.util.placement_group_table())


def placement_group_nodes(exclude: set[str] = frozenset()) -> set[str]:
    """Node ids that hosted bundles of the placement groups not in ``exclude``.

    Ray Train reserves its workers as one placement group, so the groups that appear during a
    ``fit`` tell where the workers ran (the table keeps removed groups with their nodes).
    """
    table = ray.util.placement_group_table()
    return {
        str(node)
        for pg_id, info in table.items()
        if pg_id not in exclude
        for node in (info.get("bundles_to_node_id") or {}).values()
    }
