"""What a site's update weighs (train.weighting) and where the global model starts (task.initial_weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowerbed.exception import ConfigError
from flowerbed.server.run_folder import read_metrics
from flowerbed.server.runner import initial_model
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.weights import load_safetensors, save_safetensors

from .user_task_example import RecordingFedAvg

STRATEGY = "strategy.name='tests.user_task_example:RecordingFedAvg'"


@pytest.mark.parametrize("weighting", ["train-rows", "steps", "uniform"])
def test_the_chosen_weight_reaches_the_strategy_and_the_metrics(heart_experiment, weighting):
    experiment = heart_experiment("rounds=1", STRATEGY, f"train.weighting='{weighting}'", "evaluate.central=false")
    RecordingFedAvg.seen.clear()
    run = simulate(experiment, quiet=True)
    sites = {s.name: s for s in load_federation(experiment.data, experiment.seed)}
    steps = {
        n: experiment.train.local_epochs * -(-s.num_train // experiment.train.batch_size) for n, s in sites.items()
    }
    expected = {
        "train-rows": {n: s.num_train for n, s in sites.items()},
        "steps": steps,
        "uniform": dict.fromkeys(sites, 1),
    }[weighting]
    (seen,) = RecordingFedAvg.seen
    assert seen == [float(expected[n]) for n in sorted(sites)]
    recorded = read_metrics(run)[0]["sites"]
    assert {n: v["train-num-examples"] for n, v in recorded.items()} == expected


def test_the_global_model_can_start_from_a_file(heart_experiment, tmp_path):
    base = heart_experiment("rounds=1", "evaluate.central=false")
    start = {k: torch.full_like(v, 0.01).numpy() for k, v in initial_model(base).state_dict().items()}
    path = tmp_path / "start.safetensors"
    save_safetensors(start, path)
    experiment = heart_experiment("rounds=1", "evaluate.central=false", f"task.initial_weights='{path}'")
    assert all(np.all(v.numpy() == 0.01) for v in initial_model(experiment).state_dict().values())
    run = simulate(experiment, quiet=True)
    kept = load_safetensors(run / "initial.safetensors")
    assert kept.keys() == start.keys() and all(np.array_equal(kept[k], start[k]) for k in start)
    bad = tmp_path / "bad.safetensors"
    save_safetensors({"0.weight": np.zeros((3, 3), np.float32)}, bad)
    with pytest.raises(ConfigError, match="missing 1.weight"):
        initial_model(heart_experiment(f"task.initial_weights='{bad}'"))


def test_a_task_weighs_its_sites_and_sets_the_initial_state(heart_experiment):
    task = "task={name='tests.user_task_example:weighted'}"
    experiment = heart_experiment("rounds=1", STRATEGY, task, "train.weighting='task'", "evaluate.central=false")
    RecordingFedAvg.seen.clear()
    run = simulate(experiment, quiet=True)
    sites = sorted(load_federation(experiment.data, experiment.seed), key=lambda s: s.name)
    assert RecordingFedAvg.seen == [[float((s.y_train == 1).sum() + 1) for s in sites]]
    start = load_safetensors(run / "initial.safetensors")
    assert all(np.all(v == 0.5) for k, v in start.items() if k.endswith("bias"))
    assert not all(np.all(v == 0.5) for k, v in start.items() if k.endswith("weight"))
    with pytest.raises(ConfigError, match="needs a weight_fn"):
        simulate(heart_experiment("train.weighting='task'"), quiet=True)
