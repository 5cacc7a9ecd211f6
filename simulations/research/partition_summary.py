"""What each virtual client holds: sizes and label histograms, as a table and as a PNG.

Build a ``PartitionSummary`` from pooled labels and a partition (``summarize_partition``) or from
loaded sites (``summarize_sites``), then render it with ``to_rich_table``, ``to_markdown``,
``to_csv`` or ``plot_partition``. Targets that are not class labels (``DataSchema.target =
"values"``: a regression value, survival time and event) get sizes only: no label histogram, no
label skew, and every rendering says so.
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
from flowerbed.tasks.data.partitioners import is_class_labels, label_histograms, label_skew

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
    """Per-client sizes and, for class labels, label counts.

    Attributes
    ----------
    clients : tuple[str, ...]
        Client (site) names, one per row of ``counts``.
    classes : tuple[str, ...]
        Class labels, one per column of ``counts``; empty when the targets are not class labels.
    counts : np.ndarray
        ``int64`` array ``(clients, classes)``: how many samples of each class each client holds.
    skew : float or None
        Mean total-variation distance between each client's label mix and the pooled one
        (``partitioners.label_skew``): 0 for identical mixes, near 1 for disjoint classes.
        ``None`` when the targets are not class labels.
    client_sizes : np.ndarray or None (default: None)
        Samples per client, when there are no label counts to add up (sizes-only summaries).
    note : str (default: "")
        Why the summary has sizes only (empty for class labels).
    """

    clients: tuple[str, ...]
    classes: tuple[str, ...]
    counts: np.ndarray
    skew: float | None
    client_sizes: np.ndarray | None = None
    note: str = ""

    @property
    def by_label(self) -> bool:
        """Whether the summary counts class labels (else it holds sizes only)."""
        return self.skew is not None

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client."""
        if self.client_sizes is not None:
            return self.client_sizes
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
    labels: np.ndarray, parts: Sequence[np.ndarray], names: Sequence[str] | None = None, *, target: str = "class"
) -> PartitionSummary:
    """Summarize a partition of ``labels``: one index array per client, as ``partition`` gives.

    ``target`` is the data's ``DataSchema.target``; with ``"values"``, or targets that cannot be
    class labels (several columns, fractional floats), the summary holds sizes only.
    """
    labels = np.asarray(labels)
    parts = list(parts)
    names = list(names) if names is not None else [f"client-{i}" for i in range(len(parts))]
    if len(names) != len(parts):
        raise ValueError(f"{len(names)} names for {len(parts)} clients")
    note = _sizes_only_reason(labels, target)
    if note:
        return _sizes_only(names, [len(p) for p in parts], note)
    classes = np.unique(labels)
    return PartitionSummary(
        clients=tuple(names),
        classes=tuple(str(c) for c in classes),
        counts=label_histograms(labels, parts, classes),
        skew=label_skew(labels, parts),
    )


def summarize_sites(sites: Sequence[_Site]) -> PartitionSummary:
    """Summarize loaded sites (with ``name``, ``y_train``, ``y_test``): train and test labels.

    Sites whose ``schema.target`` is ``"values"`` (or whose targets cannot be class labels) get
    sizes only.
    """
    names = [s.name for s in sites]
    targets = {getattr(getattr(s, "schema", None), "target", "class") for s in sites}
    target = "class" if targets <= {"class"} else "values"
    sizes = [len(s.y_train) + len(s.y_test) for s in sites]
    try:
        labels = [np.concatenate([np.asarray(s.y_train), np.asarray(s.y_test)]) for s in sites]
        pooled = np.concatenate(labels) if labels else np.empty(0, np.int64)
    except ValueError:  # targets of different shapes: no common label set
        note = "sizes only: the sites' targets differ in shape, so there is no label histogram or label skew"
        return _sizes_only(names, sizes, note)
    bounds = np.cumsum(sizes)
    parts = [np.arange(a, b) for a, b in zip(np.r_[0, bounds[:-1]], bounds, strict=True)]
    return summarize_partition(pooled, parts, names, target=target)


def _sizes_only_reason(labels: np.ndarray, target: str) -> str:
    """Why ``labels`` get no histogram (empty when they are class labels)."""
    if target != "class":
        return (
            f"sizes only: the targets are {target} (DataSchema.target = {target!r}), "
            "so there is no label histogram or label skew"
        )
    if not is_class_labels(labels):
        shape = "x".join(str(d) for d in labels.shape)
        return (
            f"sizes only: the targets ({labels.dtype}, shape {shape}) are not one class label per row, so there is "
            "no label histogram or label skew; set DataSchema(target='values') for such targets"
        )
    return ""


def _sizes_only(names: Sequence[str], sizes: Sequence[int], note: str) -> PartitionSummary:
    return PartitionSummary(
        clients=tuple(names),
        classes=(),
        counts=np.zeros((len(names), 0), np.int64),
        skew=None,
        client_sizes=np.asarray(sizes, dtype=np.int64),
        note=note,
    )


def to_rich_table(summary: PartitionSummary, title: str | None = None) -> Table:
    """A ``rich`` table for the terminal, with a total row and the label-skew statistic (or why there is none)."""
    # a sizes-only table is two columns wide: widen it so that its note reads as two lines, not ten
    table = Table(title=title, caption=_caption(summary), min_width=None if summary.by_label else 64)
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
    """A GitHub-flavoured Markdown table (numbers right-aligned) followed by the skew (or why there is none)."""
    header = summary.header()
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in summary.rows()]
    lines.append("")
    if summary.skew is not None:
        lines.append(f"Label skew (mean total-variation distance to the pooled mix): {summary.skew:.3f}")
    else:
        lines.append(summary.note[:1].upper() + summary.note[1:] + ".")
    return "\n".join(lines) + "\n"


def _caption(summary: PartitionSummary) -> str:
    if summary.skew is None:
        return summary.note
    return f"label skew (mean TV distance to the pooled mix): {summary.skew:.3f}"


def to_csv(summary: PartitionSummary) -> str:
    """CSV text: a header, then one row per client."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(summary.header())
    writer.writerows(summary.rows())
    return buffer.getvalue()


def plot_partition(summary: PartitionSummary, path: str | Path, title: str | None = None) -> Path:
    """Draw one stacked bar per client (a segment per class; one plain bar for sizes only); save a PNG at ``path``."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_clients, n_classes = summary.counts.shape
    width = min(16.0, max(6.0, 0.35 * n_clients + 2.5))
    fig, ax = plt.subplots(figsize=(width, 4.2), constrained_layout=True)
    x = np.arange(n_clients)
    if summary.skew is None:
        ax.bar(x, summary.sizes, color="tab:blue", width=0.8)
        default_title = f"Partition: {n_clients} clients (sizes only: targets are not class labels)"
    else:
        cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
        bottom = np.zeros(n_clients)
        for k, cls in enumerate(summary.classes):
            ax.bar(x, summary.counts[:, k], bottom=bottom, color=cmap(k % cmap.N), label=cls, width=0.8)
            bottom += summary.counts[:, k]
        ax.legend(
            title="class",
            fontsize=7,
            ncols=1 if n_classes <= 12 else 2,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
        default_title = f"Partition: {n_clients} clients, label skew {summary.skew:.2f}"
    ax.set_xticks(x, summary.clients, rotation=90 if n_clients > 8 else 0, fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(title or default_title)
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
