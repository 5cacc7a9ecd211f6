"""FedAdam, FedYogi and FedAdagrad as Reddi et al. (2021) publish them: each update pinned on numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flowerbed.exception import ConfigError
from flowerbed.experiment import StrategyConfig
from flowerbed.flower_internals import enter_task_identity
from flowerbed.strategies.registry import build_strategy

# x_0 = [1, -2]; round 1's mean reply is x_0 + [0.5, -0.5], round 2's is x_1 + [0.2, 0.1];
# eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3, m_{-1} = 0, v_{-1} = tau^2. Round 1 of FedAdam:
# m = 0.1 * 0.5 = 0.05, v = 0.99e-6 + 0.01 * 0.25 = 0.00250099, x = 1 + 0.1 * 0.05 / (0.0500099 + 0.001).
EXPECTED = {
    "FedAdamPaper": [[1.09802019012, -2.09802019012], [1.21700643063, -2.16564766399]],
    "FedYogiPaper": [[1.098019998, -2.098019998], [1.2165013974, -2.16532769031]],
    "FedAdagradPaper": [[1.00998002, -2.00998002], [1.022027824, -2.01683063639]],
}


class _OneNode:
    def get_node_ids(self) -> list[int]:
        return [1]


def _rounds(strategy) -> list[np.ndarray]:
    enter_task_identity(1, 1)
    x = np.array([1.0, -2.0])
    out = []
    for server_round, step in enumerate((np.array([0.5, -0.5]), np.array([0.2, 0.1])), start=1):
        list(strategy.configure_train(server_round, ArrayRecord({"w": Array(x)}), ConfigRecord(), _OneNode()))
        reply = RecordDict(
            {"arrays": ArrayRecord({"w": Array(x + step)}), "metrics": MetricRecord({"num-examples": 10})}
        )
        new, _ = strategy.aggregate_train(server_round, [Message(reply, dst_node_id=0, message_type="train")])
        x = new["w"].numpy()
        out.append(x)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_published_update_equals_the_hand_worked_numbers(name):
    strategy = build_strategy(StrategyConfig(name=name, args={"eta": 0.1}))
    for got, expected in zip(_rounds(strategy), EXPECTED[name], strict=True):
        assert np.allclose(got, expected, rtol=1e-9, atol=0), (name, got, expected)


def test_flowers_fedadam_is_not_the_published_one():
    """Flower's bias correction and zero start: a visibly different first step (documented)."""
    flower = _rounds(build_strategy(StrategyConfig(name="FedAdam", args={"eta": 0.1})))[0]
    published = np.array(EXPECTED["FedAdamPaper"][0])
    assert not np.allclose(flower, published, rtol=1e-3)


def test_an_argument_that_does_nothing_is_refused():
    for name in ("FedAdam", "FedYogi", "FedAdagrad"):
        with pytest.raises(ConfigError, match="eta_l.*does nothing.*train.lr"):
            build_strategy(StrategyConfig(name=name, args={"eta_l": 0.01}))
    with pytest.raises(ConfigError, match="eta_l"):
        build_strategy(StrategyConfig(name="FedAdamPaper", args={"eta_l": 0.01}))
