"""The ClientApp's handlers: Flower messages in, one node round, Flower messages out.

A thin adapter over ``flowerbed.client.node_round``: it reads the request from the message, lets
the node admit it, trains or evaluates, releases, and builds the reply. A refusal becomes an error
reply with the node's ``ErrorCode``, never a silent failure.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from flowerbed.client.node_round import (
    Admitted,
    Kind,
    NodeRequest,
    Refusal,
    Split,
    admit,
    evaluate_step,
    node_label,
    node_model,
    personal_scores,
    query_metrics,
    refusal_for,
    release_evaluate,
    release_train,
    train_step,
)
from flowerbed.exception import FlowerbedError, NodeError
from flowerbed.experiment import Experiment, parse_experiment
from flowerbed.packed_arrays import PackError, pack_content, unpack_content
from flowerbed.protocol import (
    CLINICAL_RECORD,
    EVALUATE_CLINICAL_KEY,
    EVALUATE_SPLIT_KEY,
    EXPERIMENT_KEY,
    PROXIMAL_MU_KEY,
    RUN_ID_KEY,
    SCAFFOLD_CONTROL,
    SCAFFOLD_DELTA,
    SCAFFOLD_PREFIX,
    SECAGG_ACTION_PREFIX,
    SITE_RECORD,
)
from flowerbed.tasks import resolve_device
from flowerbed.weights import arrays_to_numpy, model_to_arrays, numpy_to_arrays


@functools.lru_cache(maxsize=16)
def _experiment(text: str) -> Experiment:
    return parse_experiment(json.loads(text), "experiment sent by the server")


def node_request(message: Message, context: Context, kind: Kind) -> NodeRequest:
    """The request a message makes of this node.

    Raises
    ------
    NodeError
        When the message does not come from a flowerbed ServerApp.
    """
    config = message.content.get("config")  # one lookup: ``config_records`` copies every record
    if not isinstance(config, ConfigRecord) or EXPERIMENT_KEY not in config:
        raise NodeError(f"message has no {EXPERIMENT_KEY!r}: the server is not a flowerbed ServerApp")
    return NodeRequest(
        kind=kind,
        experiment=_experiment(str(config[EXPERIMENT_KEY])),
        run_id=str(config.get(RUN_ID_KEY, "run")),
        server_round=int(config.get("server-round", 0)),
        node_config=context.node_config,
        secure=kind == "train" and message.metadata.message_type.startswith(SECAGG_ACTION_PREFIX),
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
        split=evaluation_split(config.get(EVALUATE_SPLIT_KEY, "test")),
        control=_control(message) if kind == "train" else None,
        clinical=kind == "evaluate" and config.get(EVALUATE_CLINICAL_KEY) is True,
    )


def _control(message: Message) -> dict[str, np.ndarray] | None:
    """SCAFFOLD's global control variate, where the strategy sent one."""
    record = message.content.get(SCAFFOLD_CONTROL)
    return arrays_to_numpy(record) if isinstance(record, ArrayRecord) else None


def evaluation_split(value: object) -> Split:
    """The split an evaluation message names.

    Raises
    ------
    NodeError
        For anything but "test" or "validation".
    """
    if value not in ("test", "validation"):
        raise NodeError(f"{EVALUATE_SPLIT_KEY} = {value!r} from the server must be 'test' or 'validation'")
    return value  # type: ignore[return-value]


def refusal_reply(message: Message, refusal: Refusal) -> Message:
    """The error reply for a refusal (its code is what the coordinator reads)."""
    return Message(Error(code=int(refusal.code), reason=refusal.reason), reply_to=message)


def error_reply(message: Message, context: Context, exc: FlowerbedError) -> Message:
    """The error reply for an error raised while answering ``message``."""
    return refusal_reply(message, refusal_for(exc, node_label(context.node_config)))


def packed_arrays_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Unpack a request that came packed and pack the reply the same way (``flowerbed.packed_arrays``).

    An envelope or packed record that does not parse is refused with a ``NODE_ERROR`` reply;
    nothing of it is used.
    """
    if message.has_error():
        return call_next(message, context)
    try:
        content, packed = unpack_content(message.content)
    except Exception as exc:  # nothing the server sends reaches a handler unread
        detail = str(exc) if isinstance(exc, PackError) else f"{type(exc).__name__} while reading them"
        return error_reply(message, context, NodeError(f"the server's arrays do not unpack: {detail}"))
    if not packed:
        return call_next(message, context)
    message.content = content
    reply = call_next(message, context)
    if not reply.has_error():
        reply.content, _ = pack_content(reply.content)
    return reply


def site_record(name: str) -> ConfigRecord:
    """The record naming the replying site."""
    return ConfigRecord({"name": name})


def _admitted(message: Message, context: Context, kind: Kind) -> Admitted | Refusal:
    try:
        request = node_request(message, context, kind)
    except FlowerbedError as exc:
        return refusal_for(exc, node_label(context.node_config))
    (outcome,) = admit([request])
    return outcome


def query(message: Message, context: Context) -> Message:
    """Answer discovery: the site's name and what the node reveals about its size."""
    admitted = _admitted(message, context, "query")
    if isinstance(admitted, Refusal):
        return refusal_reply(message, admitted)
    content = RecordDict(
        {SITE_RECORD: site_record(admitted.site.name), "metrics": MetricRecord(query_metrics(admitted))}
    )
    return Message(content, reply_to=message)


def train(message: Message, context: Context) -> Message:
    """Train the received global model on local data and reply with the new weights."""
    admitted = _admitted(message, context, "train")
    if isinstance(admitted, Refusal):
        return refusal_reply(message, admitted)
    try:
        model = node_model(admitted, arrays_to_numpy(message.content["arrays"]))
        result = train_step(admitted, model, resolve_device(admitted.request.experiment.task.device))
    except FlowerbedError as exc:
        return refusal_reply(message, refusal_for(exc, admitted.site.name))
    (released,) = release_train([admitted], [result])
    if isinstance(released, Refusal):  # the update is discarded
        return refusal_reply(message, released)
    content = RecordDict(
        {
            "arrays": model_to_arrays(model),
            "metrics": MetricRecord(released),
            SITE_RECORD: site_record(admitted.site.name),
        }
    )
    if result.control_delta is not None:
        content[SCAFFOLD_DELTA] = numpy_to_arrays({SCAFFOLD_PREFIX + k: v for k, v in result.control_delta.items()})
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received global model on the site's own test split."""
    admitted = _admitted(message, context, "evaluate")
    if isinstance(admitted, Refusal):
        return refusal_reply(message, admitted)
    try:
        model = node_model(admitted, arrays_to_numpy(message.content["arrays"]))
        device = resolve_device(admitted.request.experiment.task.device)
        metrics = evaluate_step(admitted, model, device)
        own = personal_scores(admitted, model, device)  # the site's personalized model, where there is one
    except FlowerbedError as exc:
        return refusal_reply(message, refusal_for(exc, admitted.site.name))
    (released,) = release_evaluate([admitted], [metrics])
    if isinstance(released, Refusal):
        return refusal_reply(message, released)
    content = RecordDict(
        {"metrics": MetricRecord({**released.metrics, **own}), SITE_RECORD: site_record(admitted.site.name)}
    )
    if released.clinical is not None:
        content[CLINICAL_RECORD] = ConfigRecord({"statistics": released.clinical})
    return Message(content, reply_to=message)
