"""SCAFFOLD: control variates held at the nodes, the server step, and what a node refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from flowerbed.client.app import app as client_app
from flowerbed.client.node_state import NodeState
from flowerbed.exception import ConfigError
from flowerbed.flower_internals import enter_task_identity
from flowerbed.protocol import EXPERIMENT_KEY, RUN_ID_KEY, SCAFFOLD_CONTROL, SCAFFOLD_DELTA, SCAFFOLD_PREFIX
from flowerbed.server.reply_validation import validate_train_reply
from flowerbed.server.runner import initial_model
from flowerbed.strategies.scaffold import Scaffold
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.weights import arrays_to_numpy, model_to_arrays, numpy_to_arrays

LR, STEPS = 0.05, 3


def _train_message(experiment, control: dict[str, np.ndarray], server_round: int) -> Message:
    enter_task_identity(1, 1)  # messages made outside a Flower process need a run and task id
    config = ConfigRecord(
        {EXPERIMENT_KEY: json.dumps(experiment.to_dict()), RUN_ID_KEY: "run-1", "server-round": server_round}
    )
    content = RecordDict(
        {
            "arrays": model_to_arrays(initial_model(experiment)),
            "config": config,
            SCAFFOLD_CONTROL: numpy_to_arrays(control),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _expected(experiment, site, control, c_i):
    """The node's round by hand: K plain SGD steps on grad - c_i + c, then option II's new c_i."""
    model = initial_model(experiment)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.as_tensor(site.x_train), torch.as_tensor(site.y_train)
    n, size = len(y), experiment.train.batch_size
    step = 0
    from flowerbed.client.training import StepSchedule
    from flowerbed.seeds import derive_seed

    seed = derive_seed(experiment.seed, "iterator", site.name)
    for batch in StepSchedule(0, STEPS, seed=seed, batch_size=size).batches(n):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p -= LR * (p.grad + torch.as_tensor(control[k]) - torch.as_tensor(c_i[k]))
        step += 1
    new = {k: c_i[k] - control[k] + (start[k] - p.detach()).numpy() / (step * LR) for k, p in model.named_parameters()}
    return {k: p.detach().numpy() for k, p in model.named_parameters()}, new


def test_a_node_corrects_its_steps_and_keeps_its_control_variate(heart_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path / "nodes"))
    experiment = heart_experiment(
        "strategy.name='SCAFFOLD'", f"train.lr={LR}", f"train.local_steps={STEPS}", "train.batch_size=16"
    )
    site = load_federation(experiment.data, experiment.seed)[0]
    shapes = {k: v.detach().numpy() for k, v in initial_model(experiment).named_parameters()}
    rng = np.random.default_rng(0)
    control = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in shapes.items()}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    reply = client_app(_train_message(experiment, control, 1), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    weights, new_c_i = _expected(experiment, site, control, {k: np.zeros_like(v) for k, v in shapes.items()})
    got = arrays_to_numpy(reply.content["arrays"])
    delta = arrays_to_numpy(reply.content[SCAFFOLD_DELTA])
    for key in shapes:
        assert np.allclose(got[key], weights[key], atol=1e-6), key
        assert np.allclose(delta[SCAFFOLD_PREFIX + key], new_c_i[key], atol=1e-4), key  # c_i was 0
    state = next((tmp_path / "nodes").rglob("node-state.sqlite"))
    kept = NodeState(state).kept_before("run-1", site.name, "control", 2)
    assert kept is not None and all(np.allclose(kept[k], new_c_i[k], atol=1e-4) for k in shapes)
    assert NodeState(state).kept_before("run-1", site.name, "control", 1) is None  # round 1 again starts from zero

    # the server's control variate never reaches the node's reply: only the change does
    assert set(reply.content.keys()) == {"arrays", "metrics", "site", SCAFFOLD_DELTA}

    forged = {k: np.full_like(v, np.nan) for k, v in control.items()}
    refused = client_app(_train_message(experiment, forged, 2), context)
    assert refused.has_error() and "NaN" in refused.error.reason


def test_the_server_step_and_control_update_match_the_paper(heart_experiment):
    x = {"w": np.array([1.0, 2.0], np.float32)}
    enter_task_identity(1, 1)
    strategy = Scaffold(server_learning_rate=0.5)
    strategy.current_arrays, strategy.control, strategy.sites = x, {"w": np.array([0.1, 0.1], np.float32)}, 4
    replies = []
    for y, n, dc in (([2.0, 2.0], 1, [0.2, 0.0]), ([1.0, 4.0], 3, [0.0, 0.4])):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.array(y, np.float32))}),
                "metrics": MetricRecord({"num-examples": n}),
                SCAFFOLD_DELTA: ArrayRecord({SCAFFOLD_PREFIX + "w": Array(np.array(dc, np.float32))}),
            }
        )
        replies.append(Message(content, dst_node_id=1, message_type=MessageType.TRAIN))
    new, _ = strategy.aggregate_train(1, replies)
    mean = (np.array([2.0, 2.0]) * 1 + np.array([1.0, 4.0]) * 3) / 4  # FedAvg's weighted mean: [1.25, 3.5]
    assert np.allclose(arrays_to_numpy(new)["w"], x["w"] + 0.5 * (mean - x["w"]))  # [1.125, 2.75]
    assert np.allclose(strategy.control["w"], [0.1 + 2 / 4 * 0.1, 0.1 + 2 / 4 * 0.2])  # c + |S|/N mean(dc)


def test_a_reply_without_its_control_change_is_rejected_and_bad_settings_refused(heart_experiment):
    enter_task_identity(1, 1)
    reference = {"w": np.zeros(2, np.float32)}
    extra = Scaffold().reply_records(reference)
    content = RecordDict({"arrays": numpy_to_arrays(reference), "metrics": MetricRecord({"num-examples": 3})})
    reply = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    assert "scaffold-delta" in validate_train_reply(reply, reference, extra=extra)
    content[SCAFFOLD_DELTA] = numpy_to_arrays({SCAFFOLD_PREFIX + "w": np.array([np.inf, 0], np.float32)})
    assert "NaN or infinite" in validate_train_reply(reply, reference, extra=extra)
    with pytest.raises(ConfigError, match="train.optimizer = 'sgd'"):
        heart_experiment("strategy.name='SCAFFOLD'", "train.optimizer='adam'")
    with pytest.raises(ConfigError, match="secure aggregation does not carry"):
        heart_experiment("strategy.name='SCAFFOLD'", "secagg.enabled=true")
