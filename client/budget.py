"""``flowerbed node budget``: what this node has spent, per dataset and per run.

A thin command over ``PrivacyLedger.summary``; ``--format json`` prints the same figures as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flowerbed.exception import NodeError


def budget_report(ledger: str | Path, delta: float = 1e-5, accountant: str = "prv") -> list[dict[str, Any]]:
    """Epsilon at ``delta`` spent on each dataset of a ledger, overall and per run.

    Raises
    ------
    NodeError
        When the ledger file does not exist.
    """
    from flowerbed.privacy.ledger import PrivacyLedger  # the accountant (Opacus, torch) only when a ledger is read

    path = Path(ledger).expanduser()
    if not path.is_file():
        raise NodeError(f"privacy ledger {path}: no such file (give the `ledger` path from the node config)")
    return PrivacyLedger(path).summary(delta, accountant)


def _when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def render(report: list[dict[str, Any]], console: Console) -> None:
    """Print a report as a rich table: one line per dataset, then one per run."""
    if not report:
        console.print("no releases recorded in this ledger")
        return
    delta, accountant = report[0]["delta"], report[0]["accountant"]
    table = Table(title=f"privacy spent (epsilon at delta = {delta:.3g}, {accountant})")
    for col in ("dataset", "run", "rounds", "steps", "epsilon", "last release"):
        right = col in ("rounds", "steps", "epsilon")
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=col not in ("dataset", "run"),
            min_width=14 if col == "dataset" else None,
            overflow="fold",
        )
    for ds in report:
        sites = f"\n({', '.join(ds['sites'])})" if ds["sites"] else ""
        table.add_row(
            f"[bold]{ds['dataset'][:12]}[/]{sites}",
            "[bold]all runs[/]",
            str(sum(r["rounds"] for r in ds["runs"])),
            str(sum(r["steps"] for r in ds["runs"])),
            f"[bold]{ds['epsilon']:.3f}[/]",
            _when(max(r["last"] for r in ds["runs"])),
        )
        for run in ds["runs"]:
            table.add_row(
                "",
                run["run_id"],
                str(run["rounds"]),
                str(run["steps"]),
                f"{run['epsilon']:.3f}",
                _when(run["last"]),
            )
    console.print(table)


def budget_command(
    ledger: Annotated[Path, typer.Option(help="The node's privacy ledger (node config `ledger`).")],
    delta: Annotated[float, typer.Option(help="Report epsilon at this delta.")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="Opacus accountant: prv or rdp.")] = "prv",
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Show the privacy budget spent on each local dataset, overall and per run."""
    report = budget_report(ledger, delta, accountant)
    if format == "json":
        typer.echo(json.dumps(report, indent=2))
    elif format == "table":
        render(report, Console())
    else:
        raise typer.BadParameter(f"--format {format!r}: use table or json")
