"""Commands of this role, registered on the root ``flowerbed`` app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("report")(report)


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One run folder, or several to overlay.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: RUN_DIR/plots, or <parent>/overlay)."),
    ] = None,
) -> None:
    """Redraw a run's plots (PNG), or overlay several runs, and print their final metrics."""
    from rich.console import Console
    from rich.table import Table

    from flowerbed.simulations.report import final_metrics, load_run, write_report

    written = write_report(run_dirs, out)
    console = Console()
    table = Table("run", "metric", "last round", title="final metrics")
    for path in run_dirs:
        run = load_run(path)
        for key, value in final_metrics(run).items():
            table.add_row(run.name, key, f"{value:.4g}")
    console.print(table)
    for path in written:
        console.print(f"wrote {path}")
