"""Federated model against local-only models: the figures a hospital asks for first.

Every figure is the task's ``primary_metric`` (``Task.primary_metric``: accuracy, a C-index, a
loss, ...), ranked by ``Task.greater_is_better``. Where a figure is missing (no central
evaluation, a metric the task does not compute, NaN), the comparison says so and gives no verdict
rather than a wrong one.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["better", "comparison_summary", "metric_value", "print_comparison"]


def metric_value(metrics: dict[str, Any] | None, name: str) -> float | None:
    """``metrics[name]`` as a finite float, else ``None`` (missing, NaN or not a number)."""
    value = (metrics or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def better(a: float, b: float, greater_is_better: bool) -> bool:
    """Whether ``a`` is strictly better than ``b`` (a tie is not better)."""
    return a > b if greater_is_better else a < b


def comparison_summary(summary: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """Per-site and pooled test figures of the federated model beside the local-only models.

    Parameters
    ----------
    summary : dict
        The run's ``summary.json``: ``final.sites`` (each site's test split) and ``final.central``
        (the pooled test set, with ``evaluate.central = true``).
    baselines : dict
        ``local_only_baselines``'s result; its ``metric`` and ``greater_is_better`` (default
        ``"accuracy"``, ``True``) choose the figure and the direction.

    Returns
    -------
    dict
        ``metric``, ``greater_is_better``, ``federated`` (``sites``, ``pooled``), ``local_only``,
        ``local_only_mean_pooled``, ``federated_beats_local_mean`` (``None`` when a figure is
        missing), ``best`` (the best model on the pooled test set, or ``None``), ``sites_won`` and
        ``sites_compared`` (own test splits where both figures exist), and ``verdict`` (one line).
    """
    metric = str(baselines.get("metric", "accuracy"))
    greater = bool(baselines.get("greater_is_better", True))
    final = summary.get("final", {})
    fed_sites = {s: metric_value(m, metric) for s, m in (final.get("sites") or {}).items()}
    personal = {s: metric_value(m, f"personal-{metric}") for s, m in (final.get("sites") or {}).items()}
    central = final.get("central") or {}
    fed_pooled = metric_value(central, metric)
    local: dict[str, dict[str, float | None]] = baselines["sites"]
    mean = baselines.get("mean_pooled")
    mean = None if mean is None or not math.isfinite(mean) else float(mean)

    beats = None if fed_pooled is None or mean is None else better(fed_pooled, mean, greater)
    candidates = {f"{s} only": r.get("pooled") for s, r in local.items()}
    candidates = {"federated": fed_pooled, **candidates}
    scored = {k: v for k, v in candidates.items() if v is not None and math.isfinite(v)}
    best = None
    if fed_pooled is not None and scored:
        name = (max if greater else min)(scored, key=lambda k: scored[k])
        best = {"model": name, "value": scored[name]}
    pairs = [(fed_sites.get(s), r.get("own")) for s, r in local.items()]
    pairs = [(f, o) for f, o in pairs if f is not None and o is not None]
    won = sum(better(f, o, greater) for f, o in pairs)

    if beats is None:
        verdict = f"pooled test set ({metric}): no verdict: {_why_missing(metric, central, fed_pooled, baselines)}"
    else:
        verb = "beats" if beats else "does NOT beat"
        direction = "higher" if greater else "lower"
        verdict = (
            f"pooled test set ({metric}, {direction} is better): federated {fed_pooled:.3f} {verb} "
            f"the mean of the local-only models {mean:.3f}"
        )
    return {
        "metric": metric,
        "greater_is_better": greater,
        "federated": {"sites": fed_sites, "pooled": fed_pooled},
        # each site's own personalized model on its own test split (personalization), where there is one
        "personalized": {s: v for s, v in personal.items() if v is not None},
        "local_only": local,
        "local_only_mean_pooled": mean,
        "federated_beats_local_mean": beats,
        "best": best,
        "sites_won": won,
        "sites_compared": len(pairs),
        "verdict": verdict,
    }


def print_comparison(comparison: dict[str, Any], console: Console) -> None:
    """Rows: test sets; columns: the federated model, personalized ones, each local-only model; then the verdict."""
    metric = comparison.get("metric", "accuracy")
    greater = comparison.get("greater_is_better", True)
    local = comparison["local_only"]
    direction = "higher" if greater else "lower"
    table = Table(title=f"Test {metric} ({direction} is better): federated model vs. models trained on one site only")
    table.add_column("test set")
    table.add_column("federated", justify="right", style="bold")
    for site in local:
        table.add_column(f"{site} only", justify="right")
    personalized = comparison.get("personalized") or {}
    if personalized:
        table.add_column("personalized", justify="right")
    fed = comparison["federated"]
    for site in local:
        row = [site, _fmt(fed["sites"].get(site))]
        row += [_fmt(personalized.get(site))] if personalized else []
        row += [_fmt(local[s].get("own")) if s == site else "" for s in local]
        table.add_row(*row)
    pooled_row = ["pooled (all sites)", _fmt(fed["pooled"]), *(["-"] if personalized else [])]
    table.add_row(*pooled_row, *[_fmt(local[s].get("pooled")) for s in local])
    console.print(table)
    console.print(comparison["verdict"])
    best = comparison.get("best")
    if best:
        console.print(f"best on the pooled test set ({metric}): {best['model']} {best['value']:.3f}")
    if comparison.get("sites_compared"):
        console.print(
            f"own test splits ({metric}): the federated model is better than the site's own model at "
            f"{comparison['sites_won']} of {comparison['sites_compared']} sites"
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _why_missing(metric: str, central: dict[str, Any], fed_pooled: float | None, baselines: dict[str, Any]) -> str:
    """Which figure is missing and what to do about it."""
    if fed_pooled is None:
        if not central:
            return (
                f"the federated model has no {metric} on the pooled test set (evaluate.central = false); "
                "set evaluate.central = true for a verdict"
            )
        if metric not in central:
            found = ", ".join(k for k in central if k != "num-examples") or "none"
            return (
                f"the central evaluation has no {metric!r} (it has: {found}); set the task's primary_metric "
                "to a key of its metrics_fn result, or 'loss'"
            )
        return f"the federated model's {metric} on the pooled test set is not a finite number ({central[metric]!r})"
    missing = list(baselines.get("missing") or [])
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        return "a local-only model has no value: " + "; ".join(missing[:3]) + more
    return f"the local-only models' mean {metric} on the pooled test set is missing"
