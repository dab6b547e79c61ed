"""The ``cryoorient`` command line (typer). Thin: parse options, load config, call pipeline.

Bad input (a :class:`~cryoorient_ray.errors.CryoOrientError`) prints one red line on stderr
and exits with code 1. ``--verbose`` turns on debug logging and full tracebacks.
"""

from __future__ import annotations

import functools
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


def _fail(message: str) -> None:
    stderr.print(f"[bold red]Error:[/bold red] {message}", soft_wrap=True, highlight=False, markup=True)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input into one error line + exit 1; unexpected errors too, unless --verbose."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CryoOrientError as exc:
            _fail(str(exc).replace("[", "\\["))
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
                f"internal error: {type(exc).__name__}: {exc} (re-run with --verbose for the traceback)".replace(
                    "[", "\\["
                )
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
            r.name, f"[{style}]{r.status}[/{style}]", f"{r.seconds:.2f}" if r.status == "done" else "", detail
        )
    stdout.print(table)


# ----------------------------------------------------------------------------- pipeline


@app.command(rich_help_panel=PIPELINE_PANEL)
@guarded
def run(config: ConfigArg, out: OutOption = None, seed: SeedOption = None, sets: SetOption = None) -> None:
    """Run the whole pipeline from one config: map → projections → distances → orientations → volume."""
    from cryoorient_ray.config import load_config
    from cryoorient_ray.pipeline import SUMMARY_NAME, run_pipeline

    cfg = load_config(config, {"seed": seed}, sets)
    out_dir, results = run_pipeline(cfg, out, argv=sys.argv)
    _print_stages(out_dir, results)
    missing = [r.name for r in results if r.status != "done"]
    if missing:
        stdout.print(f"[dim]Not in cryoorient_ray {__version__} yet: {', '.join(missing)}.[/dim]")
    stdout.print(f"Summary: {out_dir / SUMMARY_NAME}")


def _not_yet(stage: str) -> Callable[..., None]:
    def command(ctx: typer.Context) -> None:
        raise CryoOrientError(f"'cryoorient {stage}' is not available in cryoorient_ray {__version__} yet")

    command.__name__ = stage
    return command


_COMING = {
    "simulate": "Simulate projections of density maps (orientations, shifts, CTF, noise) into a sharded Zarr store.",
    "train": "Train the Siamese distance network data-parallel with Ray Train.",
    "tune": "Search the architecture and n_f with Ray Tune.",
    "recover": "Recover orientations from learned distances on a sparse pair graph with Ray actors.",
    "align": "Align recovered orientations to the truth: E_OR (O(4)) and O(3)+hand registration error.",
    "reconstruct": "Reconstruct a volume from projections and orientations; FSC and resolution.",
}
for _stage, _help in _COMING.items():
    app.command(
        name=_stage,
        help=f"{_help} [dim](not in this version yet)[/dim]",
        rich_help_panel=PIPELINE_PANEL,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(guarded(_not_yet(_stage)))


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
    from cryoorient_ray.pipeline import run_orientations

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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
