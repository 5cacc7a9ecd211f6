"""Personalized FL: what is personal stays at the node, and each site scores its own model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flowerbed.client.app import app as client_app
from flowerbed.client.node_state import NodeState
from flowerbed.exception import ConfigError
from flowerbed.flower_internals import enter_task_identity
from flowerbed.protocol import EXPERIMENT_KEY, RUN_ID_KEY
from flowerbed.server.run_folder import read_summary
from flowerbed.server.runner import initial_model
from flowerbed.simulations.simulate import simulate
from flowerbed.weights import arrays_to_numpy, model_to_arrays

PERSONAL = {
    "fedper": {"3.weight", "3.bias"},
    "fedrep": {"3.weight", "3.bias"},
    "fedbn": {"2.weight", "2.bias"},  # the LayerNorm of binary-mlp with norm = true
    "ditto": set(),
}


def _message(experiment, kind, server_round: int, arrays) -> Message:
    enter_task_identity(1, 1)  # messages made outside a Flower process need a run and task id
    config = ConfigRecord(
        {EXPERIMENT_KEY: json.dumps(experiment.to_dict()), RUN_ID_KEY: "run-1", "server-round": server_round}
    )
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=kind)


@pytest.mark.parametrize("method", ["fedper", "fedrep", "fedbn", "ditto"])
def test_personal_layers_never_leave_the_node(heart_experiment, tmp_path, monkeypatch, method):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path / "nodes"))
    norm = "true" if method == "fedbn" else "false"
    experiment = heart_experiment(
        f"task={{name='binary-mlp', args={{hidden=8, norm={norm}}}}}",
        f"personalization.method='{method}'",
        "train.local_steps=5",
    )
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    sent = model_to_arrays(initial_model(experiment))
    received = arrays_to_numpy(sent)
    for server_round in (1, 2):
        reply = client_app(_message(experiment, MessageType.TRAIN, server_round, sent), context)
        assert not reply.has_error(), reply.error.reason
        out = arrays_to_numpy(reply.content["arrays"])
        assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
        for name in PERSONAL[method]:  # the coordinator gets back exactly what it sent there
            assert np.array_equal(out[name], received[name]), name
        assert any(not np.array_equal(out[k], received[k]) for k in out if k not in PERSONAL[method])
    state = next((tmp_path / "nodes").rglob("node-state.sqlite"))
    kept = NodeState(state).kept_before("run-1", "cleveland", "personal", 3)
    assert kept is not None
    for name in PERSONAL[method] or kept.keys():  # what the site keeps was trained
        assert not np.array_equal(kept[name], received[name]), name

    evaluated = client_app(_message(experiment, MessageType.EVALUATE, 2, sent), context)
    metrics = evaluated.content["metrics"]
    assert "accuracy" in metrics and "personal-accuracy" in metrics


def test_a_personalized_run_reports_each_sites_own_model(heart_experiment):
    run = simulate(
        heart_experiment(
            "rounds=2",
            "task={name='fenda-mlp'}",
            "personalization.method='fedper'",
            "evaluate.local_baselines=true",
            "evaluate.plots=true",
        ),
        quiet=True,
    )
    summary = read_summary(run)
    sites = summary["final"]["sites"]
    assert len(sites) == 4 and all("personal-accuracy" in values for values in sites.values())
    personalized = summary["comparison"]["personalized"]
    assert personalized == {site: values["personal-accuracy"] for site, values in sites.items()}
    page = next(run.rglob("report.html")).read_text()
    assert "personalized (the site&#x27;s own)" in page or "personalized (the site's own)" in page


def test_settings_that_would_leak_or_mean_nothing_are_refused(heart_experiment):
    with pytest.raises(ConfigError, match="unprotected head"):
        heart_experiment("personalization.method='fedrep'", "privacy.enabled=true", "privacy.noise_multiplier=1.0")
    with pytest.raises(ConfigError, match="SCAFFOLD's control variates"):
        heart_experiment("personalization.method='fedper'", "strategy.name='SCAFFOLD'")
    run = simulate(
        heart_experiment("rounds=1", "personalization.method='fedper'", "personalization.personal_layers=['0']"),
        quiet=True,
    )
    summary = read_summary(run)
    assert summary["rounds_completed"] == 0
    assert all("must name some but not all" in reason for reason in summary["refused"].values()), summary["refused"]
