"""End to end: DP-SGD at every node, a node that runs out of budget refuses, the run goes on."""

from __future__ import annotations

import json

import pytest

from flowerbed.client.node_config import parse_node_config
from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV, dataset_fingerprint, ledger_path, node_config
from flowerbed.exception import ConfigError, NodeError
from flowerbed.experiment import DataConfig
from flowerbed.privacy.ledger import PrivacyLedger, fingerprint_file
from flowerbed.privacy.planner import epsilon_for, sampling
from flowerbed.protocol import ErrorCode
from flowerbed.server.run_folder import read_metrics, read_summary
from flowerbed.simulations.engine import inline_backend
from flowerbed.simulations.engine.inline_grid import InlineGrid
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks.data.catalog import load_federation

SIGMA = 1.0


def heart_data_config() -> DataConfig:
    return DataConfig(dataset="heart-disease")


def _hospitals(monkeypatch: pytest.MonkeyPatch, configs: dict[int, dict]) -> None:
    """Give each virtual hospital its own node config, as a SuperNode's --node-config would."""

    class ConfiguredGrid(InlineGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            for context in self.contexts.values():
                pid = int(context.node_config["partition-id"])
                context.node_config.update(configs.get(pid, {}))

    monkeypatch.setattr(inline_backend, "InlineGrid", ConfiguredGrid)


def test_a_node_out_of_budget_refuses_and_the_run_goes_on(heart_experiment, tmp_path, monkeypatch):
    experiment = heart_experiment(
        "rounds=4",
        "train.local_epochs=1",
        "privacy.enabled=true",
        f"privacy.noise_multiplier={SIGMA}",
        "privacy.max_grad_norm=1.0",
        "evaluate.central=false",
        "backend.vectorize=false",  # every message through the ClientApp, as on a real node
    )
    sites = load_federation(experiment.data, experiment.seed)
    names = [s.name for s in sites]
    small = names.index("switzerland")
    n = sites[small].num_train
    q, per_epoch = sampling(n, experiment.train.batch_size)
    steps = per_epoch * experiment.train.local_epochs
    # Room for two rounds of this plan, not three.
    two, three = (epsilon_for(SIGMA, q, k * steps, 1e-5) for k in (2, 3))
    budget = (two + three) / 2
    ledgers = {pid: tmp_path / f"ledger-{name}.sqlite" for pid, name in enumerate(names)}
    # Evaluation is refused here: every evaluation a node with a budget answers is charged too.
    configs = {
        pid: {"ledger": str(path), "budget-epsilon": 100.0, "evaluation": "refuse"} for pid, path in ledgers.items()
    }
    configs[small]["budget-epsilon"] = budget
    _hospitals(monkeypatch, configs)

    run_dir = simulate(experiment, quiet=True)

    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for r in records[:2]:
        assert r["participants"] == sorted(names)
    third = records[2]
    assert "switzerland" not in third["participants"]
    reason = third["refused"]["switzerland"]
    assert "privacy budget exhausted" in reason and "switzerland" in reason
    assert f"of {budget:.3g}" in reason
    # Left out of later rounds, while the other three go on.
    assert "switzerland" not in records[3]["sampled"]
    assert records[3]["participants"] == sorted(set(names) - {"switzerland"})
    for r in records:
        eps = [v["epsilon"] for v in r["sites"].values()]
        assert len(eps) == len(r["participants"]) and r["epsilon_max"] == max(eps)
        assert "epsilon" not in r["train"]  # never an average across sites
    summary = read_summary(run_dir)
    assert summary["rounds_completed"] == 4
    assert "privacy budget exhausted" in summary["refused"]["switzerland"]
    assert "switzerland" in summary["budget_exhausted"]
    assert summary["epsilon"]["max"] == max(summary["epsilon"]["per_site"].values())
    # The node's own ledger: two releases, within its budget, what it reported.
    ledger = PrivacyLedger(ledgers[small])
    (dataset,) = ledger.datasets()
    assert len(ledger.releases(dataset)) == 2
    spent = ledger.epsilon(dataset, 1e-5)
    assert spent <= budget
    assert summary["epsilon"]["per_site"]["switzerland"] == pytest.approx(spent)
    assert spent == pytest.approx(two, abs=1e-6)


def test_node_settings_come_from_the_node_only(tmp_path, monkeypatch):
    sim = {"partition-id": 0, "ledger": str(tmp_path / "l.sqlite")}
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, '{"*": {"budget-epsilon": 5}, "va": {"budget-epsilon": 2}}')
    assert node_config(sim, "va").budget_epsilon == 2
    assert node_config(sim, "cleveland").budget_epsilon == 5
    # A deployed node (no partition-id) ignores the simulation variable ...
    deployed = {"ledger": str(tmp_path / "l.sqlite"), "data-path": "x.csv"}
    assert node_config(deployed, "va").budget_epsilon is None
    # ... and must name its ledger.
    with pytest.raises(NodeError, match="ledger"):
        ledger_path(parse_node_config({"data-path": "x.csv"}), "run")
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, "[1, 2]")
    with pytest.raises(ConfigError, match=SIM_NODE_CONFIG_ENV):
        node_config(sim, "va")


def test_dataset_names_follow_the_file_or_the_node_config(tmp_path):
    sites = load_federation(heart_data_config(), 0)
    data = tmp_path / "site.data"
    data.write_text("1,2,3\n")
    by_file = dataset_fingerprint(sites[0], parse_node_config({"data-path": str(data)}))
    assert by_file == fingerprint_file(data)
    none = parse_node_config({})
    assert dataset_fingerprint(sites[0], none) != dataset_fingerprint(sites[1], none)
    named = parse_node_config({"dataset-id": "cardio-2024", "data-path": str(data)})
    assert dataset_fingerprint(sites[0], named) == "id:cardio-2024"


def test_a_node_with_a_budget_never_trains_without_dp(heart_experiment, tmp_path):
    from uuid import uuid4

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from flowerbed.client.app import app
    from flowerbed.tasks import resolve_task
    from flowerbed.weights import model_to_arrays

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    plain = heart_experiment("train.local_epochs=1")
    site = load_federation(plain.data, plain.seed)[0]
    task = resolve_task(plain.task.name, plain.task.args)
    arrays = model_to_arrays(task.build_model(site.schema, seed=0))

    def ask(experiment, node_config) -> Message:
        config = ConfigRecord(
            {"server-round": 1, "flowerbed.run-id": "r", "flowerbed.experiment": json.dumps(experiment.to_dict())}
        )
        message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type="train")
        message.metadata.__dict__["_message_id"] = str(uuid4())
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return app(message, context)

    guarded = {"partition-id": 0, "ledger": str(tmp_path / "l.sqlite"), "budget-epsilon": 8.0}
    refused = ask(plain, guarded)
    assert refused.has_error() and "only trains with differential privacy" in refused.error.reason
    assert refused.error.code == ErrorCode.POLICY
    assert not ask(plain, {"partition-id": 0}).has_error()  # no budget: plain training allowed
    private = ask(
        heart_experiment("train.local_epochs=1", "privacy.enabled=true", "privacy.noise_multiplier=1.0"), guarded
    )
    assert not private.has_error()
    metrics = private.content["metrics"]
    assert 0 < metrics["epsilon"] <= 8.0 and "train-loss" not in metrics


def _ask(app, kind: str, experiment, arrays, node_config: dict, server_round: int = 1):
    from uuid import uuid4

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    config = ConfigRecord(
        {
            "server-round": server_round,
            "flowerbed.run-id": "r",
            "flowerbed.experiment": json.dumps(experiment.to_dict()),
        }
    )
    message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=kind)
    message.metadata.__dict__["_message_id"] = str(uuid4())
    return app(message, Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}))


def test_a_hospitals_evaluation_is_a_charged_dp_release_on_its_own_split(heart_experiment, tmp_path):
    """A coordinator that picks test_fraction = 0.99 gets the node's own split, and each answer costs epsilon."""
    from flowerbed.client.app import app
    from flowerbed.privacy.accountant import epsilon
    from flowerbed.tasks import resolve_task
    from flowerbed.weights import model_to_arrays

    from .conftest import HEART_DATA

    data = HEART_DATA / "processed.cleveland.data"
    greedy = heart_experiment("data.test_fraction=0.99", "data.split_seed=7")
    site = load_federation(greedy.data, greedy.seed)[0]
    arrays = model_to_arrays(resolve_task(greedy.task.name, greedy.task.args).build_model(site.schema, seed=0))
    ledger = tmp_path / "ledger.sqlite"
    node = {"data-path": str(data), "site": "cleveland", "ledger": str(ledger), "budget-epsilon": 3.0}
    first = _ask(app, "evaluate", greedy, arrays, node)
    assert not first.has_error(), first.error
    metrics = first.content["metrics"]
    # 303 rows, the node's own 25 %: about 76 test rows (plus noise), never 300.
    assert 40 < metrics["num-examples"] < 120 and 0 <= metrics["accuracy"] <= 1
    book = PrivacyLedger(ledger)
    (dataset,) = book.datasets()
    (release,) = book.releases(dataset)
    assert (release.noise_multiplier, release.sample_rate, release.steps) == (5.0, 1.0, 1)
    assert book.epsilon(dataset, 1e-5) == epsilon([(5.0, 1.0, 1)], 1e-5)
    # Until the budget is spent: then the node refuses with the budget's code, and nothing more is charged.
    replies = [_ask(app, "evaluate", greedy, arrays, node, server_round=r) for r in range(2, 40)]
    refused = [r for r in replies if r.has_error()]
    assert refused and all(r.error.code == ErrorCode.BUDGET_EXHAUSTED for r in refused)
    assert book.epsilon(dataset, 1e-5) <= 3.0
    assert len(book.releases(dataset)) == 1 + sum(not r.has_error() for r in replies)
    # A node that refuses evaluation says so with the policy code; one with too few test rows too.
    closed = _ask(app, "evaluate", greedy, arrays, {**node, "evaluation": "refuse"})
    assert closed.has_error() and closed.error.code == ErrorCode.POLICY
    tiny = _ask(app, "evaluate", greedy, arrays, {"data-path": str(data), "site": "c", "min-test-rows": 500})
    assert tiny.has_error() and tiny.error.code == ErrorCode.POLICY and "min-test-rows" in tiny.error.reason


def test_a_node_that_requires_secure_aggregation_refuses_plain_training(heart_experiment, tmp_path):
    from flowerbed.client.app import app
    from flowerbed.tasks import resolve_task
    from flowerbed.weights import model_to_arrays

    experiment = heart_experiment("train.local_epochs=1")
    site = load_federation(experiment.data, experiment.seed)[0]
    arrays = model_to_arrays(resolve_task(experiment.task.name, experiment.task.args).build_model(site.schema, seed=0))
    node = {"partition-id": 0, "require-secure-aggregation": True}
    refused = _ask(app, "train", experiment, arrays, node)
    assert refused.has_error() and refused.error.code == ErrorCode.POLICY
    assert "secure aggregation" in refused.error.reason
    discovery = _ask(app, "query", experiment, arrays, node)
    assert not discovery.has_error() and "num-examples" not in discovery.content["metrics"]
    assert _ask(app, "query", experiment, arrays, {"partition-id": 0}).content["metrics"]["num-examples"] > 0
