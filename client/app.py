"""The ClientApp: a hospital node's side of every round (Flower Message API).

The node trains only on the data its own configuration names (``data-path`` and ``site`` in a
deployment, ``partition-id`` in a simulation). A problem the hospital can fix becomes an error
reply naming the node and the fix, never a silent failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.client.approval import check_task_approved
from flowerbed.client.local_data import resolve_site
from flowerbed.client.private_round import refuse_unless_private, train_private_round
from flowerbed.client.training import evaluate_local, train_local
from flowerbed.exception import DataError, FlowerbedError
from flowerbed.experiment import EXPERIMENT_KEY, RUN_ID_KEY, Experiment, parse_experiment
from flowerbed.seeds import derive_seed
from flowerbed.tasks import SiteData, Task, resolve_device, resolve_task
from flowerbed.weights import load_arrays, model_to_arrays

ERROR_CODE = 4000

app = ClientApp()


def experiment_from_message(message: Message) -> Experiment:
    """The run's experiment, as the server sent it."""
    config = message.content["config"]
    if EXPERIMENT_KEY not in config:
        raise FlowerbedError(f"message has no {EXPERIMENT_KEY!r}: the server is not a flowerbed ServerApp")
    return parse_experiment(json.loads(str(config[EXPERIMENT_KEY])), "experiment sent by the server")


def _error_reply(message: Message, context: Context, exc: Exception) -> Message:
    site = context.node_config.get("site") or context.node_config.get("partition-id", "?")
    return Message(Error(code=ERROR_CODE, reason=f"node {site}: {exc}"), reply_to=message)


@dataclass
class Received:
    """What one train or evaluate message resolves to at this node."""

    experiment: Experiment
    site: SiteData
    task: Task
    device: torch.device
    model: torch.nn.Module


def receive_model(message: Message, context: Context) -> Received:
    """Guards, then the node's own data and the received global model, ready to train or evaluate."""
    experiment = experiment_from_message(message)
    check_task_approved(experiment.task.name, context.node_config)
    site = resolve_site(context, experiment)
    task = resolve_task(experiment.task.name, experiment.task.args)
    device = resolve_device(experiment.task.device)
    model = task.build_model(site.schema, private=experiment.privacy.enabled)
    load_arrays(model, message.content["arrays"])
    return Received(experiment, site, task, device, model)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Answer the server's discovery: the site's name and its number of training examples."""
    try:
        experiment = experiment_from_message(message)
        check_task_approved(experiment.task.name, context.node_config)
        site = resolve_site(context, experiment)
    except FlowerbedError as exc:
        return _error_reply(message, context, exc)
    content = RecordDict(
        {
            "site": ConfigRecord({"name": site.name}),
            "metrics": MetricRecord({"num-examples": site.num_train}),
        }
    )
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received global model on local data and reply with the new weights."""
    try:
        received = receive_model(message, context)
        experiment, site, task, device, model = (
            received.experiment,
            received.site,
            received.task,
            received.device,
            received.model,
        )
        server_round = int(message.content["config"]["server-round"])
        seed = derive_seed(experiment.seed, "train", server_round, site.name)
        dp_metrics: dict[str, float] = {}
        if experiment.privacy.enabled:  # DP-SGD under the node's own budget
            private = train_private_round(
                model,
                task,
                site,
                experiment,
                node_config=context.node_config,
                run_id=str(message.content["config"].get(RUN_ID_KEY, "run")),
                server_round=server_round,
                device=device,
            )
            result = private.train
            dp_metrics = {"epsilon": private.epsilon, "delta": private.delta}
        else:
            refuse_unless_private(context.node_config, site.name)
            result = train_local(model, task, site.x_train, site.y_train, experiment.train, seed=seed, device=device)
    except FlowerbedError as exc:
        return _error_reply(message, context, exc)
    values = {"num-examples": result.num_examples, "train-loss": result.loss}
    if dp_metrics:  # the loss on private rows carries no noise: under DP it stays at the node
        values = {"num-examples": result.num_examples, **dp_metrics}
    metrics = MetricRecord(values)
    content = RecordDict(
        {"arrays": model_to_arrays(model), "metrics": metrics, "site": ConfigRecord({"name": site.name})}
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's own test split."""
    try:
        received = receive_model(message, context)
        site = received.site
        if len(site.y_test) == 0:
            raise DataError(f"site {site.name} has no test rows to evaluate on (too few examples to split)")
        metrics = evaluate_local(received.model, received.task, site.x_test, site.y_test, device=received.device)
    except FlowerbedError as exc:
        return _error_reply(message, context, exc)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=message)


# Secure aggregation registers its train actions (train.secagg_*) on this app.
from flowerbed.client import secagg_handlers  # noqa: E402, F401
