"""The coordinator's side of a secure-aggregation round: a five-stage state machine.

Each method takes the nodes' replies to one stage (``{node_id: payload}``; a node missing from the
dict dropped out) and returns the requests of the next stage. The coordinator only routes signed
keys, encrypted shares and signatures, adds masked vectors and, at the end, rebuilds the self-mask
seeds of the nodes that sent an input and the mask keys of those that dropped after sharing keys.
It never sees an unmasked vector of one node: a round with fewer than ``threshold`` nodes left
fails with ``SecureAggregationError`` before anything is unmasked. It checks no certificate or
signature itself: the nodes do, each against its own federation CA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg import shamir
from flowerbed.privacy.secagg.chunks import add_vectors
from flowerbed.privacy.secagg.client import PARAM_PREFIX
from flowerbed.privacy.secagg.crypto import add_masks, agree, derive_key, public_key_of
from flowerbed.privacy.secagg.graph import graph_seed, neighbour_graph
from flowerbed.privacy.secagg.params import SecAggParams
from flowerbed.privacy.secagg.quantize import decode_sum


@dataclass
class SecAggResult:
    """What the coordinator learns from one secure round.

    Attributes
    ----------
    weighted_sum : numpy.ndarray
        ``sum_i w_i * update_i`` over the surviving nodes (float64, dequantized).
    total_weight : float
        ``sum_i w_i`` over the same nodes.
    out_of_range : int
        Update entries that were outside the clipping range, summed over the nodes.
    survivors : list of int
        Nodes whose inputs are in the sum.
    dropped : dict of int to str
        Nodes that left the round, with the stage at which they were lost.
    """

    weighted_sum: np.ndarray
    total_weight: float
    out_of_range: int
    survivors: list[int]
    dropped: dict[int, str] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean update ``weighted_sum / total_weight``."""
        if self.total_weight <= 0:
            raise SecureAggregationError("the surviving nodes have a total weight of 0")
        return self.weighted_sum / self.total_weight


class SecAggServer:
    """The coordinator's state for one secure round.

    Parameters
    ----------
    params : SecAggParams
        The round's parameters (sent to every node in the first stage).
    node_ids : list of int
        The sampled nodes.
    round_id : int (default: 0)
        The federated round; bound into every encrypted share.
    session : bytes or None (default: None)
        32 random bytes that make this round's keys unique; drawn with ``os.urandom`` if None.
    """

    def __init__(
        self,
        params: SecAggParams,
        node_ids: list[int],
        round_id: int = 0,
        session: bytes | None = None,
    ) -> None:
        if len(set(node_ids)) != len(node_ids):
            raise SecureAggregationError(f"round {round_id}: a node was sampled twice")
        self.params = params
        self.round_id = int(round_id)
        self.session = os.urandom(32) if session is None else bytes(session)
        self.sampled = [int(n) for n in node_ids]
        self.dropped: dict[int, str] = {}
        self.roster: dict[int, tuple[bytes, bytes]] = {}
        self.graph: dict[int, frozenset[int]] = {}
        self.sharers: list[int] = []
        self.mask_peers: dict[int, list[int]] = {}
        self.survivors: list[int] = []
        self.signers: list[int] = []
        self._order: dict[int, int] = {}
        self._total: np.ndarray | None = None
        self.stage = "created"

    # ------------------------------------------------------------------ helpers
    def _header(self, stage: str) -> dict[str, Any]:
        return {"stage": stage, "round": self.round_id, "session": self.session}

    def _fail(self, what: str) -> SecureAggregationError:
        self._total = None
        self.stage = "failed"
        return SecureAggregationError(
            f"secure aggregation, round {self.round_id}: {what}; the round fails and nothing is "
            f"unmasked (threshold {self.params.threshold}; dropped so far: "
            f"{_describe(self.dropped)})"
        )

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecureAggregationError(
                f"secure aggregation, round {self.round_id}: expected the replies of stage "
                f"{stage!r}, the round is at {self.stage!r}"
            )

    def _collect(self, replies: dict[int, dict[str, Any]], expected: list[int], stage: str, check: Any) -> list[int]:
        alive = []
        for node in expected:
            reply = replies.get(node)
            if reply is None:
                self.dropped[node] = stage
            elif not check(node, reply):
                self.dropped[node] = f"{stage} (malformed reply)"
            else:
                alive.append(node)
        return alive

    def _point(self, node_id: int) -> int:
        return self._order[node_id] + 1

    # ------------------------------------------------------------------ stage 1
    def advertise(self) -> dict[int, dict[str, Any]]:
        """Requests of the first stage: the round's parameters, to every sampled node."""
        if self.stage != "created":
            raise SecureAggregationError(f"round {self.round_id}: the round has already started")
        request = self._header("advertise")
        request.update({PARAM_PREFIX + k: v for k, v in self.params.to_payload().items()})
        self.stage = "advertise"
        return {node: dict(request) for node in self.sampled}

    # ------------------------------------------------------------------ stage 2
    def receive_keys(self, replies: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Public keys in, the roster out (to every node that advertised)."""
        self._expect("advertise")

        def ok(_: int, r: dict[str, Any]) -> bool:
            keys = all(isinstance(r.get(k), bytes) and len(r[k]) == 32 for k in ("channel_pk", "mask_pk"))
            signed = all(isinstance(r.get(k), bytes) and 0 < len(r[k]) <= 8192 for k in ("certificate", "signature"))
            return keys and signed

        alive = self._collect(replies, self.sampled, "advertise", ok)
        if len(alive) < self.params.threshold:
            raise self._fail(f"only {len(alive)} of {len(self.sampled)} nodes sent keys")
        self.roster = {n: (replies[n]["channel_pk"], replies[n]["mask_pk"]) for n in alive}
        keys = [k for pair in self.roster.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise self._fail("two nodes sent the same public key")
        self._order = {n: i for i, n in enumerate(sorted(self.roster))}
        self.graph = neighbour_graph(alive, self.params.neighbours, graph_seed(self.session, self.roster))
        nodes = sorted(self.roster)
        request = self._header("share_keys")
        request.update(
            {
                "nodes": nodes,
                "channel_pks": [self.roster[n][0] for n in nodes],
                "mask_pks": [self.roster[n][1] for n in nodes],
                "certificates": [replies[n]["certificate"] for n in nodes],
                "signatures": [replies[n]["signature"] for n in nodes],
            }
        )
        self.stage = "share_keys"
        return {node: dict(request) for node in nodes}

    # ------------------------------------------------------------------ stage 3
    def receive_shares(self, replies: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Encrypted shares in; each node gets the ciphertexts addressed to it."""
        self._expect("share_keys")

        def ok(node: int, r: dict[str, Any]) -> bool:
            to, cts = r.get("to"), r.get("ciphertexts")
            return (
                isinstance(to, list)
                and isinstance(cts, list)
                and len(to) == len(cts)
                and set(to) == self.graph[node]
                and len(set(to)) == len(to)
                and all(isinstance(c, bytes) for c in cts)
            )

        alive = set(self._collect(replies, sorted(self.roster), "share_keys", ok))
        # A node with fewer than t share holders left could never be unmasked: leave it out
        # (its shares are not forwarded, so nobody masks with it), until every node is safe.
        changed = True
        while changed:
            changed = False
            for node in sorted(alive):
                holders = len((self.graph[node] & alive) | {node})
                if holders < self.params.threshold:
                    alive.discard(node)
                    self.dropped[node] = f"share_keys (only {holders} share holders left)"
                    changed = True
        if len(alive) < self.params.threshold:
            raise self._fail(f"only {len(alive)} nodes shared keys")
        self.sharers = sorted(alive)
        inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in self.sharers}
        for sender in self.sharers:
            for receiver, blob in zip(replies[sender]["to"], replies[sender]["ciphertexts"], strict=True):
                if receiver in alive:
                    inbox[receiver][0].append(sender)
                    inbox[receiver][1].append(blob)
        requests = {}
        for node, (senders, blobs) in inbox.items():
            self.mask_peers[node] = senders
            requests[node] = self._header("masked_input") | {"from": senders, "ciphertexts": blobs}
        self.stage = "masked_input"
        return requests

    # ------------------------------------------------------------------ stage 4
    def receive_masked(self, replies: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Masked vectors in (summed at once); the survivor and dropout lists out, for the nodes to sign."""
        self._expect("masked_input")
        params = self.params

        def ok(_: int, r: dict[str, Any]) -> bool:
            v = r.get("masked")
            return isinstance(v, np.ndarray) and v.dtype == params.dtype and v.shape == (params.vector_length,)

        survivors = self._collect(replies, self.sharers, "masked_input", ok)
        if len(survivors) < params.threshold:
            raise self._fail(f"only {len(survivors)} nodes sent masked inputs")
        total = np.zeros(params.vector_length, dtype=params.dtype)
        add_vectors(total, [replies[node]["masked"] for node in survivors])
        self._total = total
        self.survivors = survivors
        self._check_holders(set(survivors))
        live = set(survivors)
        late = [n for n in self.sharers if n not in live]
        request = self._header("consistency") | {"survivors": survivors, "dropped": late}
        self.stage = "consistency"
        return {node: dict(request) for node in survivors}

    def _check_holders(self, responders: set[int]) -> None:
        """Fail unless every secret that must be rebuilt has ``threshold`` holders among ``responders``."""
        live, sharers = set(self.survivors), set(self.sharers)
        for node in self.survivors:
            holders = len((self.graph[node] & sharers | {node}) & responders)
            if holders < self.params.threshold:
                raise self._fail(f"node {node} has only {holders} share holders left")
        for node in sorted(sharers - live):
            if set(self.mask_peers[node]) & live:
                holders = len(self.graph[node] & responders)
                if holders < self.params.threshold:
                    raise self._fail(f"node {node} dropped and only {holders} of its share holders are left")

    # ------------------------------------------------------------------ stage 5
    def receive_consistency(self, replies: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Signatures on the survivor set in; all of them out, to every node that signed."""
        self._expect("consistency")

        def ok(_: int, r: dict[str, Any]) -> bool:
            return isinstance(r.get("signature"), bytes) and 0 < len(r["signature"]) <= 1024

        signers = self._collect(replies, self.survivors, "consistency", ok)
        if len(signers) < self.params.threshold:
            raise self._fail(f"only {len(signers)} nodes signed the survivor set")
        self._check_holders(set(signers))
        self.signers = signers
        request = self._header("unmask") | {
            "signers": signers,
            "signatures": [replies[node]["signature"] for node in signers],
        }
        self.stage = "unmask"
        return {node: dict(request) for node in signers}

    # ------------------------------------------------------------------ finish
    def receive_unmask(self, replies: dict[int, dict[str, Any]]) -> SecAggResult:
        """Shares in; the unmasked sum of weighted updates and weights out."""
        self._expect("unmask")
        params = self.params
        live = set(self.survivors)
        late = [n for n in self.sharers if n not in live]

        def ok(node: int, r: dict[str, Any]) -> bool:
            try:
                pairs = [
                    *zip(r["seed_owners"], r["seed_shares"], strict=True),
                    *zip(r["key_owners"], r["key_shares"], strict=True),
                ]
                return all(isinstance(s, bytes) and shamir.share_point(s) == self._point(node) for _, s in pairs)
            except (KeyError, TypeError, ValueError):
                return False

        responders = self._collect(replies, self.signers, "unmask", ok)
        if len(responders) < params.threshold:
            raise self._fail(f"only {len(responders)} nodes sent unmasking shares")
        seed_shares: dict[int, list[bytes]] = {n: [] for n in self.survivors}
        key_shares: dict[int, list[bytes]] = {n: [] for n in late}
        for node in responders:
            reply = replies[node]
            for owner, share in zip(reply["seed_owners"], reply["seed_shares"], strict=True):
                if owner in seed_shares and (owner == node or node in self.graph[owner]):
                    seed_shares[owner].append(share)
            for owner, share in zip(reply["key_owners"], reply["key_shares"], strict=True):
                if owner in key_shares and node in self.graph[owner]:
                    key_shares[owner].append(share)
        needed_keys = [n for n in late if set(self.mask_peers[n]) & live]
        short = [n for n in self.survivors if len(seed_shares[n]) < params.threshold]
        short += [n for n in needed_keys if len(key_shares[n]) < params.threshold]
        if short:
            raise self._fail(f"too few shares came back to rebuild the secrets of nodes {short}")
        total = self._total
        if total is None:
            raise self._fail("the masked inputs were already released")
        masks = []
        for node in self.survivors:
            seed = self._combine(seed_shares[node], node, "self-mask seed")
            masks.append((derive_key(seed, session=self.session, purpose=b"self-mask"), -1))
        for node in needed_keys:
            mask_sk = self._combine(key_shares[node], node, "mask key")
            if public_key_of(mask_sk) != self.roster[node][1]:
                raise self._fail(f"the rebuilt mask key of node {node} does not match its public key")
            for peer in self.mask_peers[node]:
                if peer in live:
                    seed = agree(
                        mask_sk,
                        self.roster[peer][1],
                        session=self.session,
                        purpose=b"mask",
                        a=node,
                        b=peer,
                    )
                    # The peer added +mask if peer < node, else -mask: take it back out.
                    masks.append((seed, -1 if peer < node else 1))
        add_masks(total, masks)
        weighted_sum, total_weight, out_of_range = decode_sum(total, params)
        self._total = None
        self.stage = "done"
        return SecAggResult(
            weighted_sum=weighted_sum,
            total_weight=total_weight,
            out_of_range=out_of_range,
            survivors=list(self.survivors),
            dropped=dict(self.dropped),
        )

    def _combine(self, shares: list[bytes], node: int, what: str) -> bytes:
        try:
            return shamir.combine(shares, self.params.threshold)
        except ValueError as exc:
            raise self._fail(f"could not rebuild the {what} of node {node}: {exc}") from None


def _describe(dropped: dict[int, str]) -> str:
    if not dropped:
        return "none"
    return ", ".join(f"node {n} at {stage}" for n, stage in sorted(dropped.items()))
