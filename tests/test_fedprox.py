"""FedProx's proximal term is applied at every node, on every path, with and without DP.

Flower's FedProx only sends ``proximal-mu``; the node must add ``mu / 2 * ||w - w_global||^2`` to
its objective. Each path's trained weights are compared with SGD written out by hand here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message

from flowerbed.client.training import epoch_permutations
from flowerbed.exception import ConfigError
from flowerbed.experiment import StrategyConfig
from flowerbed.seeds import derive_seed
from flowerbed.server.runner import initial_model
from flowerbed.strategies.registry import build_strategy
from flowerbed.tasks.data.catalog import load_federation

from .test_node_rules import PATHS, probe

MU = 0.5


def _weights(reply: Message) -> tuple[str, dict[str, np.ndarray]]:
    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"]
    return str(reply.content["site"]["name"]), {k: arrays[k].numpy() for k in arrays}


def _by_hand(experiment, site, mu: float) -> dict[str, np.ndarray]:
    """One round of mini-batch SGD on ``loss + mu / 2 ||w - w_global||^2``, step by step."""
    model = initial_model(experiment)
    w_global = {k: v.detach().clone() for k, v in model.named_parameters()}
    params = dict(model.named_parameters())
    x, y = torch.as_tensor(site.x_train), torch.as_tensor(site.y_train)
    seed = derive_seed(experiment.seed, "train", 1, site.name)
    order = torch.from_numpy(epoch_permutations([seed], [0], [len(y)])[0, : len(y)])  # the node's batch order
    for start in range(0, len(y), experiment.train.batch_size):
        batch = order[start : start + experiment.train.batch_size]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads, strict=True):
                p -= experiment.train.lr * (g + mu * (p - w_global[name]))
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_every_path_applies_the_proximal_term(heart_experiment, tmp_path):
    base = ("task.name='tabular-logreg'", "task.args={}", "train.local_epochs=1", "train.lr=0.5")
    for path, backend in PATHS.items():
        experiment = heart_experiment(*base, *backend)
        sites = {s.name: s for s in load_federation(experiment.data, experiment.seed)}
        replies = probe(
            experiment, ("train",), tmp_path / f"{path}-prox", extra_config={"proximal-mu": MU}, describe=_weights
        )
        for name, weights in replies["train"]:
            expected, plain = _by_hand(experiment, sites[name], MU), _by_hand(experiment, sites[name], 0.0)
            for key, value in weights.items():
                assert np.allclose(value, expected[key], atol=1e-5), (path, name, key)
            assert any(not np.allclose(weights[k], plain[k], atol=1e-4) for k in weights), (path, name)


@pytest.mark.slow
def test_the_proximal_term_holds_under_dp(heart_experiment, tmp_path, monkeypatch):
    """Same DP noise (a fixed test seed), with and without the term: the term pulls towards the global model."""
    monkeypatch.setenv("FLOWERBED_SIM_NODE_CONFIG", json.dumps({"*": {"dp-test-seed": 3}}))
    base = ("task.name='tabular-logreg'", "task.args={}", "privacy.enabled=true", "privacy.noise_multiplier=0.5")
    for path, backend in PATHS.items():
        if path == "flower":
            continue  # the DP step of the ClientApp is the same on Flower's engine and the sequential path
        experiment = heart_experiment(*base, *backend)
        start = {k: v.detach().numpy() for k, v in initial_model(experiment).state_dict().items()}
        runs = {
            mu: dict(
                probe(
                    experiment,
                    ("train",),
                    tmp_path / f"{path}-{mu}",
                    extra_config={"proximal-mu": mu},
                    describe=_weights,
                )["train"]
            )
            for mu in (0.0, 5.0)
        }
        for name, pulled in runs[5.0].items():
            free = runs[0.0][name]
            drift = {k: np.linalg.norm(v - start[k]) for k, v in free.items()}
            assert all(np.linalg.norm(pulled[k] - start[k]) < drift[k] for k in drift), (path, name)


def test_a_strategy_whose_node_side_is_missing_is_refused_by_name():
    with pytest.raises(ConfigError, match="'QFedAvg' cannot run on flowerbed"):
        build_strategy(StrategyConfig(name="QFedAvg"))
    with pytest.raises(ConfigError, match="FedXgbBagging"):
        build_strategy(StrategyConfig(name="FedXgbBagging"))
