"""Ray side of global refinement: image batches scored on actors that hold the iteration's half maps.

Design (:mod:`cryoorient_ray.core.refinement.global_search`):

- :class:`RayScorer` cuts the fixed list of batches (:func:`~cryoorient_ray.core.refinement.
  global_search.make_batches`) into ``n_actors`` contiguous groups. Each :class:`RefineBatchActor`
  gets the images of its group once (``ray.put`` of the stack's subset, at ``prepare``) and keeps
  them, with their DFTs, for the whole run.
- Every iteration the driver puts the two masked half maps in the object store once; every actor
  reads them (zero-copy on one node), computes their padded Fourier transforms and runs
  :func:`~cryoorient_ray.core.refinement.global_search.search_batch` on its batches.
- Each actor returns, per batch, the last level's candidates; the driver keeps them in the
  batches' order. The batches, their contents and the arithmetic are those of the in-process
  scorer, so the poses are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from cryoorient_ray.core.imaging.particles import ParticleStack
from cryoorient_ray.core.refinement.global_search import BatchCandidates, ImageBatch, SearchPlan

__all__ = ["RayScorer", "RefineBatchActor"]


@ray.remote
class RefineBatchActor:
    """Holds a slice of the images and scores its batches against each iteration's half maps."""


class RayScorer:
    """:class:`~cryoorient_ray.core.refinement.global_search.Scorer` on ``n_actors`` Ray actors.

    Ray must be initialised. ``cpus_per_actor`` Ray CPUs and ``threads_per_actor`` torch threads
    each; ``gpus_per_actor`` > 0 puts each actor on a GPU (the device then follows the settings).
    """

    def __init__(
        self, n_actors: int = 2, cpus_per_actor: float = 1.0, threads_per_actor: int = 1, gpus_per_actor: float = 0.0
    ) -> None:
        self.n_actors = n_actors
        self.cpus_per_actor = cpus_per_actor
        self.threads_per_actor = threads_per_actor
        self.gpus_per_actor = gpus_per_actor

    def prepare(self, stack: ParticleStack, batches: Sequence[ImageBatch], device: str) -> None:
        raise NotImplementedError

    def score(self, references: np.ndarray, plan: SearchPlan) -> list[BatchCandidates]:
        raise NotImplementedError

    def close(self) -> None:
        """Kill the actors (also safe to call twice)."""
