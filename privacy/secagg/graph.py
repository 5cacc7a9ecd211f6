"""The SecAgg+ neighbour graph: a random ring lattice that every party derives on its own.

Nodes are placed on a ring in a pseudo-random order and each is joined to the ``k / 2`` nodes on
either side (``k`` even), or to everyone when ``k >= n - 1``. The order is a hash of the round's
session id and the whole roster of public keys, so no party picks it alone and every node can
recompute its neighbours from what the coordinator forwarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from flowerbed.privacy.secagg.crypto import PROTOCOL_ID, node_bytes


def graph_seed(session: bytes, roster: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 over the session id and every ``node id, public keys`` entry, in id order."""
    digest = hashlib.sha256(PROTOCOL_ID + b"|graph|" + session)
    for node_id in sorted(roster):
        channel_key, mask_key = roster[node_id]
        digest.update(node_bytes(node_id) + channel_key + mask_key)
    return digest.digest()


def neighbour_graph(node_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours (never itself) in a ``degree``-regular ring lattice.

    Parameters
    ----------
    node_ids : sequence of int
        The nodes of the round (order does not matter).
    degree : int
        Neighbours per node; rounded up to even; everyone when ``>= len(node_ids) - 1``.
    seed : bytes
        From ``graph_seed``; fixes the ring order.
    """
    ids = sorted(set(int(i) for i in node_ids))
    n = len(ids)
    if degree >= n - 1:
        return {i: frozenset(j for j in ids if j != i) for i in ids}
    ring = sorted(ids, key=lambda i: hashlib.sha256(seed + node_bytes(i)).digest())
    half = (degree + 1) // 2
    graph: dict[int, frozenset[int]] = {}
    for pos, node in enumerate(ring):
        graph[node] = frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d != 0)
    return graph
