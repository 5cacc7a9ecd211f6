"""Secure aggregation (SecAgg+, Bell et al. 2020): the protocol's entry points.

The node side is ``SecAggClient`` (``secagg_client.py``), the coordinator side ``SecAggServer``
(``secagg_server.py``); every stage is a method from one stage's inbound payloads to the next
stage's outbound payloads, so a round loop can carry them in Flower messages (ConfigRecord values
and one numpy array, the masked vector). ``run_secure_sum`` drives both sides in memory, for tests,
benchmarks and the in-process simulation backend.

A round, as the coordinator sees it::

    server = SecAggServer(params, node_ids, round_id)
    requests = server.advertise()                     # -> nodes: "advertise"
    requests = server.receive_keys(replies)           # -> nodes: "share_keys"
    requests = server.receive_shares(replies)         # -> nodes: "masked_input"
    requests = server.receive_masked(replies)         # -> nodes: "consistency"
    requests = server.receive_consistency(replies)    # -> nodes: "unmask"
    result = server.receive_unmask(replies)           # SecAggResult: sum of w*u and of w

Every node needs an identity (``NodeIdentity``: node key, certificate, federation CA); the
in-memory driver makes a throwaway federation when none are given.

A node missing from ``replies`` has dropped out; a reply a node could not make (its error) counts
the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg.client import STAGES, SecAggClient
from flowerbed.privacy.secagg.identity import NodeIdentity, throwaway_federation
from flowerbed.privacy.secagg.params import SecAggParams, derive_params
from flowerbed.privacy.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "STAGES",
    "NodeIdentity",
    "RoundTimings",
    "SecAggClient",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "derive_params",
    "run_secure_sum",
    "throwaway_identities",
]

Payloads = dict[int, dict[str, Any]]


@dataclass
class RoundTimings:
    """CPU and wall-clock seconds spent by each side of an in-memory secure round.

    CPU is process time (mask expansion runs in threads), measured while only that side works.

    Attributes
    ----------
    client : dict of int to float
        Per node, CPU seconds of all its stages together.
    server : float
        The coordinator's CPU seconds, all its stages together.
    client_wall : dict of int to float
        Per node, wall-clock seconds of all its stages together.
    server_wall : float
        The coordinator's wall-clock seconds.
    wall : float
        Wall-clock seconds of the whole round (nodes run one after the other here).
    """

    client: dict[int, float] = field(default_factory=dict)
    server: float = 0.0
    client_wall: dict[int, float] = field(default_factory=dict)
    server_wall: float = 0.0
    wall: float = 0.0


def run_secure_sum(
    updates: dict[int, np.ndarray],
    weights: dict[int, float],
    params: SecAggParams,
    drop_at: dict[int, str] | None = None,
    *,
    round_id: int = 0,
    intercept: Callable[[str, Payloads], Payloads] | None = None,
    observe: Callable[[str, Payloads], None] | None = None,
    node_errors: str = "raise",
    timings: RoundTimings | None = None,
    identities: dict[int, NodeIdentity] | None = None,
) -> SecAggResult:
    """One secure round in memory: the coordinator learns ``sum w_i u_i`` and ``sum w_i``.

    Parameters
    ----------
    updates : dict of int to numpy.ndarray
        Each node's flattened float update (new weights - global weights).
    weights : dict of int to float
        Each node's weight (e.g. its number of examples).
    params : SecAggParams
        The round's parameters; ``params.dimension`` must match the updates.
    drop_at : dict of int to str or None (default: None)
        Nodes that vanish at a stage (one of ``STAGES``): they answer no request from that
        stage on.
    round_id : int (default: 0)
        The federated round.
    intercept : callable or None (default: None)
        ``intercept(stage, requests) -> requests``, applied to the coordinator's requests before
        nodes see them (to test what nodes do with altered messages).
    observe : callable or None (default: None)
        ``observe(stage, replies)``, called with everything the coordinator receives.
    node_errors : "raise" or "drop" (default: "raise")
        What a node's ``SecureAggregationError`` does: propagate, or make that node drop out
        (what a deployed coordinator sees: an error reply).
    timings : RoundTimings or None (default: None)
        Filled with CPU and wall-clock seconds per side if given.
    identities : dict of int to NodeIdentity or None (default: None)
        Each node's identity; None: a throwaway federation (one CA, one site per node).

    Raises
    ------
    SecureAggregationError
        Too few nodes left at some stage (nothing is unmasked), or a node rejected a message.
    """
    drop_at = dict(drop_at or {})
    for node, stage in drop_at.items():
        if stage not in STAGES:
            raise ValueError(f"drop_at[{node}] = {stage!r}: expected one of {STAGES}")
    if set(updates) != set(weights):
        raise ValueError("updates and weights must name the same nodes")
    if identities is None:
        identities = throwaway_identities(sorted(updates))
    t = timings if timings is not None else RoundTimings()
    wall_start = time.perf_counter()
    clients = {node: SecAggClient(node, identities.get(node)) for node in updates}
    server = SecAggServer(params, sorted(updates), round_id=round_id)

    def server_call(fn: Callable[..., Any], *args: Any) -> Any:
        start, wall = time.process_time(), time.perf_counter()
        try:
            return fn(*args)
        finally:
            t.server += time.process_time() - start
            t.server_wall += time.perf_counter() - wall

    def deliver(stage: str, requests: Payloads) -> Payloads:
        if intercept is not None:
            requests = intercept(stage, requests)
        replies: Payloads = {}
        gone_from = STAGES.index(stage)
        for node, request in requests.items():
            if node in drop_at and STAGES.index(drop_at[node]) <= gone_from:
                continue
            start, wall = time.process_time(), time.perf_counter()
            try:
                replies[node] = clients[node].handle(request, updates[node], weights[node])
            except SecureAggregationError:
                if node_errors != "drop":
                    raise
            finally:
                t.client[node] = t.client.get(node, 0.0) + time.process_time() - start
                t.client_wall[node] = t.client_wall.get(node, 0.0) + time.perf_counter() - wall
        if observe is not None:
            observe(stage, replies)
        return replies

    requests = server_call(server.advertise)
    requests = server_call(server.receive_keys, deliver("advertise", requests))
    requests = server_call(server.receive_shares, deliver("share_keys", requests))
    requests = server_call(server.receive_masked, deliver("masked_input", requests))
    requests = server_call(server.receive_consistency, deliver("consistency", requests))
    result = server_call(server.receive_unmask, deliver("unmask", requests))
    t.wall = time.perf_counter() - wall_start
    return result


def throwaway_identities(node_ids: list[int]) -> dict[int, NodeIdentity]:
    """One identity per node (site ``node-<id>``) under a new CA whose key is then dropped."""
    _, _, by_site = throwaway_federation([f"node-{n}" for n in node_ids])
    return {n: by_site[f"node-{n}"] for n in node_ids}
