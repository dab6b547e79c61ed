"""Import direction: core never imports ray or zarr; only distributed/ imports ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cryoorient_ray"


def test_importing_core_does_not_import_ray_or_zarr():
    code = (
        "import sys, cryoorient_ray.core, cryoorient_ray.io.star, cryoorient_ray.config, cryoorient_ray.pipeline;"
        "bad = [m for m in ('ray', 'zarr') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_only_distributed_imports_ray_in_source():
    pattern = re.compile(r"^\s*(import ray\b|from ray\b)", re.M)
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if "distributed" not in p.parts and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_core_does_not_import_upper_layers():
    pattern = re.compile(r"^\s*(from|import) cryoorient_ray\.(io|distributed|pipeline|cli|config)\b", re.M)
    offenders = [str(p.relative_to(PKG)) for p in (PKG / "core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
