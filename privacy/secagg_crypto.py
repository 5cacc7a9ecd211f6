"""Cryptographic primitives of secure aggregation, all from ``cryptography``.

- Key agreement: X25519, then HKDF-SHA256 bound to the round's session and to the pair of nodes.
- Share encryption: ChaCha20-Poly1305 with associated data naming the round, the sender and the
  receiver, so a share that was altered, replayed from another round or relabelled is rejected.
- Mask expansion: AES-256-CTR keystream read as unsigned integers (uint32 or uint64), so modular
  arithmetic is numpy's native wrap-around.
- Randomness: ``os.urandom`` / ``secrets`` only; no numpy random generator anywhere.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flowerbed.exception import SecureAggregationError

PROTOCOL_ID = b"flowerbed-secagg/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_ZERO_IV = bytes(16)


def node_bytes(node_id: int) -> bytes:
    """Fixed-width encoding of a node id (Flower ids are 64-bit; signed 128 bits covers any)."""
    return int(node_id).to_bytes(16, "big", signed=True)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(private_key, public_key)``, 32 bytes each."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private.private_bytes_raw(), public


def public_key_of(private_key: bytes) -> bytes:
    """The raw X25519 public key that belongs to a raw private key."""
    private = X25519PrivateKey.from_private_bytes(private_key)
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private_key: bytes, public_key: bytes, *, session: bytes, purpose: bytes, a: int, b: int) -> bytes:
    """A 32-byte key shared by nodes ``a`` and ``b``: X25519, then HKDF-SHA256.

    Parameters
    ----------
    private_key, public_key : bytes
        This node's raw private key and the other node's raw public key.
    session : bytes
        The round's random session id (HKDF salt), so keys never repeat across rounds.
    purpose : bytes
        Domain separation (``b"mask"`` or ``b"share-key"``).
    a, b : int
        The two node ids, in any order (the derivation sorts them).

    Raises
    ------
    SecureAggregationError
        If the public key is malformed or a low-order point (all-zero shared secret).
    """
    try:
        peer = X25519PublicKey.from_public_bytes(public_key)
        secret = X25519PrivateKey.from_private_bytes(private_key).exchange(peer)
    except ValueError as exc:
        raise SecureAggregationError(
            f"key agreement between nodes {a} and {b} failed: {exc} (a public key is malformed)"
        ) from None
    lo, hi = sorted((int(a), int(b)))
    info = PROTOCOL_ID + b"|" + purpose + b"|" + node_bytes(lo) + node_bytes(hi)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(secret)


def derive_key(seed: bytes, *, session: bytes, purpose: bytes) -> bytes:
    """A 32-byte key derived from a secret seed with HKDF-SHA256 (e.g. the self-mask key)."""
    info = PROTOCOL_ID + b"|" + purpose
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=info).derive(seed)


def share_associated_data(session: bytes, round_id: int, sender: int, receiver: int) -> bytes:
    """Associated data that binds an encrypted share to its round, sender and receiver."""
    return (
        PROTOCOL_ID
        + b"|share|"
        + session
        + int(round_id).to_bytes(8, "big", signed=True)
        + node_bytes(sender)
        + node_bytes(receiver)
    )


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: ``nonce (12 bytes) || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(
    key: bytes, blob: bytes, associated_data: bytes, *, sender: int, receiver: int, round_id: int
) -> bytes:
    """Decrypt and authenticate one share sent by ``sender`` to ``receiver``.

    Raises
    ------
    SecureAggregationError
        If the ciphertext was altered, replayed from another round, relabelled with another
        sender or receiver, or truncated.
    """
    if len(blob) < NONCE_BYTES + 16:
        raise SecureAggregationError(
            f"round {round_id}: share from node {sender} to node {receiver} is truncated "
            f"({len(blob)} bytes); the round is aborted at node {receiver}"
        )
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise SecureAggregationError(
            f"round {round_id}: share from node {sender} to node {receiver} failed authentication "
            "(tampered, replayed from another round, or relabelled); node "
            f"{receiver} rejects it and takes no further part in this round"
        ) from None


class MaskExpander:
    """Expands 32-byte keys into mask vectors with AES-256-CTR and adds them in place.

    One expander reuses one keystream buffer, so adding k masks to a vector of length m costs k
    AES passes over ``m * itemsize`` bytes and k vectorized integer additions (wrapping modulo
    ``2**(8 * itemsize)``).

    Parameters
    ----------
    length : int
        Number of vector entries.
    dtype : numpy dtype
        ``numpy.uint32`` or ``numpy.uint64``: the modulus is ``2**32`` or ``2**64``.
    """

    def __init__(self, length: int, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise ValueError(f"mask dtype must be uint32 or uint64, not {self.dtype}")
        self.length = int(length)
        self._nbytes = self.length * self.dtype.itemsize
        self._zeros = bytes(self._nbytes)
        self._buffer = bytearray(self._nbytes + 15)
        self._view = np.frombuffer(self._buffer, dtype=self.dtype, count=self.length)

    def _stream(self, key: bytes) -> np.ndarray:
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return self._view

    def expand(self, key: bytes) -> np.ndarray:
        """A fresh copy of the mask for ``key`` (uniform over the modulus)."""
        return self._stream(key).copy()

    def add(self, target: np.ndarray, key: bytes, sign: int = 1) -> None:
        """``target += sign * mask(key)`` modulo the dtype's modulus, in place."""
        stream = self._stream(key)
        if sign > 0:
            np.add(target, stream, out=target)
        else:
            np.subtract(target, stream, out=target)


_LOCAL = threading.local()


def mask_expander(length: int, dtype: np.dtype | type) -> MaskExpander:
    """A ``MaskExpander`` reused by this thread (buffers of large vectors cost page faults)."""
    cache: dict[tuple[int, str], MaskExpander] = getattr(_LOCAL, "expanders", None) or {}
    key = (int(length), np.dtype(dtype).str)
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = MaskExpander(length, dtype)
    _LOCAL.expanders = cache
    return cache[key]


def keystream_words(length: int) -> np.ndarray:
    """``length`` uniform uint32 words from AES-CTR under a fresh ``os.urandom`` key.

    The array is a view of a reused buffer: use it before the next call in this thread.
    """
    return mask_expander(length, np.uint32)._stream(os.urandom(KEY_BYTES))
