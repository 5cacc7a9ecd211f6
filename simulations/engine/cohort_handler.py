"""The inline grid's batch handler: a round's train and evaluate messages as vectorized cohorts.

Messages that carry the same global weights and the same experiment, whose task is a built-in
model, are answered together (``flowerbed.simulations.cohort.vectorized``); the replies are the very
Messages the ClientApp would build (weights, ``num-examples``, ``train-loss``, the ``site``
record), so the server cannot tell the paths apart. Everything else (other message types such as
discovery or secure-aggregation stages, user tasks, secure-aggregation rounds, any node whose data
or weights the ClientApp would refuse) is handed to the ClientApp, one message at a time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.client.app import _error_reply
from flowerbed.client.local_data import resolve_site
from flowerbed.exception import FlowerbedError
from flowerbed.experiment import EXPERIMENT_KEY, RUN_ID_KEY, Experiment, parse_experiment
from flowerbed.seeds import derive_seed
from flowerbed.simulations.cohort.vectorized import (
    Unsupported,
    check_functional,
    cohort_logits,
    stack_cohort,
    train_cohort,
)
from flowerbed.simulations.cohort.vectorized_dp import PrivateCohortPlan, train_cohort_private
from flowerbed.simulations.engine.inline_arrays import in_memory_record, stacked_numpy
from flowerbed.simulations.engine.inline_privacy import NodeRelease, charge_release, prepare_release
from flowerbed.simulations.engine.inline_records import metric_record, reply_content, site_record
from flowerbed.tasks import is_builtin, resolve_device, resolve_task
from flowerbed.tasks.task import SiteData, Task
from flowerbed.weights import arrays_to_numpy

Pair = tuple[Message, Context]


@functools.lru_cache(maxsize=16)
def _experiment(text: str) -> Experiment:
    return parse_experiment(json.loads(text), "experiment sent by the server")


class CohortHandler:
    """Answer a push of messages, vectorizing what it can (an ``InlineGrid`` ``batch_handler``).

    Parameters
    ----------
    client_app : ClientApp
        The app that answers everything the vectorized path does not take.
    vectorize : bool (default: True)
        ``False`` sends every message to the ClientApp (the sequential reference).
    """

    def __init__(self, client_app: ClientApp, *, vectorize: bool = True) -> None:
        self.client_app = client_app
        self.vectorize = vectorize
        self.stats = {"vectorized": 0, "sequential": 0}

    def __call__(self, pairs: list[Pair]) -> list[Message]:
        """One reply per (message, context) pair, in order."""
        replies: list[Message | None] = [None] * len(pairs)
        if self.vectorize:
            groups: dict[tuple, list[int]] = {}
            for i, (message, _) in enumerate(pairs):
                key = self._group_key(message)
                if key is not None:
                    groups.setdefault(key, []).append(i)
            for key, members in groups.items():
                try:
                    answered = self._answer_group(key[0], [pairs[i] for i in members])
                except Unsupported:
                    continue
                for i, reply in zip(members, answered, strict=True):
                    replies[i] = reply
        for i, pair in enumerate(pairs):
            if replies[i] is None:
                replies[i] = self.client_app(*pair)
                self.stats["sequential"] += 1
            else:
                self.stats["vectorized"] += 1
        return replies  # type: ignore[return-value]

    @staticmethod
    def _group_key(message: Message) -> tuple | None:
        kind = message.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or message.has_error():
            return None
        content = message.content
        if "arrays" not in content or "config" not in content:
            return None
        config = content["config"]
        if EXPERIMENT_KEY not in config:
            return None
        server_round = config.get("server-round", 0)
        return kind, id(content["arrays"]), str(config[EXPERIMENT_KEY]), server_round

    def _answer_group(self, kind: str, pairs: list[Pair]) -> list[Message | None]:
        message = pairs[0][0]
        try:
            experiment = _experiment(str(message.content["config"][EXPERIMENT_KEY]))
        except FlowerbedError:
            raise Unsupported("the experiment does not parse") from None
        if not is_builtin(experiment.task.name):
            raise Unsupported(f"task {experiment.task.name!r} is not a built-in model")
        if kind == MessageType.TRAIN and experiment.secagg.enabled:
            raise Unsupported("secure-aggregation rounds go through the ClientApp")
        replies: list[Message | None] = [None] * len(pairs)
        sites: list[tuple[int, SiteData]] = []
        for i, (_, context) in enumerate(pairs):
            try:
                sites.append((i, resolve_site(context, experiment)))
            except FlowerbedError:
                continue  # the ClientApp builds the error reply
        if not sites:
            return replies
        try:
            task = resolve_task(experiment.task.name, experiment.task.args)
            device = resolve_device(experiment.task.device)
        except FlowerbedError:
            raise Unsupported("the task or device does not resolve here") from None
        by_schema: dict[Any, list[tuple[int, SiteData]]] = {}
        for i, site in sites:
            by_schema.setdefault(site.schema, []).append((i, site))
        for schema, members in by_schema.items():
            try:
                model = task.build_model(schema, private=experiment.privacy.enabled)
            except (FlowerbedError, ValueError, TypeError):
                continue  # the ClientApp reports why the model does not fit the data
            check_functional(model)
            weights = self._weights(message, model, device)
            if weights is None:
                continue  # the ClientApp reports the mismatch
            chosen = [pairs[i] for i, _ in members]
            site_list = [s for _, s in members]
            if kind == MessageType.TRAIN:
                out = self._train(experiment, task, model, weights, chosen, site_list, device)
            else:
                out = self._evaluate(task, model, weights, chosen, site_list, device)
            for (i, _), reply in zip(members, out, strict=True):
                replies[i] = reply
        return replies

    @staticmethod
    def _weights(message: Message, model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The received weights as the model's parameters (``None`` where ``load_arrays`` would refuse)."""
        arrays = arrays_to_numpy(message.content["arrays"])
        params = dict(model.named_parameters())
        if set(arrays) != set(params) or any(arrays[k].shape != tuple(p.shape) for k, p in params.items()):
            return None
        return {k: torch.from_numpy(arrays[k].copy()).to(device=device, dtype=p.dtype) for k, p in params.items()}

    def _train(
        self,
        experiment: Experiment,
        task: Task,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        pairs: list[Pair],
        sites: list[SiteData],
        device: torch.device,
    ) -> list[Message]:
        if experiment.privacy.enabled:
            return self._train_private(experiment, task, model, weights, pairs, sites, device)
        server_round = int(pairs[0][0].content["config"]["server-round"])
        cohort = stack_cohort([s.x_train for s in sites], [s.y_train for s in sites], device)
        seeds = [derive_seed(experiment.seed, "train", server_round, s.name) for s in sites]
        result = train_cohort(model, task.loss_fn, cohort, weights, experiment.train, seeds)
        trained = stacked_numpy(result.params)
        return [
            _train_reply(message, site, trained, j, {"num-examples": site.num_train, "train-loss": result.loss[j]})
            for j, ((message, _), site) in enumerate(zip(pairs, sites, strict=True))
        ]

    def _train_private(
        self,
        experiment: Experiment,
        task: Task,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        pairs: list[Pair],
        sites: list[SiteData],
        device: torch.device,
    ) -> list[Message]:
        """DP-SGD with the ClientApp's node guards: budget check before, charge before the reply."""
        if any(s.num_train == 0 for s in sites):
            raise Unsupported("DP-SGD needs training rows at every node")
        config = pairs[0][0].content["config"]
        server_round = int(config["server-round"])
        run_id = str(config.get(RUN_ID_KEY, "run"))
        replies: list[Message | None] = [None] * len(pairs)
        releases: dict[int, NodeRelease] = {}
        for j, ((message, context), site) in enumerate(zip(pairs, sites, strict=True)):
            try:
                releases[j] = prepare_release(context, site, experiment, run_id, server_round)
            except FlowerbedError as exc:
                replies[j] = _error_reply(message, context, exc)
        members = sorted(releases)
        if members:
            chosen = [sites[j] for j in members]
            cohort = stack_cohort([s.x_train for s in chosen], [s.y_train for s in chosen], device)
            plans = [releases[j].plan for j in members]
            seeds = [releases[j].test_seed for j in members if releases[j].test_seed is not None]
            seed = derive_seed(seeds[0], "dp-cohort", server_round, chosen[0].name) if seeds else None
            stacked_plan = PrivateCohortPlan.from_plans(plans, [s.num_train for s in chosen], device)
            result = train_cohort_private(
                model, task.loss_fn, cohort, weights, experiment.train, stacked_plan, seed=seed
            )
            trained = stacked_numpy(result.params)
            for row, j in enumerate(members):
                message, context = pairs[j]
                try:
                    epsilon, delta = charge_release(
                        releases[j], run_id=run_id, server_round=server_round, steps=result.steps[row]
                    )
                except FlowerbedError as exc:  # spent elsewhere meanwhile: the update is discarded
                    replies[j] = _error_reply(message, context, exc)
                    continue
                # As the ClientApp: under DP the training loss stays at the node.
                metrics = {"num-examples": sites[j].num_train, "epsilon": epsilon, "delta": delta}
                replies[j] = _train_reply(message, sites[j], trained, row, metrics)
        return replies  # type: ignore[return-value]

    @staticmethod
    def _evaluate(
        task: Task,
        model: torch.nn.Module,
        weights: dict[str, torch.Tensor],
        pairs: list[Pair],
        sites: list[SiteData],
        device: torch.device,
    ) -> list[Message]:
        xs = [torch.as_tensor(s.x_test, device=device) for s in sites]
        logits = cohort_logits(model, weights, xs)
        replies = []
        for (message, _), site, out in zip(pairs, sites, logits, strict=True):
            if len(site.y_test) == 0:
                metrics: dict[str, Any] = {"loss": float("nan"), "num-examples": 0}
            else:
                labels = torch.as_tensor(site.y_test, device=device)
                metrics = {"loss": float(task.loss_fn(out, labels))}
                metrics.update(task.metrics_fn(out, labels))
                metrics["num-examples"] = len(site.y_test)
            content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
            replies.append(Message(content, reply_to=message))
        return replies


def _train_reply(
    message: Message, site: SiteData, params: dict[str, np.ndarray], row: int, metrics: dict[str, Any]
) -> Message:
    """The reply the ClientApp's ``train`` builds: weights (row ``row`` of ``params``), metrics, the site's name."""
    arrays = in_memory_record({name: tensor[row] for name, tensor in params.items()})
    content = reply_content({"arrays": arrays, "metrics": metric_record(metrics), "site": site_record(site.name)})
    return Message(content, reply_to=message)


def make_handler(client_app: ClientApp, *, vectorize: bool = True) -> Callable[[list[Pair]], list[Message]]:
    """A ``batch_handler`` for ``InlineGrid``."""
    return CohortHandler(client_app, vectorize=vectorize)
