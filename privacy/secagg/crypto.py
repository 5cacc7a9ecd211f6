"""Cryptographic primitives of secure aggregation, all from ``cryptography``.

- Key agreement: X25519, then HKDF-SHA256 bound to the round's session and to the pair of nodes.
- Share encryption: ChaCha20-Poly1305 with associated data naming the round, the sender and the
  receiver, so a share that was altered, replayed from another round or relabelled is rejected.
- Mask expansion: AES-256-CTR keystream read as unsigned integers (uint32 or uint64), so modular
  arithmetic is numpy's native wrap-around; expanded and added in cache-sized chunks, by several
  threads on large vectors.
- Randomness: ``os.urandom`` / ``secrets`` only; no numpy random generator anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg.chunks import chunk_words, for_each_range

PROTOCOL_ID = b"flowerbed-secagg/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_AES_BLOCK = 16


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


def keystream_encryptor(key: bytes, start_byte: int = 0) -> CipherContext:
    """An AES-256-CTR encryptor of zeros under ``key``, positioned at byte ``start_byte`` (a multiple of 16)."""
    if start_byte % _AES_BLOCK:
        raise ValueError(f"keystreams start on an AES block: {start_byte} is not a multiple of {_AES_BLOCK}")
    counter = (start_byte // _AES_BLOCK).to_bytes(_AES_BLOCK, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def _check_dtype(dtype: np.dtype | type) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"mask dtype must be uint32 or uint64, not {dtype}")
    return dtype


def _add_range(target: np.ndarray, masks: Sequence[tuple[bytes, int]], lo: int, hi: int) -> None:
    """``target[lo:hi] += sum(sign * mask(key)[lo:hi])``, one cache-sized chunk at a time."""
    itemsize = target.dtype.itemsize
    chunk = min(chunk_words(itemsize), hi - lo)
    streams = [(keystream_encryptor(key, lo * itemsize), sign) for key, sign in masks]
    zeros = memoryview(bytes(chunk * itemsize))
    buffer = bytearray(chunk * itemsize + _AES_BLOCK - 1)
    for start in range(lo, hi, chunk):
        stop = min(hi, start + chunk)
        words = stop - start
        keystream = np.frombuffer(buffer, dtype=target.dtype, count=words)
        piece = target[start:stop]
        for encryptor, sign in streams:
            encryptor.update_into(zeros[: words * itemsize], buffer)
            if sign > 0:
                np.add(piece, keystream, out=piece)
            else:
                np.subtract(piece, keystream, out=piece)


def add_masks(target: np.ndarray, masks: Sequence[tuple[bytes, int]], workers: int | None = None) -> None:
    """``target += sum(sign * mask(key) for key, sign in masks)`` modulo the dtype's modulus, in place.

    A mask is the AES-256-CTR keystream of its 32-byte key (zero initial counter) read as
    ``target.dtype`` words, uniform over the modulus. Every mask is added to one cache-sized chunk
    before the next chunk, and ranges of a large vector are masked by ``workers`` threads
    (default: ``secagg_chunks.default_workers()``).

    Parameters
    ----------
    target : numpy.ndarray
        A contiguous 1-D ``uint32`` or ``uint64`` vector: the modulus is ``2**32`` or ``2**64``.
    masks : sequence of (bytes, int)
        Each mask's key and sign (``+1`` adds it, ``-1`` subtracts it).
    workers : int or None (default: None)
        Threads to use.
    """
    _check_dtype(target.dtype)
    if target.ndim != 1 or not target.flags.c_contiguous:
        raise ValueError("masks are added to contiguous 1-D vectors only")
    if masks and target.size:
        for_each_range(target.size, target.dtype.itemsize, lambda lo, hi: _add_range(target, masks, lo, hi), workers)


def expand_mask(key: bytes, length: int, dtype: np.dtype | type) -> np.ndarray:
    """The mask of ``key``: ``length`` words of ``dtype`` (what ``add_masks`` adds for it)."""
    mask = np.zeros(length, dtype=_check_dtype(dtype))
    add_masks(mask, [(key, 1)])
    return mask
