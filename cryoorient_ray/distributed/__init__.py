"""Everything that runs on Ray, and the only package that imports ray.

- ``runtime``: connect to a cluster (``ray.address``) or start a local Ray; ``cluster``: what a
  cluster offers and what each stage will ask of it (``cryoorient cluster check``).
- ``simulate_tasks``: one Ray task per projection-store shard; ``data``: Ray Data streams of
  samples and training pairs; ``train_workers``: data-parallel training with Ray Train;
  ``tune_trials``: the Ray Tune search (one Ray Train run per trial); ``recover_actors``:
  orientation recovery with the pair graph's edges partitioned across Ray actors.

Built on :mod:`cryoorient_ray.core` and :mod:`cryoorient_ray.io`; called by :mod:`cryoorient_ray.stages`.
"""
