"""What the distance head and the pooling do to the learned distance, and to recovery from it.

    python benchmarks/bench_distance.py [--n 8000] [--steps 1500] [--snr-db none|-6|0 ...]
                                        [--variants angle:global,so3:global,angle:grid,so3:grid]

For each noise level: simulates the demo's pseudo-protein (32², 6 Å/px, uniform orientations;
splits 50/17/33 %), then for each (head, pool) variant trains the demo's network ([16, 32, 64]
channels, n_f 32, group norm) with a plain single-process torch loop (the same loss as Ray Train's
``pairing: batch``: all pairs of a 64-image batch, weighted uniform in d_q; Adam with a one-cycle
learning rate of 3e-3; 2 threads) for a fixed number of steps, so the variants get identical
compute. Reports, on the test split:

- L_DE on 20,000 random pairs (natural distance distribution, as Ray Train's validation) and
  the mean d̂ for the largest true distances (d_q > 2.75 rad) — where the angle heads saturate;
- the true d_q of each projection's 10 nearest neighbours in embedding space (median);
- recovery from the learned distance (kNN 10 + 20 random edges, Gram start): E_OR (O(4)), and its
  median and 90th percentile over projections.

Writes benchmarks/results/distance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_plain(store, head: str, pool: str, steps: int, seed: int = 0):
    """The demo network with this head and pool, trained for ``steps`` steps on the train split (no Ray)."""
    from benchmarks import common

    model, _ = common.train_plain(store, steps, model={**common.SMALL_MODEL, "head": head, "pool": pool}, seed=seed)
    return model


def evaluate(store, model_path: Path, seed: int = 0) -> dict:
    import torch

    from cryoorient_ray.config import RecoverConfig
    from cryoorient_ray.core.geometry.quaternion import quat_distance
    from cryoorient_ray.core.recovery.align import align_o4
    from cryoorient_ray.core.recovery.graph import build_pair_graph
    from cryoorient_ray.core.recovery.solver import EdgeObjective, RecoverySettings, recover_orientations
    from cryoorient_ray.stages.recover import make_estimator, select_projections

    cfg = RecoverConfig(k=10, n_random=20)
    sel = select_projections(store, cfg, seed)
    est = make_estimator(store, sel, cfg, str(model_path), seed)
    q = sel.q_true
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(q), 20000), rng.integers(0, len(q), 20000)
    d_hat, d_q = est.distance(i, j), quat_distance(q[i], q[j])
    emb = torch.nn.functional.normalize(torch.as_tensor(est.features), dim=1)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    nn = sim.topk(10, dim=1).indices.numpy()
    d_nn = quat_distance(np.repeat(q, 10, axis=0), q[nn.ravel()])
    graph = build_pair_graph(est.features, k=cfg.k, n_random=cfg.n_random, metric=est.metric, seed=seed)
    t0 = time.perf_counter()
    result = recover_orientations(
        len(q),
        EdgeObjective(graph.i, graph.j, est.distance(graph.i, graph.j)),
        settings=RecoverySettings(seed=seed),
    )
    seconds = time.perf_counter() - t0
    err = align_o4(q, result.quaternions)
    return {
        "test_projections": int(len(q)),
        "L_DE": float(np.mean((d_hat - d_q) ** 2)),
        "mean_dhat_at_dq_gt_2.75": float(d_hat[d_q > 2.75].mean()),
        "knn_true_distance_median": float(np.median(d_nn)),
        "L_OR": float(result.final_loss),
        "E_OR": float(err.mean),
        "E_OR_median": float(np.median(err.errors)),
        "E_OR_p90": float(np.percentile(err.errors, 90)),
        "recovery_s": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000, help="projections simulated per noise level")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--snr-db", nargs="+", default=["none", "0", "-6"], help="noise levels ('none' = noiseless)")
    ap.add_argument("--variants", default="angle:global,so3:global,angle:grid,so3:grid", help="head:pool,...")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distance.json")
    args = ap.parse_args()

    import torch

    from cryoorient_ray.config import RayConfig, load_config
    from cryoorient_ray.core.learning.model import save_distance_model
    from cryoorient_ray.distributed.runtime import init_ray
    from cryoorient_ray.distributed.simulate_tasks import simulate_store

    torch.set_num_threads(2)
    init_ray(RayConfig(num_cpus=max(4, os.cpu_count() or 1)))
    work = Path(tempfile.mkdtemp(prefix="bench_distance_"))
    rows = []
    for snr in args.snr_db:
        overrides = [f"simulate.n_per_map={args.n}", "simulate.shard_size=1000"]
        overrides.append("simulate.noise.snr_db=null" if snr == "none" else f"simulate.noise.snr_db={snr}")
        sim = load_config(ROOT / "configs" / "demo.yaml", None, overrides).simulate
        store = simulate_store(sim, 0, work / f"store_{snr}.zarr", progress=False)
        for variant in args.variants.split(","):
            head, pool = variant.split(":")
            t0 = time.perf_counter()
            model = train_plain(store, head, pool, args.steps)
            train_s = time.perf_counter() - t0
            path = work / f"model_{snr}_{head}_{pool}.pt"
            save_distance_model(path, model)
            row = {"snr_db": None if snr == "none" else float(snr), "head": head, "pool": pool}
            row.update({"steps": args.steps, "train_s": round(train_s, 1), **evaluate(store, path)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "command": "python benchmarks/bench_distance.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (torch threads 2)",
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
