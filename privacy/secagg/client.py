"""The node's side of a secure-aggregation round: a four-stage state machine.

Each stage is one method from the coordinator's request (a dict of ConfigRecord-friendly values)
to the node's reply. Between stages the node keeps its secrets in ``SecAggClient``; ``to_record``
and ``from_record`` turn that state into ConfigRecord values, so a Flower ClientApp can keep it in
its ``Context`` between messages.

Stages (Bell et al. 2020, SecAgg+):

1. ``advertise``: make two X25519 key pairs (one to encrypt shares, one to derive masks).
2. ``share_keys``: from the roster, find the neighbours; Shamir-share a fresh self-mask seed and
   the mask private key among the neighbours and itself; encrypt each neighbour's shares.
3. ``masked_input``: decrypt the shares received; send the quantized, weighted update plus the
   self mask and the pairwise masks with every neighbour whose shares arrived.
4. ``unmask``: for each neighbour still in the round, reveal its self-mask seed share; for each
   that dropped after sharing keys, its mask-key share. Never both for one node, and only once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg import shamir
from flowerbed.privacy.secagg.crypto import (
    add_masks,
    agree,
    decrypt_share,
    derive_key,
    encrypt_share,
    generate_keypair,
    public_key_of,
    share_associated_data,
)
from flowerbed.privacy.secagg.graph import graph_seed, neighbour_graph
from flowerbed.privacy.secagg.params import SecAggParams
from flowerbed.privacy.secagg.quantize import encode_input

STAGES = ("advertise", "share_keys", "masked_input", "unmask")
"""The four stages, in order."""

PARAM_PREFIX = "param."

_PREVIOUS = {"share_keys": "advertise", "masked_input": "share_keys", "unmask": "masked_input"}


class SecAggClient:
    """One node's secure-aggregation state for one round.

    Parameters
    ----------
    node_id : int
        This node's id as the coordinator addresses it.
    """

    def __init__(self, node_id: int) -> None:
        self.node_id = int(node_id)
        self._reset()

    def _reset(self) -> None:
        self.stage = "idle"
        self.round_id = -1
        self.session = b""
        self.params: SecAggParams | None = None
        self.channel_sk = b""
        self.mask_sk = b""
        self.roster: dict[int, tuple[bytes, bytes]] = {}
        self.neighbours: frozenset[int] = frozenset()
        self.self_seed = b""
        self.seed_shares: dict[int, bytes] = {}
        self.key_shares: dict[int, bytes] = {}
        self.mask_peers: list[int] = []
        self.out_of_range = 0

    # ------------------------------------------------------------------ dispatch
    def handle(
        self,
        request: dict[str, Any],
        update: np.ndarray | None = None,
        weight: float | None = None,
    ) -> dict[str, Any]:
        """Run the stage named by ``request["stage"]``; ``masked_input`` needs update and weight."""
        stage = request.get("stage")
        if stage == "advertise":
            return self.advertise(request)
        if stage == "share_keys":
            return self.share_keys(request)
        if stage == "masked_input":
            if update is None or weight is None:
                raise SecureAggregationError(f"node {self.node_id}: the masked_input stage needs the update and weight")
            return self.masked_input(request, update, weight)
        if stage == "unmask":
            return self.unmask(request)
        raise SecureAggregationError(
            f"node {self.node_id}: unknown secure-aggregation stage {stage!r} (expected one of {', '.join(STAGES)})"
        )

    def _enter(self, request: dict[str, Any], stage: str) -> None:
        if self.stage != _PREVIOUS[stage]:
            raise SecureAggregationError(
                f"node {self.node_id}: got stage {stage!r} while at {self.stage!r}; stages run "
                f"once each, in the order {' -> '.join(STAGES)}"
            )
        if request.get("round") != self.round_id or request.get("session") != self.session:
            raise SecureAggregationError(
                f"node {self.node_id}: {stage} request belongs to round {request.get('round')}, "
                f"not to the current round {self.round_id} (stale or replayed message)"
            )

    # ------------------------------------------------------------------ stage 1
    def advertise(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a round: read its parameters, reply with two fresh X25519 public keys."""
        self._reset()  # a new round forgets everything from the last one
        self.round_id = int(request["round"])
        self.session = bytes(request["session"])
        self.params = SecAggParams.from_payload(
            {k[len(PARAM_PREFIX) :]: v for k, v in request.items() if k.startswith(PARAM_PREFIX)}
        )
        self.channel_sk, channel_pk = generate_keypair()
        self.mask_sk, mask_pk = generate_keypair()
        self.stage = "advertise"
        return {"channel_pk": channel_pk, "mask_pk": mask_pk}

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check the roster, find the neighbours, send them encrypted shares of both secrets."""
        self._enter(request, "share_keys")
        params = self._params()
        nodes = [int(n) for n in request["nodes"]]
        roster = dict(
            zip(
                nodes,
                zip(request["channel_pks"], request["mask_pks"], strict=True),
                strict=True,
            )
        )
        me = self.node_id
        own = (public_key_of(self.channel_sk), public_key_of(self.mask_sk))
        if roster.get(me) != own:
            raise SecureAggregationError(
                f"node {me}: the roster does not carry this node's own public keys; refusing to share secrets"
            )
        keys = [k for pair in roster.values() for k in pair]
        if len(roster) != len(nodes) or len(set(keys)) != len(keys):
            raise SecureAggregationError(
                f"node {me}: the roster repeats a node or a public key; refusing to share secrets"
            )
        if len(roster) < params.threshold:
            raise SecureAggregationError(
                f"node {me}: roster has {len(roster)} nodes, fewer than the threshold {params.threshold}"
            )
        self.roster = roster
        graph = neighbour_graph(nodes, params.neighbours, graph_seed(self.session, roster))
        self.neighbours = graph[me]
        holders = sorted(self.neighbours | {me})
        if len(holders) < params.threshold:
            raise SecureAggregationError(
                f"node {me}: {len(holders)} share holders, fewer than the threshold {params.threshold}"
            )
        xs = [self._point(n) for n in holders]
        self.self_seed = os.urandom(32)
        seed_shares = shamir.split(self.self_seed, params.threshold, xs)
        key_shares = shamir.split(self.mask_sk, params.threshold, xs)
        to, ciphertexts = [], []
        for holder, s_share, k_share in zip(holders, seed_shares, key_shares, strict=True):
            if holder == me:
                self.seed_shares[me], self.key_shares[me] = s_share, k_share
                continue
            key = agree(
                self.channel_sk,
                roster[holder][0],
                session=self.session,
                purpose=b"share-key",
                a=me,
                b=holder,
            )
            ad = share_associated_data(self.session, self.round_id, me, holder)
            to.append(holder)
            ciphertexts.append(encrypt_share(key, s_share + k_share, ad))
        self.stage = "share_keys"
        return {"to": to, "ciphertexts": ciphertexts}

    # ------------------------------------------------------------------ stage 3
    def masked_input(self, request: dict[str, Any], update: np.ndarray, weight: float) -> dict[str, Any]:
        """Decrypt the neighbours' shares, reply with the masked, quantized, weighted update."""
        self._enter(request, "masked_input")
        params = self._params()
        me = self.node_id
        senders = [int(s) for s in request["from"]]
        ciphertexts = list(request["ciphertexts"])
        if len(senders) != len(ciphertexts):
            raise SecureAggregationError(f"node {me}: {len(senders)} senders but {len(ciphertexts)} ciphertexts")
        if len(set(senders)) != len(senders):
            raise SecureAggregationError(
                f"node {me}: a share arrived twice from the same node (replayed); round aborted"
            )
        my_point = self._point(me)
        for sender, blob in zip(senders, ciphertexts, strict=True):
            if sender not in self.neighbours:
                raise SecureAggregationError(f"node {me}: got a share from node {sender}, which is not a neighbour")
            key = agree(
                self.channel_sk,
                self.roster[sender][0],
                session=self.session,
                purpose=b"share-key",
                a=me,
                b=sender,
            )
            ad = share_associated_data(self.session, self.round_id, sender, me)
            plain = decrypt_share(key, blob, ad, sender=sender, receiver=me, round_id=self.round_id)
            s_share, k_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            if len(k_share) != shamir.SHARE_BYTES or {
                shamir.share_point(s_share),
                shamir.share_point(k_share),
            } != {my_point}:
                raise SecureAggregationError(f"node {me}: shares from node {sender} are not addressed to this node")
            self.seed_shares[sender], self.key_shares[sender] = s_share, k_share
        if len(senders) + 1 < params.threshold:
            raise SecureAggregationError(
                f"node {me}: only {len(senders)} neighbours shared keys, threshold is "
                f"{params.threshold}; not sending an input"
            )
        vector, self.out_of_range = encode_input(update, weight, params, me)
        masks = [(derive_key(self.self_seed, session=self.session, purpose=b"self-mask"), 1)]
        for peer in senders:
            seed = agree(
                self.mask_sk,
                self.roster[peer][1],
                session=self.session,
                purpose=b"mask",
                a=me,
                b=peer,
            )
            masks.append((seed, 1 if me < peer else -1))
        add_masks(vector, masks)
        self.mask_peers = senders
        self.stage = "masked_input"
        return {"masked": vector}

    # ------------------------------------------------------------------ stage 4
    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Reveal seed shares of surviving neighbours and key shares of dropped ones, once."""
        self._enter(request, "unmask")
        params = self._params()
        me = self.node_id
        survivors = {int(n) for n in request["survivors"]}
        dropped = {int(n) for n in request["dropped"]}
        if survivors & dropped:
            raise SecureAggregationError(
                f"node {me}: nodes {sorted(survivors & dropped)} are listed as both survived and "
                "dropped; refusing to reveal any share"
            )
        if me not in survivors:
            raise SecureAggregationError(
                f"node {me}: this node sent its input but is listed as dropped; refusing to reveal any share"
            )
        if len(survivors) < params.threshold:
            raise SecureAggregationError(
                f"node {me}: only {len(survivors)} nodes survived, threshold is {params.threshold}; refusing to unmask"
            )
        held = set(self.seed_shares)
        seed_owners = sorted(held & survivors)
        key_owners = sorted(held & dropped)
        self.stage = "unmask"
        return {
            "seed_owners": seed_owners,
            "seed_shares": [self.seed_shares[n] for n in seed_owners],
            "key_owners": key_owners,
            "key_shares": [self.key_shares[n] for n in key_owners],
        }

    # ------------------------------------------------------------------ helpers
    def _params(self) -> SecAggParams:
        if self.params is None:
            raise SecureAggregationError(f"node {self.node_id}: no round started (advertise first)")
        return self.params

    def _point(self, node_id: int) -> int:
        """The Shamir point of a node: its 1-based rank in the sorted roster."""
        return sorted(self.roster).index(node_id) + 1

    def to_record(self) -> dict[str, Any]:
        """The whole state as ConfigRecord-friendly values (bytes, ints, lists)."""
        nodes = sorted(self.roster)
        held = sorted(self.seed_shares)
        record: dict[str, Any] = {
            "node_id": self.node_id,
            "stage": self.stage,
            "round": self.round_id,
            "session": self.session,
            "channel_sk": self.channel_sk,
            "mask_sk": self.mask_sk,
            "nodes": nodes,
            "channel_pks": [self.roster[n][0] for n in nodes],
            "mask_pks": [self.roster[n][1] for n in nodes],
            "neighbours": sorted(self.neighbours),
            "self_seed": self.self_seed,
            "held": held,
            "seed_shares": [self.seed_shares[n] for n in held],
            "key_shares": [self.key_shares[n] for n in held],
            "mask_peers": list(self.mask_peers),
            "out_of_range": self.out_of_range,
        }
        if self.params is not None:
            record.update({PARAM_PREFIX + k: v for k, v in self.params.to_payload().items()})
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SecAggClient:
        """Inverse of ``to_record``."""
        client = cls(int(record["node_id"]))
        client.stage = str(record["stage"])
        client.round_id = int(record["round"])
        client.session = bytes(record["session"])
        params = {k[len(PARAM_PREFIX) :]: v for k, v in record.items() if k.startswith(PARAM_PREFIX)}
        client.params = SecAggParams.from_payload(params) if params else None
        client.channel_sk = bytes(record["channel_sk"])
        client.mask_sk = bytes(record["mask_sk"])
        client.roster = {
            int(n): (bytes(c), bytes(m))
            for n, c, m in zip(record["nodes"], record["channel_pks"], record["mask_pks"], strict=True)
        }
        client.neighbours = frozenset(int(n) for n in record["neighbours"])
        client.self_seed = bytes(record["self_seed"])
        held = [int(n) for n in record["held"]]
        client.seed_shares = dict(zip(held, map(bytes, record["seed_shares"]), strict=True))
        client.key_shares = dict(zip(held, map(bytes, record["key_shares"]), strict=True))
        client.mask_peers = [int(n) for n in record["mask_peers"]]
        client.out_of_range = int(record["out_of_range"])
        return client
