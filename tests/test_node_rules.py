"""Every node rule gives the same outcome, with the same error code, on all three execution paths.

The paths: Flower's simulation engine (Ray) running the ClientApp, the inline backend sending each
message to the ClientApp (``backend.vectorize = false``), and the inline backend's vectorized
cohorts. A probe ServerApp sends one kind of message to every virtual node and records each
reply as ``(site, "ok", metric keys)`` or ``(site, error code)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV
from flowerbed.experiment import Experiment
from flowerbed.protocol import EVALUATE_SPLIT_KEY, EXPERIMENT_KEY, RUN_ID_KEY, error_name
from flowerbed.server.runner import initial_model
from flowerbed.simulations.simulate import run_backend, virtual_nodes_home
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.weights import model_to_arrays

from .conftest import ROOT

PATHS = {
    "flower": ["backend.name='flower'"],
    "inline-sequential": ["backend.name='inline'", "backend.vectorize=false"],
    "inline-vectorized": ["backend.name='inline'"],
}


def _describe(reply: Message) -> tuple:
    if reply.has_error():
        reason = str(reply.error.reason)
        return (reason.split(":", 1)[0].removeprefix("node "), error_name(reply.error.code))
    return (str(reply.content["site"]["name"]), "ok", tuple(sorted(reply.content["metrics"].keys())))


def probe(
    experiment: Experiment,
    kinds: tuple[str, ...],
    nodes_dir: Path,
    *,
    extra_config: dict | None = None,
    describe: Callable[[Message], Any] = _describe,
) -> dict[str, list]:
    """Send each kind of message once to every node, on the experiment's backend; describe the replies."""
    num_nodes = len(load_federation(experiment.data, experiment.seed))
    arrays = model_to_arrays(initial_model(experiment))
    config = {EXPERIMENT_KEY: json.dumps(experiment.to_dict()), RUN_ID_KEY: "probe", "server-round": 1}
    config.update(extra_config or {})
    seen: dict[str, list[tuple]] = {}
    errors: list[BaseException] = []
    app = ServerApp()

    def ask(grid: Grid) -> None:
        deadline = time.monotonic() + 120
        while len(node_ids := list(grid.get_node_ids())) < num_nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        for kind in kinds:
            messages = [
                Message(
                    RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=n, message_type=kind
                )
                for n in node_ids
            ]
            seen[kind] = sorted(describe(r) for r in grid.send_and_receive(messages, timeout=300))

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            ask(grid)
        except BaseException as exc:  # re-raised below, outside the engine's thread
            errors.append(exc)

    with virtual_nodes_home(nodes_dir):
        run_backend(experiment, app, num_nodes)
    if errors:
        raise errors[0]
    return seen


PLAIN = ("num-examples", "train-loss")
PRIVATE = ("delta", "epsilon", "num-examples")


def _rules(tmp_path: Path) -> list[tuple[str, list[str], dict, tuple[str, ...], dict[str, list[tuple]], dict]]:
    empty_approvals = tmp_path / "approvals.json"
    empty_approvals.write_text('{"tasks": {}}')
    tiny = tmp_path / "tiny.csv"
    rng = np.random.default_rng(0)
    rows = ["x1,x2,site,label"]
    for site, n in ((1, 40), (2, 40), (3, 1)):
        rows += [f"{a:.3f},{b:.3f},{site},{int(a + b > 0)}" for a, b in rng.normal(size=(n, 2))]
    tiny.write_text("\n".join(rows) + "\n")
    return [
        (
            "plain training on a node with a budget, an unknown key, a data error",
            [],
            {
                "cleveland": {"budget-epsilon": 2},
                "hungarian": {"budget_epsilon": 8},
                "switzerland": {"data-path": str(tmp_path / "missing.csv")},
            },
            ("train",),
            {
                "train": [
                    ("cleveland", "POLICY"),
                    ("hungarian", "CONFIG"),
                    ("switzerland", "DATA"),
                    ("va", "ok", PLAIN),
                ]
            },
            {},
        ),
        (
            "budget exhausted",
            ["privacy.enabled=true", "privacy.noise_multiplier=1.0"],
            {"*": {"dp-test-seed": 0}, "hungarian": {"budget-epsilon": 0.01}},
            ("train",),
            {
                "train": [
                    ("cleveland", "ok", PRIVATE),
                    ("hungarian", "BUDGET_EXHAUSTED"),
                    ("switzerland", "ok", PRIVATE),
                    ("va", "ok", PRIVATE),
                ]
            },
            {},
        ),
        (
            "an unapproved user task",
            ["task.name='tests.user_task_example:wide_mlp'", "task.args={}"],
            {"va": {"approvals": str(empty_approvals)}},
            ("train",),
            {
                "train": [
                    ("cleveland", "ok", PLAIN),
                    ("hungarian", "ok", PLAIN),
                    ("switzerland", "ok", PLAIN),
                    ("va", "TASK_NOT_APPROVED"),
                ]
            },
            {},
        ),
        (
            "one training row and no test split",
            [
                "data.dataset='csv'",
                f"data.path='{tiny}'",
                "data.label_column='label'",
                "data.site_column='site'",
            ],
            {},
            ("train", "evaluate"),
            {
                "train": [("site-1", "ok", PLAIN), ("site-2", "ok", PLAIN), ("site-3", "ok", PLAIN)],
                "evaluate": [
                    ("site-1", "ok", ("accuracy", "loss", "num-examples")),
                    ("site-2", "ok", ("accuracy", "loss", "num-examples")),
                    ("site-3", "DATA"),
                ],
            },
            {},
        ),
        (
            "validation rows held at each node, scored when the coordinator asks for them",
            ["data.validation_fraction=0.25"],
            {},
            ("evaluate",),
            {
                "evaluate": [
                    ("cleveland", "ok", ("accuracy", "loss", "num-examples")),
                    ("hungarian", "ok", ("accuracy", "loss", "num-examples")),
                    ("switzerland", "ok", ("accuracy", "loss", "num-examples")),
                    ("va", "ok", ("accuracy", "loss", "num-examples")),
                ],
            },
            {EVALUATE_SPLIT_KEY: "validation"},
        ),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule", range(5), ids=["policy-config-data", "budget", "approval", "one-row", "validation-split"]
)
def test_every_path_applies_the_same_node_rules(rule, heart_experiment, tmp_path, monkeypatch):
    name, overrides, node_configs, kinds, expected, extra_config = _rules(tmp_path)[rule]
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps(node_configs))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # Ray's workers import the user task from the checkout
    outcomes = {}
    for path, backend in PATHS.items():
        experiment = heart_experiment(*overrides, *backend)
        outcomes[path] = probe(experiment, kinds, tmp_path / f"nodes-{path}", extra_config=extra_config)
    for path, seen in outcomes.items():
        assert seen == expected, f"{name}: the {path} path differs"
