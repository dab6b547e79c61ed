"""What a Ray cluster offers and what each pipeline stage will ask of it (``cryoorient cluster check``).

Every stage takes its resources from the run config, the same on a laptop and on a cluster:

========== =================================================================================
simulate   one Ray task per shard, 1 CPU each (the torch projector on CPU), writing the store
train      ``train.num_workers`` Ray Train workers of ``cpus_per_worker`` CPUs (+ 1 GPU each with
           ``use_gpu``), fed by Ray Data read tasks of 0.5 CPU each
recover    ``recover.actors`` edge-partition actors of ``cpus_per_actor`` CPUs and, for the learned
           distance, as many Ray Data embedding workers of 0.5 CPU; ``actors: 0`` runs in the driver
reconstruct the driver process (CPU, or the driver's GPU)
========== =================================================================================

:func:`plan_stages` turns a config and the cluster's nodes into that table with a verdict per
stage ("fits now", or what is missing: an autoscaling cluster adds nodes on demand, a fixed one
waits forever). :func:`storage_warnings` names the paths that other nodes cannot see.
:func:`cluster_check_report` connects to the cluster and gathers all of it (:func:`check_report`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from cryoorient_ray.config import RunConfig
from cryoorient_ray.errors import CryoOrientError
from cryoorient_ray.io.store import is_url

GIB = 1024**3
READ_TASK_CPUS = 0.5  # Ray Data read/embedding tasks (cryoorient_ray.distributed.data)


@dataclass
class NodeInfo:
    """One alive Ray node: id, IP, head or not, and its logical resources (memory in GiB)."""

    node_id: str
    address: str
    head: bool
    cpus: float
    gpus: float
    memory_gib: float
    object_store_gib: float
    accelerator: str | None = None


@dataclass
class StagePlan:
    """What one stage asks for: ``units`` × ``per_unit`` resources, where it runs, and whether it fits now."""

    stage: str
    runs_on: str
    units: int
    per_unit: dict[str, float] = field(default_factory=dict)
    fits_now: bool = True
    note: str = ""

    def demand(self) -> str:
        """``"2 × {CPU: 0.5, GPU: 1}"`` or ``"driver"``."""
        if not self.per_unit:
            return "driver process"
        per = ", ".join(f"{k} {v:g}" for k, v in self.per_unit.items())
        return f"{self.units} × ({per})"


def describe_nodes(ray_nodes: list[dict] | None = None) -> list[NodeInfo]:
    """Alive nodes from ``ray.nodes()`` (or the given list of the same form), head first."""
    if ray_nodes is None:
        import ray

        ray_nodes = ray.nodes()
    out = []
    for n in ray_nodes:
        if not n.get("Alive", False):
            continue
        res = n.get("Resources", {})
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        out.append(
            NodeInfo(
                node_id=str(n.get("NodeID", "")),
                address=str(n.get("NodeManagerAddress", "")),
                head="node:__internal_head__" in res,
                cpus=float(res.get("CPU", 0.0)),
                gpus=float(res.get("GPU", 0.0)),
                memory_gib=round(float(res.get("memory", 0.0)) / GIB, 1),
                object_store_gib=round(float(res.get("object_store_memory", 0.0)) / GIB, 1),
                accelerator=accel,
            )
        )
    return sorted(out, key=lambda n: (not n.head, n.address, n.node_id))


def _slots(node: NodeInfo, per_unit: dict[str, float]) -> int:
    """How many units of ``per_unit`` fit on an empty ``node``."""
    have = {"CPU": node.cpus, "GPU": node.gpus}
    counts = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_unit.items() if v > 0]
    return min(counts) if counts else 0


def _fit(nodes: list[NodeInfo], units: int, per_unit: dict[str, float]) -> tuple[bool, str]:
    """Whether ``units`` of ``per_unit`` fit on the nodes at once, and a note saying how or what lacks."""
    slots = [_slots(n, per_unit) for n in nodes]
    total = sum(slots)
    used = sum(1 for s in slots if s > 0)
    if total >= units:
        return True, f"fits now: room for {total} on {used} node(s)"
    missing = units - total
    kind = "GPU" if per_unit.get("GPU", 0) > 0 else "CPU"
    return False, (
        f"room for {total} of {units} now; {missing} more need {kind} nodes — an autoscaling cluster adds "
        "them on demand, a fixed one waits"
    )


def _n_projections(cfg: RunConfig) -> int:
    """Projections the simulation writes (a folder counts as one map: an estimate)."""
    from cryoorient_ray.config import InputSpec
    from cryoorient_ray.io.maps import pseudo_range

    sim, n = cfg.simulate, 0
    for item in sim.inputs:
        spec = item if isinstance(item, InputSpec) else InputSpec(source=item)
        n += (spec.n_per_map or sim.n_per_map) * len(pseudo_range(spec.source) or [spec.source])
    return max(1, n)


def plan_stages(cfg: RunConfig, nodes: list[NodeInfo], driver_has_gpu: bool = False) -> list[StagePlan]:
    """The resources each stage of ``cfg`` will request on ``nodes`` (see the module docstring)."""
    plans = [_plan_simulate(cfg, nodes), _plan_train(cfg, nodes)]
    plans.append(_plan_recover(cfg, nodes, driver_has_gpu))
    if cfg.refine.enabled:
        plans.append(_plan_refine(cfg, nodes, driver_has_gpu))
    method = cfg.reconstruct.method
    gpu_note = " (ASTRA CGLS if installed: the driver has a GPU)" if driver_has_gpu else " (CPU)"
    plans.append(StagePlan("reconstruct", "driver process", 1, {}, True, f"method {method}" + gpu_note))
    if cfg.bootstrap.rounds > 0:  # per round: a simulation, a fine-tune (as train), a recovery, a refinement
        train = _plan_train(cfg, nodes)
        note = f"{cfg.bootstrap.rounds} round(s), each simulate + fine-tune as train ({train.note}) + recover + refine"
        plans.append(StagePlan("bootstrap", train.runs_on, train.units, train.per_unit, train.fits_now, note))
    return plans


def _plan_simulate(cfg: RunConfig, nodes: list[NodeInfo]) -> StagePlan:
    """One 1-CPU Ray task per shard of the store."""
    sim = cfg.simulate
    n_proj = _n_projections(cfg)
    shards = -(-n_proj // min(sim.shard_size, n_proj))
    fits, note = _fit(nodes, 1, {"CPU": 1.0})
    parallel = min(shards, int(sum(n.cpus for n in nodes)))
    return StagePlan(
        "simulate",
        "Ray tasks, one per shard",
        shards,
        {"CPU": 1.0},
        fits,
        f"{n_proj} projections in {shards} shards (≥{shards} if inputs are folders), "
        f"{parallel} at a time; projector on CPU" + ("" if fits else f"; {note}"),
    )


def _plan_train(cfg: RunConfig, nodes: list[NodeInfo]) -> StagePlan:
    """``train.num_workers`` Ray Train workers, and the CPUs they leave to the Ray Data read tasks."""
    total_cpu = sum(n.cpus for n in nodes)
    t = cfg.train
    per = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {})}
    fits, note = _fit(nodes, t.num_workers, per)
    left = total_cpu - t.num_workers * t.cpus_per_worker
    if fits and left < READ_TASK_CPUS:
        fits = False
        note = (
            f"workers take {t.num_workers * t.cpus_per_worker:g} of {total_cpu:g} CPUs, leaving none for the "
            f"Ray Data read tasks ({READ_TASK_CPUS:g} CPU each): lower train.cpus_per_worker"
        )
    elif fits:
        note += f"; {left:g} CPUs left for Ray Data reads"
    if t.use_gpu and sum(n.gpus for n in nodes) == 0:
        note += "; the cluster has no GPU now"
    return StagePlan("train", "Ray Train workers (data parallel)", t.num_workers, per, fits, note)


def _plan_recover(cfg: RunConfig, nodes: list[NodeInfo], driver_has_gpu: bool) -> StagePlan:
    """``recover.actors`` edge-partition actors, or the driver process when there are none."""
    r = cfg.recover
    if r.actors > 0:
        fits, note = _fit(nodes, r.actors, {"CPU": r.cpus_per_actor})
        if r.estimator == "model":
            note += f"; embedding: {r.actors} Ray Data workers × {READ_TASK_CPUS:g} CPU"
        return StagePlan("recover", "edge-partition actors", r.actors, {"CPU": r.cpus_per_actor}, fits, note)
    device = r.device if r.device != "auto" else ("cuda" if driver_has_gpu else "cpu")
    note = f"in-process on {device} (recover.actors > 0 spreads the pair graph over actors)"
    return StagePlan("recover", "driver process", 1, {}, True, note)


def _plan_refine(cfg: RunConfig, nodes: list[NodeInfo], driver_has_gpu: bool) -> StagePlan:
    """``refine.actors`` batch-scoring actors (a GPU each when refine.gpu is true), or the driver."""
    r = cfg.refine
    gpu = bool(r.gpu) if r.gpu is not None else driver_has_gpu
    if r.actors > 0:
        per = {"CPU": r.cpus_per_actor, **({"GPU": 1.0} if gpu else {})}
        fits, note = _fit(nodes, r.actors, per)
        note += "; the half maps go to the object store once per iteration"
        if gpu and sum(n.gpus for n in nodes) == 0:
            note += "; the cluster has no GPU now"
        return StagePlan("refine", "image-batch scoring actors", r.actors, per, fits, note)
    note = f"in-process on {'cuda' if gpu else 'cpu'} (refine.actors > 0 scores image batches on actors)"
    return StagePlan("refine", "driver process", 1, {}, True, note)


def storage_warnings(cfg: RunConfig, nodes: list[NodeInfo]) -> list[str]:
    """Paths that tasks on other nodes cannot see, and fsspec protocols this driver cannot open."""
    out = []
    store = cfg.simulate.store
    for url in [store, *cfg.train.stores]:
        if url and is_url(url):
            protocol = str(url).split("://", 1)[0]
            try:
                import fsspec

                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                out.append(f"{url}: fsspec cannot open '{protocol}://' here ({exc}); install s3fs / gcsfs")
    if len(nodes) > 1:
        if not (store and is_url(store)):
            out.append(
                f"simulate.store is a local path (default: {cfg.output_dir}/projections.zarr): with "
                f"{len(nodes)} nodes it must be on a filesystem every node mounts at the same path, or set "
                "simulate.store to s3://… / gs://… (read and written through fsspec)"
            )
        out.append(
            f"output_dir {cfg.output_dir} holds Ray Train checkpoints and TensorBoard logs written by workers on "
            "other nodes: put it on a shared filesystem (EFS, Filestore, NFS, a ReadWriteMany volume; see clusters/)"
        )
    return out


def check_report(cfg: RunConfig, nodes: list[NodeInfo], driver_has_gpu: bool = False) -> dict:
    """Everything ``cryoorient cluster check`` prints, as JSON-able data."""
    return {
        "nodes": [asdict(n) for n in nodes],
        "totals": {
            "nodes": len(nodes),
            "CPU": sum(n.cpus for n in nodes),
            "GPU": sum(n.gpus for n in nodes),
            "memory_gib": round(sum(n.memory_gib for n in nodes), 1),
        },
        "driver_has_gpu": driver_has_gpu,
        "stages": [asdict(p) | {"demand": p.demand()} for p in plan_stages(cfg, nodes, driver_has_gpu)],
        "warnings": storage_warnings(cfg, nodes),
    }


def cluster_check_report(cfg: RunConfig, address: str | None = None, local: bool = False) -> dict:
    """Connect to the config's Ray cluster (or start a local one) and return :func:`check_report`
    plus ``"address"`` (where it looked): what ``cryoorient cluster check`` prints.

    Looks at ``cfg.ray.address``, else RAY_ADDRESS, else a ``ray start`` cluster on this machine
    ('auto'); ``local`` starts a local Ray instead. ``address`` is the ``--address`` option
    (already in ``cfg.ray``), which excludes ``local``. A Ray started here is shut down again.

    Raises:
        CryoOrientError: ``address`` with ``local``; an address that does not answer; no cluster at 'auto'.
    """
    if local and address:
        raise CryoOrientError("give either --address or --local, not both")
    from cryoorient_ray.distributed.runtime import check_address, init_ray, resolve_address, shutdown_ray

    if local:
        ray_cfg = cfg.ray.model_copy(update={"address": "local"})
    else:
        ray_cfg = cfg.ray.model_copy(update={"address": resolve_address(cfg.ray) or "auto"})
        check_address(ray_cfg.address, timeout=ray_cfg.connect_timeout)  # also when Ray already runs here
    try:
        started = init_ray(ray_cfg)
    except CryoOrientError as exc:
        if ray_cfg.address == "auto":
            raise CryoOrientError(
                "no running Ray cluster found on this machine: start one with `ray start --head`, "
                "pass --address host:6379 (or set RAY_ADDRESS), or use --local"
            ) from None
        raise exc from None
    try:
        import torch

        where = resolve_address(ray_cfg) or "a local Ray started for this check"
        report = check_report(cfg, describe_nodes(), driver_has_gpu=torch.cuda.is_available())
    finally:
        if started:
            shutdown_ray()
    return report | {"address": where}
