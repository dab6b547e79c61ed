"""Ray side of the ``recover`` stage: L_OR with the pair graph's edges on actors, embeddings with Ray Data.

Design (synchronous data parallelism, parameter server on the driver):

- The edges ``(i, j, d̂)`` are cut into ``n_actors`` contiguous partitions (edges are sorted by
  ``i``, so each partition touches a compact block of nodes plus its long-range partners). Each
  :class:`EdgePartitionActor` holds its partition for the whole run — edges travel once.
- At every step the driver puts the current ``(P, 4)`` quaternions in the object store once
  (``ray.put``: actors on one node read them zero-copy), every actor returns the L_OR sum and the
  gradient of its partition, and the driver adds them and takes the Adam step (and the
  renormalisation to S³). All actors see the same quaternions at every step, so the result is
  the same as in-process recovery, whatever the number of actors.
- Traffic per step is ``2·n_actors·P·16`` bytes: 3 MB for P = 10⁵ with 2 actors, against ~10⁶
  edges of work per actor; for small graphs the per-call overhead dominates and the in-process
  path (``n_actors = 0``) is faster (docs/BENCHMARKS.md, ``scaling``).

:func:`embed_with_ray_data` computes the learned distance's embeddings of a large stack on Ray
Data workers, shard by shard (:mod:`cryoorient_ray.stages.recover` uses it when actors are on).
"""

from __future__ import annotations

import functools

import numpy as np
import ray
import torch

from cryoorient_ray.core.recovery.solver import EdgeObjective, RecoveryResult, RecoverySettings, recover_orientations
from cryoorient_ray.distributed.runtime import current_node_id, record_nodes
from cryoorient_ray.errors import CryoOrientError

__all__ = ["EdgePartitionActor", "embed_with_ray_data", "partition_edges", "recover_on_actors"]


@ray.remote
class EdgePartitionActor:
    """One partition of the pair graph: returns its L_OR sum and gradient for given quaternions."""

    def __init__(
        self,
        i: np.ndarray,
        j: np.ndarray,
        d: np.ndarray,
        threads: int = 1,
        chunk_size: int = 1 << 20,
        weights: np.ndarray | None = None,
        robust: str = "l2",
        scale: float = 0.2,
    ):
        torch.set_num_threads(max(1, int(threads)))
        self.objective = EdgeObjective(i, j, d, weights, chunk_size=chunk_size, robust=robust, scale=scale)

    def n_edges(self) -> int:
        return self.objective.n_edges

    def node_id(self) -> str:
        """The Ray node this partition lives on."""
        return current_node_id()

    def loss_and_grad(self, q: np.ndarray, loss: str) -> tuple[float, float, torch.Tensor]:
        """``(L_OR sum, loss sum, gradient (P, m))`` of this partition at ``q (P, m)`` (m = 4; 9 for "gram")."""
        # Object-store arrays are read-only views; torch needs writable memory.
        return self.objective.loss_and_grad(torch.from_numpy(np.array(q, copy=True)), loss)


def partition_edges(n_edges: int, n_parts: int) -> list[slice]:
    """``n_parts`` contiguous, nearly equal slices of ``range(n_edges)``."""
    bounds = np.linspace(0, n_edges, n_parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def recover_on_actors(
    n_nodes: int,
    i: np.ndarray,
    j: np.ndarray,
    d: np.ndarray,
    n_actors: int = 2,
    settings: RecoverySettings | None = None,
    cpus_per_actor: float = 1.0,
    threads_per_actor: int = 1,
    progress=None,
    weights: np.ndarray | None = None,
) -> RecoveryResult:
    """Recover ``(n_nodes, 4)`` quaternions from edges ``i, j (E,)`` with d̂ ``d (E,)`` on ``n_actors`` Ray actors.

    ``n_actors = 0`` runs in-process (no Ray). Ray must already be initialised otherwise
    (:func:`cryoorient_ray.distributed.runtime.ray_runtime`). Actors are killed at the end,
    also on error or Ctrl-C. The nodes they ran on are recorded under ``"recover"``
    (:func:`cryoorient_ray.distributed.runtime.nodes_used`). ``settings`` and ``progress`` are
    :func:`~cryoorient_ray.core.recovery.solver.recover_orientations`'s; ``weights (E,)`` (optional)
    weigh the edges, and ``settings.loss`` / ``loss_scale`` pick the robust loss of the partitions.
    """
    s = settings or RecoverySettings()
    i, j, d = np.asarray(i), np.asarray(j), np.asarray(d, dtype=np.float32)
    if n_actors < 0:
        raise CryoOrientError(f"actors must be >= 0; got {n_actors}")
    if n_actors == 0:
        objective = EdgeObjective(
            i, j, d, weights, chunk_size=s.chunk_size, device=s.device, robust=s.loss, scale=s.loss_scale
        )
        return recover_orientations(n_nodes, objective, settings=s, progress=progress)
    if not ray.is_initialized():
        raise CryoOrientError("Ray is not initialised: start it before recovering on actors")
    order = np.argsort(i, kind="stable")
    i, j, d = i[order], j[order], d[order]
    w = None if weights is None else np.asarray(weights, dtype=np.float32)[order]
    # SPREAD: on a cluster each node's cores and memory bandwidth take a share of the edges
    actor_cls = EdgePartitionActor.options(num_cpus=cpus_per_actor, scheduling_strategy="SPREAD")
    actors = [
        actor_cls.remote(
            i[p], j[p], d[p], threads_per_actor, s.chunk_size, None if w is None else w[p], s.loss, s.loss_scale
        )
        for p in partition_edges(len(i), n_actors)
    ]
    try:
        ray.get([a.n_edges.remote() for a in actors])  # fail early if an actor cannot start
        record_nodes("recover", ray.get([a.node_id.remote() for a in actors]))
        grad_fn = functools.partial(_actors_loss_and_grad, actors)
        return recover_orientations(n_nodes, grad_fn, n_edges=len(i), settings=s, progress=progress)
    finally:
        for a in actors:
            ray.kill(a)


def _actors_loss_and_grad(actors: list, q: torch.Tensor, loss: str) -> tuple[float, float, torch.Tensor]:
    """The whole graph's ``(L_OR sum, loss sum, gradient (P, m))``: the sums over the actors' partitions."""
    ref = ray.put(q.detach().cpu().numpy())  # once for all actors (zero-copy reads on one node)
    results = ray.get([a.loss_and_grad.remote(ref, loss) for a in actors])
    l_or = sum(r[0] for r in results)
    l_used = sum(r[1] for r in results)
    grad = torch.from_numpy(np.sum([r[2] for r in results], axis=0))
    return l_or, l_used, grad


class _Embedder:
    """Ray Data map_batches worker: loads the model once, embeds a batch of images."""

    def __init__(self, model_path: str, store_path: str):
        from cryoorient_ray.core.learning.model import load_distance_model
        from cryoorient_ray.io.store import ProjectionStore

        torch.set_num_threads(1)
        self.model, _ = load_distance_model(model_path)
        self.store = ProjectionStore.open(store_path, verify=False) if self.model.needs_ctf else None

    def __call__(self, batch: dict) -> dict:
        ctf = self.store.ctf_parameters(batch) if self.store is not None else None  # phase flipping
        with torch.no_grad():
            emb = self.model.embed(torch.as_tensor(np.asarray(batch["images"]), dtype=torch.float32), ctf)
        return {"index": np.asarray(batch["index"]), "embedding": emb.numpy()}


def embed_with_ray_data(
    store_path: str,
    split: str,
    model_path: str,
    rows: np.ndarray,
    concurrency: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 256,
) -> np.ndarray:
    """Embeddings ``(len(rows), n_f)`` of store rows, streamed with Ray Data (one block per shard).

    The store's ``split`` is read shard by shard and embedded by ``concurrency`` model-holding
    workers; only ``rows`` are kept, in their order. For large stacks (10⁵+ images) on a cluster.
    """
    from cryoorient_ray.distributed.data import sample_dataset

    ds = sample_dataset([store_path], splits=split, num_cpus=num_cpus).map_batches(
        _Embedder,
        fn_constructor_kwargs={"model_path": str(model_path), "store_path": str(store_path)},
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=num_cpus,
    )
    index, emb = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        index.append(batch["index"])
        emb.append(batch["embedding"])
    if not index:
        raise CryoOrientError(f"{store_path}: no images in split '{split}' to embed")
    index = np.concatenate(index)
    emb = np.concatenate(emb)
    pos = {int(r): k for k, r in enumerate(index)}
    missing = [int(r) for r in rows if int(r) not in pos]
    if missing:
        raise CryoOrientError(f"{store_path}: {len(missing)} rows to recover were not found in split '{split}'")
    return emb[[pos[int(r)] for r in rows]]
