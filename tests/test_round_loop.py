"""The round loop on the in-process backend: strategies, seeds, validation, checkpoints, resume."""

from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.client.app import app as real_client_app
from flowerbed.exception import RunError
from flowerbed.experiment import StrategyConfig
from flowerbed.server.checkpoint import latest_round, load_checkpoint
from flowerbed.server.run_folder import read_metrics, read_summary
from flowerbed.simulations.simulate import resume_simulation, simulate
from flowerbed.weights import load_safetensors


def final_weights(run_dir):
    return load_safetensors(run_dir / "model.safetensors")


@pytest.mark.parametrize("strategy", ["FedAvg", "FedAdam", "FedMedian", "FedAvgM"])
def test_strategies_by_name_train_the_heart_federation(heart_experiment, strategy):
    args = "{eta=0.01}" if strategy == "FedAdam" else "{}"
    run_dir = simulate(heart_experiment(f"strategy.name={strategy!r}", f"strategy.args={args}"), quiet=True)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["participants"] == ["cleveland", "hungarian", "switzerland", "va"] for r in records)
    summary = read_summary(run_dir)
    assert summary["strategy"] == strategy and summary["rounds_completed"] == 3
    assert summary["final"]["central"]["accuracy"] > 0.6
    assert set(summary["final"]["sites"]) == {"cleveland", "hungarian", "switzerland", "va"}
    for name in ("model.safetensors", "model.pt2", "experiment.json", "metrics.jsonl"):
        assert (run_dir / name).is_file()
    exported = __import__("torch").export.load(str(run_dir / "model.pt2")).module()
    assert exported(__import__("torch").zeros(5, 22)).shape == (5, 2)


def test_same_seed_same_metrics_and_weights(heart_experiment):
    a = simulate(heart_experiment("train.clients_per_round=2"), quiet=True)
    b = simulate(heart_experiment("train.clients_per_round=2"), quiet=True)
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    for key, value in final_weights(a).items():
        assert np.array_equal(value, final_weights(b)[key])
    c = simulate(heart_experiment("train.clients_per_round=2", "seed=7"), quiet=True)
    assert [r["sampled"] for r in read_metrics(c)] != [r["sampled"] for r in read_metrics(a)]


def test_seeded_sampling_takes_clients_per_round(heart_experiment):
    run_dir = simulate(heart_experiment("train.clients_per_round=2", "rounds=4"), quiet=True)
    sampled = [r["sampled"] for r in read_metrics(run_dir)]
    assert all(len(s) == 2 for s in sampled)
    assert len({tuple(s) for s in sampled}) > 1


@pytest.mark.parametrize("strategy", ["FedAvg", "FedAdam"])
def test_checkpoint_after_every_round_and_resume_equals_uninterrupted(strategy, heart_experiment, tmp_path):
    full = simulate(heart_experiment("rounds=4", f"strategy.name={strategy!r}"), quiet=True)
    partial = simulate(heart_experiment("rounds=2", f"strategy.name={strategy!r}"), quiet=True)
    assert latest_round(partial) == 2
    # Continue the 2-round run to 4 rounds from its checkpoint, as after a crash.
    experiment = json.loads((partial / "experiment.json").read_text())
    experiment["rounds"] = 4
    (partial / "experiment.json").write_text(json.dumps(experiment))
    resume_simulation(partial, quiet=True)
    assert [r["round"] for r in read_metrics(partial)] == [1, 2, 3, 4]
    for key, value in final_weights(full).items():
        assert np.array_equal(value, final_weights(partial)[key]), key
    checkpoint = load_checkpoint(partial, StrategyConfig(name=strategy))
    assert checkpoint.round == 4 and len(checkpoint.state["history"]) == 4
    # No pickle anywhere: a run folder is data, and resuming it runs nothing it holds.
    for folder in (partial / "checkpoints").glob("round-*"):
        assert sorted(p.name for p in folder.iterdir()) == ["state.json", "strategy.safetensors", "weights.safetensors"]
    assert not list(partial.rglob("*.pkl"))


def test_a_run_folder_of_an_earlier_layout_resumes_with_its_whole_history(heart_experiment):
    """Before ``history_in_metrics``, ``state.json`` held the whole history and ``metrics.jsonl`` was a copy."""
    full = simulate(heart_experiment("rounds=3"), quiet=True)
    partial = simulate(heart_experiment("rounds=2"), quiet=True)
    state_file = partial / "checkpoints" / "round-0002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("history_in_metrics") == {"records": 1, "last_round": 1} and state.pop("layout") == 2
    state["history"] = read_metrics(partial)
    state_file.write_text(json.dumps(state))
    (partial / "metrics.jsonl").write_text("")  # the earlier layout did not need it
    experiment = json.loads((partial / "experiment.json").read_text())
    experiment["rounds"] = 3
    (partial / "experiment.json").write_text(json.dumps(experiment))
    resume_simulation(partial, quiet=True)
    assert read_metrics(partial) == read_metrics(full)
    assert load_checkpoint(partial, StrategyConfig()).state["history"] == read_metrics(full)


def test_a_checkpoint_with_a_pickled_strategy_is_refused(heart_experiment, tmp_path):
    run = simulate(heart_experiment("rounds=1"), quiet=True)
    folder = run / "checkpoints" / "round-0001"
    (folder / "strategy.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "strategy.pkl").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(RunError, match="older flowerbed"):
        load_checkpoint(run, StrategyConfig())
    assert not marker.exists()


class _Marker:
    """Writes a file when unpickled (what an attacker's pickle would do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "ran"))


def test_invalid_replies_are_rejected_with_the_site_named(heart_experiment):
    bad_app = ClientApp()

    @bad_app.query()
    def query(message: Message, context):
        return real_client_app(message, context)

    @bad_app.evaluate()
    def evaluate(message: Message, context):
        return real_client_app(message, context)

    @bad_app.train()
    def train(message: Message, context):
        reply = real_client_app(message, context)
        if context.node_config["partition-id"] == 2:  # switzerland sends NaN weights
            arrays = reply.content["arrays"]
            poisoned = {k: arrays[k].numpy() * np.nan for k in arrays}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: __import__("torch").from_numpy(v) for k, v in poisoned.items()}),
                    "metrics": MetricRecord(dict(reply.content["metrics"])),
                    "site": ConfigRecord({"name": "switzerland"}),
                }
            )
            return Message(content, reply_to=message)
        return reply

    from flowerbed.simulations import simulate as simulate_module

    original = simulate_module.client_app
    simulate_module.client_app = bad_app
    try:
        run_dir = simulate(heart_experiment("rounds=2", "backend.vectorize=false"), quiet=True)
    finally:
        simulate_module.client_app = original
    record = read_metrics(run_dir)[0]
    assert record["participants"] == ["cleveland", "hungarian", "va"]
    assert "NaN" in record["refused"]["switzerland"]
    assert all(np.isfinite(v).all() for v in final_weights(run_dir).values())
    assert "switzerland" in read_summary(run_dir)["refused"]


def _run_with(app: ClientApp, experiment):
    from flowerbed.simulations import simulate as simulate_module

    original = simulate_module.client_app
    simulate_module.client_app = app
    try:
        return simulate(experiment, quiet=True)
    finally:
        simulate_module.client_app = original


def test_no_single_node_can_steer_the_aggregate(heart_experiment):
    """A huge weight, huge weights, or a weight that changes mid-run: rejected, site named, the run goes on."""
    import torch

    attacker = ClientApp()
    attacker.query()(real_client_app)
    attacker.evaluate()(real_client_app)

    @attacker.train()
    def train(message: Message, context):
        reply = real_client_app(message, context)
        pid, server_round = context.node_config["partition-id"], int(message.content["config"]["server-round"])
        metrics = dict(reply.content["metrics"])
        arrays = {k: reply.content["arrays"][k].numpy() for k in reply.content["arrays"]}
        if pid == 0:  # cleveland claims a trillion patients
            metrics["num-examples"] = 1e12
        elif pid == 1:  # hungarian sends weights of 3e38 (finite float32)
            arrays = {k: np.full_like(v, 3e38) for k, v in arrays.items()}
        elif pid == 2 and server_round == 2:  # switzerland doubles its weight after round 1
            metrics["num-examples"] = 2 * metrics["num-examples"]
        else:
            return reply
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                "metrics": MetricRecord(metrics),
                "site": reply.content["site"],
            }
        )
        return Message(content, reply_to=message)

    run_dir = _run_with(attacker, heart_experiment("rounds=2", "backend.vectorize=false", "evaluate.central=false"))
    first, second = read_metrics(run_dir)
    assert first["participants"] == ["switzerland", "va"]
    assert "num-examples = 1e+12" in first["refused"]["cleveland"]
    assert "update norm" in first["refused"]["hungarian"]
    assert second["participants"] == ["va"]
    assert "reported" in second["refused"]["switzerland"] and "fixed per run" in second["refused"]["switzerland"]
    assert read_summary(run_dir)["rounds_completed"] == 2
    assert all(np.abs(v).max() < 100 for v in final_weights(run_dir).values())


def test_node_without_data_answers_with_a_clear_error():
    from flwr.app import Context

    from flowerbed.simulations.engine.inline_grid import InlineGrid

    grid = InlineGrid(real_client_app, 1)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    from flowerbed.experiment import Experiment

    config = ConfigRecord({"flowerbed.experiment": json.dumps(Experiment().to_dict())})
    message = Message(RecordDict({"config": config}), dst_node_id=5, message_type="query")
    message.metadata.__dict__["_message_id"] = "m1"
    reply = real_client_app(message, context)
    assert reply.has_error()
    assert "the node config names no data" in reply.error.reason
    assert grid.get_node_ids()


def test_scenario_dropouts_stragglers_and_late_joiners(heart_experiment):
    run_dir = simulate(
        heart_experiment(
            "rounds=6",
            "scenario.dropout=0.3",
            "scenario.late_join_fraction=0.25",
            "scenario.late_join_round=3",
            "scenario.straggler_fraction=0.3",
            "scenario.straggler_delay=1000.0",
            "train.round_timeout=60",
            "evaluate.federated=false",
        ),
        quiet=True,
    )
    records = read_metrics(run_dir)
    late = set(records[0]["sampled"]) - set(records[0]["participants"]) - set(records[0]["refused"])
    assert len(late) == 1, "one of four sites joins late"
    for record in records:
        reasons = record["refused"].values()
        assert all("simulated" in r for r in reasons)
        if record["round"] < 3:
            assert not late & set(record["participants"])
    assert any("dropped out" in r for rec in records for r in rec["refused"].values())
    assert any("straggler" in r for rec in records for r in rec["refused"].values())
    assert late & {s for rec in records for s in rec["participants"]}, "the late site takes part once it joined"


@pytest.mark.parametrize(
    "values",
    [
        np.arange(1_000, dtype=np.uint64) * np.uint64(2**40),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.array(2.5),
    ],
)
def test_array_view_reads_flower_array_bytes_without_a_copy(values):
    from flwr.app import Array

    from flowerbed.weights import array_view

    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, values)
    assert view.dtype == values.dtype and view.shape == values.shape
    if values.flags.c_contiguous:
        assert not view.flags.writeable  # a view over the message's bytes, not a copy
