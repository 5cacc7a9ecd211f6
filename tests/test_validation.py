"""Validation splits held at the nodes, federated validation, early stopping and the best model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flowerbed.client.app import app as client_app
from flowerbed.exception import ConfigError
from flowerbed.flower_internals import enter_task_identity
from flowerbed.protocol import EVALUATE_SPLIT_KEY, EXPERIMENT_KEY, ErrorCode
from flowerbed.server.checkpoint import load_checkpoint
from flowerbed.server.model_selection import Selection, SelectionProgress, best_round, stop_reason
from flowerbed.server.run_folder import read_metrics, read_summary
from flowerbed.server.runner import initial_model
from flowerbed.simulations.simulate import resume_simulation, simulate
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.tasks.data.validation import hold_out_validation
from flowerbed.weights import load_safetensors, model_to_arrays


def _history(values: list[float]) -> list[dict]:
    return [{"round": r, "validation": {"loss": v}} for r, v in enumerate(values, start=1)]


def test_early_stopping_stops_after_patience_validations_without_improvement():
    rule = Selection("loss", greater_is_better=False, patience=2, min_delta=0.01)
    curve = [1.0, 0.8, 0.795, 0.79, 0.7, 0.71, 0.705]  # 0.795 and 0.79 improve by < min_delta
    stops = [r for r in range(1, len(curve) + 1) if stop_reason(_history(curve[:r]), rule)]
    assert stops == [4, 7] and "best 0.8 at round 2" in stop_reason(_history(curve[:4]), rule)
    progress = SelectionProgress(rule)  # the round loop's: one record at a time
    new_best = [progress.observe(record) for record in _history(curve)]
    assert new_best == [True, True, False, False, True, False, False] and progress.best == (5, 0.7)
    assert best_round(_history(curve), rule) == (5, 0.7)
    assert stop_reason(_history(curve[:5]), rule) is None  # round 5 improved: patience starts again
    assert stop_reason(_history(curve), rule) is not None  # 6 and 7 did not
    accuracy = Selection("accuracy", greater_is_better=True, patience=1)
    assert best_round([{"round": 1, "validation": {"accuracy": 0.6}}, {"round": 2}], accuracy) == (1, 0.6)


def _scan(history: list[dict], rule: Selection) -> tuple[tuple[int, float] | None, int]:
    """The best round and the validations since, by a scan of the whole history (the rule, written out)."""
    best, since = None, 0
    for record in history:
        value = record.get("validation", {}).get(rule.metric)
        if value is None:
            continue
        if rule.improves(float(value), best[1] if best else None):
            best, since = (record["round"], float(value)), 0
        else:
            since += 1
    return best, since


@pytest.mark.parametrize("greater", [False, True])
def test_the_round_loops_selection_equals_a_scan_of_the_whole_history(greater: bool):
    rng = np.random.default_rng(7)
    rule = Selection("loss", greater_is_better=greater, patience=3, min_delta=0.01)
    history: list[dict] = []
    progress = SelectionProgress(rule)
    for server_round in range(1, 301):
        kind = rng.integers(6)
        if kind == 0:
            record: dict = {"round": server_round}  # a round that did not validate
        elif kind == 1:
            record = {"round": server_round, "validation": {}}  # the metric missing
        elif kind == 2:
            record = {"round": server_round, "validation": {"loss": float("nan")}}  # counts, never improves
        else:
            record = {"round": server_round, "validation": {"loss": float(rng.normal())}}
        history.append(record)
        was_best = progress.observe(record)
        best, since = _scan(history, rule)
        assert progress.best == best and progress.since == since
        assert was_best == (best is not None and best[0] == server_round)
        assert (progress.stop_reason() is not None) == (since >= 3)


def test_a_resumed_run_stops_early_counting_the_validations_before_the_crash(heart_experiment):
    settings = (
        "data.validation_fraction=0.2",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=100.0",
    )
    run = simulate(heart_experiment("rounds=2", *settings), quiet=True)  # round 1 the best, round 2 one without
    assert read_summary(run)["rounds_completed"] == 2
    experiment = json.loads((run / "experiment.json").read_text())
    experiment["rounds"] = 5
    (run / "experiment.json").write_text(json.dumps(experiment))
    resume_simulation(run, quiet=True)
    summary = read_summary(run)
    assert summary["rounds_completed"] == 3 and "in 2 validations" in summary["stopped"]
    assert summary["model"]["reported"] == "best" and summary["model"]["round"] == 1


def test_a_node_holds_out_validation_rows_of_its_own_training_rows(heart_experiment):
    experiment = heart_experiment()
    for site in load_federation(experiment.data, experiment.seed):
        held = hold_out_validation(site, 0.2, seed=3)
        assert held.num_val == round(0.2 * site.num_train) and held.num_train == site.num_train - held.num_val
        rows = {r.tobytes() for r in site.x_train}
        assert {r.tobytes() for r in held.x_val} <= rows and {r.tobytes() for r in held.x_train} <= rows
        assert not {r.tobytes() for r in held.x_val} & {r.tobytes() for r in held.x_train}
        assert np.array_equal(held.x_val, hold_out_validation(site, 0.2, seed=3).x_val)  # the same rows again
        share = np.mean(site.y_train == 1)
        assert abs(np.mean(held.y_val == 1) - share) <= 1 / held.num_val + 1e-9  # stratified


def test_the_run_stops_early_and_reports_the_best_model(heart_experiment):
    # min_delta larger than any change: round 1 is the best, round 2 the first without improvement
    settings = ("rounds=4", "data.validation_fraction=0.2", "train.early_stopping.patience=1")
    run = simulate(heart_experiment(*settings, "train.early_stopping.min_delta=100.0"), quiet=True)
    summary = read_summary(run)
    assert summary["rounds_completed"] == 2 and summary["stopped"].startswith("early stopping: validation accuracy")
    assert summary["model"]["reported"] == "best" and summary["model"]["round"] == 1
    records = read_metrics(run)
    assert all("val-accuracy" in values for values in records[0]["sites"].values())
    best, last = load_safetensors(run / "best.safetensors"), load_safetensors(run / "model.safetensors")
    kept = load_checkpoint(run, heart_experiment().strategy).best
    assert kept is not None and all(np.array_equal(kept[k], best[k]) for k in best)
    assert any(not np.array_equal(best[k], last[k]) for k in best)
    # the final figures are the best model's: its central accuracy, not the last round's
    assert summary["final"]["central"] == pytest.approx(records[0]["central"])

    # rows held for validation are not trained on
    full = simulate(heart_experiment("rounds=1", "evaluate.central=false"), quiet=True)
    held = simulate(heart_experiment("rounds=1", "evaluate.central=false", "data.validation_fraction=0.2"), quiet=True)
    trained = {s: v["train-num-examples"] for s, v in read_metrics(held)[0]["sites"].items()}
    for site, values in read_metrics(full)[0]["sites"].items():
        n = values["train-num-examples"]
        assert trained[site] == n - round(0.2 * n)


def test_selection_needs_validation_rows_and_a_dp_run_selects_on_what_it_releases(heart_experiment):
    with pytest.raises(ConfigError, match="set data.validation_fraction"):
        heart_experiment("train.early_stopping.patience=2")
    dp = (
        "data.validation_fraction=0.2",
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        "train.early_stopping.metric='auroc'",
    )
    with pytest.raises(ConfigError, match="carry only loss, accuracy"):
        simulate(heart_experiment(*dp), quiet=True)


def _evaluate(experiment, split) -> Message:
    enter_task_identity(1, 1)  # messages made outside a Flower process need a run and task id
    config = ConfigRecord({EXPERIMENT_KEY: json.dumps(experiment.to_dict()), EVALUATE_SPLIT_KEY: split})
    arrays = model_to_arrays(initial_model(experiment))
    content = RecordDict({"arrays": arrays, "config": config})
    message = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return client_app(message, context)


def test_a_node_answers_the_split_asked_for_and_refuses_what_it_does_not_hold(heart_experiment):
    with_validation = heart_experiment("data.validation_fraction=0.25")
    site = hold_out_validation(load_federation(with_validation.data, 0)[0], 0.25, with_validation.data.split_seed)
    reply = _evaluate(with_validation, "validation")
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == site.num_val
    assert _evaluate(with_validation, "test").content["metrics"]["num-examples"] == len(site.y_test)
    refused = _evaluate(heart_experiment(), "validation")
    assert refused.error.code == ErrorCode.DATA and "set data.validation_fraction" in refused.error.reason
    forged = _evaluate(with_validation, "train")  # a coordinator asking for metrics on the training rows
    assert forged.has_error() and "must be 'test' or 'validation'" in forged.error.reason


def test_local_baselines_follow_the_same_validation_rule(heart_experiment):
    from flowerbed.simulations.research.baselines import local_only_baselines

    stopping = (
        "data.validation_fraction=0.2",
        "train.early_stopping.patience=1",
        "train.early_stopping.min_delta=100.0",
    )
    experiment = heart_experiment("rounds=4", *stopping)
    sites = load_federation(experiment.data, experiment.seed)
    stopped = local_only_baselines(experiment, sites)  # round 1 is each local model's best; round 2 stops it
    one_round = local_only_baselines(heart_experiment("rounds=1", "data.validation_fraction=0.2"), sites)
    assert stopped["sites"] == one_round["sites"]
    last = local_only_baselines(heart_experiment("rounds=4", *stopping, "evaluate.report_model='last'"), sites)
    assert last["sites"] != one_round["sites"]
