"""Projections per second of each projector backend on this machine.

    python benchmarks/bench_projection.py [--sizes 64 128] [--n 256] [--backends torch real astra]

For each size D it projects a smooth random D³ map at ``--n`` random orientations into D × D
images (after a short warm-up) and reports projections per second; the construction time of a
projector (the padded 3D FFT for ``torch``) is reported separately. Backends that cannot run here
(``astra`` without CUDA) are listed as skipped. The table is printed and the results are written
to ``benchmarks/results/projection.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryoorient_ray.core import sample_orientations, unitquat_to_rotmat
from cryoorient_ray.core.imaging.projection import FourierSliceProjector, make_projector, real_space_project
from cryoorient_ray.core.imaging.projection_astra import astra_available

RESULTS = Path(__file__).resolve().parent / "results" / "projection.json"


def smooth_volume(d: int, seed: int = 0) -> np.ndarray:
    """Gaussian-filtered noise inside a soft sphere: a stand-in for a density map."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(d, d, d, generator=g)
    k = torch.fft.fftfreq(d)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    vol = torch.fft.ifftn(torch.fft.fftn(noise) * torch.exp(-2 * np.pi**2 * 1.5**2 * k2)).real
    ax = torch.arange(d) - d // 2
    r = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2).float()
    return (vol * torch.sigmoid((0.45 * d - r) / 1.5)).numpy().astype(np.float32)


def make(backend: str, volume: np.ndarray, device: str):
    if backend == "torch":
        proj = FourierSliceProjector(volume, device=device)
        return lambda r: proj(r)
    if backend == "torch_cubic":
        proj = FourierSliceProjector(volume, device=device, interpolation="cubic")
        return lambda r: proj(r)
    if backend == "real":
        vol = torch.from_numpy(volume).to(device)
        return lambda r: real_space_project(vol, r)
    return make_projector(volume, backend)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(backend: str, d: int, n: int, device: str) -> dict:
    volume = smooth_volume(d)
    rot = torch.from_numpy(unitquat_to_rotmat(sample_orientations(n, seed=1)).astype(np.float32))
    if backend != "astra":
        rot = rot.to(device)
    t0 = time.perf_counter()
    project = make(backend, volume, device)
    sync(device)
    setup = time.perf_counter() - t0
    project(rot[: min(8, n)])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    images = project(rot)
    sync(device)
    elapsed = time.perf_counter() - t0
    assert tuple(images.shape) == (n, d, d)
    return {
        "backend": backend,
        "size": d,
        "n": n,
        "setup_s": round(setup, 4),
        "seconds": round(elapsed, 4),
        "projections_per_s": round(n / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="volume sizes D (D³ → D²)")
    parser.add_argument("--n", type=int, default=256, help="projections per measurement")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["torch", "real", "astra"],
        choices=["torch", "torch_cubic", "real", "astra"],
        help="torch = Fourier slice (trilinear), torch_cubic = Fourier slice (cubic B-spline)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    results, skipped = [], []
    for backend in args.backends:
        if backend == "astra" and not astra_available():
            skipped.append({"backend": "astra", "reason": "astra-toolbox with CUDA not available"})
            continue
        for d in args.sizes:
            res = bench(backend, d, args.n, args.device)
            results.append(res)
            print(
                f"{res['backend']:>12} {d:>4}³→{d}²  {res['projections_per_s']:>9.1f} proj/s  "
                f"({res['n']} in {res['seconds']:.2f} s, setup {res['setup_s']:.2f} s)",
                flush=True,
            )
    for s in skipped:
        print(f"{s['backend']:>12} skipped: {s['reason']}")

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "results": results,
        "skipped": skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
