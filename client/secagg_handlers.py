"""The node's side of the secure train phase: four ClientApp handlers on custom train actions.

Registered by ``flowerbed.client.app`` (``HANDLERS``) for the message types ``train.secagg_advertise``,
``train.secagg_share_keys``, ``train.secagg_masked_input`` and ``train.secagg_unmask``. The node's
protocol state (its private keys and the shares it holds) lives in its Flower ``Context`` between
messages. In the masked-input stage the node trains exactly as in a plain round (the same ``train``
handler: data guards, DP-SGD under the node's budget, ledger charge), then sends only its masked
update, with its loss and epsilon in the clear; its weight is summed securely.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flowerbed.client.handlers import error_reply
from flowerbed.client.handlers import train as plain_train
from flowerbed.exception import FlowerbedError
from flowerbed.privacy.secagg.client import SecAggClient
from flowerbed.weights import arrays_to_numpy

STATE_KEY = "flowerbed.secagg"
PAYLOAD_KEY = "secagg"
MASKED_KEY = "secagg-masked"
MASKED_ARRAY = "masked"
CLEAR_METRICS = ("train-loss", "epsilon", "delta")


def _load(message: Message, context: Context) -> SecAggClient:
    node_id = message.metadata.dst_node_id
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        return SecAggClient(node_id)
    client = SecAggClient.from_record(dict(record))
    client.node_id = node_id
    return client


def _save(context: Context, client: SecAggClient) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord(client.to_record())


def _payload(message: Message) -> dict[str, Any]:
    if PAYLOAD_KEY not in message.content.config_records:
        raise FlowerbedError(f"secure-aggregation message without a {PAYLOAD_KEY!r} record")
    return dict(message.content.config_records[PAYLOAD_KEY])


def _stage(message: Message, context: Context) -> Message:
    try:
        client = _load(message, context)
        out = client.handle(_payload(message))
        _save(context, client)
    except FlowerbedError as exc:
        return error_reply(message, context, exc)
    return Message(RecordDict({PAYLOAD_KEY: ConfigRecord(out)}), reply_to=message)


def secagg_advertise(message: Message, context: Context) -> Message:
    """Stage 1: start the round, answer with two fresh public keys."""
    return _stage(message, context)


def secagg_share_keys(message: Message, context: Context) -> Message:
    """Stage 2: answer with encrypted shares for the neighbours."""
    return _stage(message, context)


def secagg_masked_input(message: Message, context: Context) -> Message:
    """Stage 3: train as in a plain round, answer with the masked update."""
    trained = plain_train(message, context)
    if trained.has_error():
        return trained
    try:
        client = _load(message, context)
        received = arrays_to_numpy(message.content["arrays"])
        new = arrays_to_numpy(trained.content["arrays"])
        update = np.concatenate([(new[k].astype(np.float64) - received[k]).ravel() for k in received]).astype(
            np.float32
        )
        metrics = trained.content["metrics"]
        out = client.masked_input(_payload(message), update, float(metrics["num-examples"]))
        _save(context, client)
    except FlowerbedError as exc:
        return error_reply(message, context, exc)
    content = RecordDict(
        {
            PAYLOAD_KEY: ConfigRecord({"stage": "masked_input"}),  # counts travel masked
            MASKED_KEY: ArrayRecord({MASKED_ARRAY: Array(out["masked"])}),
            "metrics": MetricRecord({k: v for k, v in metrics.items() if k in CLEAR_METRICS}),
            "site": trained.content["site"],
        }
    )
    return Message(content, reply_to=message)


def secagg_unmask(message: Message, context: Context) -> Message:
    """Stage 4: answer with the shares that unmask the sum (and nothing more)."""
    return _stage(message, context)


#: Custom train actions and their handlers, registered on the ClientApp.
HANDLERS = {
    "secagg_advertise": secagg_advertise,
    "secagg_share_keys": secagg_share_keys,
    "secagg_masked_input": secagg_masked_input,
    "secagg_unmask": secagg_unmask,
}
