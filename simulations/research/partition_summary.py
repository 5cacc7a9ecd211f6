"""What each virtual client holds: sizes and label histograms, as a table and as a PNG.

Build a ``PartitionSummary`` from pooled labels and a partition (``summarize_partition``) or from
loaded sites (``summarize_sites``), then render it with ``to_rich_table``, ``to_markdown``,
``to_csv`` or ``plot_partition``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.table import Table

from flowerbed.simulations.research.plots import pyplot
from flowerbed.tasks.data.partitioners import label_histograms, label_skew

__all__ = [
    "PartitionSummary",
    "plot_partition",
    "summarize_partition",
    "summarize_sites",
    "to_csv",
    "to_markdown",
    "to_rich_table",
    "write_partition_summary",
]


class _Site(Protocol):
    name: str
    y_train: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class PartitionSummary:
    """Per-client label counts.

    Attributes
    ----------
    clients : tuple[str, ...]
        Client (site) names, one per row of ``counts``.
    classes : tuple[str, ...]
        Class labels, one per column of ``counts``.
    counts : np.ndarray
        ``int64`` array ``(clients, classes)``: how many samples of each class each client holds.
    skew : float
        Mean total-variation distance between each client's label mix and the pooled one
        (``partitioners.label_skew``): 0 for identical mixes, near 1 for disjoint classes.
    """

    clients: tuple[str, ...]
    classes: tuple[str, ...]
    counts: np.ndarray
    skew: float

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client."""
        return self.counts.sum(axis=1)

    def rows(self) -> list[list[str | int]]:
        """One row per client: name, size, then the count of every class."""
        return [
            [name, int(size), *(int(v) for v in row)]
            for name, size, row in zip(self.clients, self.sizes, self.counts, strict=True)
        ]

    def header(self) -> list[str]:
        """Column names matching ``rows``."""
        return ["client", "samples", *(f"class {c}" for c in self.classes)]


def summarize_partition(
    labels: np.ndarray, parts: Sequence[np.ndarray], names: Sequence[str] | None = None
) -> PartitionSummary:
    """Summarize a partition of ``labels``: one index array per client, as ``partition`` gives."""
    labels = np.asarray(labels)
    parts = list(parts)
    classes = np.unique(labels)
    names = list(names) if names is not None else [f"client-{i}" for i in range(len(parts))]
    if len(names) != len(parts):
        raise ValueError(f"{len(names)} names for {len(parts)} clients")
    return PartitionSummary(
        clients=tuple(names),
        classes=tuple(str(c) for c in classes),
        counts=label_histograms(labels, parts, classes),
        skew=label_skew(labels, parts),
    )


def summarize_sites(sites: Sequence[_Site]) -> PartitionSummary:
    """Summarize loaded sites (with ``name``, ``y_train``, ``y_test``): train and test labels."""
    labels = [np.concatenate([s.y_train, s.y_test]) for s in sites]
    pooled = np.concatenate(labels) if labels else np.empty(0, np.int64)
    bounds = np.cumsum([len(y) for y in labels])
    parts = [np.arange(a, b) for a, b in zip(np.r_[0, bounds[:-1]], bounds, strict=True)]
    return summarize_partition(pooled, parts, [s.name for s in sites])


def to_rich_table(summary: PartitionSummary, title: str | None = None) -> Table:
    """A ``rich`` table for the terminal, with a total row and the label-skew statistic."""
    table = Table(
        title=title,
        caption=f"label skew (mean TV distance to the pooled mix): {summary.skew:.3f}",
    )
    table.add_column("client", no_wrap=True)
    table.add_column("samples", justify="right", no_wrap=True)
    for cls in summary.classes:  # class labels alone keep wide tables on one screen
        table.add_column(cls, justify="right")
    for row in summary.rows():
        table.add_row(*(str(v) for v in row))
    table.add_section()
    table.add_row("total", *(str(int(v)) for v in (summary.sizes.sum(), *summary.counts.sum(0))))
    return table


def to_markdown(summary: PartitionSummary) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned) followed by the skew."""
    header = summary.header()
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in summary.rows()]
    lines.append("")
    lines.append(f"Label skew (mean total-variation distance to the pooled mix): {summary.skew:.3f}")
    return "\n".join(lines) + "\n"


def to_csv(summary: PartitionSummary) -> str:
    """CSV text: a header, then one row per client."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(summary.header())
    writer.writerows(summary.rows())
    return buffer.getvalue()


def plot_partition(summary: PartitionSummary, path: str | Path, title: str | None = None) -> Path:
    """Draw one stacked bar per client (a segment per class) and save it as a PNG at ``path``."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_clients, n_classes = summary.counts.shape
    width = min(16.0, max(6.0, 0.35 * n_clients + 2.5))
    fig, ax = plt.subplots(figsize=(width, 4.2), constrained_layout=True)
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
    x = np.arange(n_clients)
    bottom = np.zeros(n_clients)
    for k, cls in enumerate(summary.classes):
        ax.bar(x, summary.counts[:, k], bottom=bottom, color=cmap(k % cmap.N), label=cls, width=0.8)
        bottom += summary.counts[:, k]
    ax.set_xticks(x, summary.clients, rotation=90 if n_clients > 8 else 0, fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(title or f"Partition: {n_clients} clients, label skew {summary.skew:.2f}")
    ax.legend(
        title="class",
        fontsize=7,
        ncols=1 if n_classes <= 12 else 2,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_partition_summary(summary: PartitionSummary, folder: str | Path) -> list[Path]:
    """Write ``partition.csv``, ``partition.md`` and ``partition.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "partition.csv").write_text(to_csv(summary))
    (folder / "partition.md").write_text(to_markdown(summary))
    png = plot_partition(summary, folder / "partition.png")
    return [folder / "partition.csv", folder / "partition.md", png]
