"""Commands of this role, registered on the root ``flowerbed`` app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("simulate")(simulate)
    app.command("resume")(resume)
    app.command("report")(report)
    app.command("sweep")(sweep)
    app.command("partition")(partition)


def make_importable(folder: Path) -> None:
    """Let ``package.module:attr`` names in an experiment find modules next to its file (here and in workers)."""
    import os
    import sys

    text = str(folder)
    if text not in sys.path:
        sys.path.insert(0, text)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if text not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([text, *parts])


def simulate(
    experiment: Annotated[
        Path | None,
        typer.Argument(help="Experiment file (TOML). Default: the bundled four-hospital heart-disease federation."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a key, e.g. --set rounds=5 --set strategy.name=FedAdam."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Parent folder of the run folder.")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output; print only the run folder.")
    ] = False,
) -> None:
    """Run a simulated federation on this machine and leave a report folder."""
    from flowerbed.config_utils import find_file
    from flowerbed.experiment import load_experiment
    from flowerbed.simulations.simulate import bundled_experiment
    from flowerbed.simulations.simulate import simulate as run_simulation

    experiment = find_file(experiment) if experiment else bundled_experiment("heart")
    extra = list(overrides or [])
    if output is not None:
        extra.append(f"output={str(output)!r}")
    make_importable(experiment.resolve().parent)
    run_dir = run_simulation(load_experiment(experiment, extra), quiet=quiet)
    typer.echo(str(run_dir) if quiet else f"run folder: {run_dir}")


def resume(
    run_dir: Annotated[Path, typer.Argument(help="A simulated run's folder (runs/<name>-<time>).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Continue a simulated run from its last complete round (after a crash or kill)."""
    from flowerbed.simulations.simulate import resume_simulation

    resume_simulation(run_dir, quiet=quiet)
    typer.echo(f"run folder: {run_dir}")


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One run folder, or several to overlay.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: RUN_DIR/plots, or <parent>/overlay)."),
    ] = None,
) -> None:
    """Redraw a run's plots (PNG), or overlay several runs, and print their final metrics.

    A run folder without a completed round (every site refused, a failure before round 1) has
    nothing to draw: it is left out with its reason, so ``flowerbed report runs/<name>-*`` works.
    """
    from rich.console import Console
    from rich.table import Table

    from flowerbed.exception import RunError
    from flowerbed.simulations.research.report import final_metrics, load_run, write_report

    console = Console()
    drawable = []
    for path in run_dirs:
        why = without_rounds(path)
        if why is None:
            drawable.append(path)
        else:
            console.print(f"left out {path}: {why}", soft_wrap=True, highlight=False)
    if not drawable:
        raise RunError("none of these run folders has a completed round to report")
    run_dirs = drawable
    written = write_report(run_dirs, out)
    table = Table("run", "metric", "last round", title="final metrics")
    for path in run_dirs:
        run = load_run(path)
        for key, value in final_metrics(run).items():
            table.add_row(run.name, key, f"{value:.4g}")
    console.print(table)
    for path in written:
        console.print(f"wrote {path}")


def without_rounds(path: Path) -> str | None:
    """Why a flowerbed run folder has no round to draw (``None``: it has one, or it is not a run folder)."""
    import json

    if not (path / "experiment.json").is_file() and not (path / "summary.json").is_file():
        return None  # not a run folder: the report says what it expected
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return None
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return f"no round completed ({summary.get('stopped') or 'the run did not finish a round'})"


def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep file (TOML): base experiment, [grid].")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Sweep folder (default: <output>/<name>-<timestamp>)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate every combination, list them, run nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the summary table.")] = False,
) -> None:
    """Run an experiment over a grid of settings; write summary.csv, summary.md and overlay.png."""
    from rich.console import Console

    from flowerbed.simulations.research.sweep import load_sweep, run_sweep

    console = Console(highlight=False)
    if dry_run:
        plan = load_sweep(sweep_file)
        for index in range(len(plan.experiments)):
            console.print(f"[{index + 1}/{len(plan.experiments)}] {plan.label(index)}")
        return
    result = run_sweep(sweep_file, folder=out, progress=None if quiet else console.print)
    typer.echo(result.markdown_path.read_text())  # unwrapped, ready to paste
    console.print(f"sweep folder: {result.folder}")
    failed = [row for row in result.rows if row.error]
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(result.rows)} runs failed[/]: see summary")
        raise typer.Exit(1)


def partition(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (TOML).")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a key, e.g. --set data.partition.alpha=0.1."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write partition.csv, partition.md, partition.png here."),
    ] = None,
) -> None:
    """Show what every client of an experiment holds (sizes; label histograms for class labels); train nothing."""
    from rich.console import Console

    from flowerbed.config_utils import find_file
    from flowerbed.experiment import load_experiment
    from flowerbed.simulations.research.partition_summary import (
        summarize_sites,
        to_rich_table,
        write_partition_summary,
    )
    from flowerbed.tasks.data.catalog import load_federation

    experiment = find_file(experiment)  # relative: to the working directory, else flowerbed's bundled files
    make_importable(experiment.resolve().parent)  # a user dataset factory next to the experiment file
    config = load_experiment(experiment, overrides)
    summary = summarize_sites(load_federation(config.data, config.seed))
    console = Console(highlight=False)
    console.print(to_rich_table(summary, title=f"{config.name}: {config.data.dataset}"))
    for path in write_partition_summary(summary, out) if out is not None else []:
        console.print(f"wrote {path}")
