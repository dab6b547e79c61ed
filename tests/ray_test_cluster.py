"""A throw-away two-node Ray cluster on this machine, in its own process (for tests/test_multinode.py).

Run as ``python tests/ray_test_cluster.py NUM_CPUS_HEAD NUM_CPUS_WORKER``: starts a head and one
worker node with :class:`ray.cluster_utils.Cluster` (no dashboard, no token authentication),
prints one JSON line ``{"address": ..., "node_ids": [...]}``, and keeps the cluster up until its
stdin closes, then shuts it down. The test session's own local Ray (``ray_local``) lives in the
pytest process and is never touched: this process never calls ``ray.init``.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from ray.cluster_utils import Cluster

    head_cpus, worker_cpus = (int(a) for a in sys.argv[1:3])
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=worker_cpus, num_gpus=0)
        cluster.wait_for_nodes()
        ids = [cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)]
        print(json.dumps({"address": cluster.address, "node_ids": ids}), flush=True)
        sys.stdin.read()  # until the test closes our stdin (or dies)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
