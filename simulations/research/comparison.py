"""Federated model against local-only models: the figures a hospital asks for first."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def comparison_summary(summary: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """Per-site and pooled test accuracy of the federated model beside the local-only models."""
    final = summary.get("final", {})
    fed_sites = {s: m.get("accuracy") for s, m in final.get("sites", {}).items()}
    fed_pooled = final.get("central", {}).get("accuracy")
    return {
        "federated": {"sites": fed_sites, "pooled": fed_pooled},
        "local_only": baselines["sites"],
        "local_only_mean_pooled": baselines["mean_pooled"],
        "federated_beats_local_mean": fed_pooled is not None and fed_pooled > baselines["mean_pooled"],
    }


def print_comparison(comparison: dict[str, Any], console: Console) -> None:
    """A table: rows are test sets, columns the federated model and each local-only model."""
    local = comparison["local_only"]
    table = Table(title="Test accuracy: federated model vs. models trained on one site only")
    table.add_column("test set")
    table.add_column("federated", justify="right", style="bold")
    for site in local:
        table.add_column(f"{site} only", justify="right")
    fed = comparison["federated"]
    for site in local:
        own = fed["sites"].get(site)
        row = [site, f"{own:.3f}" if own is not None else "-"]
        row += [f"{local[s]['own']:.3f}" if s == site else "" for s in local]
        table.add_row(*row)
    pooled = fed["pooled"]
    table.add_row(
        "pooled (all sites)",
        f"{pooled:.3f}" if pooled is not None else "-",
        *[f"{local[s]['pooled']:.3f}" for s in local],
    )
    console.print(table)
    verdict = "beats" if comparison["federated_beats_local_mean"] else "does NOT beat"
    console.print(
        f"pooled test set: federated {pooled if pooled is None else f'{pooled:.3f}'} {verdict} the mean of the "
        f"local-only models {comparison['local_only_mean_pooled']:.3f}"
    )
