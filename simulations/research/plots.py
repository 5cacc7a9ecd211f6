"""PNG line charts for reports: metrics per round, one panel per metric, one line per series.

Plotting knows nothing about run folders: every function takes plain series,
``{panel title: {line label: (rounds, values)}}``, and writes one PNG (matplotlib's Agg backend, so
no display is needed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Series", "axis_label", "plot_panels", "pyplot", "quantile_band"]

Series = tuple[Sequence[float], Sequence[float]]
"""``(rounds, values)`` of one line."""

_MAX_LEGEND = 12


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (headless, deterministic PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Units of the figures reports draw, by metric name (anything else is labelled by its name).
UNITS = {
    "accuracy": "accuracy (fraction of patients, 0-1)",
    "loss": "loss (the task's loss per patient)",
    "train-loss": "training loss (the task's loss per patient)",
    "epsilon": "epsilon (cumulative, at the budget's delta)",
    "participants": "sites that replied",
}


def axis_label(panel: str) -> str:
    """The y-axis label of a panel: its metric with its unit (``"central accuracy"`` -> accuracy, 0-1)."""
    for name in sorted(UNITS, key=len, reverse=True):
        if panel == name or panel.endswith(f" {name}") or panel.startswith(f"{name} "):
            return UNITS[name]
    return panel.split(" ")[-1]


def quantile_band(lines: Mapping[str, Series], low: float = 0.1, high: float = 0.9) -> dict[str, list[float]]:
    """Per round across lines: ``rounds``, ``median``, the ``low`` and ``high`` quantiles, ``count`` of values."""
    by_round: dict[float, list[float]] = {}
    for rounds, values in lines.values():
        for r, v in zip(rounds, values, strict=True):
            by_round.setdefault(float(r), []).append(float(v))
    xs = sorted(by_round)
    out: dict[str, list[float]] = {"rounds": xs, "median": [], "low": [], "high": [], "count": []}
    for x in xs:
        values = sorted(by_round[x])
        out["median"].append(_quantile(values, 0.5))
        out["low"].append(_quantile(values, low))
        out["high"].append(_quantile(values, high))
        out["count"].append(float(len(values)))
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    position = q * (len(values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(values) - 1)
    return values[below] + (values[above] - values[below]) * (position - below)


def plot_panels(
    panels: Mapping[str, Mapping[str, Series]],
    path: str | Path,
    *,
    title: str | None = None,
    highlight: str | None = None,
    ncols: int = 3,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Draw one panel per metric and save the figure as a PNG.

    Parameters
    ----------
    panels : Mapping[str, Mapping[str, Series]]
        Panel title (e.g. ``"central accuracy"``) to lines (label to ``(rounds, values)``).
    path : str or Path
        Where the PNG goes; parent folders are created.
    title : str or None (default: None)
        The figure's title.
    highlight : str or None (default: None)
        A line label drawn thick and black in every panel (e.g. ``"max"`` over per-site lines).
    ncols : int (default: 3)
        Panels per row.
    references : Mapping[str, Mapping[str, float]] or None (default: None)
        Per panel, horizontal dashed lines (label to value), e.g. local-only models' figures.

    Returns
    -------
    Path
        ``path``. Past 12 lines in a panel they are drawn as their median per round with a band
        from the 10th to the 90th percentile (and the highlighted line on top). Every axis is
        labelled (``axis_label``).
    """
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(panels) or ["(no metrics recorded)"]
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, names, strict=False):
        lines = panels.get(name, {})
        many = len(lines) > _MAX_LEGEND
        if many:
            band = quantile_band({k: v for k, v in lines.items() if k != highlight})
            ax.fill_between(band["rounds"], band["low"], band["high"], alpha=0.25, label="10th-90th percentile")
            ax.plot(band["rounds"], band["median"], linewidth=1.6, label=f"median of {len(lines)} lines")
        for label, (rounds, values) in lines.items():
            if label == highlight:
                ax.plot(rounds, values, color="black", linewidth=2.2, label=label, zorder=3)
            elif not many:
                ax.plot(rounds, values, marker="o", markersize=3, linewidth=1.4, label=label)
        for label, value in ((references or {}).get(name) or {}).items():
            ax.axhline(value, linestyle="--", linewidth=1.0, alpha=0.8, color="grey")
            ax.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=6, va="bottom")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(axis_label(name), fontsize=8)
        ax.grid(alpha=0.3)
        if _all_integers(r for rounds, _ in lines.values() for r in rounds):
            ax.xaxis.get_major_locator().set_params(integer=True)
        if _all_integers(v for _, values in lines.values() for v in values):
            ax.yaxis.get_major_locator().set_params(integer=True)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif many or len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _all_integers(values: Iterable[float]) -> bool:
    return all(float(v).is_integer() for v in values)
