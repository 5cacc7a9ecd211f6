"""Secure-aggregation building blocks: Shamir, X25519/HKDF, AEAD, masks, graph, params."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerbed.exception import ConfigError, SecureAggregationError
from flowerbed.privacy.secagg import shamir
from flowerbed.privacy.secagg.chunks import CHUNK_BYTES, add_vectors
from flowerbed.privacy.secagg.crypto import (
    add_masks,
    agree,
    decrypt_share,
    encrypt_share,
    expand_mask,
    generate_keypair,
    share_associated_data,
)
from flowerbed.privacy.secagg.graph import neighbour_graph
from flowerbed.privacy.secagg.params import SecAggParams, derive_params
from flowerbed.privacy.secagg.quantize import decode_sum, encode_input, quantize

PRIVACY = Path(__file__).resolve().parents[1] / "privacy"


# ---------------------------------------------------------------- Shamir
@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(min_value=2, max_value=12),
    data=st.data(),
)
def test_shamir_any_t_shares_recover_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(min_value=1, max_value=n))
    xs = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, xs)
    subset = data.draw(st.permutations(shares))[:t]
    assert shamir.combine(subset, t) == secret


def test_shamir_too_few_shares_is_an_error_and_t_minus_1_shares_reveal_nothing() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="3 needed"):
        shamir.combine(shares[:2], 3)
    # Two shares of a degree-2 polynomial are consistent with every secret: interpolating them
    # as if the threshold were 2 gives a field element unrelated to the secret (almost surely
    # too large to be a 32-byte secret at all).
    try:
        assert shamir.combine(shares[:2], 2) != secret
    except ValueError as exc:
        assert "corrupted" in str(exc)


def test_shamir_corrupted_share_is_detected_when_shares_are_spare() -> None:
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4, 5])
    bad = bytearray(shares[4])
    bad[-1] ^= 1
    with pytest.raises(ValueError, match="corrupted"):
        shamir.combine([*shares[:4], bytes(bad)], 3, check=2)
    bad_low = bytearray(shares[1])
    bad_low[-1] ^= 1  # point 2: among the interpolated shares, caught by the spare one
    with pytest.raises(ValueError, match="corrupted"):
        shamir.combine([shares[0], bytes(bad_low), shares[2], shares[3]], 3)


# ---------------------------------------------------------------- key agreement and AEAD
def test_x25519_hkdf_agreement_is_symmetric_and_bound_to_session_and_pair() -> None:
    a_sk, a_pk = generate_keypair()
    b_sk, b_pk = generate_keypair()
    session = os.urandom(32)
    k_ab = agree(a_sk, b_pk, session=session, purpose=b"mask", a=1, b=2)
    assert k_ab == agree(b_sk, a_pk, session=session, purpose=b"mask", a=2, b=1)
    assert k_ab != agree(a_sk, b_pk, session=os.urandom(32), purpose=b"mask", a=1, b=2)
    assert k_ab != agree(a_sk, b_pk, session=session, purpose=b"share-key", a=1, b=2)
    assert k_ab != agree(a_sk, b_pk, session=session, purpose=b"mask", a=1, b=3)


def test_low_order_public_key_is_refused() -> None:
    sk, _ = generate_keypair()
    with pytest.raises(SecureAggregationError, match="key agreement"):
        agree(sk, bytes(32), session=b"s", purpose=b"mask", a=1, b=2)


def test_aead_rejects_other_round_sender_receiver_and_bit_flips() -> None:
    key = os.urandom(32)
    session = os.urandom(32)
    blob = encrypt_share(key, b"share", share_associated_data(session, 3, 7, 9))
    good = share_associated_data(session, 3, 7, 9)
    assert decrypt_share(key, blob, good, sender=7, receiver=9, round_id=3) == b"share"
    for ad in (
        share_associated_data(session, 4, 7, 9),
        share_associated_data(session, 3, 8, 9),
        share_associated_data(session, 3, 7, 8),
        share_associated_data(os.urandom(32), 3, 7, 9),
    ):
        with pytest.raises(SecureAggregationError, match="failed authentication"):
            decrypt_share(key, blob, ad, sender=7, receiver=9, round_id=3)
    flipped = bytearray(blob)
    flipped[20] ^= 0x01
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        decrypt_share(key, bytes(flipped), good, sender=7, receiver=9, round_id=3)


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masks_cancel_and_look_uniform(dtype: type) -> None:
    m = 20_000
    key = os.urandom(32)
    vector = np.arange(m, dtype=dtype)
    original = vector.copy()
    add_masks(vector, [(key, +1)])
    assert not np.array_equal(vector, original)
    add_masks(vector, [(key, -1)])
    np.testing.assert_array_equal(vector, original)
    mask = expand_mask(key, m, dtype)
    top_bit = mask >> np.uint64(np.dtype(dtype).itemsize * 8 - 1)
    assert abs(top_bit.mean() - 0.5) < 0.02
    assert not np.array_equal(mask, expand_mask(os.urandom(32), m, dtype))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("workers", [1, 3])
def test_chunked_threaded_masks_equal_the_aes_ctr_keystream(dtype: type, workers: int) -> None:
    """Ranges and chunks resume the keystream at the right AES block: equal to one pass of AES-CTR."""
    itemsize = np.dtype(dtype).itemsize
    m = 3 * CHUNK_BYTES // itemsize + 7  # several chunks and a ragged tail
    keys = [os.urandom(32) for _ in range(3)]
    signs = [1, -1, 1]
    expected = np.arange(m, dtype=dtype)
    for key, sign in zip(keys, signs, strict=True):
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(m * itemsize))
        words = np.frombuffer(stream, dtype=dtype)
        expected = expected + words if sign > 0 else expected - words
    vector = np.arange(m, dtype=dtype)
    add_masks(vector, list(zip(keys, signs, strict=True)), workers=workers)
    np.testing.assert_array_equal(vector, expected)
    others = [np.arange(m, dtype=dtype) * np.asarray(i + 2, dtype=dtype) for i in range(3)]
    total = np.full(m, np.iinfo(dtype).max, dtype=dtype)
    add_vectors(total, others, workers=workers)
    np.testing.assert_array_equal(total, np.full(m, np.iinfo(dtype).max, dtype=dtype) + sum(others))


def test_no_numpy_or_stdlib_random_generator_in_the_protocol() -> None:
    paths = sorted((PRIVACY / "secagg").glob("*.py"))
    assert len(paths) >= 9, paths
    for path in paths:
        text = path.read_text()
        for banned in ("np.random", "numpy.random", "import random", "from random"):
            assert banned not in text, f"{path.name} uses {banned}"


# ---------------------------------------------------------------- graph
@pytest.mark.parametrize(("n", "k"), [(5, 4), (13, 12), (50, 18), (100, 20), (101, 20)])
def test_neighbour_graph_is_symmetric_and_regular(n: int, k: int) -> None:
    ids = [1000 + 7 * i for i in range(n)]
    seed = os.urandom(32)
    graph = neighbour_graph(ids, k, seed)
    assert graph == neighbour_graph(list(reversed(ids)), k, seed)
    for node, nbrs in graph.items():
        assert node not in nbrs
        assert len(nbrs) == min(k, n - 1)
        assert all(node in graph[j] for j in nbrs)


# ---------------------------------------------------------------- parameters
def test_default_parameters_grow_logarithmically() -> None:
    p10, p50, p100 = (derive_params(n, 10) for n in (10, 50, 100))
    assert (p10.neighbours, p10.threshold) == (9, 6)
    assert (p50.neighbours, p50.threshold) == (18, 10)
    assert (p100.neighbours, p100.threshold) == (20, 11)
    for p in (p10, p50, p100):
        assert 2 * p.threshold > p.neighbours + 1


def test_bad_parameters_name_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"secagg.threshold = 3 must be a strict majority"):
        derive_params(10, 10, threshold=3)
    with pytest.raises(ConfigError, match=r"needs 80 bits \(> 64\)"):
        derive_params(1000, 10, quantization_bits=30, max_weight=2.0**40)
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        derive_params(1, 10)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 10_000),
    bits=st.integers(2, 30),
    max_weight=st.integers(1, 2**24),
    dim=st.integers(1, 10**7),
)
def test_required_bits_is_the_smallest_width_that_cannot_wrap(n: int, bits: int, max_weight: int, dim: int) -> None:
    try:
        p = derive_params(n, dim, quantization_bits=bits, max_weight=float(max_weight))
    except ConfigError:
        return  # needs more than 64 bits: refused
    worst = max(n * max_weight * p.levels, n * dim)
    assert -(2 ** (p.required_bits - 1)) <= -worst
    assert worst < 2 ** (p.required_bits - 1)
    assert worst >= 2 ** (p.required_bits - 2)  # one bit fewer could wrap
    assert p.modulus_bits >= p.required_bits


# ---------------------------------------------------------------- quantization
def test_nearest_rounding_error_is_at_most_half_a_step() -> None:
    x = np.linspace(-3, 3, 10_001)
    q, oor = quantize(x, clip_range=3.0, levels=127, stochastic=False)
    assert oor == 0
    assert np.max(np.abs(q * (3.0 / 127) - x)) <= 0.5 * 3.0 / 127 + 1e-12


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    x = np.full(200_000, 0.3)
    q, _ = quantize(x, clip_range=1.0, levels=1, stochastic=True)
    assert set(np.unique(q)) <= {0, 1}
    assert abs(q.mean() - 0.3) < 0.01


def test_out_of_range_entries_are_counted_never_silently_clipped() -> None:
    p = derive_params(3, 6, clip_range=1.0, stochastic_rounding=False)
    update = np.array([0.5, 1.5, -2.0, 1.0, -1.0, np.float32(1.0001)], dtype=np.float32)
    vector, oor = encode_input(update, 2.0, p, node_id=4)
    assert oor == 3
    total, weight, counted = decode_sum(vector, p)
    assert counted == 3 and weight == 2.0
    np.testing.assert_allclose(total, 2.0 * np.clip(update, -1, 1), atol=2 * p.step)


def test_bad_inputs_name_the_node() -> None:
    p = derive_params(3, 4, max_weight=100.0)
    with pytest.raises(SecureAggregationError, match=r"node 7: weight 101 exceeds"):
        encode_input(np.zeros(4), 101.0, p, node_id=7)
    with pytest.raises(SecureAggregationError, match=r"node 7: update has 5 entries"):
        encode_input(np.zeros(5), 1.0, p, node_id=7)
    with pytest.raises(SecureAggregationError, match=r"node 7: update has NaN"):
        encode_input(np.array([0, np.nan, 0, 0]), 1.0, p, node_id=7)


def test_params_round_trip_through_a_payload() -> None:
    p = derive_params(17, 123, clip_range=2.5, quantization_bits=12, stochastic_rounding=False)
    assert SecAggParams.from_payload(p.to_payload()) == p


def _mask_in_child(queue) -> None:
    vector = np.zeros(3 * CHUNK_BYTES // 8, dtype=np.uint64)
    add_masks(vector, [(bytes(32), 1)], workers=2)
    queue.put(int(vector[-1]))


def test_masking_threads_work_in_a_forked_child() -> None:
    """A child forked after the parent used its pool (as Flower's and Ray's workers may be) gets its own."""
    import multiprocessing

    vector = np.zeros(3 * CHUNK_BYTES // 8, dtype=np.uint64)
    add_masks(vector, [(bytes(32), 1)], workers=2)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_mask_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("masking hung in a forked child")
    assert queue.get(timeout=5) == int(vector[-1])
