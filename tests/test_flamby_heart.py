"""FLamby's Fed-Heart-Disease as a built-in dataset, its binary task, and sweeps with cases averaged over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowerbed.exception import ConfigError
from flowerbed.experiment import parse_experiment
from flowerbed.simulations.research.sweep import SweepRow, averaged, load_sweep
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import load_federation

SWEEPS = Path(__file__).parents[1] / "simulations" / "sweeps"


def test_the_four_hospitals_are_split_and_scaled_as_flamby_does():
    data = parse_experiment({"data": {"dataset": "fed-heart-disease"}}).data
    sites = load_federation(data, 0)
    sizes = [(s.name, s.num_train, len(s.y_test)) for s in sites]
    assert sizes == [("cleveland", 199, 104), ("hungarian", 172, 89), ("switzerland", 30, 16), ("va", 85, 45)]
    for site in sites:
        assert site.x_train.shape[1] == 13 and site.x_train.dtype == np.float32
        assert np.allclose(site.x_train.mean(axis=0), 0, atol=1e-5)  # z-scored with the site's own training rows
        std = site.x_train.std(axis=0, ddof=1)
        assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))  # a constant column stays 0
        assert set(np.unique(site.y_train)) <= {0, 1}
    with pytest.raises(ConfigError, match="natural"):
        load_federation(
            parse_experiment({"data": {"dataset": "fed-heart-disease", "partition": {"kind": "iid"}}}).data, 0
        )


def test_the_binary_task_is_a_sigmoid_and_binary_cross_entropy():
    task = resolve_task("binary-logreg")
    logit = torch.tensor([[2.0], [-1.0], [0.5]])
    labels = torch.tensor([1, 0, 0])
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logit[:, 0]), labels.float())
    assert torch.allclose(task.loss_fn(logit, labels), expected)
    assert task.metrics_fn(logit, labels) == {"accuracy": pytest.approx(2 / 3)}


def test_cases_run_with_every_grid_value_and_average_over_seeds(tmp_path):
    sweep = load_sweep(SWEEPS / "flamby_heart.toml", check_data=False)
    assert sweep.keys == ("case", "seed") and len(sweep.experiments) == 6 * 5
    scaffold = [e for e, c in zip(sweep.experiments, sweep.combinations, strict=True) if c[0] == "SCAFFOLD"]
    assert {e.seed for e in scaffold} == {42, 43, 44, 45, 46}
    assert all(e.strategy.name == "SCAFFOLD" and e.train.lr == 0.001 for e in scaffold)
    rows = [
        SweepRow(i, {"case": case, "seed": seed}, "", tmp_path, 1.0, {"sites.accuracy": value})
        for i, (case, seed, value) in enumerate([("A", 1, 0.6), ("A", 2, 0.8), ("B", 1, 0.5), ("B", 2, 0.5)])
    ]
    header, body = averaged(("case", "seed"), ("seed",), rows)
    assert header == ["case", "sites.accuracy", "runs"]
    assert body == [["A", "0.700 ± 0.141", "2"], ["B", "0.500 ± 0.000", "2"]]
