"""The columnar cohort path: training replies as a ``ReplyBlock``, checked and averaged once per array.

A block's rows must be exactly the replies the messages would have been; its checks must reject
the same rows, for the same reasons, as the per-message checks; and a weighted-mean strategy given
its one equivalent reply must land on the same model as Flower's ``aggregate_train`` over the rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from flowerbed.client.app import app as client_app
from flowerbed.experiment import StrategyConfig
from flowerbed.flower_internals import enter_task_identity
from flowerbed.protocol import EXPERIMENT_KEY, RUN_ID_KEY
from flowerbed.server.federation import Federation
from flowerbed.server.reply_block import ReplyBlock, averages_blocks, block_problems
from flowerbed.server.reply_validation import validate_train_reply
from flowerbed.simulations.engine.cohort_handler import CohortHandler
from flowerbed.simulations.engine.inline_grid import InlineGrid
from flowerbed.simulations.simulate import simulate
from flowerbed.strategies.registry import WEIGHTED_MEAN, build_strategy
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.weights import load_safetensors, numpy_to_arrays

SHAPES = {"0.weight": (3, 4), "0.bias": (3,)}


def _rows(m: int, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray], list[float], list[float]]:
    rng = np.random.default_rng(seed)
    sites = [f"site-{i:02d}" for i in rng.permutation(m)]
    arrays = {k: rng.normal(size=(m, *s)).astype(np.float32) for k, s in SHAPES.items()}
    weights = [float(w) for w in rng.integers(5, 300, size=m)]
    losses = [float(v) for v in rng.uniform(0.1, 2.0, size=m)]
    return sites, arrays, weights, losses


def _message(arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    content = RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


class _Nodes:
    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


@pytest.mark.parametrize("name", WEIGHTED_MEAN)
def test_a_block_aggregates_as_flower_does_over_its_rows(name):
    """Two rounds of each weighted-mean strategy: the block's equivalent reply against the rows as messages."""
    enter_task_identity(1, 1)
    args = {"eta": 0.1} if "Adam" in name or "Yogi" in name or "Adagrad" in name else {}
    per_rows, per_block = (build_strategy(StrategyConfig(name=name, args=args)) for _ in range(2))
    assert averages_blocks(per_rows)
    current = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    for server_round in (1, 2):
        sites, arrays, weights, losses = _rows(9, seed=server_round)
        block = ReplyBlock(sites, arrays, {"num-examples": weights, "train-loss": losses}).sorted_by_site()
        messages = [
            _message({k: v[i] for k, v in block.arrays.items()}, dict(row))
            for i, (_, row) in enumerate(block.row_metrics())
        ]
        outcomes = []
        for strategy, replies in ((per_rows, messages), (per_block, [block.equivalent_reply()])):
            list(strategy.configure_train(server_round, numpy_to_arrays(current), ConfigRecord(), _Nodes(9)))
            new, metrics = strategy.aggregate_train(server_round, replies)
            outcomes.append(({k: new[k].numpy() for k in SHAPES}, dict(metrics)))
        (rows_arrays, rows_metrics), (block_arrays, block_metrics) = outcomes
        for key in SHAPES:
            assert np.array_equal(rows_arrays[key], block_arrays[key]), (name, server_round, key)
        assert block_metrics == rows_metrics
        current = rows_arrays


def test_a_strategy_that_needs_every_update_gets_every_row():
    assert not averages_blocks(build_strategy(StrategyConfig(name="FedMedian")))
    assert not averages_blocks(build_strategy(StrategyConfig(name="SCAFFOLD")))
    custom = build_strategy(StrategyConfig(name="FedAvg"))
    custom.train_metrics_aggr_fn = lambda records, key: MetricRecord()
    assert not averages_blocks(custom)


def test_block_checks_reject_the_rows_the_message_checks_reject_for_the_same_reasons():
    """A forged row of every kind, among sound ones: each is named, with the per-message reason."""
    sites, arrays, weights, losses = _rows(8)
    reference = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    arrays["0.weight"][1, 0, 0] = np.nan  # not a number
    arrays["0.bias"][2] = 3e38  # finite values, an infinite norm
    weights[3] = 1e12  # more than its cap
    weights[4] = 0.0  # no weight
    arrays["0.weight"][5] += 50.0  # an update far too long
    weights[6] = float("inf")
    block = ReplyBlock(sites, arrays, {"num-examples": weights, "train-loss": losses})
    caps = np.full(len(block), 1e6)
    problems = block_problems(block, reference, caps=caps, max_update_norm=100.0)
    assert sorted(problems) == [1, 2, 3, 4, 5, 6]
    for i in range(len(block)):
        message = _message({k: v[i] for k, v in arrays.items()}, {"num-examples": weights[i], "train-loss": losses[i]})
        expected = validate_train_reply(message, reference, max_examples=1e6, max_update_norm=100.0)
        assert problems.get(i) == expected, (i, problems.get(i), expected)


def test_a_block_of_the_wrong_shape_is_refused_whole():
    sites, arrays, weights, losses = _rows(3)
    reference = {"0.weight": np.zeros((3, 5), dtype=np.float32), "0.bias": np.zeros(3, dtype=np.float32)}
    block = ReplyBlock(sites, arrays, {"num-examples": weights, "train-loss": losses})
    problems = block_problems(block, reference, caps=np.full(3, np.inf), max_update_norm=None)
    assert set(problems) == {0, 1, 2} and "shape" in problems[0]


def test_columnar_rows_are_the_replies_the_client_app_would_send(heart_experiment):
    experiment = heart_experiment()
    text = json.dumps(experiment.to_dict())
    task = resolve_task(experiment.task.name, experiment.task.args)
    model = task.build_model(load_federation(experiment.data, experiment.seed)[0].schema, seed=3)
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    grid = InlineGrid(client_app, 4, batch_handler=CohortHandler(client_app))
    config = ConfigRecord({EXPERIMENT_KEY: text, RUN_ID_KEY: "run-1", "server-round": 1})
    content = RecordDict({"arrays": arrays, "config": config})

    def push():
        return [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()]

    torch.set_num_threads(1)
    replies, blocks = grid.exchange_columnar(push())
    assert replies == [] and len(blocks) == 1
    block = blocks[0]
    by_site = {m.content["site"]["name"]: m for m in grid.send_and_receive(push())}
    assert sorted(block.sites) == sorted(by_site)
    for i, (site, metrics) in enumerate(block.row_metrics()):
        message = by_site[site]
        assert metrics == dict(message.content["metrics"])
        for key, values in block.arrays.items():
            assert np.array_equal(values[i], message.content["arrays"][key].numpy()), (site, key)


def test_a_vectorized_simulation_aggregates_blocks_and_equals_the_message_path(heart_experiment, monkeypatch):
    sorted_blocks: list[int] = []
    original = Federation._sort_block

    def counting(self, block, reference, outcome):
        sorted_blocks.append(len(block))
        return original(self, block, reference, outcome)

    monkeypatch.setattr(Federation, "_sort_block", counting)
    base = ("rounds=2", "evaluate.central=false")
    columns = simulate(heart_experiment(*base), quiet=True)
    assert sorted_blocks == [4, 4]
    messages = simulate(heart_experiment(*base, "backend.vectorize=false"), quiet=True)
    a, b = load_safetensors(columns / "model.safetensors"), load_safetensors(messages / "model.safetensors")
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    rows = [json.loads(line) for line in (columns / "metrics.jsonl").read_text().splitlines()]
    assert all(sorted(r["sites"]) == r["participants"] for r in rows)
    assert all("train-loss" in v and "train-num-examples" in v for r in rows for v in r["sites"].values())
