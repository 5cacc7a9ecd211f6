"""The node's side of the secure train phase: five ClientApp handlers on custom train actions.

Registered by ``flowerbed.client.app`` (``HANDLERS``) for the message types ``train.secagg_advertise``,
``train.secagg_share_keys``, ``train.secagg_masked_input``, ``train.secagg_consistency`` and
``train.secagg_unmask``. The node's protocol state (its round keys and the shares it holds) lives
in its Flower ``Context`` between messages. In the masked-input stage the node trains exactly as in
a plain round (the same ``train`` handler: data guards, DP-SGD under the node's budget, ledger
charge), then sends only its masked update, with its loss and epsilon in the clear; its weight is
summed securely.

Every stage runs with the node's identity, read from its own files, never from a message:

- a deployed node: ``identity-key``, ``identity-cert`` and ``ca-cert`` in its node config
  (``flowerbed node start`` passes the kit's ``node.key``, ``node.crt`` and ``ca.pem``);
- a virtual node of a simulation: ``$FLOWERBED_SIM_NODE_DIR/identity/`` (``ca.pem`` and
  ``partition-<id>/node.key``, ``node.crt``), which ``flowerbed simulate`` makes for the run.

A node without an identity refuses every secure round; there are no unauthenticated ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flowerbed.client.handlers import error_reply
from flowerbed.client.handlers import train as plain_train
from flowerbed.client.node_config import NodeConfig
from flowerbed.client.node_round import SIM_NODE_DIR_ENV, node_config, node_label
from flowerbed.exception import FlowerbedError, NodeError
from flowerbed.privacy.secagg.client import SecAggClient
from flowerbed.privacy.secagg.identity import NodeIdentity, load_identity
from flowerbed.protocol import SECAGG_MASKED, SECAGG_MASKED_ARRAY, SECAGG_PAYLOAD
from flowerbed.weights import arrays_to_numpy

STATE_KEY = "flowerbed.secagg"
CLEAR_METRICS = ("train-loss", "epsilon", "delta")
IDENTITY_DIR = "identity"
"""Folder of the virtual nodes' identities under ``$FLOWERBED_SIM_NODE_DIR``."""
_IDENTITY_KEYS = ("identity-key", "identity-cert", "ca-cert")


def simulated_identity_paths(folder: Path, partition_id: int) -> tuple[Path, Path, Path]:
    """Key, certificate and CA of a virtual node, under a simulation's identity folder."""
    node = folder / f"partition-{partition_id}"
    return node / "node.key", node / "node.crt", folder / "ca.pem"


def node_identity(raw: dict[str, Any]) -> NodeIdentity:
    """This node's identity, from its own node config (or, for a virtual node, the simulation's folder).

    Raises
    ------
    NodeError
        No identity configured, a file missing or unreadable, a certificate for another key or site,
        or one the CA does not vouch for.
    """
    config = node_config(raw)
    paths = _identity_paths(config, node_label(raw))
    identity = load_identity(*paths)
    if config.site is not None and config.site.lower() != identity.site.lower():
        raise NodeError(
            f"node {config.site}: identity-cert {paths[1]} names site {identity.site!r}, not this node's site; "
            "use this site's own kit"
        )
    return identity


def _identity_paths(config: NodeConfig, label: str) -> tuple[Path, Path, Path]:
    if config.identity_key and config.identity_cert and config.ca_cert:
        return Path(config.identity_key), Path(config.identity_cert), Path(config.ca_cert)
    given = dict(zip(_IDENTITY_KEYS, (config.identity_key, config.identity_cert, config.ca_cert), strict=True))
    if any(given.values()):
        missing = [k for k in _IDENTITY_KEYS if not given[k]]
        raise NodeError(f"node {label}: the node config sets some identity keys but not {', '.join(missing)}")
    folder = os.environ.get(SIM_NODE_DIR_ENV)
    if config.simulated and config.partition_id is not None and folder:
        return simulated_identity_paths(Path(folder) / IDENTITY_DIR, config.partition_id)
    raise NodeError(
        f"node {label}: secure aggregation needs this node's identity, and this node has none: give it "
        "identity-key, identity-cert and ca-cert in its node config (flowerbed node start passes the kit's "
        "node.key, node.crt and ca.pem; a kit without node.crt is re-made by flowerbed provision)"
    )


def _load(message: Message, context: Context) -> SecAggClient:
    node_id = message.metadata.dst_node_id
    identity = node_identity(dict(context.node_config))
    min_peers = node_config(dict(context.node_config)).min_secagg_peers
    record = context.state.config_records.get(STATE_KEY)
    try:
        client = SecAggClient.from_record(dict(record), identity, min_peers) if record is not None else None
    except (KeyError, TypeError, ValueError):  # a state this version does not read: no round in progress
        client = None
    if client is None:
        return SecAggClient(node_id, identity, min_peers)
    client.node_id = node_id
    return client


def _save(context: Context, client: SecAggClient) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord(client.to_record())


def _payload(message: Message) -> dict[str, Any]:
    if SECAGG_PAYLOAD not in message.content.config_records:
        raise FlowerbedError(f"secure-aggregation message without a {SECAGG_PAYLOAD!r} record")
    return dict(message.content.config_records[SECAGG_PAYLOAD])


def _stage(message: Message, context: Context) -> Message:
    client: SecAggClient | None = None
    try:
        client = _load(message, context)
        out = client.handle(_payload(message))
    except FlowerbedError as exc:
        if client is not None:
            _save(context, client)  # a failed stage ends the round at this node
        return error_reply(message, context, exc)
    _save(context, client)
    return Message(RecordDict({SECAGG_PAYLOAD: ConfigRecord(out)}), reply_to=message)


def secagg_advertise(message: Message, context: Context) -> Message:
    """Stage 1: start the round, answer with two fresh public keys, the certificate and a signature."""
    return _stage(message, context)


def secagg_share_keys(message: Message, context: Context) -> Message:
    """Stage 2: check the roster, answer with encrypted shares for the neighbours."""
    return _stage(message, context)


def secagg_masked_input(message: Message, context: Context) -> Message:
    """Stage 3: train as in a plain round, answer with the masked update."""
    client: SecAggClient | None = None
    try:  # out of order or from another round: refused before any training (and any DP charge)
        client = _load(message, context)
        client.ready_for(_payload(message), "masked_input")
    except FlowerbedError as exc:
        if client is not None:
            _save(context, client)
        return error_reply(message, context, exc)
    trained = plain_train(message, context)
    if trained.has_error():
        return trained
    try:
        received = arrays_to_numpy(message.content["arrays"])
        new = arrays_to_numpy(trained.content["arrays"])
        update = np.concatenate([(new[k].astype(np.float64) - received[k]).ravel() for k in received]).astype(
            np.float32
        )
        metrics = trained.content["metrics"]
        out = client.handle(_payload(message), update, float(metrics["num-examples"]))
    except FlowerbedError as exc:
        _save(context, client)
        return error_reply(message, context, exc)
    _save(context, client)
    content = RecordDict(
        {
            SECAGG_PAYLOAD: ConfigRecord({"stage": "masked_input"}),  # counts travel masked
            SECAGG_MASKED: ArrayRecord({SECAGG_MASKED_ARRAY: Array(out["masked"])}),
            "metrics": MetricRecord({k: v for k, v in metrics.items() if k in CLEAR_METRICS}),
            "site": trained.content["site"],
        }
    )
    return Message(content, reply_to=message)


def secagg_consistency(message: Message, context: Context) -> Message:
    """Stage 4: check the survivor and dropout lists, answer with a signature on them."""
    return _stage(message, context)


def secagg_unmask(message: Message, context: Context) -> Message:
    """Stage 5: with enough signatures on the same lists, answer with the shares that unmask the sum."""
    return _stage(message, context)


#: Custom train actions and their handlers, registered on the ClientApp.
HANDLERS = {
    "secagg_advertise": secagg_advertise,
    "secagg_share_keys": secagg_share_keys,
    "secagg_masked_input": secagg_masked_input,
    "secagg_consistency": secagg_consistency,
    "secagg_unmask": secagg_unmask,
}
