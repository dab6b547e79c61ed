"""Training throughput of the Siamese distance with Ray Train on this machine.

    python benchmarks/bench_train.py [--size 32] [--n 2000] [--epochs 3] [--workers 2]

Simulates a pseudo-protein store, then trains the same model with `pairing: stream` (pre-drawn
pairs) and `pairing: batch` (all pairs within image batches) and reports pairs per second per
worker (median over epochs after the first). Writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = ap.parse_args()

    from cryoorient_ray.config import RayConfig, TrainConfig, load_config
    from cryoorient_ray.distributed.runtime import init_ray
    from cryoorient_ray.distributed.simulate_tasks import simulate_store
    from cryoorient_ray.distributed.train_workers import TrainJob, train_distance

    init_ray(RayConfig(num_cpus=max(4, os.cpu_count() or 1)))
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    sim = load_config(
        None,
        None,
        [
            "simulate.inputs=[pseudo:0]",
            f"simulate.n_per_map={args.n}",
            f"simulate.image_size={args.size}",
            f"simulate.voxel_size={192 / args.size}",
            "simulate.shard_size=250",
        ],
    ).simulate
    simulate_store(sim, 0, work / "store.zarr", progress=False)
    results = []
    for pairing in ("stream", "batch"):
        cfg = TrainConfig(
            epochs=args.epochs,
            pairing=pairing,
            batch_size=64 if pairing == "batch" else 128,
            pairs_per_shard=1000,
            val_pairs_per_shard=200,
            num_workers=args.workers,
            use_gpu=args.gpu,
            model={"channels": [16, 32, 64], "n_features": 32},
        )
        t0 = time.perf_counter()
        train_distance(TrainJob(cfg, [str(work / "store.zarr")], work / pairing))
        history = json.loads((work / pairing / "history.json").read_text())
        rates = [h["pairs_per_second_per_worker"] for h in history[1:]] or [history[0]["pairs_per_second_per_worker"]]
        results.append(
            {
                "pairing": pairing,
                "pairs_per_epoch": history[-1]["train_pairs"],
                "epoch_seconds_median": round(statistics.median(h["seconds"] for h in history[1:] or history), 2),
                "pairs_per_second_per_worker": round(statistics.median(rates), 1),
                "fit_seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(results[-1], flush=True)
    out = {
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpu": args.gpu},
        "image_size": args.size,
        "workers": args.workers,
        "model": {"channels": [16, 32, 64], "n_features": 32},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
