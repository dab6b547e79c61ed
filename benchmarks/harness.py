"""One entry point for the benchmarks of the paper's experiments and the peer comparison.

    python -m benchmarks list
    python -m benchmarks run NAME [--scale small|paper] [--seed 0]
    python -m benchmarks run all [--scale small]
    python -m benchmarks report            # regenerate the generated part of docs/BENCHMARKS.md

Each benchmark (a module of ``benchmarks/suite``) returns tables, a PNG and notes; the harness
stamps them with the exact command, the machine, the date and the wall time, and writes
``benchmarks/results/<name>_<scale>.json``. ``report`` renders every such JSON into the section of
docs/BENCHMARKS.md between the ``<!-- harness:start -->`` and ``<!-- harness:end -->`` markers.

Scales: ``small`` finishes in at most 20 minutes on 2 CPU cores; ``paper`` is the paper's size
(a GPU machine or a cluster).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- harness:start -->", "<!-- harness:end -->"
SCALES = ("small", "paper")
# Order of the report (the order); each name is a module of benchmarks/suite.
SUITE = (
    "exact",
    "symmetry",
    "euclidean",
    "noise_shift",
    "noise",
    "full_method",
    "generalisation",
    "common_lines",
    "scaling",
    "throughput",
    "refine",
    "unseen",
)


@dataclass
class Benchmark:
    name: str
    title: str
    run: Callable[[Context], dict]
    needs_gpu_for_paper: bool = True
    paper_reference: str = ""
    small_threads: int = 2
    headline: Callable[[dict], dict] | None = None


REGISTRY: dict[str, Benchmark] = {}


def register(
    name: str,
    title: str,
    needs_gpu_for_paper: bool = True,
    paper_reference: str = "",
    small_threads: int = 2,
    headline: Callable[[dict], dict] | None = None,
):
    """Decorator: ``fn(ctx) -> {"tables": [...], "figure": png path, "notes": [...], ...}``.

    A benchmark may also return ``"headline"``: a flat dict of the few numbers to compare across
    runs (``name -> number, string, bool or None``); the harness checks it is flat and writes it as
    the result's top-level ``headline`` (:func:`check_headline`). Or it names ``headline``: a function
    of its result (its measured tables) that gives that dict, so the headline of a stored result can
    be derived again (``python -m benchmarks headlines``) without measuring anything again.

    ``small_threads``: torch threads at small scale (at most the CPU count; paper scale uses every
    CPU). The machine line of the result records what ran.
    """

    def wrap(fn):
        REGISTRY[name] = Benchmark(name, title, fn, needs_gpu_for_paper, paper_reference, small_threads, headline)
        return fn

    return wrap


def load_suite() -> None:
    for name in SUITE:
        try:
            importlib.import_module(f"benchmarks.suite.{name}")
        except ModuleNotFoundError as exc:  # a benchmark not written yet is listed as such
            if exc.name != f"benchmarks.suite.{name}":
                raise


@dataclass
class Context:
    """What a benchmark gets: the scale, a scratch folder, where its PNG goes, a seed."""

    name: str
    scale: str
    seed: int
    work: Path
    results: Path
    ray_started: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def small(self) -> bool:
        return self.scale == "small"

    @property
    def figure(self) -> Path:
        return self.results / f"{self.name}_{self.scale}.png"

    def pick(self, small, paper):
        return small if self.small else paper

    def say(self, msg: str) -> None:
        line = f"[{self.name} {time.strftime('%H:%M:%S')}] {msg}"
        self.log.append(line)
        print(line, flush=True)

    def ray(self) -> None:
        """Start local Ray once (more logical CPUs than cores, so Train and Data do not starve)."""
        if self.ray_started:
            return
        from cryoorient_ray.config import RayConfig
        from cryoorient_ray.distributed.runtime import init_ray

        init_ray(RayConfig(num_cpus=max(4, os.cpu_count() or 1)))
        self.ray_started = True

    def stop_ray(self) -> None:
        """Shut down the Ray :meth:`ray` started (before a subprocess that starts its own)."""
        if not self.ray_started:
            return
        from cryoorient_ray.distributed.runtime import shutdown_ray

        shutdown_ray()
        self.ray_started = False


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover
        ray_version = None
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
    }


def machine_line(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpus']} CPUs ({m['cpu']}){gpu}; torch {m['torch']}, Ray {m['ray']}"


def result_path(name: str, scale: str) -> Path:
    return RESULTS / f"{name}_{scale}.json"


HeadlineValue = int | float | str | bool | None


def check_headline(name: str, headline) -> dict[str, HeadlineValue]:
    """A benchmark's ``headline``: a flat dict of scalars (numpy scalars become Python numbers).

    Raises ``ValueError`` naming the benchmark and the key for anything else (a nested dict, a
    list, an array), so a result never carries a headline that tools cannot read as one row.
    """
    import numpy as np

    if not isinstance(headline, dict):
        raise ValueError(f"benchmark {name!r}: headline must be a dict, got {type(headline).__name__}")
    flat: dict[str, HeadlineValue] = {}
    for key, value in headline.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not (value is None or isinstance(value, (int, float, str, bool))):
            raise ValueError(
                f"benchmark {name!r}: headline[{key!r}] is {type(value).__name__}; "
                "a headline holds only numbers, strings, booleans or None"
            )
        flat[key] = value
    return flat


def run_one(name: str, scale: str, seed: int, argv: list[str]) -> dict:
    import torch

    bench = REGISTRY[name]
    cpus = os.cpu_count() or 1
    torch.set_num_threads(min(bench.small_threads, cpus) if scale == "small" else cpus)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    ctx = Context(name=name, scale=scale, seed=seed, work=work, results=RESULTS)
    ctx.say(f"{bench.title} ({scale} scale); scratch {work}")
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    out = bench.run(ctx)
    wall = time.perf_counter() - t0
    if "headline" not in out and bench.headline is not None:
        out = {**out, "headline": bench.headline(out)}
    if "headline" in out:
        out = {**out, "headline": check_headline(name, out["headline"])}
    load_end = os.getloadavg()[0]
    record = {
        "name": name,
        "title": bench.title,
        "scale": scale,
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "wall_s": round(wall, 1),
        # 1-minute load average when the run started and ended: above the core count, other jobs
        # shared the machine and the timings are inflated by about load / cores.
        "load_average": [round(load_start, 1), round(load_end, 1)],
        "needs_gpu_for_paper": bench.needs_gpu_for_paper,
        "paper_reference": bench.paper_reference,
        **out,
    }
    if "figure" in record and record["figure"]:
        record["figure"] = os.path.relpath(record["figure"], ROOT)
    path = result_path(name, scale)
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    ctx.say(f"done in {wall:.0f} s; wrote {os.path.relpath(path, ROOT)}")
    return record


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a result")


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.001:
            return f"{v:.3f}"
        return f"{v:.1e}"
    return str(v)


def render_table(t: dict) -> str:
    lines = []
    if t.get("title"):
        lines.append(f"**{t['title']}**\n")
    cols = t["columns"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    if t.get("note"):
        lines.append("")
        lines.append(t["note"])
    return "\n".join(lines)


def render_result(r: dict) -> str:
    m = r["machine"]
    parts = [f"### {r['title']} — `{r['name']}`, {r['scale']} scale", ""]
    wall = f"wall time {r['wall_s']:.0f} s"
    load = r.get("load_average")
    if load and max(load) > 1.5 * (m.get("cpus") or 1):
        wall += f" (shared machine: load average {load[0]:g} → {load[1]:g} on {m['cpus']} cores, timings inflated)"
    parts.append(f"`{r['command']}` — {r['date']}, {machine_line(m)}; {wall}.")
    if r.get("paper_reference"):
        parts.append(f"Paper: {r['paper_reference']}.")
    if r.get("headline"):
        parts.append("Headline: " + ", ".join(f"`{k}` {_cell(v)}" for k, v in r["headline"].items()) + ".")
    if r["scale"] == "small" and r.get("needs_gpu_for_paper"):
        parts.append(
            "Reduced scale (the `paper` scale needs a GPU machine); the reductions: "
            + r.get("reduction", "see the notes")
            + "."
        )
    parts.append("")
    for t in r.get("tables", []):
        parts.append(render_table(t))
        parts.append("")
    if r.get("figure"):
        rel = os.path.relpath(ROOT / r["figure"], DOC.parent)
        parts.append(f"![{r['name']}]({rel})")
        parts.append("")
    for n in r.get("notes", []):
        parts.append(f"- {n}")
    if r.get("notes"):
        parts.append("")
    return "\n".join(parts)


def render_all() -> str:
    load_suite()
    out = [
        "## The benchmark harness (issue 9)",
        "",
        "Generated by `python -m benchmarks report` from `benchmarks/results/<name>_<scale>.json`;",
        "each section names the command that produced it. `small` scale: at most 20 minutes each on",
        "the 2-core reference machine; `paper` scale: the paper's sizes, for a GPU machine.",
        "",
        "| benchmark | what | small | paper |",
        "|---|---|---|---|",
    ]
    for name in SUITE:
        b = REGISTRY.get(name)
        if b is None:
            continue
        cells = []
        for scale in SCALES:
            p = result_path(name, scale)
            cells.append(f"{json.loads(p.read_text())['wall_s']:.0f} s" if p.exists() else "not run")
        out.append(f"| `{name}` | {b.title} | {cells[0]} | {cells[1]} |")
    out.append("")
    for name in SUITE:
        for scale in SCALES:
            p = result_path(name, scale)
            if p.exists():
                out.append(render_result(json.loads(p.read_text())))
    return "\n".join(out).rstrip() + "\n"


def write_report() -> Path:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{START}\n{render_all()}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        lines = text.split("\n", 1)
        text = lines[0] + "\n\n" + block + "\n\n" + (lines[1] if len(lines) > 1 else "")
    DOC.write_text(text)
    return DOC


def refresh_headlines() -> list[Path]:
    """Derive the headline of every stored result whose benchmark names a headline function, from
    the result's own tables (nothing is measured again); returns the files rewritten."""
    written = []
    for name, bench in REGISTRY.items():
        if bench.headline is None:
            continue
        for scale in SCALES:
            path = result_path(name, scale)
            if not path.exists():
                continue
            record = json.loads(path.read_text())
            record["headline"] = check_headline(name, bench.headline(record))
            path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the benchmarks and their results")
    r = sub.add_parser("run", help="run one benchmark (or all) and write its JSON and PNG")
    r.add_argument("name", help=f"one of: {', '.join(SUITE)}, or all")
    r.add_argument("--scale", choices=SCALES, default="small")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-report", action="store_true", help="do not regenerate docs/BENCHMARKS.md")
    sub.add_parser("report", help="regenerate the harness section of docs/BENCHMARKS.md")
    sub.add_parser("headlines", help="derive stored results' headlines from their tables, then report")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    load_suite()
    if args.cmd == "list":
        for name in SUITE:
            done = [s for s in SCALES if result_path(name, s).exists()]
            title = REGISTRY[name].title if name in REGISTRY else "(not written yet)"
            print(f"{name:15s} {title}  [results: {', '.join(done) or 'none'}]")
        return
    if args.cmd == "headlines":
        for path in refresh_headlines():
            print(f"wrote {path.relative_to(ROOT)}")
        print(f"wrote {write_report().relative_to(ROOT)}")
        return
    if args.cmd == "report":
        print(f"wrote {write_report().relative_to(ROOT)}")
        return
    if args.name != "all" and args.name not in REGISTRY:
        ap.error(f"unknown benchmark {args.name!r}; choose from {', '.join(SUITE)} or all")
    names = SUITE if args.name == "all" else (args.name,)
    for name in names:
        run_one(
            name,
            args.scale,
            args.seed,
            ["run", name, "--scale", args.scale] + (["--seed", str(args.seed)] if args.seed else []),
        )
    if not args.no_report:
        print(f"wrote {write_report().relative_to(ROOT)}")
