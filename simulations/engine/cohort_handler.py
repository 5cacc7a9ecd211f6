"""The inline grid's batch handler: a round's train and evaluate messages as vectorized cohorts.

Messages that carry the same global weights and the same experiment, whose task is a built-in
model, are answered together. Every virtual node goes through the node's own round
(``flowerbed.client.node_round``): the same ``admit`` (config, approval, data, policy, budget) and
the same ``release`` (ledger charge, reply metrics) as the ClientApp, with only the train step
replaced by the cohort kernels (``flowerbed.simulations.cohort``). A refused node gets the same
error reply, with the same code, as from the ClientApp. Everything else (discovery, the
secure-aggregation stages, user tasks, a model that does not fit) goes to the ClientApp, one
message at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from flowerbed.client.handlers import node_request, refusal_reply
from flowerbed.client.node_round import (
    Admitted,
    Kind,
    Metrics,
    NodeRequest,
    Refusal,
    Scored,
    admit,
    release_evaluate,
    release_train,
    score,
)
from flowerbed.client.training import TrainResult
from flowerbed.exception import FlowerbedError
from flowerbed.in_memory_arrays import in_memory_record, stacked_numpy
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.protocol import (
    CLINICAL_RECORD,
    EVALUATE_SPLIT_KEY,
    EXPERIMENT_KEY,
    PROXIMAL_MU_KEY,
    SCAFFOLD_CONTROL,
    SITE_RECORD,
)
from flowerbed.server.reply_block import ReplyBlock
from flowerbed.simulations.cohort.vectorized import (
    Unsupported,
    check_functional,
    cohort_logits,
    stack_cohort,
    train_cohort,
)
from flowerbed.simulations.cohort.vectorized_dp import PrivateCohortPlan, train_cohort_private
from flowerbed.simulations.engine.inline_records import config_record, metric_record, reply_content, site_record
from flowerbed.tasks import DataSchema, Task, is_builtin, resolve_device
from flowerbed.weights import arrays_to_numpy

Pair = tuple[Message, Context]
_KINDS: dict[str, Kind] = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}


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
        self._models: dict[tuple, torch.nn.Module] = {}  # one module per architecture: only its shapes are used

    def __call__(self, pairs: list[Pair]) -> list[Message]:
        """One reply per (message, context) pair, in order."""
        replies, _ = self._answer(pairs, blocks=None)
        return replies

    def columnar(self, pairs: list[Pair]) -> tuple[list[Message], list[ReplyBlock]]:
        """The replies, with the vectorized training replies as columns (``ReplyBlock``) instead of messages.

        Refusals, and everything the ClientApp answers, stay messages.
        """
        blocks: list[ReplyBlock] = []
        replies, in_blocks = self._answer(pairs, blocks=blocks)
        return [r for r, b in zip(replies, in_blocks, strict=True) if not b], blocks

    def _answer(self, pairs: list[Pair], blocks: list[ReplyBlock] | None) -> tuple[list[Message], list[bool]]:
        replies: list[Message | None] = [None] * len(pairs)
        in_blocks = [False] * len(pairs)
        if self.vectorize:
            groups: dict[tuple, list[int]] = {}
            keys: dict[tuple[int, str], tuple | None] = {}  # one content is sent to many nodes
            for i, (message, _) in enumerate(pairs):
                if message.has_error():
                    continue
                read = (id(message.content), message.metadata.message_type)
                key = keys[read] if read in keys else keys.setdefault(read, self._group_key(message))
                if key is not None:
                    groups.setdefault(key, []).append(i)
            for key, members in groups.items():
                try:
                    answered = self._answer_group(_KINDS[key[0]], [pairs[i] for i in members], blocks)
                except Unsupported:
                    continue
                for i, reply in zip(members, answered, strict=True):
                    if reply is _IN_BLOCK:
                        in_blocks[i] = True
                    else:
                        replies[i] = reply  # type: ignore[assignment]
        for i, pair in enumerate(pairs):
            if in_blocks[i] or replies[i] is not None:
                self.stats["vectorized"] += 1
            else:
                replies[i] = self.client_app(*pair)
                self.stats["sequential"] += 1
        return replies, in_blocks  # type: ignore[return-value]

    @staticmethod
    def _group_key(message: Message) -> tuple | None:
        kind = message.metadata.message_type
        if kind not in _KINDS or message.has_error():
            return None
        content = message.content
        if "arrays" not in content or "config" not in content or SCAFFOLD_CONTROL in content:
            return None  # SCAFFOLD rounds go through the ClientApp, one node at a time
        config = content["config"]
        if EXPERIMENT_KEY not in config:
            return None
        server_round, mu = config.get("server-round", 0), config.get(PROXIMAL_MU_KEY, 0.0)
        split = config.get(EVALUATE_SPLIT_KEY, "test")
        return kind, id(content["arrays"]), str(config[EXPERIMENT_KEY]), server_round, mu, split

    def _answer_group(
        self, kind: Kind, pairs: list[Pair], blocks: list[ReplyBlock] | None
    ) -> list[Message | object | None]:
        try:
            requests = _requests(pairs, kind)
        except FlowerbedError:
            raise Unsupported("the experiment does not parse") from None
        experiment = requests[0].experiment
        if not is_builtin(experiment.task.name):
            raise Unsupported(f"task {experiment.task.name!r} is not a built-in model")
        if kind == "train" and experiment.secagg.enabled:
            raise Unsupported("secure-aggregation rounds go through the ClientApp")
        if experiment.personalization.method != "none":
            raise Unsupported("personalized rounds keep layers at each node: the ClientApp answers them")
        try:
            device = resolve_device(experiment.task.device)
        except FlowerbedError:
            raise Unsupported("the device does not resolve here") from None
        replies: list[Message | object | None] = [None] * len(pairs)
        made: list[ReplyBlock] = []
        by_schema: dict[Any, list[tuple[int, Admitted]]] = {}
        for i, outcome in enumerate(admit(requests)):
            if isinstance(outcome, Refusal):
                replies[i] = refusal_reply(pairs[i][0], outcome)
            else:  # one cohort per data schema and local work (sites may have their own batch size or steps)
                key = (outcome.site.schema, _train_key(outcome))
                by_schema.setdefault(key, []).append((i, outcome))
        message = pairs[0][0]
        for (schema, _), members in by_schema.items():
            try:
                model = self._model(members[0][1].task, schema, experiment.privacy.enabled)
            except (FlowerbedError, ValueError, TypeError):
                continue  # the ClientApp reports why the model does not fit the data
            weights = self._weights(message, model, device)
            if weights is None:
                continue  # the ClientApp reports the mismatch
            admitted = [a for _, a in members]
            if kind == "train":
                trained, results = self._train(model, weights, admitted, device)
                released = release_train(admitted, results)
                if blocks is not None:
                    block = _block(admitted, released, trained)
                    if block is not None:
                        if len(block):
                            made.append(block)
                        for row, (i, _) in enumerate(members):
                            outcome = released[row]
                            replies[i] = (
                                refusal_reply(pairs[i][0], outcome) if isinstance(outcome, Refusal) else _IN_BLOCK
                            )
                        continue
            else:
                trained, released = None, release_evaluate(admitted, self._evaluate(model, weights, admitted, device))
            for row, ((i, a), outcome) in enumerate(zip(members, released, strict=True)):
                if isinstance(outcome, Refusal):  # an update that may not leave the node is dropped here
                    replies[i] = refusal_reply(pairs[i][0], outcome)
                else:
                    replies[i] = _reply(pairs[i][0], a.site.name, outcome, trained, row)
        if blocks is not None:  # only once the whole group is answered (``Unsupported`` sends it all elsewhere)
            blocks.extend(made)
        return replies

    def _model(self, task: Task, schema: DataSchema, private: bool) -> torch.nn.Module:
        """The task's module for ``schema`` (DP-compatible where ``private``), built once: only its shapes are used."""
        key = (task, schema, private)
        model = self._models.get(key)
        if model is None:
            model = task.build_model(schema)
            if private:
                model = make_private_compatible(model)
            check_functional(model)
            if len(self._models) > 64:
                self._models.clear()
            self._models[key] = model
        return model

    @staticmethod
    def _weights(message: Message, model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The received weights as the model's parameters (``None`` where the ClientApp would refuse)."""
        arrays = arrays_to_numpy(message.content["arrays"])
        params = dict(model.named_parameters())
        if set(arrays) != set(params) or any(arrays[k].shape != tuple(p.shape) for k, p in params.items()):
            return None
        return {k: torch.from_numpy(arrays[k].copy()).to(device=device, dtype=p.dtype) for k, p in params.items()}

    @staticmethod
    def _train(
        model: torch.nn.Module, weights: dict[str, torch.Tensor], admitted: Sequence[Admitted], device: torch.device
    ) -> tuple[dict[str, np.ndarray], list[TrainResult]]:
        """The cohort kernels in place of each node's train step."""
        experiment, task, train = admitted[0].request.experiment, admitted[0].task, admitted[0].train
        mu = admitted[0].request.proximal_mu  # one message group: one strategy config
        sites = [a.site for a in admitted]
        cohort = stack_cohort([s.x_train for s in sites], [s.y_train for s in sites], device)
        classes = sites[0].schema.num_classes  # one cohort, one schema
        if cohort.y.numel() and not 0 <= int(cohort.y.min()) <= int(cohort.y.max()) < classes:
            raise Unsupported(f"labels outside 0..{classes - 1}: the ClientApp names the node")  # kernels assume them
        if experiment.privacy.enabled:
            plans = [a.private.plan for a in admitted]  # type: ignore[union-attr]
            seeds = [a.private.noise_seed for a in admitted if a.private.noise_seed is not None]  # type: ignore[union-attr]
            stacked_plan = PrivateCohortPlan.from_plans(plans, [s.num_train for s in sites], device)
            result = train_cohort_private(
                model, task.loss_fn, cohort, weights, train, stacked_plan,
                seed=seeds[0] if seeds else None, proximal_mu=mu,
            )  # fmt: skip
        else:
            schedules = [a.schedule for a in admitted] if train.local_steps else None
            seeds = [0] * len(admitted) if schedules else [a.seed for a in admitted]  # a schedule has its own
            result = train_cohort(
                model, task.loss_fn, cohort, weights, train, seeds, proximal_mu=mu, schedules=schedules
            )
        results = [
            TrainResult(loss=result.loss[j], steps=result.steps[j], num_examples=s.num_train)
            for j, s in enumerate(sites)
        ]
        return stacked_numpy(result.params), results

    @staticmethod
    def _evaluate(
        model: torch.nn.Module, weights: dict[str, torch.Tensor], admitted: Sequence[Admitted], device: torch.device
    ) -> list[Scored]:
        """Each node's ``score`` on its test (or validation) split, from one forward pass of the cohort."""
        rows = [a.evaluation_rows() for a in admitted]
        logits = cohort_logits(model, weights, [torch.as_tensor(x, device=device) for x, _ in rows])
        return [
            score(a, out, torch.as_tensor(y, device=device))
            for a, (_, y), out in zip(admitted, rows, logits, strict=True)
        ]


_IN_BLOCK = object()  # a reply that travels as a row of a ReplyBlock


def _requests(pairs: Sequence[Pair], kind: Kind) -> list[NodeRequest]:
    """Each message's ``node_request``, read once per message content: a strategy sends one content to many nodes."""
    read: dict[tuple[int, str], NodeRequest] = {}
    out = []
    for message, context in pairs:
        key = (id(message.content), message.metadata.message_type)
        request = read.get(key)
        if request is None:
            request = read[key] = node_request(message, context, kind)
        elif request.node_config is not context.node_config:
            request = request.with_(node_config=context.node_config)
        out.append(request)
    return out


def _block(
    admitted: Sequence[Admitted], released: Sequence[Metrics | Refusal], trained: dict[str, np.ndarray]
) -> ReplyBlock | None:
    """The released rows as one ``ReplyBlock`` (``None`` if their metrics differ in keys: then messages)."""
    rows = [j for j, outcome in enumerate(released) if not isinstance(outcome, Refusal)]
    if not rows:
        return ReplyBlock([], {}, {})
    metrics = [released[j] for j in rows]
    keys = list(metrics[0])  # type: ignore[arg-type]
    if any(list(m) != keys for m in metrics):  # type: ignore[arg-type]
        return None
    arrays = trained if len(rows) == len(released) else {name: t[rows] for name, t in trained.items()}
    columns = {key: [m[key] for m in metrics] for key in keys}  # type: ignore[index]
    return ReplyBlock([admitted[j].site.name for j in rows], arrays, columns)


def _train_key(admitted: Admitted) -> object:
    """Nodes whose local work is the federation's share one key; a site with its own, its own."""
    train = admitted.train
    return "federation" if train is admitted.request.experiment.train else train.model_dump_json()


def _reply(
    message: Message, site: str, metrics: Metrics | Scored, trained: dict[str, np.ndarray] | None, row: int
) -> Message:
    """The reply the ClientApp builds: weights (row ``row`` of ``trained``) for training, metrics, the site.

    An evaluation's reply also carries its released clinical statistics, when asked for.
    """
    records: dict[str, Any] = {}
    if trained is not None:
        records["arrays"] = in_memory_record({name: tensor[row] for name, tensor in trained.items()})
    scored = metrics if isinstance(metrics, Scored) else Scored(metrics)
    records["metrics"] = metric_record(scored.metrics)
    records[SITE_RECORD] = site_record(site)
    if scored.clinical is not None:
        records[CLINICAL_RECORD] = config_record({"statistics": scored.clinical})
    return Message(reply_content(records), reply_to=message)
