"""The secure train phase: five message exchanges in place of the plain train exchange.

When ``secagg.enabled``, the round loop hands its training round to ``secure_train_round``:

1. ``train.secagg_advertise``: the round's parameters; nodes answer with two public keys, their
   identity certificate and a signature binding the keys to the round and to themselves.
2. ``train.secagg_share_keys``: the roster (every node's keys, certificate and signature); each
   node checks every entry, then answers with encrypted Shamir shares.
3. ``train.secagg_masked_input``: the strategy's train message (global arrays + config) plus the
   shares addressed to the node; the node trains exactly as in a plain round, then answers with
   its masked, quantized, weighted update (and its per-site metrics: loss, epsilon).
4. ``train.secagg_consistency``: who survived and who dropped; nodes answer with a signature on
   those lists.
5. ``train.secagg_unmask``: every signature collected; a node that finds at least ``threshold``
   valid ones on its own lists (and no invalid one) answers with the shares needed to unmask the sum.

The coordinator learns ``sum_i w_i * update_i`` and ``sum_i w_i``; one equivalent reply (global
weights + the weighted mean update, ``num-examples`` = the total weight) goes to the strategy's
``aggregate_train``, so FedAvg, FedProx, FedAvgM, FedAdam, FedYogi and FedAdagrad work unchanged.
Strategies that need individual updates are refused (``check_secagg_strategy``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower_strategies
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import ConfigError, SecureAggregationError
from flowerbed.experiment import Experiment
from flowerbed.privacy.secagg.params import SecAggParams, derive_params
from flowerbed.privacy.secagg.server import SecAggResult, SecAggServer
from flowerbed.protocol import SECAGG_ACTION_PREFIX, SECAGG_MASKED, SECAGG_MASKED_ARRAY, SECAGG_PAYLOAD
from flowerbed.server.exchange import send_and_receive
from flowerbed.server.round_outcome import NodeSubset, RoundOutcome
from flowerbed.weights import array_view, arrays_to_numpy, numpy_to_arrays


class Federation(Protocol):
    """What the secure phase uses of the round loop (``flowerbed.server.federation.Federation``)."""

    grid: Grid
    experiment: Experiment
    reporter: Any
    site_nodes: dict[str, int]

    @property
    def timeout(self) -> float: ...

    @property
    def min_nodes(self) -> int: ...

    def config(self) -> ConfigRecord: ...

    def as_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord: ...


ROBUST = ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
WEIGHTED_MEAN = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad")
CLEAR_METRICS = ("train-loss", "epsilon", "delta")
"""Per-site metrics a node sends in the clear next to its masked update (never its weight)."""


def check_secagg_strategy(experiment: Experiment, strategy: Strategy | None = None, source: str = "experiment") -> None:
    """Refuse a strategy that needs individual updates when secure aggregation is on.

    Raises
    ------
    ConfigError
        Naming ``strategy.name`` and why: the coordinator only ever sees the sum of the updates.
    """
    if not experiment.secagg.enabled:
        return
    name = experiment.strategy.name
    robust = name in ROBUST
    if strategy is not None:
        robust_classes = tuple(getattr(flower_strategies, n) for n in ROBUST if hasattr(flower_strategies, n))
        robust = robust or isinstance(strategy, robust_classes)
    if robust:
        raise ConfigError(
            source,
            [
                f"strategy.name = {name!r} needs every node's individual update (median, trimming or "
                "distances between updates), but with secagg.enabled = true the coordinator only "
                f"learns their sum: use one of {', '.join(WEIGHTED_MEAN)}, or set secagg.enabled = false"
            ],
        )


def secagg_params_for(experiment: Experiment, num_nodes: int, dimension: int) -> SecAggParams:
    """The round's parameters: the experiment's ``secagg`` keys, defaults derived from ``num_nodes``."""
    cfg = experiment.secagg
    extra: dict[str, Any] = {}
    for key in ("max_weight", "stochastic_rounding"):
        value = getattr(cfg, key, None)
        if value is not None:
            extra[key] = value
    return derive_params(
        num_nodes,
        dimension,
        neighbours=cfg.neighbours,
        threshold=cfg.threshold,
        clip_range=cfg.clip_range,
        quantization_bits=cfg.quantization_bits,
        **extra,
    )


def secure_train_round(
    fed: Federation, strategy: Strategy, server_round: int, arrays: ArrayRecord, sites: list[str]
) -> tuple[ArrayRecord | None, dict[str, Any], RoundOutcome]:
    """One training round through secure aggregation; same return as ``Federation.train_round``.

    A round that cannot finish securely (fewer than ``threshold`` nodes left at some stage) returns
    no new weights, with the reason under ``refused["secure aggregation"]``; nothing is unmasked.
    """
    check_secagg_strategy(fed.experiment, strategy)
    subset = NodeSubset(fed.grid, [fed.site_nodes[s] for s in sites])
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, arrays, fed.config(), subset)}
    outcome = RoundOutcome()
    site_of = {fed.site_nodes[s]: s for s in sites}
    global_weights = arrays_to_numpy(arrays)
    dimension = sum(v.size for v in global_weights.values())
    try:
        params = secagg_params_for(fed.experiment, len(messages), dimension)
        exchange = _Exchange(fed, server_round, messages, site_of, outcome)
        server = SecAggServer(params, sorted(messages), round_id=server_round)
        replies = exchange("advertise", server.advertise())
        replies = exchange("share_keys", server.receive_keys(replies))
        replies = exchange("masked_input", server.receive_shares(replies))
        replies = exchange("consistency", server.receive_masked(replies))
        replies = exchange("unmask", server.receive_consistency(replies))
        result = server.receive_unmask(replies)
    except (SecureAggregationError, ConfigError) as exc:
        outcome.refused["secure aggregation"] = str(exc)
        for node, site in site_of.items():
            if site not in outcome.refused and node in messages:
                outcome.refused.setdefault(site, "round failed (secure aggregation)")
        return None, {}, outcome
    for node, stage in result.dropped.items():
        site = site_of.get(node, f"node {node}")
        outcome.refused.setdefault(site, f"dropped out of secure aggregation at {stage}")
    survivors = {site_of[n] for n in result.survivors}
    for site in survivors:  # a node lost while unmasking already sent its input: it took part
        outcome.refused.pop(site, None)
    outcome.accepted = sorted(
        ((s, m) for s, m in exchange.site_metrics.items() if s in survivors), key=lambda pair: pair[0]
    )
    if len(result.survivors) < fed.min_nodes or result.total_weight <= 0:
        return None, {}, outcome
    reply = equivalent_reply(global_weights, result, [m for _, m in outcome.accepted])
    new_arrays, metrics = strategy.aggregate_train(server_round, [reply])
    if new_arrays is not None:
        new_arrays = fed.as_model_dtypes(new_arrays)
    out = {k: v for k, v in metrics.items()} if metrics is not None else {}
    out["secagg-out-of-range"] = result.out_of_range
    if result.out_of_range:
        fed.reporter.note(
            f"round {server_round}: {result.out_of_range} update entries were outside "
            f"secagg.clip_range = {fed.experiment.secagg.clip_range:g} and were clipped (raise it)"
        )
    return new_arrays, out, outcome


def equivalent_reply(
    global_weights: dict[str, np.ndarray], result: SecAggResult, site_replies: list[Message]
) -> Message:
    """One reply standing for all survivors: global + weighted mean update, total weight.

    A strategy that averages replies weighted by ``num-examples`` computes exactly this mean.
    """
    mean = result.mean
    new: dict[str, np.ndarray] = {}
    offset = 0
    for key, value in global_weights.items():
        part = mean[offset : offset + value.size].reshape(value.shape)
        new[key] = (value.astype(np.float64) + part).astype(value.dtype)
        offset += value.size
    metrics: dict[str, float] = {"num-examples": float(result.total_weight)}
    losses = [
        float(next(iter(m.content.metric_records.values()))["train-loss"])
        for m in site_replies
        if "train-loss" in next(iter(m.content.metric_records.values()))
    ]
    if losses:
        metrics["train-loss"] = float(np.mean(losses))  # unweighted: weights stay secret
    content = RecordDict({"arrays": numpy_to_arrays(new), "metrics": MetricRecord(metrics)})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


class _Exchange:
    """Sends one stage's requests as Flower messages and turns replies back into payloads."""

    def __init__(
        self,
        fed: Federation,
        server_round: int,
        train_messages: dict[int, Message],
        site_of: dict[int, str],
        outcome: RoundOutcome,
    ) -> None:
        self.fed = fed
        self.server_round = server_round
        self.train_messages = train_messages
        self.site_of = site_of
        self.outcome = outcome
        self.site_metrics: dict[str, Message] = {}

    def __call__(self, stage: str, requests: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        messages = []
        for node, payload in requests.items():
            content = RecordDict({SECAGG_PAYLOAD: ConfigRecord(payload)})
            if stage == "masked_input":  # the strategy's train message: global arrays + config
                train = self.train_messages[node].content
                for name in ("arrays", "config"):
                    content[name] = train[name]
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=SECAGG_ACTION_PREFIX + stage,
                    group_id=str(self.server_round),
                )
            )
        replies: dict[int, dict[str, Any]] = {}
        for reply in send_and_receive(self.fed.grid, messages, self.fed.timeout):
            node = reply.metadata.src_node_id
            site = self.site_of.get(node, f"node {node}")
            if reply.has_error():
                self.outcome.refused[site] = str(reply.error.reason)
                continue
            content = reply.content
            if SECAGG_PAYLOAD not in content.config_records:
                self.outcome.refused[site] = f"reply to {stage} carries no {SECAGG_PAYLOAD!r} record"
                continue
            payload = dict(content.config_records[SECAGG_PAYLOAD])
            if stage == "masked_input":
                record = content.get(SECAGG_MASKED)  # one lookup: ``array_records`` copies every record
                if not isinstance(record, ArrayRecord) or SECAGG_MASKED_ARRAY not in record:
                    self.outcome.refused[site] = "masked_input reply carries no masked vector"
                    continue
                try:
                    payload["masked"] = array_view(record[SECAGG_MASKED_ARRAY])
                except (ValueError, TypeError, EOFError, MemoryError) as exc:
                    self.outcome.refused[site] = f"masked_input reply's vector does not read ({type(exc).__name__})"
                    continue
                metrics = content.metric_records.get("metrics", MetricRecord({}))
                clear = {k: v for k, v in metrics.items() if k in CLEAR_METRICS}
                self.site_metrics[site] = Message(
                    RecordDict({"metrics": MetricRecord(clear), "site": ConfigRecord({"name": site})}),
                    dst_node_id=0,
                    message_type=MessageType.TRAIN,
                )
            replies[node] = payload
        return replies
