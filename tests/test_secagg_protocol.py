"""Secure aggregation end to end, in memory: correctness, dropouts, failures, tampering, privacy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg.protocol import (
    STAGES,
    SecAggClient,
    SecAggServer,
    derive_params,
    run_secure_sum,
    throwaway_identities,
)

DIM = 4_000


def _federation(n: int, dim: int = DIM, seed: int = 0, scale: float = 0.5):
    rng = np.random.default_rng(seed)  # test data only; the protocol never uses numpy RNG
    ids = [int(x) for x in rng.choice(2**62, size=n, replace=False)]
    updates = {i: rng.normal(0, scale, dim).astype(np.float32) for i in ids}
    weights = {i: float(rng.integers(1, 1000)) for i in ids}
    return ids, updates, weights


def _plain(updates, weights, nodes):
    total = sum(weights[i] * updates[i].astype(np.float64) for i in nodes)
    return total, sum(weights[i] for i in nodes)


def _assert_matches(result, updates, weights, nodes, params) -> None:
    assert sorted(result.survivors) == sorted(nodes)
    plain_sum, plain_weight = _plain(updates, weights, nodes)
    assert result.total_weight == plain_weight  # integer weights are summed exactly
    err = np.max(np.abs(result.mean - plain_sum / plain_weight))
    assert err <= params.mean_error_bound, (err, params.mean_error_bound)


@pytest.mark.parametrize("stochastic", [True, False])
def test_secure_sum_equals_plain_weighted_sum_within_the_quantization_bound(
    stochastic: bool,
) -> None:
    ids, updates, weights = _federation(12)
    params = derive_params(12, DIM, clip_range=4.0, stochastic_rounding=stochastic)
    result = run_secure_sum(updates, weights, params)
    _assert_matches(result, updates, weights, ids, params)
    assert result.out_of_range == 0 and result.dropped == {}
    # the bound is tight enough to matter: a coarse quantizer is visibly off, yet within it
    coarse = derive_params(12, DIM, clip_range=4.0, quantization_bits=6)
    result = run_secure_sum(updates, weights, coarse)
    _assert_matches(result, updates, weights, ids, coarse)


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_each_stage_are_survived(stage: str) -> None:
    ids, updates, weights = _federation(14)
    params = derive_params(14, DIM)
    gone = ids[:3]
    result = run_secure_sum(updates, weights, params, drop_at=dict.fromkeys(gone, stage))
    # a node that vanishes after sending its input (consistency check, unmasking) is in the sum
    in_sum = ids if stage in ("consistency", "unmask") else ids[3:]
    _assert_matches(result, updates, weights, in_sum, params)
    assert {n: s.split(" ")[0] for n, s in result.dropped.items()} == dict.fromkeys(gone, stage)


def test_dropouts_at_every_stage_in_one_round_with_a_sparse_graph() -> None:
    ids, updates, weights = _federation(40, dim=2_000)
    params = derive_params(40, 2_000)
    assert params.neighbours < 39  # SecAgg+: not everyone is a neighbour
    drop = {ids[0]: "advertise", ids[1]: "share_keys", ids[2]: "masked_input", ids[3]: "unmask"}
    result = run_secure_sum(updates, weights, params, drop_at=drop)
    _assert_matches(result, updates, weights, [i for i in ids if i not in ids[:3]], params)


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_the_round_fails_and_nothing_is_unmasked(stage: str) -> None:
    ids, updates, weights = _federation(8, dim=500)
    params = derive_params(8, 500)  # complete graph, threshold 5
    unmask_requests: list[Any] = []

    def watch(s: str, requests: dict) -> dict:
        if s == "unmask":
            unmask_requests.append(requests)
        return requests

    with pytest.raises(SecureAggregationError, match="nothing is unmasked") as info:
        run_secure_sum(updates, weights, params, drop_at=dict.fromkeys(ids[:4], stage), intercept=watch)
    assert "threshold 5" in str(info.value)
    if stage != "unmask":
        assert unmask_requests == []  # no node was ever asked to reveal a share


def _clients(ids: list[int]) -> dict[int, SecAggClient]:
    identities = throwaway_identities(ids)
    return {i: SecAggClient(i, identities[i]) for i in ids}


def test_server_refuses_to_unmask_with_too_few_shares_before_rebuilding_anything() -> None:
    ids, updates, weights = _federation(6, dim=300)
    params = derive_params(6, 300)
    clients = _clients(ids)
    server = SecAggServer(params, ids)

    def ask(requests):
        return {i: clients[i].handle(r, updates[i], weights[i]) for i, r in requests.items()}

    requests = server.receive_keys(ask(server.advertise()))
    requests = server.receive_masked(ask(server.receive_shares(ask(requests))))
    replies = ask(server.receive_consistency(ask(requests)))
    few = {i: replies[i] for i in ids[: params.threshold - 1]}
    with pytest.raises(SecureAggregationError, match="nothing is unmasked"):
        server.receive_unmask(few)
    assert server.stage == "failed"
    with pytest.raises(SecureAggregationError):
        server.receive_unmask(replies)  # a failed round stays failed


def _tamper_one(requests: dict, how) -> dict:
    node = sorted(requests)[0]
    request = dict(requests[node])
    request["from"], request["ciphertexts"] = how(list(request["from"]), list(request["ciphertexts"]))
    return {**requests, node: request}


def test_a_tampered_share_is_rejected_with_a_clear_error() -> None:
    _, updates, weights = _federation(6, dim=100)
    params = derive_params(6, 100)

    def flip(senders, blobs):
        bad = bytearray(blobs[0])
        bad[len(bad) // 2] ^= 0x40
        return senders, [bytes(bad), *blobs[1:]]

    def intercept(stage, requests):
        return _tamper_one(requests, flip) if stage == "masked_input" else requests

    with pytest.raises(SecureAggregationError, match=r"failed authentication \(tampered"):
        run_secure_sum(updates, weights, params, intercept=intercept)


def test_a_relabelled_share_is_rejected() -> None:
    _, updates, weights = _federation(6, dim=100)
    params = derive_params(6, 100)

    def swap(senders, blobs):
        return senders, [blobs[1], blobs[0], *blobs[2:]]

    def intercept(stage, requests):
        return _tamper_one(requests, swap) if stage == "masked_input" else requests

    with pytest.raises(SecureAggregationError, match="failed authentication"):
        run_secure_sum(updates, weights, params, intercept=intercept)


def test_a_share_replayed_within_the_round_is_rejected() -> None:
    _, updates, weights = _federation(6, dim=100)
    params = derive_params(6, 100)

    def duplicate(senders, blobs):
        return [*senders, senders[0]], [*blobs, blobs[0]]

    def intercept(stage, requests):
        return _tamper_one(requests, duplicate) if stage == "masked_input" else requests

    with pytest.raises(SecureAggregationError, match="arrived twice"):
        run_secure_sum(updates, weights, params, intercept=intercept)


def test_a_share_replayed_from_an_earlier_round_is_rejected() -> None:
    ids, updates, weights = _federation(6, dim=100)
    params = derive_params(6, 100)
    recorded: dict = {}

    def record(stage, requests):
        if stage == "masked_input":
            recorded.update(requests)
        return requests

    run_secure_sum(updates, weights, params, round_id=1, intercept=record)

    def replay(stage, requests):
        if stage != "masked_input":
            return requests
        node = ids[0]
        old = recorded[node]
        request = dict(requests[node])
        request["ciphertexts"] = [dict(zip(old["from"], old["ciphertexts"], strict=True))[s] for s in request["from"]]
        return {**requests, node: request}

    with pytest.raises(SecureAggregationError, match="failed authentication"):
        run_secure_sum(updates, weights, params, round_id=2, intercept=replay)


def test_a_stale_request_from_another_round_is_refused() -> None:
    ids, _, _ = _federation(5, dim=50)
    params = derive_params(5, 50)
    old = SecAggServer(params, ids, round_id=1)
    new = SecAggServer(params, ids, round_id=2)
    clients = _clients(ids)
    old.receive_keys({i: clients[i].handle(r) for i, r in old.advertise().items()})
    requests = new.receive_keys({i: clients[i].handle(r) for i, r in new.advertise().items()})
    assert requests
    stale = {"round": old.round_id, "session": old.session}
    with pytest.raises(SecureAggregationError, match="stale or replayed"):
        clients[ids[0]].share_keys({**requests[ids[0]], **stale})


def test_a_node_never_reveals_both_secrets_of_a_neighbour() -> None:
    ids, updates, weights = _federation(6, dim=100)
    params = derive_params(6, 100)

    def ask(clients, requests):
        return {i: clients[i].handle(r, updates[i], weights[i]) for i, r in requests.items()}

    def at_consistency():
        clients = _clients(ids)
        session = SecAggServer(params, ids)
        requests = session.receive_keys(ask(clients, session.advertise()))
        return clients, session.receive_masked(ask(clients, session.receive_shares(ask(clients, requests))))

    me, other = ids[0], ids[1]
    refusals = {
        "both survived and dropped": lambda r: {**r, "dropped": [*r["dropped"], other]},
        "listed as dropped": lambda r: {**r, "survivors": [i for i in ids if i != me], "dropped": [me]},
        "refusing to unmask": lambda r: {**r, "survivors": [me, other], "dropped": ids[2:]},
        "listed twice": lambda r: {**r, "survivors": [*r["survivors"], other]},
        "not in this round's roster": lambda r: {**r, "dropped": [12345]},
    }
    for message, alter in refusals.items():
        clients, requests = at_consistency()
        with pytest.raises(SecureAggregationError, match=message):
            clients[me].handle(alter(requests[me]))
        assert clients[me].stage == "failed"  # the round is over for this node
    # a consistent round: every node signs once, reveals once
    clients, requests = at_consistency()
    signed = {i: clients[i].handle(r) for i, r in requests.items()}
    request = {
        **{k: requests[me][k] for k in ("round", "session")},
        "stage": "unmask",
        "signers": sorted(signed),
        "signatures": [signed[i]["signature"] for i in sorted(signed)],
    }
    clients[me].handle(request)
    with pytest.raises(SecureAggregationError, match="once each"):
        clients[me].handle(request)
    with pytest.raises(SecureAggregationError, match="once each"):
        clients[other].handle(requests[other])  # signs one survivor set, once


def test_everything_the_server_receives_is_masked() -> None:
    ids, updates, weights = _federation(10, dim=20_000, scale=1.0)
    params = derive_params(10, 20_000, clip_range=8.0)
    received: dict[str, dict] = {}
    result = run_secure_sum(
        updates,
        weights,
        params,
        drop_at={ids[0]: "masked_input"},
        observe=lambda stage, replies: received.__setitem__(stage, replies),
    )
    # Masked vectors: no entry of any one node's input shows through, whoever's vector it is.
    dim = params.dimension
    for sender, reply in received["masked_input"].items():
        masked = reply["masked"].view(np.int64)[:dim].astype(np.float64)
        assert reply["masked"].view(np.int64)[dim] != round(weights[sender])
        for owner, update in updates.items():
            corr = np.corrcoef(masked, update.astype(np.float64))[0, 1]
            assert abs(corr) < 0.05, (sender, owner, corr)
    # Key shares: the server learns seed shares of survivors and key shares of the dropped node
    # only, never both kinds for one node.
    seed_owners = {o for r in received["unmask"].values() for o in r["seed_owners"]}
    key_owners = {o for r in received["unmask"].values() for o in r["key_owners"]}
    assert seed_owners == set(ids[1:]) and key_owners == {ids[0]}
    # Share-key replies are opaque ciphertexts: no plaintext share is a substring of them.
    for reply in received["share_keys"].values():
        assert all(len(c) == 12 + 2 * 71 + 16 for c in reply["ciphertexts"])
    # and still, the sum is right
    _assert_matches(result, updates, weights, ids[1:], params)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_modulus_never_wraps_at_the_worst_case(sign: float) -> None:
    # The worst case: every node at the maximum weight, every entry at the clipping bound.
    # These parameters need exactly 32 bits, the smallest modulus: any larger sum would wrap.
    n, bits, max_weight = 8, 16, 2**13
    params = derive_params(n, 64, quantization_bits=bits, max_weight=float(max_weight), stochastic_rounding=False)
    assert params.required_bits == 32 and params.modulus_bits == 32
    ids = list(range(1, n + 1))
    updates = {i: np.full(64, sign * 1e6, dtype=np.float32) for i in ids}
    result = run_secure_sum(updates, dict.fromkeys(ids, float(max_weight)), params)
    expected = sign * n * max_weight * params.levels * params.step
    np.testing.assert_array_equal(result.weighted_sum, np.full(64, expected))
    assert result.total_weight == n * max_weight
    assert result.out_of_range == n * 64  # every entry was outside the range: counted


def test_weights_resolution_and_fractional_weights() -> None:
    ids, updates, _ = _federation(5, dim=200)
    weights = {i: 0.25 * (k + 1) for k, i in enumerate(ids)}
    params = derive_params(5, 200, max_weight=4.0, weight_resolution=0.25)
    result = run_secure_sum(updates, weights, params)
    _assert_matches(result, updates, weights, ids, params)


def test_client_state_survives_a_flower_config_record_between_stages() -> None:
    ids, updates, weights = _federation(5, dim=300)
    params = derive_params(5, 300)
    server = SecAggServer(params, ids, round_id=4)
    identities = throwaway_identities(ids)
    records = {i: SecAggClient(i).to_record() for i in ids}

    def ask(requests):
        replies = {}
        for i, request in requests.items():
            # what a ClientApp does: state lives in Context.state as a ConfigRecord; the
            # identity comes from the node's own files at every stage
            client = SecAggClient.from_record(dict(ConfigRecord(records[i])), identities[i])
            replies[i] = client.handle(dict(ConfigRecord(request)), updates[i], weights[i])
            records[i] = client.to_record()
            masked = replies[i].pop("masked", None)
            replies[i] = dict(ConfigRecord(replies[i]))
            if masked is not None:
                replies[i]["masked"] = ArrayRecord({"m": Array(masked)})["m"].numpy()
        return replies

    requests = server.receive_keys(ask(server.advertise()))
    requests = server.receive_masked(ask(server.receive_shares(ask(requests))))
    result = server.receive_unmask(ask(server.receive_consistency(ask(requests))))
    _assert_matches(result, updates, weights, ids, params)


def test_sessions_are_fresh_and_random() -> None:
    params = derive_params(3, 10)
    sessions = {SecAggServer(params, [1, 2, 3]).session for _ in range(20)}
    assert len(sessions) == 20 and all(len(s) == 32 for s in sessions)
