"""Secure aggregation against a malicious coordinator: the test plays the coordinator against the real code.

Each attack goes through the nodes' real ``SecAggClient`` (and, end to end, through the ClientApp
in a simulation): the node detects it, aborts naming the site or the problem, and reveals nothing
(no share ciphertexts, no unmasking shares). Identities come from a federation CA made as
``flowerbed provision`` makes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flowerbed.exception import NodeError, SecureAggregationError
from flowerbed.privacy.secagg import shamir
from flowerbed.privacy.secagg.crypto import add_masks, agree, derive_key, generate_keypair
from flowerbed.privacy.secagg.graph import graph_seed
from flowerbed.privacy.secagg.identity import (
    NodeIdentity,
    check_certificate,
    issue_node_certificate,
    load_identity,
    roster_message,
    survivors_message,
    throwaway_federation,
)
from flowerbed.privacy.secagg.protocol import SecAggClient, SecAggServer, derive_params, run_secure_sum
from flowerbed.server.provisioning import generate_ca, issue_server_certificate, load_certificate

Payloads = dict[int, dict[str, Any]]
DIM = 64


def _der(cert: Any) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class Federation:
    """A federation CA as provisioning makes it, one node identity per site, and the coordinator's TLS pair."""

    def __init__(self, n: int) -> None:
        self.ca_key, self.ca_cert = generate_ca("test-federation", 30)
        self.ids = list(range(101, 101 + n))
        self.site = {node: f"site-{i}" for i, node in enumerate(self.ids)}
        self.identities: dict[int, NodeIdentity] = {}
        for node in self.ids:
            key = ec.generate_private_key(ec.SECP384R1())
            cert = issue_node_certificate(self.ca_key, self.ca_cert, self.site[node], key.public_key())
            self.identities[node] = NodeIdentity(self.site[node], key, _der(cert), _der(self.ca_cert))
        self.tls_key, self.tls_cert = issue_server_certificate(
            self.ca_key, self.ca_cert, ["coordinator.example.org"], [], 30
        )


class Round:
    """The real coordinator (``SecAggServer``) and honest nodes, stage by stage; the test acts in between."""

    def __init__(self, fed: Federation, round_id: int = 1, **params: Any) -> None:
        self.fed = fed
        self.ids = fed.ids
        self.params = derive_params(len(self.ids), DIM, **params)
        self.server = SecAggServer(self.params, self.ids, round_id=round_id)
        self.clients = {i: SecAggClient(i, fed.identities[i]) for i in self.ids}
        rng = np.random.default_rng(round_id)  # test data only
        self.updates = {i: rng.normal(0, 0.5, DIM).astype(np.float32) for i in self.ids}
        self.errors: dict[int, str] = {}

    def ask(self, requests: Payloads) -> Payloads:
        """Every node's reply; a node that aborts gives none (its reason goes to ``errors``)."""
        replies = {}
        for node, request in requests.items():
            try:
                replies[node] = self.clients[node].handle(request, self.updates[node], 10.0)
            except SecureAggregationError as exc:
                self.errors[node] = str(exc)
        return replies

    def to_share_keys(self) -> Payloads:
        return self.server.receive_keys(self.ask(self.server.advertise()))

    def to_consistency(self) -> Payloads:
        requests = self.server.receive_shares(self.ask(self.to_share_keys()))
        return self.server.receive_masked(self.ask(requests))

    def to_unmask(self) -> Payloads:
        return self.server.receive_consistency(self.ask(self.to_consistency()))


def _with_entry(request: dict[str, Any], node: int, **fields: Any) -> dict[str, Any]:
    """A share_keys request whose roster entry for ``node`` has some fields replaced."""
    out = dict(request)
    index = list(out["nodes"]).index(node)
    for name, value in fields.items():
        column = list(out[name])
        column[index] = value
        out[name] = column
    return out


def _forged_entry(fed: Federation, rnd: Round, node: int, how: str) -> dict[str, bytes]:
    """Keys the coordinator generated for ``node``, with a certificate and signature made ``how``."""
    _, channel_pk = generate_keypair()
    _, mask_pk = generate_keypair()
    message = roster_message(rnd.server.session, rnd.server.round_id, node, channel_pk, mask_pk, rnd.params.digest())
    entry = {"channel_pks": channel_pk, "mask_pks": mask_pk}
    if how == "keeps the site's signature":
        return entry
    if how == "signs with a key of its own":
        key = ec.generate_private_key(ec.SECP384R1())
        return entry | {"signatures": key.sign(message, ec.ECDSA(hashes.SHA384()))}
    if how == "certifies its own key under another CA":
        _, _, mine = throwaway_federation([fed.site[node]])
        return entry | {
            "certificates": mine[fed.site[node]].certificate,
            "signatures": mine[fed.site[node]].sign(message),
        }
    if how == "uses its TLS certificate from the federation CA":
        signature = fed.tls_key.sign(message, ec.ECDSA(hashes.SHA256()))
        return entry | {"certificates": _der(fed.tls_cert), "signatures": signature}
    raise AssertionError(how)


FORGERIES = {
    "keeps the site's signature": "do not carry that site's signature for this round",
    "signs with a key of its own": "do not carry that site's signature for this round",
    "certifies its own key under another CA": "was not issued by this federation's CA",
    "uses its TLS certificate from the federation CA": "is not a node identity certificate",
}


# ------------------------------------------------------------------------------ the roster


@pytest.mark.parametrize("how", FORGERIES)
def test_a_substituted_neighbour_key_is_refused_before_any_share_leaves(how: str) -> None:
    fed = Federation(6)
    rnd = Round(fed)
    requests = rnd.to_share_keys()
    victim, neighbour = fed.ids[0], fed.ids[3]
    requests[victim] = _with_entry(requests[victim], neighbour, **_forged_entry(fed, rnd, neighbour, how))
    replies = rnd.ask(requests)
    assert victim not in replies  # no ciphertext of the victim's secrets was sent
    assert FORGERIES[how] in rnd.errors[victim] and "refusing to share secrets" in rnd.errors[victim]
    assert f"node {neighbour}" in rnd.errors[victim]
    if how != "uses its TLS certificate from the federation CA":  # that one names the coordinator's host
        assert fed.site[neighbour] in rnd.errors[victim]
    assert set(replies) == set(fed.ids) - {victim}  # the nodes sent the true roster carry on
    assert rnd.clients[victim].stage == "failed"


def test_every_neighbour_substituted_the_victim_sends_nothing_and_the_round_goes_on_without_it() -> None:
    """The key-substitution attack: keys of the coordinator's own for all of the victim's neighbours."""
    fed = Federation(8)
    rnd = Round(fed)
    requests = rnd.to_share_keys()
    victim = fed.ids[0]
    for node in fed.ids[1:]:
        requests[victim] = _with_entry(
            requests[victim], node, **_forged_entry(fed, rnd, node, "keeps the site's signature")
        )
    replies = rnd.ask(requests)
    assert victim not in replies  # the victim never encrypted a share for anyone
    requests = rnd.server.receive_masked(rnd.ask(rnd.server.receive_shares(replies)))
    result = rnd.server.receive_unmask(rnd.ask(rnd.server.receive_consistency(rnd.ask(requests))))
    assert result.survivors == fed.ids[1:]


def test_a_site_listed_twice_is_refused_by_every_node() -> None:
    fed = Federation(6)
    rnd = Round(fed)
    requests = rnd.to_share_keys()
    twin = fed.ids[2]
    extra = 999  # a second roster entry with site-2's certificate (and its signature, from its own entry)
    forged = _forged_entry(fed, rnd, twin, "keeps the site's signature")
    for node, request in requests.items():
        index = list(request["nodes"]).index(twin)
        requests[node] = {
            **request,
            "nodes": [*request["nodes"], extra],
            "channel_pks": [*request["channel_pks"], forged["channel_pks"]],
            "mask_pks": [*request["mask_pks"], forged["mask_pks"]],
            "certificates": [*request["certificates"], request["certificates"][index]],
            "signatures": [*request["signatures"], request["signatures"][index]],
        }
    assert rnd.ask(requests) == {}
    for node in fed.ids:
        assert f"site 'site-2' appears twice in the roster (nodes {twin} and {extra})" in rnd.errors[node]


def test_keys_replayed_from_an_earlier_round_are_refused() -> None:
    fed = Federation(5)
    first = Round(fed, round_id=1)
    old = first.to_share_keys()[fed.ids[0]]
    second = Round(fed, round_id=2)
    requests = second.to_share_keys()
    victim, replayed = fed.ids[0], fed.ids[1]
    index = list(old["nodes"]).index(replayed)
    fields = {k: old[k][index] for k in ("channel_pks", "mask_pks", "signatures")}
    requests[victim] = _with_entry(requests[victim], replayed, **fields)
    assert victim not in second.ask(requests)
    assert "site 'site-1'" in second.errors[victim] and "substituted or replayed" in second.errors[victim]


def test_other_parameters_for_one_node_are_detected_by_everyone() -> None:
    fed = Federation(6)
    rnd = Round(fed)
    requests = rnd.server.advertise()
    victim = fed.ids[0]
    requests[victim] = {**requests[victim], "param.neighbours": 2, "param.threshold": 2}  # valid, but not the round's
    requests = rnd.server.receive_keys(rnd.ask(requests))
    assert rnd.ask(requests) == {}  # nobody shares a secret
    assert "other round parameters" in rnd.errors[victim]
    assert all(f"site 'site-0' (node {victim})" in rnd.errors[n] for n in fed.ids[1:])


def test_a_roster_smaller_than_the_nodes_own_minimum_is_refused() -> None:
    fed = Federation(5)
    rnd = Round(fed)
    rnd.clients[fed.ids[0]].min_peers = 6
    rnd.ask(rnd.to_share_keys())
    assert "min-secagg-peers = 6" in rnd.errors[fed.ids[0]]


def test_a_node_without_an_identity_never_joins_a_round() -> None:
    params = derive_params(3, 10)
    server = SecAggServer(params, [1, 2, 3])
    with pytest.raises(SecureAggregationError, match="never takes part in an unauthenticated"):
        SecAggClient(1).handle(server.advertise()[1])


def test_an_expired_or_foreign_certificate_is_refused() -> None:
    fed = Federation(2)
    identity = fed.identities[fed.ids[0]]
    member = check_certificate(identity.certificate, identity.ca)
    assert member.site == "site-0"
    later = member.not_after.replace(year=member.not_after.year + 1)
    with pytest.raises(SecureAggregationError, match="expired"):
        check_certificate(identity.certificate, identity.ca, now=later)
    _, _, other = throwaway_federation(["site-0"])
    with pytest.raises(SecureAggregationError, match="not issued by this federation's CA"):
        check_certificate(other["site-0"].certificate, identity.ca)
    with pytest.raises(SecureAggregationError, match="not a node identity certificate"):
        check_certificate(_der(fed.tls_cert), identity.ca)


# ------------------------------------------------------------------------------ the consistency check


def _unmask_replies(rnd: Round, requests: Payloads) -> Payloads:
    replies = rnd.ask(requests)
    for reply in replies.values():
        assert set(reply) == {"seed_owners", "seed_shares", "key_owners", "key_shares"}
    return replies


def test_a_survivor_left_out_of_one_nodes_list_stops_every_node() -> None:
    fed = Federation(6)
    rnd = Round(fed)
    requests = rnd.to_consistency()
    target, left_out = fed.ids[0], fed.ids[4]
    request = requests[target]
    requests[target] = {
        **request,
        "survivors": [n for n in request["survivors"] if n != left_out],
        "dropped": [*request["dropped"], left_out],
    }
    unmask = rnd.server.receive_consistency(rnd.ask(requests))  # the coordinator forwards every signature
    assert _unmask_replies(rnd, unmask) == {}  # no node reveals any share
    assert f"attributed to node {left_out} (site site-4), which is not among the survivors" in rnd.errors[target]
    for node in fed.ids[1:]:
        assert f"the signature of node {target} (site site-0) does not cover" in rnd.errors[node]


def test_different_survivor_sets_with_filtered_signatures_reveal_nothing_of_the_victim() -> None:
    """Split: some nodes hear that the victim dropped; each group gets only its own group's signatures."""
    fed = Federation(8)  # complete graph, threshold 5
    rnd = Round(fed)
    assert rnd.params.threshold == 5
    requests = rnd.to_consistency()
    victim, told_dropped = fed.ids[0], fed.ids[5:]
    for node in told_dropped:
        requests[node] = {
            **requests[node],
            "survivors": [n for n in fed.ids if n != victim],
            "dropped": [victim],
        }
    signatures = rnd.ask(requests)
    assert set(signatures) == set(fed.ids)

    def unmask_for(group: list[int]) -> Payloads:
        header = {k: requests[group[0]][k] for k in ("round", "session")} | {"stage": "unmask"}
        return {
            n: header | {"signers": group, "signatures": [signatures[s]["signature"] for s in group]} for n in group
        }

    rest = [n for n in fed.ids if n not in told_dropped]
    told = _unmask_replies(rnd, unmask_for(list(told_dropped)))
    assert told == {}  # 3 signatures < threshold 5: they reveal no key share of the victim
    assert all("only 3 nodes signed the survivor set, threshold is 5" in rnd.errors[n] for n in told_dropped)
    kept = _unmask_replies(rnd, unmask_for(rest))
    assert set(kept) == set(rest)
    assert all(victim not in r["key_owners"] for r in kept.values())  # seed shares only: the mask key stays hidden


@pytest.mark.parametrize("threshold", [None, 6], ids=["default threshold", "threshold for one colluder"])
def test_one_colluding_neighbour_and_a_split_expose_a_victim_unless_the_threshold_is_raised(threshold) -> None:
    """The documented limit: with C colluding neighbours, a split works when 2t <= k + 1 + C.

    Nine nodes (k = 8); the default t = 5 gives 2t = 10 <= 9 + 1. The coordinator tells the victim
    and three honest nodes that the victim survived, four others that it dropped; the colluder
    signs both lists. With t = 6 = (k + 1 + C) // 2 + 1 neither group gets t signatures.
    """
    fed = Federation(9)
    rnd = Round(fed, threshold=threshold)
    victim, colluder, *honest = fed.ids
    requests = rnd.server.receive_shares(rnd.ask(rnd.to_share_keys()))
    inputs = rnd.ask(requests)
    masked = inputs[victim]["masked"]
    requests = rnd.server.receive_masked(inputs)
    told_dropped = honest[3:]
    for node in told_dropped:
        requests[node] = {**requests[node], "survivors": [n for n in fed.ids if n != victim], "dropped": [victim]}
    signatures = {n: r["signature"] for n, r in rnd.ask(requests).items()}
    header = {k: requests[victim][k] for k in ("round", "session")} | {"stage": "unmask"}
    colluding = rnd.clients[colluder]
    roster = graph_seed(rnd.server.session, rnd.server.roster)
    as_dropped = survivors_message(
        rnd.server.session, 1, colluder, [n for n in fed.ids if n != victim], [victim], roster
    )
    groups = [([victim, colluder, *honest[:3]], signatures), ([*told_dropped, colluder], signatures)]
    seed_shares = [colluding.seed_shares[victim]]
    key_shares = [colluding.key_shares[victim]]
    for members, signed in groups:
        sigs = {**signed, colluder: fed.identities[colluder].sign(as_dropped)} if victim not in members else signed
        request = header | {"signers": members, "signatures": [sigs[m] for m in members]}
        for reply in _unmask_replies(rnd, {m: request for m in members if m != colluder}).values():
            owned = dict(zip(reply["seed_owners"], reply["seed_shares"], strict=True))
            seed_shares += [owned[victim]] if victim in owned else []
            owned = dict(zip(reply["key_owners"], reply["key_shares"], strict=True))
            key_shares += [owned[victim]] if victim in owned else []
    t = rnd.params.threshold
    if threshold is not None:
        assert len(seed_shares) < t and len(key_shares) < t  # nobody revealed anything: too few signatures
        return
    assert len(seed_shares) >= t and len(key_shares) >= t
    session = rnd.server.session
    mask_sk = shamir.combine(key_shares, t)
    masks = [(derive_key(shamir.combine(seed_shares, t), session=session, purpose=b"self-mask"), -1)]
    for peer in rnd.server.mask_peers[victim]:  # the coordinator routed these shares
        seed = agree(mask_sk, rnd.server.roster[peer][1], session=session, purpose=b"mask", a=victim, b=peer)
        masks.append((seed, -1 if victim < peer else 1))
    vector = np.array(masked, copy=True)
    add_masks(vector, masks)
    recovered = vector.view(np.int64)[:DIM].astype(np.float64)
    assert np.corrcoef(recovered, rnd.updates[victim])[0, 1] > 0.999


def test_a_node_sent_another_roster_is_found_out_before_any_share_is_revealed() -> None:
    """The signed lists carry a digest of the roster each node was sent: a tailored roster shows.

    A node that advertised but then dropped is in every roster but the target's; the survivor lists
    are then the same everywhere, and only the roster digest differs.
    """
    fed = Federation(6)
    rnd = Round(fed)
    target, hidden = fed.ids[0], fed.ids[5]
    requests = rnd.to_share_keys()
    del requests[hidden]  # it drops before sharing keys
    requests = rnd.server.receive_masked(rnd.ask(rnd.server.receive_shares(rnd.ask(requests))))
    del rnd.clients[target].roster[hidden]  # what the target keeps of a roster sent without it
    unmask = rnd.server.receive_consistency(rnd.ask(requests))
    assert set(unmask) == set(fed.ids[:5])  # every survivor signed its (same) lists
    assert _unmask_replies(rnd, unmask) == {}
    assert all("does not cover the survivor set this node signed" in rnd.errors[n] for n in fed.ids[:5])


def test_the_victim_left_out_of_its_own_list_refuses_to_sign() -> None:
    fed = Federation(5)
    rnd = Round(fed)
    requests = rnd.to_consistency()
    victim = fed.ids[0]
    requests[victim] = {**requests[victim], "survivors": fed.ids[1:], "dropped": [victim]}
    replies = rnd.ask(requests)
    assert victim not in replies and "listed as dropped" in rnd.errors[victim]


def test_signatures_replayed_from_an_earlier_round_are_refused() -> None:
    fed = Federation(5)
    old = Round(fed, round_id=1).to_unmask()
    rnd = Round(fed, round_id=2)
    requests = rnd.to_unmask()
    for node in fed.ids:
        requests[node] = {**requests[node], "signatures": old[node]["signatures"]}
    assert _unmask_replies(rnd, requests) == {}
    assert all("replayed or forged a signature" in rnd.errors[n] for n in fed.ids)


@pytest.mark.parametrize(
    ("alter", "problem"),
    [
        (lambda r, ids: {**r, "signatures": [b"\x30\x02\x00\x00", *r["signatures"][1:]]}, "does not cover"),
        (lambda r, ids: {**r, "signers": r["signers"][:2], "signatures": r["signatures"][:2]}, "only 2 nodes signed"),
        (lambda r, ids: {**r, "signers": [*r["signers"][:-1], 12345]}, "not among the survivors"),
        (lambda r, ids: {**r, "signers": [*r["signers"], r["signers"][0]]}, "repeats a node"),
    ],
    ids=["forged", "too few", "not a survivor", "twice"],
)
def test_forged_missing_or_misattributed_signatures_are_refused(
    alter: Callable[[dict, list[int]], dict], problem: str
) -> None:
    fed = Federation(5)
    rnd = Round(fed)
    requests = rnd.to_unmask()
    victim = fed.ids[0]
    requests[victim] = alter(requests[victim], fed.ids)
    replies = _unmask_replies(rnd, requests)
    assert victim not in replies and problem in rnd.errors[victim]
    assert set(replies) == set(fed.ids[1:])
    # the round is over at the victim: a correct request afterwards is refused too
    honest = {**requests[fed.ids[1]]}
    with pytest.raises(SecureAggregationError, match="while at 'failed'"):
        rnd.clients[victim].handle(honest)


def test_an_honest_round_with_kit_identities_and_dropouts_at_every_stage() -> None:
    fed = Federation(12)
    rng = np.random.default_rng(0)
    updates = {n: rng.normal(0, 0.3, DIM).astype(np.float32) for n in fed.ids}
    weights = {n: float(i + 1) for i, n in enumerate(fed.ids)}
    drop = {fed.ids[0]: "advertise", fed.ids[1]: "share_keys", fed.ids[2]: "masked_input"}
    drop |= {fed.ids[3]: "consistency", fed.ids[4]: "unmask"}
    params = derive_params(12, DIM)
    result = run_secure_sum(updates, weights, params, drop_at=drop, identities=fed.identities)
    in_sum = fed.ids[3:]
    expected = sum(weights[n] * updates[n].astype(np.float64) for n in in_sum)
    assert sorted(result.survivors) == in_sum
    assert np.max(np.abs(result.weighted_sum - expected)) / result.total_weight <= params.mean_error_bound


# ------------------------------------------------------------------------------ kits and the ClientApp


def test_provisioned_kits_carry_a_node_certificate_that_other_nodes_accept(tmp_path) -> None:
    from flowerbed.client.secagg_handlers import node_identity
    from flowerbed.kit import load_kit
    from flowerbed.server.federation_config import load_federation
    from flowerbed.server.provisioning import ProvisionPaths, provision

    path = tmp_path / "federation.toml"
    path.write_text(
        'name = "t"\n[coordinator]\naddress = "127.0.0.1:9093"\n'
        + "".join(f'[[sites]]\nname = "{s}"\n' for s in ("cleveland", "hungary", "va"))
    )
    federation = load_federation(path)
    provision(federation)
    paths = ProvisionPaths(federation.output_dir)
    kits = {s: load_kit(paths.kit(s)) for s in ("cleveland", "hungary", "va")}
    identities = {}
    for i, (site, kit) in enumerate(kits.items()):
        assert kit.node_cert == kit.folder / "node.crt"
        config = {"data-path": "/data/x.csv", "site": site, "identity-key": str(kit.node_key)}
        config |= {"identity-cert": str(kit.node_cert), "ca-cert": str(kit.ca_cert)}
        identities[i + 1] = node_identity(config)
        assert identities[i + 1].site == site
    cleveland = kits["cleveland"]
    borrowed = {"identity-key": str(cleveland.node_key), "identity-cert": str(cleveland.node_cert)}
    with pytest.raises(NodeError, match="names site 'cleveland', not this node's site"):
        node_identity({**config, **borrowed, "site": "hungary"})
    with pytest.raises(NodeError, match="this certificate is for another key"):
        load_identity(kits["va"].node_key, kits["hungary"].node_cert, kits["va"].ca_cert)
    with pytest.raises(NodeError, match="not .*identity-cert"):
        node_identity({"data-path": "/data/x.csv", "identity-key": str(kits["va"].node_key)})
    with pytest.raises(NodeError, match="needs this node's identity"):
        node_identity({"data-path": "/data/x.csv", "site": "va"})
    with pytest.raises(SecureAggregationError, match="not a node identity certificate"):
        ca = identities[1].ca
        check_certificate(_der(load_certificate(paths.server_cert)), ca)
    updates = {n: np.ones(DIM, np.float32) * n for n in identities}
    result = run_secure_sum(updates, dict.fromkeys(identities, 1.0), derive_params(3, DIM), identities=identities)
    assert np.allclose(result.weighted_sum, 6.0, atol=1e-3)
    again = provision(federation)  # a second run keeps every certificate
    assert not [p for p in again.created if p.name == "node.crt"]


def test_a_virtual_node_without_an_identity_answers_an_error(monkeypatch) -> None:
    from flowerbed.client.app import app
    from flowerbed.flower_internals import enter_task_identity

    monkeypatch.delenv("FLOWERBED_SIM_NODE_DIR", raising=False)
    enter_task_identity(1, 1)
    server = SecAggServer(derive_params(3, 10), [1, 2, 3])
    message = Message(
        RecordDict({"secagg": ConfigRecord(server.advertise()[1])}),
        dst_node_id=1,
        message_type="train.secagg_advertise",
    )
    message.metadata.__dict__["_message_id"] = str(uuid4())
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(message, context)
    assert reply.has_error() and "needs this node's identity" in reply.error.reason


# ------------------------------------------------------------------------------ end to end, through the ClientApp


def _tamper_exchange(monkeypatch, tamper: Callable[[str, Payloads], None]) -> dict[str, Any]:
    """Make the coordinator's secure train phase alter its requests; record what came back."""
    from flowerbed.server import secure_train_phase

    seen: dict[str, Any] = {"replies": {}, "refused": {}}
    original = secure_train_phase._Exchange.__call__

    def call(self, stage: str, requests: Payloads) -> Payloads:
        tamper(stage, requests)
        replies = original(self, stage, requests)
        seen["replies"][stage] = replies
        seen["refused"][stage] = dict(self.outcome.refused)
        return replies

    monkeypatch.setattr(secure_train_phase._Exchange, "__call__", call)
    return seen


def test_end_to_end_a_substituted_key_is_refused_by_the_victims_client_app(heart_experiment, monkeypatch) -> None:
    from flowerbed.server.run_folder import read_metrics
    from flowerbed.simulations.simulate import simulate

    victim: list[int] = []

    def tamper(stage: str, requests: Payloads) -> None:
        if stage == "share_keys":
            node = sorted(requests)[0]
            other = sorted(requests)[1]
            victim.append(node)
            _, fake = generate_keypair()
            requests[node] = _with_entry(requests[node], other, channel_pks=fake)

    seen = _tamper_exchange(monkeypatch, tamper)
    run = simulate(heart_experiment("rounds=1", "secagg.enabled=true", "evaluate.federated=false"), quiet=True)
    assert victim[0] not in seen["replies"]["share_keys"]  # the victim sent no share
    record = read_metrics(run)[0]
    refused = {s: r for s, r in record["refused"].items() if "do not carry that site's signature" in r}
    assert len(refused) == 1
    (site, reason), *_ = refused.items()
    assert site not in record["participants"] and len(record["participants"]) == 3
    assert "share_keys" in reason and "refusing to share secrets" in reason


def test_end_to_end_different_survivor_sets_stop_the_round_before_any_share(heart_experiment, monkeypatch) -> None:
    from flowerbed.server.run_folder import read_summary
    from flowerbed.simulations.simulate import simulate

    def tamper(stage: str, requests: Payloads) -> None:
        if stage == "consistency":
            node, left_out = sorted(requests)[:2]
            request = requests[node]
            requests[node] = {
                **request,
                "survivors": [n for n in request["survivors"] if n != left_out],
                "dropped": [*request["dropped"], left_out],
            }

    seen = _tamper_exchange(monkeypatch, tamper)
    run = simulate(heart_experiment("rounds=1", "secagg.enabled=true", "evaluate.federated=false"), quiet=True)
    assert seen["replies"]["unmask"] == {}  # every node refused to reveal a share
    reasons = seen["refused"]["unmask"]
    assert len(reasons) == 4 and all("unmask" in r and "refusing to reveal any share" in r for r in reasons.values())
    assert sum("does not cover the survivor set" in r for r in reasons.values()) == 3
    assert sum("not among the survivors this node signed" in r for r in reasons.values()) == 1  # the targeted node
    summary = read_summary(run)
    assert summary["rounds_completed"] == 0 and "nothing is unmasked" in summary["stopped"]
