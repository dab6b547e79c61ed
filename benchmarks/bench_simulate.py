"""Time to generate a many-protein projection store with `cryoorient simulate` on local Ray.

    python benchmarks/bench_simulate.py [--proteins 50] [--n 1000] [--size 64] [--voxel-size 6]

Uses the first N models of ../shared/data/models (sorted), noise at -12 dB, shifts, CTF,
shards of 250. Writes benchmarks/results/simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proteins", type=int, default=50)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--voxel-size", type=float, default=6.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulate.json")
    args = ap.parse_args()
    if not MODELS.is_dir():
        sys.exit(f"models not found at {MODELS}")
    models = sorted(MODELS.iterdir())[: args.proteins]
    work = Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    cmd = [
        sys.executable,
        "-m",
        "cryoorient_ray.cli",
        "simulate",
        "--n",
        str(args.n),
        "--image-size",
        str(args.size),
        "--voxel-size",
        str(args.voxel_size),
        "--set",
        f"simulate.resolution={2 * args.voxel_size}",
        "--snr-db",
        "-12",
        "--max-shift",
        "3",
        "--ctf",
        "--shard-size",
        "250",
        "--backend",
        args.backend,
        "-o",
        str(work / "run"),
    ]
    for m in models:
        cmd += ["-i", str(m)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    store = work / "run" / "projections.zarr"
    size_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    summary = json.loads((work / "run" / "summary.json").read_text())
    result = {
        "command": "python benchmarks/bench_simulate.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "proteins": len(models),
        "projections_per_protein": args.n,
        "image_size": args.size,
        "total_projections": len(models) * args.n,
        "wall_seconds": round(seconds, 1),
        "projections_per_second": round(len(models) * args.n / seconds, 1),
        "store_megabytes": round(size_mb, 1),
        "stage_seconds": summary["stages"][0]["seconds"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
