"""Ray side of global refinement: image batches scored on actors that hold the iteration's half maps.

Design (:mod:`cryoorient_ray.core.refinement.global_search`):

- :class:`RayScorer` cuts the fixed list of batches (:func:`~cryoorient_ray.core.refinement.
  global_search.make_batches`) into ``n_actors`` contiguous groups. Each :class:`RefineBatchActor`
  gets the images of its group once (``ray.put`` of the stack's subset, at ``prepare``) and keeps
  them, with their DFTs (:class:`~cryoorient_ray.core.refinement.matching.SliceMatcher`), for the
  whole run.
- Every iteration the driver puts the two masked half maps in the object store once; every actor
  reads them (zero-copy on one node), computes their padded Fourier transforms and the level-0
  slices and runs :func:`~cryoorient_ray.core.refinement.global_search.score_batches` on its
  batches.
- Each actor returns, per batch, the last level's candidates; the driver maps them back to the
  global rows, in the batches' order. The batches, their contents and the arithmetic are those
  of the in-process scorer (every image's DFT, CTF and scores are computed per image or per
  batch, never across batches), so the poses are the same (``tests/test_refine_actors.py``).

Traffic per iteration: the two maps (``2 L³`` float32: 0.26 MB at 32³) out, ``P · keep · 7``
float64 back (2.2 MB for 5,000 images, keep 8). Scoring is ~10⁸ trilinear samples per iteration
for 5,000 images, so the per-call overhead is negligible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch

from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.refinement.global_search import (
    BatchCandidates,
    ImageBatch,
    SearchPlan,
    resolve_device,
    score_batches,
)
from cryoorient_ray.core.refinement.matching import SliceMatcher
from cryoorient_ray.distributed.runtime import current_node_id, record_nodes
from cryoorient_ray.errors import CryoOrientError

__all__ = ["RayScorer", "RefineBatchActor"]


@ray.remote
class RefineBatchActor:
    """Holds a slice of the images (with their DFTs) and scores its batches against each iteration's half maps."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.matcher: SliceMatcher | None = None
        self.batches: list[ImageBatch] = []

    def load(self, stack: ParticleStack, batches: list[ImageBatch], device: str) -> int:
        """Keep ``stack`` (this actor's images) and its ``batches`` (rows local to ``stack``)."""
        self.matcher = SliceMatcher(stack, resolve_device(device))
        self.batches = batches
        return len(stack)

    def node_id(self) -> str:
        return current_node_id()

    def score(self, references: np.ndarray, plan: SearchPlan) -> list[BatchCandidates]:
        """Every batch of this actor against ``references (2, L, L, L)`` (its rows local)."""
        # Object-store arrays are read-only views; torch needs writable memory.
        return score_batches(self.matcher, np.array(references, copy=True), plan, self.batches)


class RayScorer:
    """:class:`~cryoorient_ray.core.refinement.global_search.Scorer` on ``n_actors`` Ray actors.

    Ray must be initialised (:func:`cryoorient_ray.distributed.runtime.ray_runtime`). Each actor
    takes ``cpus_per_actor`` Ray CPUs (and ``gpus_per_actor`` GPUs; with a GPU it scores on the
    settings' device, else on the CPU) and runs ``threads_per_actor`` torch threads. The nodes the
    actors ran on are recorded under ``"refine"`` (:func:`~cryoorient_ray.distributed.runtime.nodes_used`).
    """

    def __init__(
        self, n_actors: int = 2, cpus_per_actor: float = 1.0, threads_per_actor: int = 1, gpus_per_actor: float = 0.0
    ) -> None:
        if isinstance(n_actors, bool) or not isinstance(n_actors, (int, np.integer)) or n_actors < 1:
            raise CryoOrientError(f"the Ray scorer needs at least 1 actor; got {n_actors!r}")
        self.n_actors = int(n_actors)
        self.cpus_per_actor = cpus_per_actor
        self.threads_per_actor = threads_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.actors: list = []
        self.groups: list[list[ImageBatch]] = []

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None:
        """Start the actors and hand each its contiguous group of batches' images (once)."""
        if not ray.is_initialized():
            raise CryoOrientError("Ray is not initialised: start it before refining on actors")
        self.close()
        batches = list(batches)
        bounds = np.linspace(0, len(batches), min(self.n_actors, len(batches)) + 1).round().astype(int)
        self.groups = [batches[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        actor_cls = RefineBatchActor.options(
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor, scheduling_strategy="SPREAD"
        )
        on_gpu = self.gpus_per_actor > 0 and device == "cuda"
        loads = []
        for group in self.groups:
            rows = np.concatenate([b.index for b in group])
            local, start = [], 0
            for b in group:
                local.append(ImageBatch(b.half, np.arange(start, start + len(b.index))))
                start += len(b.index)
            part = stack.subset(rows)
            part = dataclasses.replace(part, images=part.images.contiguous())
            actor = actor_cls.remote(self.threads_per_actor)
            self.actors.append(actor)
            loads.append(actor.load.remote(ray.put(part), local, "cuda" if on_gpu else "cpu"))
        try:
            ray.get(loads)  # fail early if an actor cannot start
            record_nodes("refine", ray.get([a.node_id.remote() for a in self.actors]))
        except BaseException:
            self.close()
            raise

    def score(
        self, references: np.ndarray, plan: SearchPlan, progress: Callable[[int, int], None] | None = None
    ) -> list[BatchCandidates]:
        """Every batch against ``references``: the maps go to the object store once for all actors."""
        if not self.actors:
            raise CryoOrientError("the Ray scorer was not prepared")
        ref = ray.put(np.ascontiguousarray(references, dtype=np.float32))
        pending = {a.score.remote(ref, plan): k for k, a in enumerate(self.actors)}
        results: dict[int, list[BatchCandidates]] = {}
        total = sum(len(g) for g in self.groups)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ready[0])
            results[k] = ray.get(ready[0])
            done += len(self.groups[k])
            if progress is not None:
                progress(done, total)
        out = []
        for k, group in enumerate(self.groups):
            for batch, cand in zip(group, results[k], strict=True):
                out.append(dataclasses.replace(cand, index=np.asarray(batch.index)))
        return out

    def close(self) -> None:
        """Kill the actors (also safe to call twice)."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
