"""The node's side of a secure-aggregation round: a five-stage state machine.

Each stage is one method from the coordinator's request (a dict of ConfigRecord-friendly values)
to the node's reply. Between stages the node keeps its secrets in ``SecAggClient``; ``to_record``
and ``from_record`` turn that state into ConfigRecord values, so a Flower ClientApp can keep it in
its ``Context`` between messages. The node's identity (``NodeIdentity``: its node key, certificate
and the federation CA) is never part of that state: the caller hands it in at every stage.

Stages (Bell et al. 2020, SecAgg+, with the malicious-server additions):

1. ``advertise``: make two X25519 key pairs (one to encrypt shares, one to derive masks); sign
   both, with the round's session, round, this node's id and parameters, with the node key.
2. ``share_keys``: check every roster entry (certificate issued by the federation CA, signature
   over this round's data, no site twice); find the neighbours; Shamir-share a fresh self-mask seed
   and the mask private key among the neighbours and itself; encrypt each neighbour's shares.
3. ``masked_input``: decrypt the shares received; send the quantized, weighted update plus the
   self mask and the pairwise masks with every neighbour whose shares arrived.
4. ``consistency``: check the survivor and dropout lists; sign them, with a digest of the roster
   it was sent, with the node key.
5. ``unmask``: only with at least ``threshold`` valid signatures of roster members on the same
   lists (any signature that does not verify aborts): for each neighbour that survived, reveal
   its self-mask seed share; for each that dropped after sharing keys, its mask-key share. Never
   both for one node, and only once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg import shamir
from flowerbed.privacy.secagg.chunks import map_in_threads
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
from flowerbed.privacy.secagg.identity import (
    Member,
    NodeIdentity,
    check_certificate,
    roster_message,
    survivors_message,
    verify_signature,
)
from flowerbed.privacy.secagg.params import SecAggParams
from flowerbed.privacy.secagg.quantize import encode_input

STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")
"""The five stages, in order."""

PARAM_PREFIX = "param."

_PREVIOUS = {
    "share_keys": "advertise",
    "masked_input": "share_keys",
    "consistency": "masked_input",
    "unmask": "consistency",
}


def _ends_round_on_failure(method: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A stage that raises ``SecureAggregationError`` leaves the node at ``failed``: the round is over for it."""

    @functools.wraps(method)
    def stage(self: SecAggClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        except SecureAggregationError:
            self.stage = "failed"
            raise

    return stage


class SecAggClient:
    """One node's secure-aggregation state for one round.

    Parameters
    ----------
    node_id : int
        This node's id as the coordinator addresses it.
    identity : NodeIdentity or None (default: None)
        This node's key, certificate and the CA it trusts; every stage but ``masked_input``
        refuses to run without it (there are no unauthenticated rounds).
    min_peers : int or None (default: None)
        The node's own policy: fewest nodes a roster, and a survivor set, may have.
    """

    def __init__(self, node_id: int, identity: NodeIdentity | None = None, min_peers: int | None = None) -> None:
        self.node_id = int(node_id)
        self.identity = identity
        self.min_peers = min_peers
        self._reset()

    def _reset(self) -> None:
        self.stage = "idle"
        self.round_id = -1
        self.session = b""
        self.params: SecAggParams | None = None
        self.channel_sk = b""
        self.mask_sk = b""
        self.roster: dict[int, tuple[bytes, bytes]] = {}
        self.sites: dict[int, str] = {}
        self.identity_keys: dict[int, bytes] = {}
        self.neighbours: frozenset[int] = frozenset()
        self.self_seed = b""
        self.seed_shares: dict[int, bytes] = {}
        self.key_shares: dict[int, bytes] = {}
        self.mask_peers: list[int] = []
        self.out_of_range = 0
        self.survivors: list[int] = []
        self.dropped: list[int] = []

    # ------------------------------------------------------------------ dispatch
    def handle(
        self,
        request: dict[str, Any],
        update: np.ndarray | None = None,
        weight: float | None = None,
    ) -> dict[str, Any]:
        """Run the stage named by ``request["stage"]``; ``masked_input`` needs update and weight.

        A stage that fails ends the round at this node: every later request of the round is refused.
        """
        try:
            return self._dispatch(request, update, weight)
        except SecureAggregationError:
            self.stage = "failed"
            raise

    def ready_for(self, request: dict[str, Any], stage: str) -> None:
        """Refuse, before any work, a request that is not this round's next stage (it ends the round)."""
        try:
            self._enter(request, stage)
        except SecureAggregationError:
            self.stage = "failed"
            raise

    def _dispatch(self, request: dict[str, Any], update: np.ndarray | None, weight: float | None) -> dict[str, Any]:
        stage = request.get("stage")
        if stage == "advertise":
            return self.advertise(request)
        if stage == "share_keys":
            return self.share_keys(request)
        if stage == "masked_input":
            if update is None or weight is None:
                raise SecureAggregationError(f"{self._who}: the masked_input stage needs the update and weight")
            return self.masked_input(request, update, weight)
        if stage == "consistency":
            return self.consistency(request)
        if stage == "unmask":
            return self.unmask(request)
        raise SecureAggregationError(
            f"{self._who}: unknown secure-aggregation stage {stage!r} (expected one of {', '.join(STAGES)})"
        )

    @property
    def _who(self) -> str:
        site = f" (site {self.identity.site})" if self.identity is not None else ""
        return f"node {self.node_id}{site}"

    def _site(self, node: int) -> str:
        site = self.sites.get(node)
        return f"node {node} (site {site})" if site else f"node {node}"

    def _identity(self, stage: str) -> NodeIdentity:
        if self.identity is None:
            raise SecureAggregationError(
                f"{self._who}, {stage}: this node has no identity (node key, certificate, federation CA) and "
                "never takes part in an unauthenticated secure-aggregation round; give it identity-key, "
                "identity-cert and ca-cert in its node config"
            )
        return self.identity

    def _enter(self, request: dict[str, Any], stage: str) -> None:
        if self.stage != _PREVIOUS[stage]:
            raise SecureAggregationError(
                f"{self._who}: got stage {stage!r} while at {self.stage!r}; stages run "
                f"once each, in the order {' -> '.join(STAGES)}"
            )
        if request.get("round") != self.round_id or request.get("session") != self.session:
            raise SecureAggregationError(
                f"{self._who}: {stage} request belongs to round {request.get('round')}, "
                f"not to the current round {self.round_id} (stale or replayed message)"
            )

    # ------------------------------------------------------------------ stage 1
    @_ends_round_on_failure
    def advertise(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a round: read its parameters, reply with two fresh X25519 public keys, signed."""
        self._reset()  # a new round forgets everything from the last one
        identity = self._identity("advertise")
        self.round_id = int(request["round"])
        self.session = bytes(request["session"])
        self.params = SecAggParams.from_payload(
            {k[len(PARAM_PREFIX) :]: v for k, v in request.items() if k.startswith(PARAM_PREFIX)}
        )
        self.channel_sk, channel_pk = generate_keypair()
        self.mask_sk, mask_pk = generate_keypair()
        message = roster_message(self.session, self.round_id, self.node_id, channel_pk, mask_pk, self.params.digest())
        self.stage = "advertise"
        return {
            "channel_pk": channel_pk,
            "mask_pk": mask_pk,
            "certificate": identity.certificate,
            "signature": identity.sign(message),
        }

    # ------------------------------------------------------------------ stage 2
    @_ends_round_on_failure
    def share_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check the roster, find the neighbours, send them encrypted shares of both secrets."""
        self._enter(request, "share_keys")
        identity = self._identity("share_keys")
        params = self._params()
        me = self.node_id
        nodes = [int(n) for n in request["nodes"]]
        columns = [list(request[k]) for k in ("channel_pks", "mask_pks", "certificates", "signatures")]
        if any(len(c) != len(nodes) for c in columns):
            raise SecureAggregationError(f"{self._who}, share_keys: the roster's lists differ in length; round aborted")
        entries = dict(zip(nodes, zip(*columns, strict=True), strict=True))
        if len(entries) != len(nodes):
            raise SecureAggregationError(
                f"{self._who}, share_keys: the roster lists a node id twice; refusing to share secrets"
            )
        own = (public_key_of(self.channel_sk), public_key_of(self.mask_sk), identity.certificate)
        if me not in entries or tuple(entries[me][:3]) != own:
            raise SecureAggregationError(
                f"{self._who}, share_keys: the roster does not carry this node's own keys and certificate; "
                "refusing to share secrets"
            )
        self._check_roster(entries, identity, params)
        roster = {n: (bytes(e[0]), bytes(e[1])) for n, e in entries.items()}
        keys = [k for pair in roster.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise SecureAggregationError(
                f"{self._who}, share_keys: the roster repeats a public key; refusing to share secrets"
            )
        fewest = max(params.threshold, self.min_peers or 0)
        if len(roster) < fewest:
            raise SecureAggregationError(
                f"{self._who}, share_keys: roster has {len(roster)} nodes, fewer than "
                + (
                    f"the threshold {params.threshold}"
                    if fewest == params.threshold
                    else f"this node's min-secagg-peers = {fewest}"
                )
            )
        self.roster = roster
        graph = neighbour_graph(nodes, params.neighbours, graph_seed(self.session, roster))
        self.neighbours = graph[me]
        holders = sorted(self.neighbours | {me})
        if len(holders) < params.threshold:
            raise SecureAggregationError(
                f"{self._who}, share_keys: {len(holders)} share holders, fewer than the threshold {params.threshold}"
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

    def _check_roster(self, entries: dict[int, tuple[Any, ...]], identity: NodeIdentity, params: SecAggParams) -> None:
        """Every entry: a certificate from the federation CA, no site twice, a signature over this round's data."""
        where = f"{self._who}, share_keys"
        nodes = sorted(entries)

        def member(node: int) -> Member | SecureAggregationError:
            try:
                return check_certificate(bytes(entries[node][2]), identity.ca)
            except SecureAggregationError as exc:
                return exc

        members = dict(zip(nodes, map_in_threads(member, nodes), strict=True))
        for node, found in members.items():
            if isinstance(found, SecureAggregationError):
                raise SecureAggregationError(
                    f"{where}: the roster entry of node {node}: {found}; refusing to share secrets"
                )
        checked = {node: found for node, found in members.items() if isinstance(found, Member)}
        seen: dict[str, int] = {}
        for node, found in checked.items():
            other = seen.setdefault(found.site.lower(), node)
            if other != node:
                raise SecureAggregationError(
                    f"{where}: site {found.site!r} appears twice in the roster (nodes {other} and {node}); "
                    "refusing to share secrets"
                )
        digest = params.digest()

        def signed(node: int) -> bool:
            channel_pk, mask_pk, _, signature = entries[node]
            message = roster_message(self.session, self.round_id, node, bytes(channel_pk), bytes(mask_pk), digest)
            return isinstance(signature, bytes) and verify_signature(checked[node].public_key, message, signature)

        for node, valid in zip(nodes, map_in_threads(signed, nodes), strict=True):
            if not valid:
                raise SecureAggregationError(
                    f"{where}: the keys listed for site {checked[node].site!r} (node {node}) do not carry that "
                    "site's signature for this round (substituted or replayed keys, or other round parameters); "
                    "refusing to share secrets"
                )
        self.sites = {node: found.site for node, found in checked.items()}
        self.identity_keys = {node: found.spki for node, found in checked.items()}

    # ------------------------------------------------------------------ stage 3
    @_ends_round_on_failure
    def masked_input(self, request: dict[str, Any], update: np.ndarray, weight: float) -> dict[str, Any]:
        """Decrypt the neighbours' shares, reply with the masked, quantized, weighted update."""
        self._enter(request, "masked_input")
        params = self._params()
        me = self.node_id
        senders = [int(s) for s in request["from"]]
        ciphertexts = list(request["ciphertexts"])
        if len(senders) != len(ciphertexts):
            raise SecureAggregationError(f"{self._who}: {len(senders)} senders but {len(ciphertexts)} ciphertexts")
        if len(set(senders)) != len(senders):
            raise SecureAggregationError(
                f"{self._who}: a share arrived twice from the same node (replayed); round aborted"
            )
        my_point = self._point(me)
        for sender, blob in zip(senders, ciphertexts, strict=True):
            if sender not in self.neighbours:
                raise SecureAggregationError(f"{self._who}: got a share from node {sender}, which is not a neighbour")
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
                raise SecureAggregationError(f"{self._who}: shares from node {sender} are not addressed to this node")
            self.seed_shares[sender], self.key_shares[sender] = s_share, k_share
        if len(senders) + 1 < params.threshold:
            raise SecureAggregationError(
                f"{self._who}: only {len(senders)} neighbours shared keys, threshold is "
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
    @_ends_round_on_failure
    def consistency(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check the survivor and dropout lists, sign them with the node key (once per round)."""
        self._enter(request, "consistency")
        identity = self._identity("consistency")
        params = self._params()
        me = self.node_id
        survivors = [int(n) for n in request["survivors"]]
        dropped = [int(n) for n in request["dropped"]]
        where = f"{self._who}, consistency"
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise SecureAggregationError(f"{where}: a node is listed twice; refusing to sign or reveal any share")
        both = set(survivors) & set(dropped)
        if both:
            raise SecureAggregationError(
                f"{where}: {', '.join(self._site(n) for n in sorted(both))} listed as both survived and "
                "dropped; refusing to reveal any share"
            )
        unknown = (set(survivors) | set(dropped)) - set(self.roster)
        if unknown:
            raise SecureAggregationError(
                f"{where}: nodes {sorted(unknown)} are not in this round's roster; refusing to reveal any share"
            )
        if me not in survivors:
            raise SecureAggregationError(
                f"{where}: this node sent its input but is listed as dropped (or left out of the survivors); "
                "refusing to reveal any share"
            )
        fewest = max(params.threshold, self.min_peers or 0)
        if len(survivors) < fewest:
            raise SecureAggregationError(
                f"{where}: only {len(survivors)} nodes survived, fewer than "
                + (
                    f"the threshold {params.threshold}"
                    if fewest == params.threshold
                    else f"this node's min-secagg-peers = {fewest}"
                )
                + "; refusing to unmask"
            )
        self.survivors, self.dropped = sorted(survivors), sorted(dropped)
        digest = graph_seed(self.session, self.roster)  # the roster as this node was sent it
        message = survivors_message(self.session, self.round_id, me, self.survivors, self.dropped, digest)
        signature = identity.sign(message)
        self.stage = "consistency"
        return {"signature": signature}

    # ------------------------------------------------------------------ stage 5
    @_ends_round_on_failure
    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """With ``threshold`` valid signatures on the same lists, reveal the shares that unmask the sum, once.

        Seed shares of the survivors and key shares of the nodes that dropped after sharing keys;
        never both for one node.
        """
        self._enter(request, "unmask")
        params = self._params()
        where = f"{self._who}, unmask"
        signers = [int(n) for n in request["signers"]]
        signatures = list(request["signatures"])
        self.stage = "unmask"  # one unmask request per round, whatever its outcome
        if len(signers) != len(signatures) or len(set(signers)) != len(signers):
            raise SecureAggregationError(
                f"{where}: the signers' list repeats a node or does not match the signatures; "
                "refusing to reveal any share"
            )
        survived = set(self.survivors)
        outsiders = [n for n in signers if n not in survived]
        if outsiders:
            raise SecureAggregationError(
                f"{where}: a signature is attributed to {self._site(outsiders[0])}, which is not among the "
                "survivors this node signed; refusing to reveal any share"
            )
        if len(signers) < params.threshold:
            raise SecureAggregationError(
                f"{where}: only {len(signers)} nodes signed the survivor set, threshold is {params.threshold}; "
                "refusing to reveal any share"
            )
        # threshold valid signatures on these very lists decide; the first ones (by node id) are checked
        chosen = sorted(zip(signers, signatures, strict=True))[: params.threshold]

        digest = graph_seed(self.session, self.roster)

        def valid(pair: tuple[int, Any]) -> bool:
            signer, signature = pair
            message = survivors_message(self.session, self.round_id, signer, self.survivors, self.dropped, digest)
            return isinstance(signature, bytes) and verify_signature(self.identity_keys[signer], message, signature)

        for (signer, _), ok in zip(chosen, map_in_threads(valid, chosen), strict=True):
            if not ok:
                raise SecureAggregationError(
                    f"{where}: the signature of {self._site(signer)} does not cover the survivor set this node "
                    "signed (the coordinator sent different survivor sets or rosters to different nodes, or "
                    "replayed or forged a signature); refusing to reveal any share"
                )
        held = set(self.seed_shares)
        seed_owners = sorted(held & survived)
        key_owners = sorted(held & set(self.dropped))
        return {
            "seed_owners": seed_owners,
            "seed_shares": [self.seed_shares[n] for n in seed_owners],
            "key_owners": key_owners,
            "key_shares": [self.key_shares[n] for n in key_owners],
        }

    # ------------------------------------------------------------------ helpers
    def _params(self) -> SecAggParams:
        if self.params is None:
            raise SecureAggregationError(f"{self._who}: no round started (advertise first)")
        return self.params

    def _point(self, node_id: int) -> int:
        """The Shamir point of a node: its 1-based rank in the sorted roster."""
        return sorted(self.roster).index(node_id) + 1

    def to_record(self) -> dict[str, Any]:
        """The whole state as ConfigRecord-friendly values (bytes, ints, lists); never the identity."""
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
            "sites": [self.sites[n] for n in nodes],
            "identity_keys": [self.identity_keys[n] for n in nodes],
            "neighbours": sorted(self.neighbours),
            "self_seed": self.self_seed,
            "held": held,
            "seed_shares": [self.seed_shares[n] for n in held],
            "key_shares": [self.key_shares[n] for n in held],
            "mask_peers": list(self.mask_peers),
            "out_of_range": self.out_of_range,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }
        if self.params is not None:
            record.update({PARAM_PREFIX + k: v for k, v in self.params.to_payload().items()})
        return record

    @classmethod
    def from_record(
        cls, record: dict[str, Any], identity: NodeIdentity | None = None, min_peers: int | None = None
    ) -> SecAggClient:
        """Inverse of ``to_record``; the identity and policy come from the node, not from the record."""
        client = cls(int(record["node_id"]), identity, min_peers)
        client.stage = str(record["stage"])
        client.round_id = int(record["round"])
        client.session = bytes(record["session"])
        params = {k[len(PARAM_PREFIX) :]: v for k, v in record.items() if k.startswith(PARAM_PREFIX)}
        client.params = SecAggParams.from_payload(params) if params else None
        client.channel_sk = bytes(record["channel_sk"])
        client.mask_sk = bytes(record["mask_sk"])
        nodes = [int(n) for n in record["nodes"]]
        client.roster = {
            n: (bytes(c), bytes(m)) for n, c, m in zip(nodes, record["channel_pks"], record["mask_pks"], strict=True)
        }
        client.sites = dict(zip(nodes, map(str, record["sites"]), strict=True))
        client.identity_keys = dict(zip(nodes, map(bytes, record["identity_keys"]), strict=True))
        client.neighbours = frozenset(int(n) for n in record["neighbours"])
        client.self_seed = bytes(record["self_seed"])
        held = [int(n) for n in record["held"]]
        client.seed_shares = dict(zip(held, map(bytes, record["seed_shares"]), strict=True))
        client.key_shares = dict(zip(held, map(bytes, record["key_shares"]), strict=True))
        client.mask_peers = [int(n) for n in record["mask_peers"]]
        client.out_of_range = int(record["out_of_range"])
        client.survivors = [int(n) for n in record["survivors"]]
        client.dropped = [int(n) for n in record["dropped"]]
        return client
