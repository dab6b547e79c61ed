"""The ``cryoorient`` command line (typer). Thin: parse options, load the config, call a stage, print.

Every option that overrides a config value names its dotted key (:func:`option`, ``key=``);
:func:`config_overrides` turns a command's arguments into the
``{dotted.key: value}`` overrides of :func:`~cryoorient_ray.config.load_config`. Options that
several commands share are declared once below (``SeedOption``, ``StoresOption``, ...), and the
families whose help differs per command (the store argument, ``--config``, ``--workers``,
``--gpu``) through one small factory each. Checks of option combinations live in the library
(:func:`~cryoorient_ray.config.recover_estimator`, :func:`~cryoorient_ray.config.check_tune_resume`,
:func:`~cryoorient_ray.distributed.cluster.cluster_check_report`).

Bad input (a :class:`~cryoorient_ray.errors.CryoOrientError`) prints one red line on stderr
and exits with code 1. ``--verbose`` turns on debug logging and full tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from cryoorient_ray import __version__
from cryoorient_ray.errors import CryoOrientError

if TYPE_CHECKING:
    from cryoorient_ray.config import RunConfig

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


# ----------------------------------------------------------------------------- options shared by commands


def option(*names: str, key: str | None = None, **kwargs: Any) -> Any:
    """``typer.Option(*names, **kwargs)`` that also records ``key``, the dotted config key the option
    overrides (read by :func:`config_overrides`; typer ignores it)."""
    info = typer.Option(*names, **kwargs)
    info.config_key = key
    return info


def config_overrides(command: Callable[..., Any], values: dict[str, Any]) -> dict[str, Any]:
    """``{dotted.key: value}`` for each parameter of ``command`` declared with an :func:`option` ``key``.

    ``values`` maps parameter names to what was passed (a command's ``locals()`` on entry).
    Paths become strings and empty lists ``None``; ``None`` (option not given) leaves the config alone.
    """
    out = {}
    for name, hint in typing.get_type_hints(command, include_extras=True).items():
        for meta in getattr(hint, "__metadata__", ()):
            if getattr(meta, "config_key", None):
                out[meta.config_key] = _config_value(values[name])
    return out


def _config_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and not value:
        return None
    return value


def store_argument(help: str = "Projection store (folder or URL).") -> Any:
    """The projection store argument (a folder or an fsspec URL), with the command's own help."""
    return typer.Argument(help=help, show_default=False)


def config_option(help: str) -> Any:
    """``--config/-c``, the run config of commands whose first argument is something else."""
    return typer.Option("--config", "-c", help=help)


def workers_option(help: str) -> Any:
    """``--workers`` (``train.num_workers``): Ray Train workers (of the run, or of each trial)."""
    return option("--workers", key="train.num_workers", help=help)


def gpu_option(help: str) -> Any:
    """``--gpu/--cpu`` (``train.use_gpu``): one GPU per Ray Train worker."""
    return option("--gpu/--cpu", key="train.use_gpu", help=help)


ConfigArg = Annotated[Path, typer.Argument(help="YAML run config (see configs/).", show_default=False)]
OptionalConfigArg = Annotated[
    Optional[Path], typer.Argument(help="YAML run config; defaults if omitted.", show_default=False)
]
OutOption = Annotated[
    Optional[Path], typer.Option("--out", "-o", help="Output folder (default: the config's output_dir).")
]
SeedOption = Annotated[Optional[int], option("--seed", help="Random seed (overrides the config).", key="seed")]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override any config value: section.key=value (repeatable).")
]
AddressOption = Annotated[
    Optional[str],
    option(
        "--address",
        help="Ray cluster to run on: host:6379 of a running head, 'auto' or ray://host:10001 "
        "(default: ray.address, else RAY_ADDRESS, else a local Ray).",
        show_default=False,
        key="ray.address",
    ),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
StoreArg = Annotated[str, store_argument()]
StoresOption = Annotated[
    Optional[list[str]],
    option("--store", "-s", help="Projection store(s) to train on (repeatable).", key="train.stores"),
]
SymmetryOption = Annotated[str, typer.Option(help="Point group of the particle.")]


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


def _load_config(command: Callable[..., Any], values: dict[str, Any], extra: dict[str, Any] | None = None) -> RunConfig:
    """The run config of a command: its ``config`` file (or the defaults), its typed options
    (:func:`config_overrides`, then ``extra``) and its ``--set`` overrides, applied last."""
    from cryoorient_ray.config import load_config

    return load_config(values.get("config"), {**config_overrides(command, values), **(extra or {})}, values.get("sets"))


def _print_stages(out: Path, results: Any) -> None:
    """The table of a run folder's stages (one :class:`~cryoorient_ray.stages.base.StageResult` or a list)."""
    table = Table(title=f"Run folder: {out}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("outputs / numbers")
    for r in results if isinstance(results, list) else [results]:
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
    model: Annotated[
        Optional[str],
        option(
            help="Recover with this model.pt or 'pretrained' (the shipped general distance) instead of training one.",
            key="recover.model",
        ),
    ] = None,
    bootstrap: Annotated[
        Optional[int],
        option(
            "--bootstrap",
            help="Bootstrap rounds after the pipeline: project the map, fine-tune the distance, recover, refine.",
            key="bootstrap.rounds",
        ),
    ] = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
) -> None:
    """Run the whole pipeline from one config: map → projections → distances → orientations → volume.

    Stages already done with the same settings are skipped (re-running resumes). Ends with
    report.html (figures and numbers), summary.json, recovered.star and reconstruction.mrc.
    With --address every stage runs on that Ray cluster (see clusters/ and docs/SCALING.md).
    With --bootstrap N, N rounds fine-tune the distance on projections of the run's own map and
    recover and refine again (bootstrap/bootstrap.json: resolution and error per round).
    """
    from cryoorient_ray.pipeline import run_pipeline
    from cryoorient_ray.stages.base import SUMMARY_NAME

    cfg = _load_config(run, locals())
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
        option(
            "--input",
            "-i",
            help="Model/map file, folder, PDB/EMDB id or pseudo[:SEED] (repeatable).",
            key="simulate.inputs",
        ),
    ] = None,
    n: Annotated[Optional[int], option("--n", "-n", help="Projections per map.", key="simulate.n_per_map")] = None,
    image_size: Annotated[
        Optional[int], option(help="Image size L in pixels (maps are boxed to L³).", key="simulate.image_size")
    ] = None,
    voxel_size: Annotated[
        Optional[float], option(help="Å per pixel (default: the map's own).", key="simulate.voxel_size")
    ] = None,
    snr_db: Annotated[
        Optional[float],
        option(help="Noise: SNR in dB per image (-12 ≈ the paper's σ²=16).", key="simulate.noise.snr_db"),
    ] = None,
    max_shift: Annotated[
        Optional[float], option(help="Largest off-centring shift, pixels.", key="simulate.shifts.max_shift")
    ] = None,
    ctf: Annotated[
        Optional[bool], option("--ctf/--no-ctf", help="Apply a CTF (RELION convention).", key="simulate.ctf.enabled")
    ] = None,
    symmetry: Annotated[
        Optional[str], option(help="Default point group of the inputs.", key="simulate.orientations.symmetry")
    ] = None,
    shard_size: Annotated[
        Optional[int], option(help="Projections per shard (one Ray task each).", key="simulate.shard_size")
    ] = None,
    backend: Annotated[
        Optional[str], option(help="Projector: auto, torch, real or astra.", key="simulate.backend")
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
) -> None:
    """Simulate projections (orientation, shift, CTF, noise) of density maps into a sharded Zarr store.

    Runs one Ray task per shard; re-running the same command resumes an interrupted store.
    """
    from cryoorient_ray.stages.simulate import run_simulate

    _print_stages(*run_simulate(_load_config(simulate, locals()), out, argv=sys.argv, progress=progress))


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def train(
    config: OptionalConfigArg = None,
    stores: StoresOption = None,
    workers: Annotated[Optional[int], workers_option("Ray Train workers.")] = None,
    gpu: Annotated[Optional[bool], gpu_option("One GPU per worker.")] = None,
    epochs: Annotated[Optional[int], option(help="Epochs.", key="train.epochs")] = None,
    batch_size: Annotated[Optional[int], option(help="Pairs per step per worker.", key="train.batch_size")] = None,
    lr: Annotated[Optional[float], option(help="Learning rate.", key="train.lr")] = None,
    n_features: Annotated[Optional[int], option(help="n_f, the embedding size.", key="train.model.n_features")] = None,
    init_model: Annotated[
        Optional[Path],
        option("--init-model", help="Fine-tune: start from this model.pt (its architecture).", key="train.init_model"),
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
) -> None:
    """Train the Siamese distance data-parallel with Ray Train (simulating the store first if none is given).

    Writes model.pt (loadable without Ray), training.png (L_DE curves), distances.png (learned vs
    Euclidean on test pairs), history.json, TensorBoard logs and Ray Train checkpoints. With
    --init-model the training starts from that model's weights (fine-tuning).
    """
    from cryoorient_ray.stages.train import run_train

    _print_stages(*run_train(_load_config(train, locals()), out, argv=sys.argv, progress=progress))


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def distances(
    store: Annotated[str, store_argument("Projection store with true orientations.")],
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
    store: StoreArg,
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
    store: StoreArg,
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
    symmetry: SymmetryOption = "C1",
    split: Annotated[str, typer.Option(help="Split the particles go to (test = to recover).")] = "test",
    shard_size: Annotated[int, typer.Option(help="Particles per shard.")] = 256,
    image_size: Annotated[
        Optional[int],
        typer.Option(
            help="Fourier-crop the particles to this working box (the pixel size grows to match; "
            "32 for --model pretrained).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Import a RELION particle stack (.star + .mrcs) into a projection store."""
    from cryoorient_ray.io.relion import import_relion
    from cryoorient_ray.stages.simulate import write_store_preview

    st = import_relion(star, store, shard_size=shard_size, symmetry=symmetry, split=split, image_size=image_size)
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
    store: Annotated[str, store_argument("Projection store (simulated or imported with import-star).")],
    config: Annotated[Optional[Path], config_option("YAML run config (recover section).")] = None,
    model: Annotated[
        Optional[str],
        option(
            help="Trained model.pt, or 'pretrained' (the shipped general distance; the default when the output "
            "folder holds no model.pt).",
            key="recover.model",
        ),
    ] = None,
    euclidean: Annotated[bool, typer.Option("--euclidean", help="Use the Euclidean baseline ‖p_i − p_j‖.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Use the true distances d_q (experiment).")] = False,
    perturb: Annotated[
        Optional[float],
        option(
            "--perturb",
            help="True distances plus Gaussian noise of this variance σ² (rad²).",
            key="recover.perturb_sigma2",
        ),
    ] = None,
    protein: Annotated[Optional[str], option(help="Protein name or index in the store.", key="recover.protein")] = None,
    split: Annotated[Optional[str], option(help="Split to recover: train, val or test.", key="recover.split")] = None,
    n: Annotated[
        Optional[int], option("--n", "-n", help="Recover a random subset of this many.", key="recover.max_projections")
    ] = None,
    k: Annotated[
        Optional[int], option(help="Nearest neighbours per projection in the pair graph.", key="recover.k")
    ] = None,
    n_random: Annotated[
        Optional[int], option(help="Random long-range pairs per projection.", key="recover.n_random")
    ] = None,
    actors: Annotated[
        Optional[int], option(help="Ray actors holding edge partitions (0 = in-process).", key="recover.actors")
    ] = None,
    gauge: Annotated[
        Optional[bool],
        option(
            "--gauge/--no-gauge", help="Resolve the physical solution from the images.", key="recover.gauge.enabled"
        ),
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
) -> None:
    """Recover orientations from estimated distances on a sparse pair graph (kNN + random pairs), on Ray actors.

    Writes recovered.star + recovered.mrcs (RELION: reconstruct with relion_reconstruct),
    recovered_orientations.npz, the L_OR curve, the recovered viewing directions and, when the
    store knows the truth, E_OR (O(4)), the registration error and their histogram.
    """
    from cryoorient_ray.config import recover_estimator
    from cryoorient_ray.stages.recover import run_recover

    estimator = recover_estimator(model, euclidean=euclidean, exact=exact, perturb=perturb)
    cfg = _load_config(recover, locals(), {"recover.estimator": estimator})
    out = Path("runs/recover") if out is None and config is None else out
    out_dir, result = run_recover(cfg, store, out_dir=out, argv=sys.argv, progress=progress)
    stdout.print(_recovery_line(result.metrics), highlight=False)
    _print_stages(out_dir, result)


def _recovery_line(m: dict) -> str:
    """One line of the recover stage's numbers: L_OR, E_OR and registration when known, the gauge verdict."""
    line = f"recovered {m.get('recovered')} orientations: L_OR {m.get('L_OR', float('nan')):.4f}"
    if "e_or_o4" in m:
        line += f", E_OR {m['e_or_o4']:.4f} rad (O(4)), registration {m['registration']:.4f} rad (rotation + hand)"
    if "gauge_physical" in m:
        line += (
            f", gauge {'found the physical solution' if m['gauge_physical'] else 'did NOT find the physical solution'}"
        )
    return line


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def reconstruct(
    store: Annotated[str, store_argument("Projection store the orientations belong to.")],
    orientations: Annotated[
        Path, typer.Argument(help="recovered_orientations.npz (from recover) or a .star with one row per store image.")
    ],
    config: Annotated[Optional[Path], config_option("YAML run config (reconstruct section).")] = None,
    refine: Annotated[
        Optional[int], option(help="Rounds of projection-matching refinement.", key="reconstruct.refine_rounds")
    ] = None,
    method: Annotated[Optional[str], option(help="auto, fourier, cg or astra.", key="reconstruct.method")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/reconstruct"),
    sets: SetOption = None,
) -> None:
    """Reconstruct a volume from projections + orientations: .mrc maps, half-map FSC, FSC vs truth when known."""
    from cryoorient_ray.stages.reconstruct import run_reconstruct

    cfg = _load_config(reconstruct, locals())
    _print_stages(*run_reconstruct(cfg, store, str(orientations), out, argv=sys.argv))


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def refine(
    store: Annotated[str, store_argument("Projection store the particles are in (folder or URL).")],
    start: Annotated[
        str,
        typer.Argument(
            help="Where to start: a run folder (its recovered orientations) or its .npz, a RELION .star "
            "of the store's particles, or 'random' (the control: ab initio from nothing).",
            show_default=False,
        ),
    ],
    config: Annotated[Optional[Path], config_option("YAML run config (refine section).")] = None,
    out: Annotated[
        Optional[Path], typer.Option("--output", "--out", "-o", help="Output folder (default: runs/refine).")
    ] = None,
    iterations: Annotated[
        Optional[int], option(help="Iterations (search + reconstruction) at most.", key="refine.iterations")
    ] = None,
    start_deg: Annotated[
        Optional[float], option(help="Angular step of the first iteration (°).", key="refine.start_deg")
    ] = None,
    final_deg: Annotated[
        Optional[float], option(help="Angular step of the last iteration (°).", key="refine.final_deg")
    ] = None,
    keep: Annotated[
        Optional[int], option(help="Best coarse candidates per image searched finely.", key="refine.keep")
    ] = None,
    max_shift: Annotated[
        Optional[float], option(help="Largest shift searched per image (pixels).", key="refine.max_shift_px")
    ] = None,
    mode: Annotated[
        Optional[str], option(help="hard (best candidate) or soft (posterior weights).", key="refine.mode")
    ] = None,
    ab_initio: Annotated[
        Optional[str],
        option(
            help="Start from the stochastic ab initio map: on, off or auto (random starts and bad ones).",
            key="refine.ab_initio",
        ),
    ] = None,
    actors: Annotated[
        Optional[int], option(help="Ray actors scoring image batches (0 = in-process).", key="refine.actors")
    ] = None,
    gpu: Annotated[
        Optional[bool],
        option("--gpu/--no-gpu", help="Score on a GPU (default: when CUDA is present).", key="refine.gpu"),
    ] = None,
    split: Annotated[
        Optional[str], option(help="With random or .star: the split (train, val, test).", key="refine.split")
    ] = None,
    protein: Annotated[
        Optional[str], option(help="With random or .star: protein name or index in the store.", key="refine.protein")
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard the output folder's saved iterations and start again.")
    ] = False,
    seed: SeedOption = None,
    sets: SetOption = None,
    address: AddressOption = None,
    progress: ProgressOption = True,
) -> None:
    """Refine orientations globally by projection matching: search, reconstruct, repeat (image batches on Ray actors).

    Writes refined.star + refined.mrcs (RELION), map.mrc and half_map_1/2.mrc, the FSC and the
    resolution per iteration (fsc_iterations.png, resolution_iterations.png), refined.json and,
    when the store knows the truth, the error per iteration (E_OR and rotation + hand). Every
    finished iteration is saved in state/: running the same command again resumes.
    """
    from cryoorient_ray.config import refine_start
    from cryoorient_ray.stages.refine import run_refine

    kind, start_file = refine_start(start)
    cfg = _load_config(refine, locals(), {"refine.start": kind, "refine.start_file": start_file})
    out = Path("runs/refine") if out is None and config is None else out
    out_dir, result = run_refine(cfg, store, out_dir=out, argv=sys.argv, progress=progress, restart=restart)
    _print_stages(out_dir, result)
    stdout.print(f"Report: {out_dir / 'report.html'}  Numbers: {out_dir / 'refined.json'}")


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def align(
    truth: Annotated[Path, typer.Argument(help=".star with the true (or reference) orientations.")],
    estimate: Annotated[
        Path, typer.Argument(help=".star with the estimated orientations, same particles, same order.")
    ],
    symmetry: SymmetryOption = "C1",
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


# The search's own options (`tune`).
SpaceOption = Annotated[
    Optional[Path],
    option("--space", help="Search space YAML (default: tune.space, configs/tune_space.yaml).", key="tune.space"),
]
SamplesOption = Annotated[
    Optional[int], option("--samples", "-n", help="Configurations drawn from the space.", key="tune.num_samples")
]
MaxConcurrentOption = Annotated[
    Optional[int],
    option(help="Trials at once (default: as many as the Ray resources fit).", key="tune.max_concurrent_trials"),
]
CpusPerWorkerOption = Annotated[
    Optional[float], option(help="CPUs per Train worker (fractional is fine).", key="train.cpus_per_worker")
]
TrialEpochsOption = Annotated[
    Optional[int], option(help="Epochs of a trial that is not stopped (ASHA's max_t).", key="train.epochs")
]
GracePeriodOption = Annotated[
    Optional[int], option(help="Epochs before ASHA may stop a trial.", key="tune.grace_period")
]
ResumeOption = Annotated[
    Optional[Path], typer.Option("--resume", help="Resume the interrupted experiment in this folder.")
]


@tune_app.callback(invoke_without_command=True)
@guarded
def tune(
    ctx: typer.Context,
    config: Annotated[Optional[Path], config_option("YAML run config (the base of every trial).")] = None,
    space: SpaceOption = None,
    stores: StoresOption = None,
    samples: SamplesOption = None,
    max_concurrent: MaxConcurrentOption = None,
    workers: Annotated[Optional[int], workers_option("Ray Train workers per trial.")] = None,
    cpus_per_worker: CpusPerWorkerOption = None,
    gpu: Annotated[Optional[bool], gpu_option("One GPU per Train worker.")] = None,
    epochs: TrialEpochsOption = None,
    grace_period: GracePeriodOption = None,
    resume: ResumeOption = None,
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
    from cryoorient_ray.config import check_tune_resume
    from cryoorient_ray.stages.tune import run_tune

    if resume is not None:
        check_tune_resume({"--config": config, "--space": space, "--store": stores, "--set": sets})
        out_dir, summary, report = run_tune(None, resume, argv=sys.argv, progress=progress, resume=True)
    else:
        cfg = _load_config(tune, locals())
        out = Path(cfg.output_dir) / "tune" if out is None else out
        out_dir, summary, report = run_tune(cfg, out, argv=sys.argv, progress=progress)
    _print_tune_report(report, summary)


def _print_tune_report(report: dict, summary: dict | None = None) -> None:
    """The best trial and where the report is; with a search ``summary``, also its trials, time and failures."""
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
    if summary is not None:
        stdout.print(
            f"{summary['trials']} trials in {summary['seconds']:.0f} s ({summary['concurrent_trials']} at once)"
            + (f", {summary['errors']} failed: {summary['first_error']}" if summary["errors"] else ""),
            highlight=False,
        )


@tune_app.command("report")
@guarded
def tune_report(
    experiment: Annotated[Path, typer.Argument(help="Experiment folder of `cryoorient tune`.", show_default=False)],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Folder for the report (default: the experiment).")
    ] = None,
) -> None:
    """Summarise a search (finished or interrupted): L_DE per trial, L_DE vs n_f, the trial table, best_config.yaml."""
    from cryoorient_ray.stages.tune import write_tune_report

    _print_tune_report(write_tune_report(experiment, out))


# ----------------------------------------------------------------------------- tools


@app.command(rich_help_panel=TOOLS_PANEL)
@guarded
def orientations(
    config: OptionalConfigArg = None,
    n: Annotated[Optional[int], option("--n", "-n", help="Number of orientations.", key="simulate.n_per_map")] = None,
    sampler: Annotated[
        Optional[str], option(help="uniform (SO(3)) or euler (uniform angles).", key="simulate.orientations.sampler")
    ] = None,
    coverage: Annotated[
        Optional[str], option(help="full, half or quarter of the viewing sphere.", key="simulate.orientations.coverage")
    ] = None,
    symmetry: Annotated[
        Optional[str],
        option(
            help="Point group for the pair-distance plot: C1, Cn, Dn, T, O, I.", key="simulate.orientations.symmetry"
        ),
    ] = None,
    seed: SeedOption = None,
    out: OutOption = None,
    sets: SetOption = None,
) -> None:
    """Sample orientations; write RELION .star (rot/tilt/psi), .npy (wxyz quaternions) and a PNG."""
    from cryoorient_ray.stages.orientations import run_orientations

    _print_stages(*run_orientations(_load_config(orientations, locals()), out, argv=sys.argv))


@config_app.command("show")
@guarded
def config_show(config: OptionalConfigArg = None, sets: SetOption = None) -> None:
    """Validate a config and print it with every default filled in."""
    from cryoorient_ray.config import dump_config

    stdout.print(dump_config(_load_config(config_show, locals())), highlight=False, markup=False, end="")


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
    cfg = _load_config(cluster_check, locals())
    from cryoorient_ray.distributed.cluster import cluster_check_report

    report = cluster_check_report(cfg, address=address, local=local)
    if as_json:
        stdout.print_json(json.dumps(report))
    else:
        _print_cluster_report(report)


def _print_cluster_report(report: dict) -> None:
    """The nodes table, the totals line, the per-stage plan table and the warnings of ``cluster check``."""
    nodes = Table(title=f"Ray at {report['address']}", title_justify="left")
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
