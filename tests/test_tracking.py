"""Experiment tracking: what MLflow and TensorBoard hold after a run, read back with their own readers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV
from flowerbed.exception import ConfigError
from flowerbed.experiment import TrackingConfig, load_experiment
from flowerbed.server import run_folder, tracking
from tests.conftest import HEART_TOML

pytest.importorskip("mlflow", reason='MLflow is the optional extra: pip install "flowerbed[tracking]"')
pytest.importorskip("tensorboard", reason='TensorBoard is the optional extra: pip install "flowerbed[tracking]"')


def test_a_stopped_and_resumed_run_is_one_tracked_run(heart_experiment, tmp_path, monkeypatch):
    """Parameters, per-round and per-site metrics (epsilon too), artifacts; a resume goes on in the same run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowerbed.simulations.simulate import resume_simulation, simulate

    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps({"*": {"dp-test-seed": 0}}))
    experiment = heart_experiment(
        "rounds=2", "privacy.enabled=true", "privacy.noise_multiplier=1.0", "tracking.mlflow=true",
        "tracking.tensorboard=true",
    )  # fmt: skip
    note = run_folder.note_rounds_sent

    def stop_after_round_one(run_dir, rounds):  # the operator's STOP file, once round 1's training went out
        note(run_dir, rounds)
        (run_dir / "STOP").write_text("")

    monkeypatch.setattr(run_folder, "note_rounds_sent", stop_after_round_one)
    run_dir = simulate(experiment, quiet=True)
    state = json.loads((run_dir / tracking.STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=state["mlflow_uri"])
    assert state["mlflow_uri"] == (run_dir / "mlflow").resolve().as_uri()
    assert client.get_run(state["mlflow_run_id"]).info.status == "KILLED"

    monkeypatch.setattr(run_folder, "note_rounds_sent", note)
    (run_dir / "STOP").unlink()
    resume_simulation(run_dir, quiet=True)
    records = run_folder.read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2]

    (mlflow_experiment,) = [e for e in client.search_experiments() if e.name == "heart"]
    (run,) = client.search_runs([mlflow_experiment.experiment_id])
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FINISHED"
    params = run.data.params
    assert params["rounds"] == "2" and params["privacy.noise_multiplier"] == "1.0"
    assert params["strategy.name"] == "FedAvg" and params["tracking.mlflow"] == "true"
    for key, group, name in (("federated/accuracy", "evaluate", "accuracy"), ("central/loss", "central", "loss")):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r[group][name])) for r in records]
    epsilon = sorted(client.get_metric_history(run.info.run_id, "site/cleveland/epsilon"), key=lambda m: m.step)
    assert [m.value for m in epsilon] == [pytest.approx(r["sites"]["cleveland"]["epsilon"]) for r in records]
    last = records[-1]["sites"]["cleveland"]["epsilon"]
    assert run.data.metrics["final/site/cleveland/epsilon"] == pytest.approx(last)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "experiment.json", "metrics.jsonl", "model.safetensors", "model.pt2"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["rounds_completed"] == 2

    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "global.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert tracking.log_report(run_dir)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/global.png"]

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"federated/accuracy", "central/accuracy", "epsilon/max", "site/va/epsilon", "sites/participants"} <= set(
        scalars
    )
    accuracy = board.Scalars("federated/accuracy")
    assert [e.step for e in accuracy] == [1, 2]  # the resumed run logged round 2 once, round 1 was not repeated
    assert [e.value for e in accuracy] == [pytest.approx(r["evaluate"]["accuracy"]) for r in records]
    assert [e.value for e in board.Scalars("epsilon/max")] == [pytest.approx(r["epsilon_max"]) for r in records]


def test_a_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking\.mlflow = true needs the mlflow package.*flowerbed\[tracking\]"):
        tracking.check_available(TrackingConfig(mlflow=True))
    tracking.check_available(TrackingConfig(tensorboard=True))


def test_tracking_is_off_by_default_and_keeps_credentials_out_of_the_experiment(tmp_path):
    experiment = load_experiment(HEART_TOML)
    assert tracking.with_tracking(experiment, tmp_path, None) is None
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        load_experiment(HEART_TOML, ["tracking.mlflow_uri='https://me:secret@mlflow.example.org'"])
    assert load_experiment(HEART_TOML, ["tracking.mlflow_uri='https://mlflow.example.org'"]).tracking.mlflow_uri
