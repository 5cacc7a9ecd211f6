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

__all__ = ["Series", "plot_panels", "pyplot"]

Series = tuple[Sequence[float], Sequence[float]]
"""``(rounds, values)`` of one line."""

_MAX_LEGEND = 12


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (headless, deterministic PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_panels(
    panels: Mapping[str, Mapping[str, Series]],
    path: str | Path,
    *,
    title: str | None = None,
    highlight: str | None = None,
    ncols: int = 3,
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

    Returns
    -------
    Path
        ``path``. Past 12 lines in a panel the legend gives way to a note with the count.
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
        for label, (rounds, values) in lines.items():
            if label == highlight:
                ax.plot(rounds, values, color="black", linewidth=2.2, label=label, zorder=3)
            elif many:
                ax.plot(rounds, values, marker="o", markersize=2, linewidth=0.8, alpha=0.55)
            else:
                ax.plot(rounds, values, marker="o", markersize=3, linewidth=1.4, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if _all_integers(r for rounds, _ in lines.values() for r in rounds):
            ax.xaxis.get_major_locator().set_params(integer=True)
        if _all_integers(v for _, values in lines.values() for v in values):
            ax.yaxis.get_major_locator().set_params(integer=True)
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif many:
            note = f"{len(lines)} lines" + (f"; {highlight} in black" if highlight in lines else "")
            ax.text(0.02, 0.97, note, ha="left", va="top", fontsize=7, transform=ax.transAxes)
            if highlight in lines:
                ax.legend(fontsize=7)
        elif len(lines) > 1:
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
