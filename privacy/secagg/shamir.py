"""t-of-n Shamir secret sharing over the prime field GF(2**521 - 1).

A secret of up to 64 bytes is one field element; each share is one point ``(x, f(x))`` of a random
polynomial ``f`` of degree ``t - 1`` with ``f(0) = secret``. Any ``t`` shares give the secret back
(Lagrange interpolation at 0); fewer give no information about it. Coefficients come from
``secrets``.

Share encoding (bytes): ``x`` (4 bytes, big-endian) || secret length (1 byte) ||
``f(x)`` (66 bytes).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1
"""The Mersenne prime 2**521 - 1: every 64-byte secret is a field element."""

_Y_BYTES = 66
SHARE_BYTES = 4 + 1 + _Y_BYTES
MAX_SECRET_BYTES = 64


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[bytes]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them recover it.

    Parameters
    ----------
    secret : bytes
        At most 64 bytes.
    threshold : int
        Number of shares needed to recover the secret (>= 1, <= ``len(xs)``).
    xs : sequence of int
        Distinct, non-zero evaluation points below ``2**32`` (one per share holder).

    Returns
    -------
    list of bytes
        One encoded share per entry of ``xs``, in the same order.
    """
    if not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret must be 1 to {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 32 for x in xs):
        raise ValueError("share points must be distinct integers in [1, 2**32)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(_encode(x, len(secret), y))
    return shares


def share_point(share: bytes) -> int:
    """The evaluation point ``x`` of an encoded share."""
    return _decode(share)[0]


def combine(shares: Sequence[bytes], threshold: int, *, check: int = 1) -> bytes:
    """Recover the secret from at least ``threshold`` shares.

    Exactly ``threshold`` shares (those with the smallest points) are interpolated; up to
    ``check`` shares beyond those are checked to lie on the same polynomial, so a single corrupted
    share among them is detected whenever there are more shares than needed (each check costs one
    more interpolation).

    Raises
    ------
    ValueError
        Too few shares, malformed or duplicated points, shares of different secrets, or shares
        that do not lie on one polynomial.
    """
    decoded = sorted({_decode(s) for s in shares})
    points = [x for x, _, _ in decoded]
    if len(set(points)) != len(points):
        raise ValueError("two different shares have the same point")
    if len(decoded) < threshold:
        raise ValueError(f"{len(decoded)} distinct shares, {threshold} needed")
    lengths = {length for _, length, _ in decoded}
    if len(lengths) != 1:
        raise ValueError("shares belong to secrets of different lengths")
    base = [(x, y) for x, _, y in decoded[:threshold]]
    for x, _, y in decoded[threshold : threshold + check]:
        if _interpolate(base, x) != y:
            raise ValueError(f"share at point {x} does not match the others (corrupted share)")
    secret = _interpolate(base, 0)
    length = lengths.pop()
    if secret >= 1 << (8 * length):
        raise ValueError("shares do not reconstruct a valid secret (corrupted share)")
    return secret.to_bytes(length, "big")


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """Value at ``at`` of the polynomial through ``points`` (Lagrange, mod PRIME).

    The terms are summed as one fraction, so a single modular inversion is needed.
    """
    num_total, den_total = 0, 1
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        num_total = (num_total * den + yi * num * den_total) % PRIME
        den_total = den_total * den % PRIME
    return num_total * pow(den_total, -1, PRIME) % PRIME


def _encode(x: int, length: int, y: int) -> bytes:
    return x.to_bytes(4, "big") + bytes([length]) + y.to_bytes(_Y_BYTES, "big")


def _decode(share: bytes) -> tuple[int, int, int]:
    if len(share) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    x = int.from_bytes(share[:4], "big")
    length = share[4]
    y = int.from_bytes(share[5:], "big")
    if x == 0 or not 0 < length <= MAX_SECRET_BYTES or y >= PRIME:
        raise ValueError("malformed share")
    return x, length, y
