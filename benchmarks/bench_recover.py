"""Orientation recovery and alignment benchmarks (issue: recovery at scale, alignment, gauge).

    python benchmarks/bench_recover.py exact     [--p 1650]                   # time to E_OR < 0.01
    python benchmarks/bench_recover.py align     [--p 1650]                   # alignment time
    python benchmarks/bench_recover.py scaling   [--ps 1000 10000 100000] [--sigma2 0.1] [--actors 0]
    python benchmarks/bench_recover.py figure7   [--p 1650]                   # E_OR vs σ² of distance noise
    python benchmarks/bench_recover.py gauge     [--trials 10] [--snr-db -6]  # how often the gauge is physical
    python benchmarks/bench_recover.py all

Distances are the exact d_q on the pair graph's edges (k = 10 nearest + 20 random per node),
optionally plus Gaussian noise of variance σ² (the paper's Figure 7 experiment). Results go to
benchmarks/results/recover_<what>.json with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def _machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _problem(p: int, sigma2: float, seed: int = 0, k: int = 10, n_random: int = 20):
    from cryoorient_ray.core.geometry.quaternion import quat_distance
    from cryoorient_ray.core.geometry.sampling import sample_orientations
    from cryoorient_ray.core.recovery.graph import build_pair_graph
    from cryoorient_ray.core.recovery.solver import check_distances

    q = sample_orientations(p, seed=seed)
    t0 = time.perf_counter()
    g = build_pair_graph(q, k=k, n_random=n_random, metric="quaternion", seed=seed)
    graph_s = time.perf_counter() - t0
    d = np.asarray(quat_distance(q[g.i], q[g.j]))
    if sigma2 > 0:
        d = d + np.random.default_rng(seed + 1).normal(0.0, math.sqrt(sigma2), d.shape)
    return q, g, check_distances(d), graph_s


def _recover(p, g, d, actors: int, device: str | None = None):
    from cryoorient_ray.core.recovery.solver import EdgeObjective, RecoverySettings, recover_orientations

    settings = RecoverySettings(seed=0, device=device)
    t0 = time.perf_counter()
    if actors == 0:  # in-process: no Ray needed (also on a bare GPU machine)
        res = recover_orientations(p, EdgeObjective(g.i, g.j, d, device=device), settings=settings)
    else:
        from cryoorient_ray.distributed.recover_actors import recover_on_actors

        res = recover_on_actors(p, g.i, g.j, d, n_actors=actors, settings=settings)
    return res, time.perf_counter() - t0


def bench_exact(args) -> dict:
    from cryoorient_ray.core.recovery.align import align_o4

    q, g, d, graph_s = _problem(args.p, 0.0)
    res, secs = _recover(args.p, g, d, 0, args.device)
    e_or = align_o4(q, res.quaternions).mean
    return {
        "P": args.p,
        "edges": g.n_edges,
        "graph_s": round(graph_s, 3),
        "recovery_s": round(secs, 2),
        "steps": res.steps,
        "L_OR": res.final_loss,
        "E_OR_rad": e_or,
        "target": "E_OR < 0.01 rad in <= 30 s (paper: 2,833 s on a K40c)",
    }


def bench_align(args) -> dict:
    from cryoorient_ray.core.geometry.quaternion import quat_conjugate, quat_product
    from cryoorient_ray.core.geometry.sampling import sample_orientations
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation

    rng = np.random.default_rng(0)
    q = sample_orientations(args.p, seed=1)
    a, b = sample_orientations(2, seed=2)
    est = quat_product(quat_product(np.broadcast_to(a, q.shape), quat_conjugate(q)), np.broadcast_to(b, q.shape))
    noise = sample_orientations(args.p, seed=3)
    # ~10° per-image noise: a small random rotation
    small = np.concatenate([np.ones((args.p, 1)), rng.normal(0, 0.09, (args.p, 3))], 1)
    small /= np.linalg.norm(small, axis=1, keepdims=True)
    est = quat_product(est, small)
    del noise
    out = {}
    for name, fn in (("o4", align_o4), ("registration", align_rotation)):
        t0 = time.perf_counter()
        r = fn(q, est)
        out[name] = {"seconds": round(time.perf_counter() - t0, 3), "mean_error_rad": r.mean}
    return {"P": args.p, **out, "target": "<= 2 s (paper: 50 min of FTRL on a CPU)"}


def bench_scaling(args) -> dict:
    from cryoorient_ray.core.recovery.align import align_o4

    rows = []
    for p in args.ps:
        q, g, d, graph_s = _problem(p, args.sigma2)
        for actors in args.actors:
            res, secs = _recover(p, g, d, actors, args.device)
            e_or = align_o4(q, res.quaternions).mean
            rows.append(
                {
                    "P": p,
                    "edges": g.n_edges,
                    "actors": actors,
                    "graph_s": round(graph_s, 2),
                    "recovery_s": round(secs, 2),
                    "steps": res.steps,
                    "s_per_step": round(secs / max(res.steps, 1), 4),
                    "E_OR_rad": round(e_or, 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"sigma2": args.sigma2, "device": args.device or "cpu", "rows": rows}


def bench_figure7(args) -> dict:
    from cryoorient_ray.core.recovery.align import align_o4

    rows = []
    for s2 in args.sigma2s:
        q, g, d, _ = _problem(args.p, s2, k=args.k, n_random=args.n_random)
        res, secs = _recover(args.p, g, d, 0, args.device)
        rows.append(
            {
                "sigma2": s2,
                "E_OR_rad": round(align_o4(q, res.quaternions).mean, 4),
                "L_OR": round(res.final_loss, 4),
                "seconds": round(secs, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"P": args.p, "k": args.k, "n_random": args.n_random, "edges_per_node": 2 * g.n_edges / args.p, "rows": rows}


def bench_gauge(args) -> dict:
    """Exact-distance recovery of simulated projections, then the gauge; success = physical solution."""
    import torch

    from cryoorient_ray.core.density.phantom import pseudo_protein
    from cryoorient_ray.core.geometry.quaternion import quat_distance
    from cryoorient_ray.core.geometry.sampling import sample_orientations
    from cryoorient_ray.core.imaging.forward import render_projections
    from cryoorient_ray.core.recovery.align import align_o4, align_rotation
    from cryoorient_ray.core.recovery.gauge import crossval_score_fn, resolve_gauge
    from cryoorient_ray.core.recovery.graph import build_pair_graph
    from cryoorient_ray.core.recovery.solver import (
        EdgeObjective,
        RecoverySettings,
        check_distances,
        recover_orientations,
    )

    vol = pseudo_protein(box_size=32, voxel_size=6.0).data.astype(np.float32)
    rows = []
    for t in range(args.trials):
        q = sample_orientations(args.gauge_p, seed=100 + t)
        snr = None if args.snr_db is None else float(args.snr_db)
        imgs, _ = render_projections(vol, q, snr_db=snr, generator=torch.Generator().manual_seed(t), backend="torch")
        g = build_pair_graph(q, k=10, n_random=20, metric="quaternion", seed=t)
        d = np.asarray(quat_distance(q[g.i], q[g.j]))
        d = check_distances(d + np.random.default_rng(t).normal(0, math.sqrt(args.sigma2), d.shape))
        res = recover_orientations(len(q), EdgeObjective(g.i, g.j, d), settings=RecoverySettings(seed=t))
        t0 = time.perf_counter()
        near = build_pair_graph(q, k=8, n_random=0, metric="quaternion")
        dn = check_distances(
            np.asarray(quat_distance(q[near.i], q[near.j]))
            + np.random.default_rng(t + 7).normal(0, math.sqrt(args.sigma2), near.n_edges)
        )
        gres = resolve_gauge(imgs, res.quaternions, (near.i, near.j, dn), score_fn=crossval_score_fn(imgs, seed=t))
        secs = time.perf_counter() - t0
        fixed = gres.apply(res.quaternions)
        e_or = align_o4(q, fixed).mean
        reg = align_rotation(q, fixed)
        raw = align_rotation(q, res.quaternions).mean
        rows.append(
            {
                "trial": t,
                "E_OR_rad": round(e_or, 4),
                "registration_before_rad": round(raw, 4),
                "registration_after_rad": round(reg.mean, 4),
                "hand": reg.hand,
                "conjugate": gres.conjugate,
                "physical": bool(reg.mean <= e_or + 0.05),
                "gauge_s": round(secs, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ok = sum(r["physical"] for r in rows)
    return {
        "P": args.gauge_p,
        "snr_db": args.snr_db,
        "sigma2": args.sigma2,
        "success": f"{ok}/{len(rows)}",
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["exact", "align", "scaling", "figure7", "gauge", "all"])
    ap.add_argument("--p", type=int, default=1650)
    ap.add_argument("--ps", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--actors", type=int, nargs="+", default=[0])
    ap.add_argument("--sigma2", type=float, default=0.0)
    ap.add_argument("--sigma2s", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--k", type=int, default=10, help="nearest neighbours per node (figure7)")
    ap.add_argument("--n-random", type=int, default=20, help="random partners per node (figure7)")
    ap.add_argument("--gauge-p", type=int, default=1000)
    ap.add_argument("--snr-db", type=float, default=None)
    ap.add_argument("--device", default=None, help="torch device of the in-process recovery (e.g. cuda)")
    ap.add_argument("--tag", default="", help="suffix of the result file (e.g. _gpu)")
    args = ap.parse_args()
    if any(a > 0 for a in args.actors):
        from cryoorient_ray.config import RayConfig
        from cryoorient_ray.distributed.runtime import init_ray

        init_ray(RayConfig(num_cpus=max(4, os.cpu_count() or 1)))
    todo = ["exact", "align", "figure7", "gauge"] if args.what == "all" else [args.what]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for what in todo:
        t0 = time.perf_counter()
        res = {
            "figure7": bench_figure7,
            "exact": bench_exact,
            "align": bench_align,
            "scaling": bench_scaling,
            "gauge": bench_gauge,
        }[what](args)
        res["command"] = "python benchmarks/bench_recover.py " + " ".join(sys.argv[1:])
        res["machine"] = _machine()
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        path = RESULTS / f"recover_{what}{args.tag}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"{what}: {path}")
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
