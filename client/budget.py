"""``flowerbed node budget``: the privacy budget of each local dataset, what was spent, and what is left.

A thin command over ``PrivacyLedger.summary``. The budget is the node's own (``budget-epsilon`` in
its configuration): read from the node config that ``flowerbed node start`` wrote in its state
folder (``--kit`` or ``--state``), or given with ``--budget-epsilon``. ``--format json`` prints the
same figures as JSON.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flowerbed.exception import NodeError

DEFAULT_DELTA = 1e-5
NODE_CONFIG = "node-config.toml"


def node_config_file(kit: Path | None = None, state: Path | None = None) -> Path | None:
    """The node config ``flowerbed node start`` wrote: in ``state``, else in the kit's ``state`` folder."""
    folder = state if state is not None else (kit / "state" if kit is not None else None)
    return None if folder is None else folder.expanduser() / NODE_CONFIG


def read_node_config(path: Path | None) -> dict[str, Any]:
    """The node config's keys (``{}`` without a file).

    Raises
    ------
    NodeError
        When the file is named but missing or not TOML.
    """
    if path is None:
        return {}
    if not path.is_file():
        raise NodeError(
            f"{path}: no node config here; start the node once with `flowerbed node start` (it writes it), "
            "or give --ledger and --budget-epsilon"
        )
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"{path}: not a node config ({exc})") from None


def budget_report(
    ledger: str | Path,
    delta: float = DEFAULT_DELTA,
    accountant: str = "prv",
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """Epsilon at ``delta`` spent on each dataset of a ledger, overall and per run; with ``budget``, what is left.

    Each dataset's entry adds ``budget`` (the node's ``budget-epsilon``, or ``None``) and ``left``
    (``budget`` minus what was spent, at least 0; ``None`` without a budget).

    Raises
    ------
    NodeError
        When the ledger file does not exist.
    """
    from flowerbed.privacy.ledger import PrivacyLedger  # the accountant (Opacus, torch) only when a ledger is read

    path = Path(ledger).expanduser()
    if not path.is_file():
        raise NodeError(f"privacy ledger {path}: no such file (give the `ledger` path from the node config)")
    report = PrivacyLedger(path).summary(delta, accountant)
    for dataset in report:
        dataset["budget"] = budget
        dataset["left"] = None if budget is None else max(0.0, budget - dataset["epsilon"])
    return report


def _when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def render(report: list[dict[str, Any]], console: Console) -> None:
    """Print a report as a rich table: one line per dataset (spent, budget, left), then one per run."""
    if not report:
        console.print("no releases recorded in this ledger")
        return
    delta, accountant = report[0]["delta"], report[0]["accountant"]
    table = Table(title=f"privacy budget and spend per dataset (epsilon at delta = {delta:.3g}, {accountant})")
    for col in ("dataset", "run", "rounds", "spent", "budget", "left", "last release"):
        right = col in ("rounds", "spent", "budget", "left")
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=right,
            min_width=12 if col == "dataset" else None,
            overflow="fold",
        )
    for ds in report:
        sites = f"\n({', '.join(ds['sites'])})" if ds["sites"] else ""
        budget, left = ds.get("budget"), ds.get("left")
        table.add_row(
            f"[bold]{ds['dataset'][:12]}[/]{sites}",
            "[bold]all runs[/]",
            str(sum(r["rounds"] for r in ds["runs"])),
            f"[bold]{ds['epsilon']:.3f}[/]",
            "not set" if budget is None else f"{budget:.3f}",
            "-" if left is None else f"[bold]{left:.3f}[/]",
            _when(max(r["last"] for r in ds["runs"])),
        )
        for run in ds["runs"]:
            spent = f"{run['epsilon']:.3f}"
            table.add_row("", run["run_id"], str(run["rounds"]), spent, "", "", _when(run["last"]))
    console.print(table)
    if all(ds.get("budget") is None for ds in report):
        console.print(
            "no budget set: give --budget-epsilon, or --kit/--state of a node started with --budget-epsilon "
            "(a node without a budget never refuses a release)"
        )


def budget_command(
    ledger: Annotated[
        Path | None, typer.Option(help="The node's privacy ledger (node config `ledger`; default: the node config's).")
    ] = None,
    kit: Annotated[
        Path | None, typer.Option("--kit", help="The node's kit: read its node config (KIT/state/node-config.toml).")
    ] = None,
    state: Annotated[
        Path | None, typer.Option("--state", help="The node's state folder (node start --state): read its node config.")
    ] = None,
    budget_epsilon: Annotated[
        float | None,
        typer.Option("--budget-epsilon", min=0, help="The budget per dataset (default: the node config's)."),
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Report epsilon at this delta (default: the node config's, else 1e-5).")
    ] = None,
    accountant: Annotated[
        str | None, typer.Option(help="Opacus accountant: prv or rdp (default: the node config's, else prv).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Show each local dataset's privacy budget, what was spent (overall and per run) and what is left."""
    if format not in ("table", "json"):
        raise typer.BadParameter(f"--format {format!r}: use table or json")
    config = read_node_config(node_config_file(kit, state))
    path = ledger or (Path(config["ledger"]) if config.get("ledger") else None)
    if path is None:
        raise NodeError(
            "give --ledger PATH (the node config's `ledger`), or --kit/--state of a node started with --ledger"
        )
    budget = budget_epsilon if budget_epsilon is not None else config.get("budget-epsilon")
    report = budget_report(
        path,
        delta if delta is not None else float(config.get("budget-delta", DEFAULT_DELTA)),
        accountant or str(config.get("budget-accountant", "prv")),
        None if budget is None else float(budget),
    )
    if format == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report, Console())
