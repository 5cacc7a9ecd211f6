"""Targets that are not class labels, and metrics that are not accuracy (issue 13, item 4).

Label-skew partitions refuse float targets by name, row-count partitions and the partition summary
take them, and local baselines and the comparison rank by the task's primary metric.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from flowerbed.exception import ConfigError
from flowerbed.experiment import PartitionConfig, load_experiment
from flowerbed.simulations.research.comparison import comparison_summary, print_comparison
from flowerbed.simulations.research.partition_summary import (
    plot_partition,
    summarize_partition,
    summarize_sites,
    to_csv,
    to_markdown,
    to_rich_table,
)
from flowerbed.tasks.data.partitioners import label_histograms, partition

from .conftest import ROOT

SURVIVAL = ROOT / "docs" / "examples" / "survival" / "survival.toml"


def _survival_targets(n: int = 90) -> np.ndarray:
    """``[n, 2]`` floats: survival time and whether the event was seen, as the survival example has."""
    rng = np.random.default_rng(0)
    return np.stack([rng.exponential(1.0, n), rng.integers(0, 2, n)], axis=1).astype(np.float32)


def _text(renderable: object) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def survival_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's modules importable, and sys.path / PYTHONPATH restored afterwards."""
    monkeypatch.setattr(sys, "path", [str(SURVIVAL.parent), *sys.path])
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize("kind", ["dirichlet", "pathological"])
def test_label_skew_partitions_refuse_values_by_name(kind: str) -> None:
    y = _survival_targets()
    with pytest.raises(ConfigError) as declared:
        partition(y, PartitionConfig(kind=kind, num_clients=3), 0, target="values")
    message = str(declared.value)
    assert f"data.partition.kind = {kind!r} splits by class label" in message
    assert "use iid, quantity or natural" in message
    with pytest.raises(ConfigError, match="not class labels"):  # undeclared, but plainly not labels
        partition(y, PartitionConfig(kind=kind, num_clients=3), 0)
    with pytest.raises(ConfigError, match="not class labels"):
        partition(y[:, 0], PartitionConfig(kind=kind, num_clients=3), 0)


@pytest.mark.parametrize("kind", ["iid", "quantity", "natural"])
def test_row_partitions_take_multi_column_float_targets(kind: str) -> None:
    y = _survival_targets()
    groups = np.repeat(["a", "b", "c"], 30) if kind == "natural" else None
    parts = partition(y, PartitionConfig(kind=kind, num_clients=3), 1, groups, target="values")
    assert len(parts) == 3
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    summary = summarize_partition(y, parts, ["a", "b", "c"], target="values")
    assert summary.skew is None and summary.classes == () and not summary.by_label
    assert summary.sizes.tolist() == [p.size for p in parts]
    table = _text(to_rich_table(summary))
    assert "sizes only" in table and "label skew (" not in table and "total" in table
    markdown = to_markdown(summary)
    assert markdown.splitlines()[0] == "| client | samples |" and "Sizes only" in markdown
    assert to_csv(summary).splitlines()[1:] == [f"{c},{p.size}" for c, p in zip("abc", parts, strict=True)]
    with pytest.raises(ValueError, match="one class label per sample"):
        label_histograms(y, parts)


def test_sizes_only_summary_plots(tmp_path: Path) -> None:
    y = _survival_targets()
    summary = summarize_partition(y, partition(y, PartitionConfig(kind="iid", num_clients=4), 0))
    assert summary.skew is None and "not one class label per row" in summary.note  # undeclared: detected
    assert plot_partition(summary, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_partition_command_on_the_survival_example(survival_importable: None) -> None:
    from typer.testing import CliRunner

    from flowerbed.cli import _register, app

    _register()
    shown = CliRunner().invoke(app, ["partition", str(SURVIVAL)])
    assert shown.exit_code == 0, shown.output
    assert "sizes only" in shown.output and "360" in shown.output
    refused = CliRunner().invoke(app, ["partition", str(SURVIVAL), "--set", "data.partition.kind=dirichlet"])
    assert isinstance(refused.exception, ConfigError)
    assert "data.partition.kind = 'dirichlet' splits by class label" in str(refused.exception)
    assert "'survival:hospitals'" in str(refused.exception)


def test_summarize_sites_reads_the_schema_target(survival_importable: None) -> None:
    from flowerbed.tasks.data.catalog import load_federation

    experiment = load_experiment(SURVIVAL)
    sites = load_federation(experiment.data, experiment.seed)
    assert {s.schema.target for s in sites} == {"values"}
    summary = summarize_sites(sites)
    assert summary.clients == ("north", "south", "east") and summary.sizes.tolist() == [160, 120, 80]
    assert "DataSchema.target = 'values'" in summary.note


def test_survival_baselines_and_comparison_use_the_c_index(survival_importable: None, tmp_path: Path) -> None:
    from flowerbed.server.run_folder import read_summary
    from flowerbed.simulations.simulate import simulate

    overrides = [
        f"output={str(tmp_path)!r}",
        "rounds=2",
        "evaluate.central=true",
        "evaluate.local_baselines=true",
    ]
    summary = read_summary(simulate(load_experiment(SURVIVAL, overrides), quiet=True))
    comparison = summary["comparison"]
    assert comparison["metric"] == "c-index" and comparison["greater_is_better"] is True
    values = [comparison["federated"]["pooled"], comparison["local_only_mean_pooled"]]
    values += [v for r in comparison["local_only"].values() for v in r.values()]
    assert all(0.0 < v <= 1.0 for v in values)  # c-indices, not NaN
    fed, mean = comparison["federated"]["pooled"], comparison["local_only_mean_pooled"]
    assert comparison["federated_beats_local_mean"] is (fed > mean)
    assert comparison["verdict"].startswith("pooled test set (c-index, higher is better)")
    assert ("does NOT beat" in comparison["verdict"]) is (fed <= mean)
    assert "nan" not in _text(comparison["verdict"]).lower()

    # No central evaluation: no pooled figure for the federated model, so no verdict, and it says why.
    summary["final"]["central"] = {}
    blind = comparison_summary(summary, {**comparison, "sites": comparison["local_only"], "mean_pooled": mean})
    assert blind["federated_beats_local_mean"] is None and blind["best"] is None
    assert "no verdict" in blind["verdict"] and "evaluate.central = true" in blind["verdict"]
    printed = _text_of_comparison(blind)
    assert "Test c-index" in printed and "beat" not in printed and "nan" not in printed


def _text_of_comparison(comparison: dict) -> str:
    console = Console(width=200, record=True)
    print_comparison(comparison, console)
    return console.export_text()


def _baselines(own: dict[str, float], pooled: dict[str, float], *, greater: bool, metric: str = "loss") -> dict:
    return {
        "metric": metric,
        "greater_is_better": greater,
        "sites": {s: {"own": own[s], "pooled": pooled[s]} for s in own},
        "mean_pooled": float(np.mean(list(pooled.values()))),
        "mean_own": float(np.mean(list(own.values()))),
        "missing": [],
    }


def test_comparison_of_a_loss_prefers_the_lower_value() -> None:
    summary = {"final": {"sites": {"a": {"loss": 0.2}, "b": {"loss": 0.9}}, "central": {"loss": 0.4}}}
    baselines = _baselines({"a": 0.3, "b": 0.5}, {"a": 0.6, "b": 0.8}, greater=False)
    lower = comparison_summary(summary, baselines)
    assert lower["federated_beats_local_mean"] is True  # 0.4 < mean 0.7: lower is better
    assert lower["best"] == {"model": "federated", "value": 0.4}
    assert (lower["sites_won"], lower["sites_compared"]) == (1, 2)
    assert lower["verdict"] == (
        "pooled test set (loss, lower is better): federated 0.400 beats the mean of the local-only models 0.700"
    )
    printed = _text_of_comparison(lower)
    assert "Test loss (lower is better)" in printed and "best on the pooled test set (loss): federated 0.400" in printed

    # The same numbers as a score where higher is better: the federated model loses.
    higher = comparison_summary(summary, {**baselines, "greater_is_better": True})
    assert higher["federated_beats_local_mean"] is False and "does NOT beat" in higher["verdict"]
    assert higher["best"] == {"model": "b only", "value": 0.8}


def test_comparison_without_the_primary_metric_gives_no_verdict() -> None:
    summary = {"final": {"sites": {"a": {"loss": 0.2}}, "central": {"loss": 0.4, "num-examples": 9}}}
    baselines = _baselines({"a": 0.3}, {"a": 0.6}, greater=True, metric="auroc")
    result = comparison_summary(summary, baselines)
    assert result["federated_beats_local_mean"] is None and result["federated"]["pooled"] is None
    assert "no verdict" in result["verdict"] and "has no 'auroc' (it has: loss)" in result["verdict"]
    nan_local = {
        **baselines,
        "metric": "loss",
        "mean_pooled": None,
        "missing": ["a only, pooled test set: loss is not finite"],
    }
    result = comparison_summary(summary, nan_local)
    assert result["federated_beats_local_mean"] is None and "loss is not finite" in result["verdict"]


def test_comparison_reads_old_baselines_as_accuracy() -> None:
    summary = {"final": {"sites": {"a": {"accuracy": 0.8}}, "central": {"accuracy": 0.7}}}
    old = {"sites": {"a": {"own": 0.6, "pooled": 0.75}}, "mean_pooled": 0.75, "mean_own": 0.6}
    result = comparison_summary(summary, old)
    assert result["metric"] == "accuracy" and result["federated_beats_local_mean"] is False
