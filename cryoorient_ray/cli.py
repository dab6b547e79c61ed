"""The ``cryoorient`` command line (typer). Thin: parse options, load config, call pipeline.

Bad input (a :class:`~cryoorient_ray.errors.CryoOrientError`) prints one red line on stderr
and exits with code 1. ``--verbose`` turns on debug logging and full tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from cryoorient_ray import __version__
from cryoorient_ray.errors import CryoOrientError

PIPELINE_PANEL = "Pipeline stages"
TOOLS_PANEL = "Tools"

app = typer.Typer(
    name="cryoorient",
    help="Recover particle orientations in single-particle cryo-EM from a learned distance, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Inspect and validate run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config", rich_help_panel=TOOLS_PANEL)
store_app = typer.Typer(help="Inspect projection stores.", no_args_is_help=True)
app.add_typer(store_app, name="store", rich_help_panel=TOOLS_PANEL)
maps_app = typer.Typer(help="Density maps: fetch by id, preview.", no_args_is_help=True)
app.add_typer(maps_app, name="maps", rich_help_panel=TOOLS_PANEL)
cluster_app = typer.Typer(help="Ray clusters: what Ray sees and what each stage will use.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster", rich_help_panel=TOOLS_PANEL)
tune_app = typer.Typer(
    help="Search the architecture and n_f with Ray Tune (ASHA early stopping); `tune report DIR` summarises a search."
)
app.add_typer(tune_app, name="tune", rich_help_panel=PIPELINE_PANEL)

stdout = Console()
stderr = Console(stderr=True)
_state = {"verbose": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/).", show_default=False)]
OptionalConfigArg = Annotated[
    Optional[Path], typer.Argument(help="YAML run config; defaults if omitted.", show_default=False)
]
OutOption = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output folder (default: the config's output_dir).")
]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Random seed (overrides the config).")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config value: section.key=value (repeatable)."),
]
AddressOption = Annotated[
    Optional[str],
    typer.Option(
        "--address",
        help="Ray cluster to run on: host:6379 of a running head, 'auto' or ray://host:10001 "
        "(default: ray.address, else RAY_ADDRESS, else a local Ray).",
        show_default=False,
    ),
]


def _fail(message: str) -> None:
    stderr.print(f"[bold red]Error:[/bold red] {message}", soft_wrap=True, highlight=False, markup=True)


def _one_line(text: str) -> str:
    """One line of a possibly multi-line message: Ray errors carry the remote traceback, whose last
    ``SomeError: message`` line is the cause."""
    import re

    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    causes = [line for line in lines if re.match(r"^(?:[\w.]+\.)?\w+(?:Error|Exception): ", line)]
    return causes[-1] if causes else lines[0]


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input into one error line + exit 1; unexpected errors too, unless --verbose."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CryoOrientError as exc:
            _fail(str(exc).replace("[", "\\["))
            raise typer.Exit(1) from None
        except PermissionError as exc:  # a read-only output folder is bad input, not an internal error
            _fail(
                f"cannot write {exc.filename or 'the output'}: {exc.strerror or 'permission denied'}".replace(
                    "[", "\\["
                )
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _fail("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if _state["verbose"]:
                raise
            _fail(
                f"internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                "(re-run with --verbose for the traceback)".replace("[", "\\[")
            )
            raise typer.Exit(1) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=verbose, rich_tracebacks=True)],
        force=True,
    )
    for noisy in ("matplotlib", "PIL", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"cryoorient_ray {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version_callback, is_eager=True)
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
) -> None:
    """Recover particle orientations in single-particle cryo-EM from a learned distance, on Ray."""
    _state["verbose"] = verbose
    _setup_logging(verbose)
    if verbose:  # Ray workers' own logs too
        import os

        os.environ["CRYOORIENT_RAY_LOGS"] = "1"


def _print_stages(out: Path, results: list) -> None:
    table = Table(title=f"Run folder: {out}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("outputs / numbers")
    for r in results:
        style = "green" if r.status == "done" else "dim"
        detail = ", ".join(r.outputs.values())
        if r.metrics:
            detail += ("; " if detail else "") + ", ".join(f"{k}={v}" for k, v in r.metrics.items())
        table.add_row(
            r.name, f"[{style}]{r.status}[/{style}]", f"{r.seconds:.2f}" if r.status != "not available" else "", detail
        )
    stdout.print(table)


# ----------------------------------------------------------------------------- pipeline


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def run(
    config: ConfigArg,
    out: OutOption = None,
    seed: SeedOption = None,
    sets: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Re-run every stage, even those already done.")] = False,
    address: AddressOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Run the whole pipeline from one config: map → projections → distances → orientations → volume.

    Stages already done with the same settings are skipped (re-running resumes). Ends with
    report.html (figures and numbers), summary.json, recovered.star and reconstruction.mrc.
    With --address every stage runs on that Ray cluster (see clusters/ and docs/SCALING.md).
    """
    from cryoorient_ray.config import load_config
    from cryoorient_ray.pipeline import run_pipeline
    from cryoorient_ray.stages.base import SUMMARY_NAME

    cfg = load_config(config, {"seed": seed, "ray.address": address}, sets)
    out_dir, results = run_pipeline(cfg, out, argv=sys.argv, progress=progress, force=force)
    _print_stages(out_dir, results)
    summary = json.loads((out_dir / SUMMARY_NAME).read_text())
    for key, value in summary.get("headline", {}).items():
        stdout.print(f"  {key}: [bold]{value}[/bold]", highlight=False)
    stdout.print(f"Report: {out_dir / 'report.html'}  Summary: {out_dir / SUMMARY_NAME}")


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def simulate(
    config: OptionalConfigArg = None,
    inputs: Annotated[
        Optional[list[str]],
        typer.Option("--input", "-i", help="Model/map file, folder, PDB/EMDB id or pseudo[:SEED] (repeatable)."),
    ] = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Projections per map.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image size L in pixels (maps are boxed to L³).")] = None,
    voxel_size: Annotated[Optional[float], typer.Option(help="Å per pixel (default: the map's own).")] = None,
    snr_db: Annotated[
        Optional[float], typer.Option(help="Noise: SNR in dB per image (-12 ≈ the paper's σ²=16).")
    ] = None,
    max_shift: Annotated[Optional[float], typer.Option(help="Largest off-centring shift, pixels.")] = None,
    ctf: Annotated[Optional[bool], typer.Option("--ctf/--no-ctf", help="Apply a CTF (RELION convention).")] = None,
    symmetry: Annotated[Optional[str], typer.Option(help="Default point group of the inputs.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Projections per shard (one Ray task each).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="Projector: auto, torch, real or astra.")] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Simulate projections (orientation, shift, CTF, noise) of density maps into a sharded Zarr store.

    Runs one Ray task per shard; re-running the same command resumes an interrupted store.
    """
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.simulate import run_simulate

    overrides = {
        "seed": seed,
        "simulate.inputs": inputs or None,
        "simulate.n_per_map": n,
        "simulate.image_size": image_size,
        "simulate.voxel_size": voxel_size,
        "simulate.noise.snr_db": snr_db,
        "simulate.shifts.max_shift": max_shift,
        "simulate.ctf.enabled": ctf,
        "simulate.orientations.symmetry": symmetry,
        "simulate.shard_size": shard_size,
        "simulate.backend": backend,
        "ray.address": address,
    }
    cfg = load_config(config, overrides, sets)
    out_dir, result = run_simulate(cfg, out, argv=sys.argv, progress=progress)
    _print_stages(out_dir, [result])


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def train(
    config: OptionalConfigArg = None,
    stores: Annotated[
        Optional[list[str]], typer.Option("--store", "-s", help="Projection store(s) to train on (repeatable).")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers.")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per worker.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Pairs per step per worker.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    n_features: Annotated[Optional[int], typer.Option(help="n_f, the embedding size.")] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train the Siamese distance data-parallel with Ray Train (simulating the store first if none is given).

    Writes model.pt (loadable without Ray), training.png (L_DE curves), distances.png (learned vs
    Euclidean on test pairs), history.json, TensorBoard logs and Ray Train checkpoints.
    """
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.train import run_train

    overrides = {
        "seed": seed,
        "train.stores": stores or None,
        "train.num_workers": workers,
        "train.use_gpu": gpu,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "train.model.n_features": n_features,
        "ray.address": address,
    }
    cfg = load_config(config, overrides, sets)
    out_dir, results = run_train(cfg, out, argv=sys.argv, progress=progress)
    _print_stages(out_dir, results)


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def distances(
    store: Annotated[str, typer.Argument(help="Projection store with true orientations.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(help="Trained model.pt.")] = None,
    euclidean: Annotated[bool, typer.Option("--euclidean", help="Also the Euclidean baseline ‖p_i − p_j‖.")] = False,
    split: Annotated[str, typer.Option(help="Split the pairs come from.")] = "test",
    pairs: Annotated[int, typer.Option(help="Number of pairs (uniform in d_q).")] = 1000,
    proteins: Annotated[str, typer.Option(help="all, seen (trained on) or heldout proteins.")] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the pair draw.")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for distances.png and distances.json.")] = Path(
        "runs/distances"
    ),
) -> None:
    """Plot d̂ against d_q on test pairs and print L_DE (learned model and/or Euclidean baseline)."""
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.base import check_output_dir
    from cryoorient_ray.stages.train import evaluate_distances

    ProjectionStore.open(store)  # a missing or damaged store stops here, before the folder is made
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = evaluate_distances(store, out, model, euclidean, split, pairs, seed, proteins)
    for name, rep in reports.items():
        stdout.print(
            f"{name:10s} L_DE = {rep['L_DE']:.4f} rad²  MAE = {rep['mae']:.3f} rad  r = {rep['pearson']:.3f}  "
            f"({rep['pairs']} {split} pairs, {proteins} proteins)",
            highlight=False,
        )
    stdout.print(f"Plot: {out / 'distances.png'}")


@store_app.command("info")
@guarded
def store_info(
    store: Annotated[str, typer.Argument(help="Projection store (folder or URL).", show_default=False)],
    png: Annotated[Optional[Path], typer.Option(help="Preview image to write (default: <store>_samples.png).")] = None,
) -> None:
    """Counts, shapes, splits and shard progress of a store, and a PNG grid of sample images."""
    import json as _json

    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.simulate import write_store_preview

    st = ProjectionStore.open(store, verify=False)
    st.check_arrays()
    summary = st.summary()
    table = Table(title=f"{store}", title_justify="left")
    for col in ("protein", "symmetry", "held out", "train", "val", "test"):
        table.add_column(col)
    for p in summary["proteins"]:
        table.add_row(
            str(p["name"]),
            p["symmetry"],
            "yes" if p["heldout"] else "",
            *(str(p.get(s, "")) for s in ("train", "val", "test")),
        )
    stdout.print(table)
    state = "complete" if summary["complete"] else "INCOMPLETE (re-run the same simulate command to finish it)"
    if summary["damaged_shards"]:
        state = f"DAMAGED: {st.damage_report(summary['damaged_shards'])}; re-run the same simulate command to re-render"
    stdout.print(
        f"{summary['samples']} projections of {summary['image_size']}² px at {summary['pixel_size']} Å/px; "
        f"shards {summary['shards_done']}/{summary['shards']} ({state}); "
        f"orientations {'known' if summary['has_orientations'] else 'unknown'}",
        highlight=False,
    )
    if summary["shards_done"]:
        target = png or Path(str(store).rstrip("/")).with_name(Path(str(store).rstrip("/")).stem + "_samples.png")
        write_store_preview(st, target)
        stdout.print(f"Preview: {target}")
    logging.getLogger(__name__).debug(_json.dumps(summary))


@app.command("export-star", rich_help_panel=TOOLS_PANEL)
@guarded
def export_star(
    store: Annotated[str, typer.Argument(help="Projection store.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output folder for <name>.star and <name>.mrcs.", show_default=False)],
    split: Annotated[Optional[str], typer.Option(help="Only this split: train, val or test.")] = None,
    protein: Annotated[Optional[str], typer.Option(help="Only this protein (name as in `store info`).")] = None,
    name: Annotated[str, typer.Option(help="Base name of the files.")] = "particles",
) -> None:
    """Export a store (or a subset) to RELION .star + .mrcs (angles, shifts, CTF, optics group)."""
    from cryoorient_ray.io.relion import export_relion
    from cryoorient_ray.io.store import ProjectionStore
    from cryoorient_ray.stages.base import check_output_dir

    st = ProjectionStore.open(store)
    check_output_dir(out)
    rows = st.select_rows(split=split, protein=protein)
    star, mrcs = export_relion(st, out, rows, name=name)
    stdout.print(f"Wrote {len(rows)} particles: {star} and {mrcs}", highlight=False)


@app.command("import-star", rich_help_panel=TOOLS_PANEL)
@guarded
def import_star(
    star: Annotated[Path, typer.Argument(help="RELION particles .star (3.0 or 3.1+).", show_default=False)],
    store: Annotated[Path, typer.Argument(help="New projection store to create.", show_default=False)],
    symmetry: Annotated[str, typer.Option(help="Point group of the particle.")] = "C1",
    split: Annotated[str, typer.Option(help="Split the particles go to (test = to recover).")] = "test",
    shard_size: Annotated[int, typer.Option(help="Particles per shard.")] = 256,
) -> None:
    """Import a RELION particle stack (.star + .mrcs) into a projection store."""
    from cryoorient_ray.io.relion import import_relion
    from cryoorient_ray.stages.simulate import write_store_preview

    st = import_relion(star, store, shard_size=shard_size, symmetry=symmetry, split=split)
    preview = write_store_preview(st, store.with_name(store.stem + "_samples.png"))
    stdout.print(
        f"Imported {st.n_samples} particles of {st.image_size}² px at {st.pixel_size:g} Å/px into {store} "
        f"(orientations {'known' if st.manifest['has_orientations'] else 'unknown'}); preview: {preview}",
        highlight=False,
    )


@maps_app.command("fetch")
@guarded
def maps_fetch(
    entry: Annotated[str, typer.Argument(help="PDB id (e.g. 5j0n) or EMDB id (e.g. EMD-1234).", show_default=False)],
    cache: Annotated[Path, typer.Option(help="Folder to keep downloads in.")] = Path("data/fetched"),
) -> None:
    """Download a model (RCSB) or a map (EMDB) by id; the file can then be given to `simulate -i`."""
    from cryoorient_ray.io.fetch import fetch_entry

    path = fetch_entry(entry, cache)
    stdout.print(f"{entry}: {path}", highlight=False)


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def recover(
    store: Annotated[str, typer.Argument(help="Projection store (simulated or imported with import-star).")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (recover section).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Trained model.pt (the learned distance).")] = None,
    euclidean: Annotated[bool, typer.Option("--euclidean", help="Use the Euclidean baseline ‖p_i − p_j‖.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Use the true distances d_q (experiment).")] = False,
    perturb: Annotated[
        Optional[float],
        typer.Option("--perturb", help="True distances plus Gaussian noise of this variance σ² (rad²)."),
    ] = None,
    protein: Annotated[Optional[str], typer.Option(help="Protein name or index in the store.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to recover: train, val or test.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Recover a random subset of this many.")] = None,
    k: Annotated[Optional[int], typer.Option(help="Nearest neighbours per projection in the pair graph.")] = None,
    n_random: Annotated[Optional[int], typer.Option(help="Random long-range pairs per projection.")] = None,
    actors: Annotated[Optional[int], typer.Option(help="Ray actors holding edge partitions (0 = in-process).")] = None,
    gauge: Annotated[
        Optional[bool], typer.Option("--gauge/--no-gauge", help="Resolve the physical solution from the images.")
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Recover orientations from estimated distances on a sparse pair graph (kNN + random pairs), on Ray actors.

    Writes recovered.star + recovered.mrcs (RELION: reconstruct with relion_reconstruct),
    recovered_orientations.npz, the L_OR curve, the recovered viewing directions and, when the
    store knows the truth, E_OR (O(4)), the registration error and their histogram.
    """
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.recover import run_recover

    chosen = [
        name for name, on in (("--euclidean", euclidean), ("--exact", exact), ("--perturb", perturb is not None)) if on
    ]
    if model is not None:
        chosen.insert(0, "--model")
    if len(chosen) > 1 and chosen != ["--exact", "--perturb"]:
        raise CryoOrientError(f"choose one distance estimator; got {' and '.join(chosen)}")
    estimator = "euclidean" if euclidean else "exact" if (exact or perturb is not None) else "model" if model else None
    overrides = {
        "seed": seed,
        "recover.estimator": estimator,
        "recover.model": str(model) if model else None,
        "recover.perturb_sigma2": perturb,
        "recover.protein": protein,
        "recover.split": split,
        "recover.max_projections": n,
        "recover.k": k,
        "recover.n_random": n_random,
        "recover.actors": actors,
        "recover.gauge.enabled": gauge,
        "ray.address": address,
    }
    cfg = load_config(config, overrides, sets)
    if out is None and config is None:
        out = Path("runs/recover")
    out_dir, result = run_recover(cfg, store, out_dir=out, argv=sys.argv, progress=progress)
    m = result.metrics
    line = f"recovered {m.get('recovered')} orientations: L_OR {m.get('L_OR', float('nan')):.4f}"
    if "e_or_o4" in m:
        line += f", E_OR {m['e_or_o4']:.4f} rad (O(4)), registration {m['registration']:.4f} rad (rotation + hand)"
    if "gauge_physical" in m:
        line += (
            f", gauge {'found the physical solution' if m['gauge_physical'] else 'did NOT find the physical solution'}"
        )
    stdout.print(line, highlight=False)
    _print_stages(out_dir, [result])


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def reconstruct(
    store: Annotated[str, typer.Argument(help="Projection store the orientations belong to.")],
    orientations: Annotated[
        Path,
        typer.Argument(help="recovered_orientations.npz (from recover) or a .star with one row per store image."),
    ],
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML run config (reconstruct section).")
    ] = None,
    refine: Annotated[Optional[int], typer.Option(help="Rounds of projection-matching refinement.")] = None,
    method: Annotated[Optional[str], typer.Option(help="auto, fourier, cg or astra.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/reconstruct"),
    sets: SetOption = None,
) -> None:
    """Reconstruct a volume from projections + orientations: .mrc maps, half-map FSC, FSC vs truth when known."""
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.reconstruct import run_reconstruct

    cfg = load_config(config, {"reconstruct.refine_rounds": refine, "reconstruct.method": method}, sets)
    out_dir, result = run_reconstruct(cfg, store, str(orientations), out, argv=sys.argv)
    _print_stages(out_dir, [result])


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def align(
    truth: Annotated[Path, typer.Argument(help=".star with the true (or reference) orientations.")],
    estimate: Annotated[
        Path, typer.Argument(help=".star with the estimated orientations, same particles, same order.")
    ],
    symmetry: Annotated[str, typer.Option(help="Point group of the particle.")] = "C1",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for align.json and align_errors.png.")] = Path(
        "runs/align"
    ),
) -> None:
    """E_OR (the paper's min over O(4)) and the registration error (global rotation + hand) between two .star files."""
    from cryoorient_ray.stages.recover import run_align

    rep = run_align(str(truth), str(estimate), out, symmetry)
    stdout.print(
        f"E_OR {rep['e_or_o4']:.4f} rad ({rep['o4_component']}), median {rep['e_or_o4_median']:.4f}; "
        f"registration {rep['registration']:.4f} rad (hand {rep['hand']}), median {rep['registration_median']:.4f}; "
        f"{rep['n']} orientations in {rep['seconds']:.2f} s",
        highlight=False,
    )
    stdout.print(f"Histogram: {out / 'align_errors.png'}")


@tune_app.callback(invoke_without_command=True)
@guarded
def tune(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML run config (the base of every trial).")
    ] = None,
    space: Annotated[
        Optional[Path],
        typer.Option("--space", help="Search space YAML (default: tune.space, configs/tune_space.yaml)."),
    ] = None,
    stores: Annotated[
        Optional[list[str]], typer.Option("--store", "-s", help="Projection store(s) to train on (repeatable).")
    ] = None,
    samples: Annotated[
        Optional[int], typer.Option("--samples", "-n", help="Configurations drawn from the space.")
    ] = None,
    max_concurrent: Annotated[
        Optional[int], typer.Option(help="Trials at once (default: as many as the Ray resources fit).")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray Train workers per trial.")] = None,
    cpus_per_worker: Annotated[
        Optional[float], typer.Option(help="CPUs per Train worker (fractional is fine).")
    ] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per Train worker.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of a trial that is not stopped (ASHA's max_t).")] = None,
    grace_period: Annotated[Optional[int], typer.Option(help="Epochs before ASHA may stop a trial.")] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Resume the interrupted experiment in this folder.")
    ] = None,
    seed: SeedOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Experiment folder (default: <output_dir>/tune).")
    ] = None,
    sets: SetOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress and Tune's table.")] = True,
) -> None:
    """Search the distance's hyper-parameters with Ray Tune: each trial a Ray Train run, ASHA on validation L_DE.

    Writes into one experiment folder: Tune's trial folders (TensorBoard events, per-epoch
    results, each trial's Train run), results.csv, tune_report.png/.html and best_config.yaml,
    which `cryoorient train` accepts as is. `--resume DIR` goes on after an interruption.
    """
    if ctx.invoked_subcommand is not None:
        return
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.tune import run_tune

    if resume is not None:
        given = [
            name for name, v in (("--config", config), ("--space", space), ("--store", stores), ("--set", sets)) if v
        ]
        if given:
            raise CryoOrientError(f"--resume uses the experiment's own config and space; drop {', '.join(given)}")
        out_dir, summary, report = run_tune(None, resume, argv=sys.argv, progress=progress, resume=True)
    else:
        overrides = {
            "seed": seed,
            "train.stores": stores or None,
            "train.num_workers": workers,
            "train.cpus_per_worker": cpus_per_worker,
            "train.use_gpu": gpu,
            "train.epochs": epochs,
            "tune.space": str(space) if space is not None else None,
            "tune.num_samples": samples,
            "tune.max_concurrent_trials": max_concurrent,
            "tune.grace_period": grace_period,
        }
        cfg = load_config(config, overrides, sets)
        if out is None:
            out = Path(cfg.output_dir) / "tune"
        out_dir, summary, report = run_tune(cfg, out, argv=sys.argv, progress=progress)
    _print_tune_report(report)
    stdout.print(
        f"{summary['trials']} trials in {summary['seconds']:.0f} s ({summary['concurrent_trials']} at once)"
        + (f", {summary['errors']} failed: {summary['first_error']}" if summary["errors"] else ""),
        highlight=False,
    )


def _print_tune_report(report: dict) -> None:
    best = report["best"]
    counts = ", ".join(f"{n} {s}" for s, n in report["status"].items() if n)
    stdout.print(
        f"{report['trials']} trials ({counts}); best {best['trial_id']}: {report['metric']} "
        f"[bold]{best['best']:.4f}[/bold] rad² at epoch {best['best_epoch']}",
        highlight=False,
    )
    table = Table(title="best trial", title_justify="left")
    table.add_column("parameter")
    table.add_column("value")
    for key, value in sorted(best["params"].items()):
        table.add_row(key, json.dumps(value))
    stdout.print(table)
    folder = Path(report["best_config"]).parent
    stdout.print(f"Report: {folder / 'tune_report.html'}  Best config: {report['best_config']}")
    stdout.print(f"TensorBoard: tensorboard --logdir {report['experiment_dir']}")


@tune_app.command("report")
@guarded
def tune_report(
    experiment: Annotated[Path, typer.Argument(help="Experiment folder of `cryoorient tune`.", show_default=False)],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Folder for the report (default: the experiment).")
    ] = None,
) -> None:
    """Summarise a search (finished or interrupted): L_DE per trial, L_DE vs n_f, the trial table, best_config.yaml."""
    from cryoorient_ray.distributed.tune_trials import write_tune_report

    _print_tune_report(write_tune_report(experiment, out))


# ----------------------------------------------------------------------------- tools


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def orientations(
    config: OptionalConfigArg = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", help="Number of orientations.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="uniform (SO(3)) or euler (uniform angles).")] = None,
    coverage: Annotated[Optional[str], typer.Option(help="full, half or quarter of the viewing sphere.")] = None,
    symmetry: Annotated[
        Optional[str], typer.Option(help="Point group for the pair-distance plot: C1, Cn, Dn, T, O, I.")
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
) -> None:
    """Sample orientations; write RELION .star (rot/tilt/psi), .npy (wxyz quaternions) and a PNG."""
    from cryoorient_ray.config import load_config
    from cryoorient_ray.stages.orientations import run_orientations

    overrides = {
        "seed": seed,
        "simulate.n_per_map": n,
        "simulate.orientations.sampler": sampler,
        "simulate.orientations.coverage": coverage,
        "simulate.orientations.symmetry": symmetry,
    }
    cfg = load_config(config, overrides, sets)
    out_dir, result = run_orientations(cfg, out, argv=sys.argv)
    _print_stages(out_dir, [result])


@config_app.command("show")
@guarded
def config_show(config: OptionalConfigArg = None, sets: SetOption = None) -> None:
    """Validate a config and print it with every default filled in."""
    from cryoorient_ray.config import dump_config, load_config

    stdout.print(dump_config(load_config(config, None, sets)), highlight=False, markup=False, end="")


@cluster_app.command("check")
@guarded
def cluster_check(
    config: OptionalConfigArg = None,
    address: AddressOption = None,
    local: Annotated[
        bool, typer.Option("--local", help="Check the local Ray a run without an address would start.")
    ] = False,
    sets: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Print the nodes and resources Ray sees, and what each stage of the config will use there.

    Connects to --address, else the config's ray.address, else RAY_ADDRESS, else a cluster
    started on this machine with `ray start` ('auto'); --local starts a local Ray instead.
    """
    from cryoorient_ray.config import load_config

    cfg = load_config(config, {"ray.address": address}, sets)
    if local and address:
        raise CryoOrientError("give either --address or --local, not both")
    from cryoorient_ray.distributed.cluster import check_report, describe_nodes
    from cryoorient_ray.distributed.runtime import check_address, init_ray, resolve_address, shutdown_ray

    if local:
        ray_cfg = cfg.ray.model_copy(update={"address": "local"})
    else:
        ray_cfg = cfg.ray.model_copy(update={"address": resolve_address(cfg.ray) or "auto"})
        check_address(ray_cfg.address, timeout=ray_cfg.connect_timeout)  # also when Ray already runs here
    try:
        started = init_ray(ray_cfg)
    except CryoOrientError as exc:
        if ray_cfg.address == "auto":
            raise CryoOrientError(
                "no running Ray cluster found on this machine: start one with `ray start --head`, "
                "pass --address host:6379 (or set RAY_ADDRESS), or use --local"
            ) from None
        raise exc from None
    try:
        import torch

        where = resolve_address(ray_cfg) or "a local Ray started for this check"
        report = check_report(cfg, describe_nodes(), driver_has_gpu=torch.cuda.is_available())
    finally:
        if started:
            shutdown_ray()
    report["address"] = where
    if as_json:
        stdout.print_json(json.dumps(report))
        return
    nodes = Table(title=f"Ray at {where}", title_justify="left")
    for col in ("node", "address", "role", "CPU", "GPU", "accelerator", "memory GiB", "object store GiB"):
        nodes.add_column(col, justify="right" if col in ("CPU", "GPU", "memory GiB", "object store GiB") else "left")
    for n in report["nodes"]:
        nodes.add_row(
            n["node_id"][:12],
            n["address"],
            "head" if n["head"] else "worker",
            f"{n['cpus']:g}",
            f"{n['gpus']:g}",
            n["accelerator"] or "",
            f"{n['memory_gib']:g}",
            f"{n['object_store_gib']:g}",
        )
    stdout.print(nodes)
    tot = report["totals"]
    stdout.print(
        f"{tot['nodes']} node(s): {tot['CPU']:g} CPUs, {tot['GPU']:g} GPUs, {tot['memory_gib']:g} GiB; "
        f"driver GPU: {'yes' if report['driver_has_gpu'] else 'no'}",
        highlight=False,
    )
    plan = Table(title="What each stage will use (from the config)", title_justify="left")
    for col in ("stage", "runs as", "asks for", "fits now", "notes"):
        plan.add_column(col)
    for p in report["stages"]:
        ok = "[green]yes[/green]" if p["fits_now"] else "[yellow]no[/yellow]"
        plan.add_row(p["stage"], p["runs_on"], p["demand"], ok, p["note"])
    stdout.print(plan)
    for w in report["warnings"]:
        stderr.print(f"[yellow]Warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
