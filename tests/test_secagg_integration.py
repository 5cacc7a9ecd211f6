"""Secure aggregation inside the round loop: strategies, simulations, dropouts, DP, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import strategy as flower_strategies

from flowerbed.client.app import app as real_client_app
from flowerbed.exception import ConfigError
from flowerbed.privacy.secagg.protocol import derive_params, run_secure_sum
from flowerbed.server.run_folder import read_metrics, read_summary
from flowerbed.server.secure_train_phase import WEIGHTED_MEAN, equivalent_reply
from flowerbed.simulations.engine.inline_grid import InlineGrid
from flowerbed.simulations.simulate import simulate
from flowerbed.weights import arrays_to_numpy, load_safetensors, numpy_to_arrays

SITES = ["cleveland", "hungarian", "switzerland", "va"]

# How much each strategy's server step can amplify an error in the mean update it is given
# (first round, default arguments): FedAvg-like = 1; adaptive ones divide by about tau.
AMPLIFICATION = {"FedAvg": 1, "FedProx": 1, "FedAvgM": 1, "FedAdam": 200, "FedYogi": 200, "FedAdagrad": 200}


@pytest.mark.parametrize("name", WEIGHTED_MEAN)
def test_each_weighted_mean_strategy_gets_the_plain_result_from_the_secure_sum(name: str) -> None:
    rng = np.random.default_rng(3)  # test data only
    global_weights = {"w": rng.normal(size=(40, 25)).astype(np.float32), "b": np.zeros(25, np.float32)}
    nodes = [11, 22, 33, 44, 55]
    updates = {n: rng.normal(0, 0.05, 1025).astype(np.float32) for n in nodes}
    weights = {n: float(rng.integers(10, 300)) for n in nodes}
    params = derive_params(len(nodes), 1025, clip_range=1.0)

    def replies_plain() -> list[Message]:
        out = []
        for n in nodes:
            flat = updates[n]
            new = {"w": global_weights["w"] + flat[:1000].reshape(40, 25), "b": global_weights["b"] + flat[1000:]}
            content = RecordDict(
                {"arrays": numpy_to_arrays(new), "metrics": MetricRecord({"num-examples": weights[n]})}
            )
            out.append(Message(content, dst_node_id=n, message_type=MessageType.TRAIN))
        return out

    def strategy():
        s = getattr(flower_strategies, name)()
        grid = InlineGrid(ClientApp(), 5)
        s.configure_train(1, numpy_to_arrays(global_weights), ConfigRecord({}), grid)
        return s

    plain, _ = strategy().aggregate_train(1, replies_plain())
    result = run_secure_sum(updates, weights, params)
    reply = equivalent_reply(global_weights, result, [])
    assert reply.content["metrics"]["num-examples"] == sum(weights.values())
    secure, _ = strategy().aggregate_train(1, [reply])
    tolerance = AMPLIFICATION[name] * params.mean_error_bound + 1e-5  # + float32 rounding of weights
    plain_np, secure_np = arrays_to_numpy(plain), arrays_to_numpy(secure)
    for key in global_weights:
        assert np.max(np.abs(plain_np[key] - secure_np[key])) <= tolerance, key


def test_a_secure_simulation_matches_the_plain_one(heart_experiment) -> None:
    fast = ("rounds=2", "evaluate.federated=false", "backend.vectorize=false")
    plain = simulate(heart_experiment(*fast), quiet=True)
    secure = simulate(heart_experiment(*fast, "secagg.enabled=true", "secagg.clip_range=2.0"), quiet=True)
    records = read_metrics(secure)
    assert all(r["participants"] == SITES and r["refused"] == {} for r in records)
    assert all(r["train"]["secagg-out-of-range"] == 0 for r in records)
    a, b = load_safetensors(plain / "model.safetensors"), load_safetensors(secure / "model.safetensors")
    bound = derive_params(4, 10, clip_range=2.0).mean_error_bound
    for key in a:  # two rounds: errors of the two means add up (and pass through training)
        assert np.max(np.abs(a[key] - b[key])) < 20 * bound, key
    assert (
        abs(read_summary(plain)["final"]["central"]["accuracy"] - read_summary(secure)["final"]["central"]["accuracy"])
        < 0.02
    )


def _failing_app(fail: dict[int, str]) -> ClientApp:
    """The real ClientApp, except that partition p answers an error at message type fail[p]."""
    app = ClientApp()

    def route(message: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        if fail.get(pid) == message.metadata.message_type:
            from flwr.app import Error

            return Message(Error(code=1, reason=f"partition {pid} lost its connection"), reply_to=message)
        return real_client_app(message, context)

    for action in ("advertise", "share_keys", "masked_input", "consistency", "unmask"):
        app.train(f"secagg_{action}")(route)
    app.train()(route)
    app.query()(route)
    app.evaluate()(route)
    return app


def _simulate_with(app: ClientApp, experiment):
    from flowerbed.simulations import simulate as simulate_module

    original = simulate_module.client_app
    simulate_module.client_app = app
    try:
        return simulate(experiment, quiet=True)
    finally:
        simulate_module.client_app = original


def test_nodes_lost_at_any_stage_are_survived_and_the_coordinator_sees_only_masked_vectors(
    heart_experiment, monkeypatch
) -> None:
    from flowerbed.server import secure_train_phase

    seen: list[np.ndarray] = []
    original = secure_train_phase._Exchange.__call__

    def spy(self, stage, requests):
        replies = original(self, stage, requests)
        seen.extend(r["masked"] for r in replies.values() if "masked" in r)
        return replies

    monkeypatch.setattr(secure_train_phase._Exchange, "__call__", spy)
    # 4 sites, threshold 3: partition 1 is lost while sharing keys; the other three carry on.
    run = _simulate_with(
        _failing_app({1: "train.secagg_share_keys"}),
        heart_experiment("rounds=1", "secagg.enabled=true", "evaluate.federated=false"),
    )
    record = read_metrics(run)[0]
    lost = SITES[1]
    assert record["participants"] == [s for s in SITES if s != lost]
    assert "lost its connection" in record["refused"][lost]
    # what reached the coordinator from the three: uniform-looking vectors, nothing in the clear
    assert len(seen) == 3
    for vector in seen:
        assert vector.dtype == np.uint64
        top = vector >> np.uint64(63)  # masked entries are uniform: the top bit is a coin flip
        assert 0.35 < top.mean() < 0.65
    # lost while unmasking: its input was already in, so it still counts as a participant
    run = _simulate_with(
        _failing_app({2: "train.secagg_unmask"}),
        heart_experiment("rounds=1", "secagg.enabled=true", "evaluate.federated=false"),
    )
    assert read_metrics(run)[0]["participants"] == SITES


def test_below_threshold_the_run_stops_and_says_why(heart_experiment) -> None:
    run = _simulate_with(
        _failing_app({0: "train.secagg_masked_input", 3: "train.secagg_masked_input"}),
        heart_experiment("rounds=2", "secagg.enabled=true", "evaluate.federated=false"),
    )
    summary = read_summary(run)
    assert summary["rounds_completed"] == 0
    assert "only 2 nodes sent masked inputs" in summary["stopped"]
    assert "nothing is unmasked" in summary["stopped"]


def test_dp_sgd_and_secure_aggregation_together_report_epsilon_per_site(heart_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path / "nodes"))
    run = simulate(
        heart_experiment(
            "rounds=1",
            "secagg.enabled=true",
            "privacy.enabled=true",
            "privacy.noise_multiplier=1.0",
            "evaluate.federated=false",
        ),
        quiet=True,
    )
    record = read_metrics(run)[0]
    assert record["participants"] == SITES
    assert all(record["sites"][s]["epsilon"] > 0 for s in SITES)
    assert record["epsilon_max"] == max(record["sites"][s]["epsilon"] for s in SITES)
    assert all("num-examples" not in record["sites"][s] for s in SITES)  # weights stay secret


@pytest.mark.parametrize("name", ["FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"])
def test_robust_aggregators_are_refused_at_configuration(heart_experiment, name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}.*needs every node's individual update"):
        heart_experiment("secagg.enabled=true", f"strategy.name={name!r}")
