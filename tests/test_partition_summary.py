"""Partition summaries: counts match the partition, each rendering carries them, a real PNG."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from rich.console import Console
from sklearn.datasets import load_digits

from flowerbed.experiment import PartitionConfig
from flowerbed.simulations.research.partition_summary import (
    plot_partition,
    summarize_partition,
    summarize_sites,
    to_csv,
    to_markdown,
    to_rich_table,
)
from flowerbed.tasks.data.partitioners import label_skew, partition
from flowerbed.tasks.task import DataSchema, SiteData


def _digits_summary(alpha: float = 0.3, clients: int = 12):
    labels = load_digits().target
    parts = partition(labels, PartitionConfig(kind="dirichlet", num_clients=clients, alpha=alpha), 0)
    return labels, parts, summarize_partition(labels, parts)


def test_counts_match_the_partition() -> None:
    labels, parts, summary = _digits_summary()
    assert summary.counts.shape == (12, 10)
    assert summary.sizes.tolist() == [p.size for p in parts]
    assert (summary.counts.sum(axis=0) == np.bincount(labels)).all()
    for c, idx in enumerate(parts):
        assert summary.counts[c, 3] == int((labels[idx] == 3).sum())
    assert summary.skew == label_skew(labels, parts)
    assert summary.clients[0] == "client-0" and summary.classes[9] == "9"


def test_csv_and_markdown_carry_every_count() -> None:
    _, _, summary = _digits_summary(clients=5)
    rows = list(csv.reader(io.StringIO(to_csv(summary))))
    assert rows[0] == ["client", "samples", *(f"class {k}" for k in range(10))]
    assert [int(r[1]) for r in rows[1:]] == summary.sizes.tolist()
    assert [[int(v) for v in r[2:]] for r in rows[1:]] == summary.counts.tolist()
    md = to_markdown(summary).splitlines()
    assert md[0].startswith("| client | samples | class 0")
    assert md[1].startswith("|:---|---:|")
    assert len([line for line in md if line.startswith("| client-")]) == 5
    assert md[-1].endswith(f"{summary.skew:.3f}")


def test_rich_table_has_a_total_row() -> None:
    _, _, summary = _digits_summary(clients=4)
    console = Console(width=200, record=True)
    console.print(to_rich_table(summary, title="digits"))
    text = console.export_text()
    assert "total" in text and str(int(summary.sizes.sum())) in text
    assert "label skew" in text


def test_png_is_written(tmp_path: Path) -> None:
    from matplotlib.image import imread

    _, _, summary = _digits_summary(clients=20)
    path = plot_partition(summary, tmp_path / "sub" / "partition.png")
    height, width, _ = imread(path).shape
    assert height > 300 and width > 600


def test_summarize_sites_counts_train_and_test_labels() -> None:
    schema = DataSchema("tabular", (1,), 3)
    x = np.zeros((3, 1), np.float32)
    sites = [
        SiteData("a", x, np.array([0, 0, 1]), x[:1], np.array([2]), schema),
        SiteData("b", x[:2], np.array([1, 1]), x[:1], np.array([1]), schema),
    ]
    summary = summarize_sites(sites)
    assert summary.clients == ("a", "b")
    assert summary.counts.tolist() == [[2, 1, 1], [0, 3, 0]]


def test_partition_command_shows_and_writes_the_split(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flowerbed.cli import _register, app

    _register()
    experiment = Path(__file__).resolve().parents[1] / "simulations/experiments/digits_dirichlet.toml"
    args = ["partition", str(experiment), "--set", "data.partition.num_clients=5"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "1797" in result.output
    rows = list(csv.reader((tmp_path / "partition.csv").open()))
    assert len(rows) == 6 and sum(int(r[1]) for r in rows[1:]) == 1797
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
