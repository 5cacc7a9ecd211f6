"""Secure aggregation's vector work in cache-sized chunks, spread over threads.

Masking, summing and quantizing a vector of a million entries is memory-bound: done one whole
pass at a time it streams the vector through main memory once per mask. Cut into 256 KiB chunks,
every pass over a chunk happens while it sits in the CPU cache; cut into contiguous ranges, the
chunks run on several cores (AES in ``cryptography`` and numpy's ufuncs release the GIL). The same
threads check a roster's signatures (``map_in_threads``; OpenSSL's ECDSA releases the GIL too).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import TypeVar

import numpy as np

CHUNK_BYTES = 1 << 18
"""Bytes of vector handled per step (256 KiB: fits in a core's L2 cache)."""

_MAX_WORKERS = 8
_POOL: ThreadPoolExecutor | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()
_workers: int | None = None
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for vector work: ``set_default_workers``'s value, else the machine's cores, at most 8."""
    return _workers or max(1, min(_MAX_WORKERS, os.cpu_count() or 1))


def set_default_workers(workers: int | None) -> None:
    """Use ``workers`` threads (1 to 8) for vector work from now on; ``None`` goes back to the core count."""
    global _workers
    if workers is not None and not 1 <= workers <= _MAX_WORKERS:
        raise ValueError(f"workers = {workers}: expected 1 to {_MAX_WORKERS}")
    _workers = workers


def chunk_words(itemsize: int) -> int:
    """Entries of ``itemsize`` bytes in one chunk."""
    return CHUNK_BYTES // itemsize


def split_ranges(length: int, itemsize: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous, non-empty ranges covering ``[0, length)``, each starting on a chunk boundary."""
    chunk = chunk_words(itemsize)
    chunks = -(-length // chunk)
    parts = max(1, min(parts, chunks))
    bounds = [min(length, chunks * i // parts * chunk) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in pairwise(bounds) if hi > lo]


def for_each_range(
    length: int, itemsize: int, work: Callable[[int, int], object], workers: int | None = None
) -> list[object]:
    """``work(lo, hi)`` over ranges of ``[0, length)``, in threads when there is more than one; results in order."""
    ranges = split_ranges(length, itemsize, workers or default_workers())
    if len(ranges) == 1:
        return [work(*ranges[0])]
    futures = [_pool().submit(work, lo, hi) for lo, hi in ranges]
    return [future.result() for future in futures]


def add_vectors(target: np.ndarray, vectors: Sequence[np.ndarray], workers: int | None = None) -> None:
    """``target += sum(vectors)`` in place (unsigned: modulo the dtype's modulus).

    Each thread adds whole vectors over its range: streaming every vector through once is faster
    than visiting a hundred of them chunk by chunk, which defeats the memory prefetcher.
    """
    if not vectors:
        return

    def add_range(lo: int, hi: int) -> None:
        piece = target[lo:hi]
        for vector in vectors:
            np.add(piece, vector[lo:hi], out=piece)

    for_each_range(target.size, target.dtype.itemsize, add_range, workers)


def map_in_threads(work: Callable[[T], R], items: Sequence[T], workers: int | None = None) -> list[R]:
    """``[work(x) for x in items]``, contiguous slices on the pool's threads (for work that releases the GIL)."""
    parts = min(workers or default_workers(), len(items))
    if parts <= 1:
        return [work(item) for item in items]
    bounds = [len(items) * i // parts for i in range(parts + 1)]

    def run(lo: int, hi: int) -> list[R]:
        return [work(item) for item in items[lo:hi]]

    futures = [_pool().submit(run, lo, hi) for lo, hi in pairwise(bounds)]
    return [result for future in futures for result in future.result()]


def _pool() -> ThreadPoolExecutor:
    """The process's pool, made on first use (and again in a forked child, which has no threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID:
            _POOL = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="flowerbed-secagg")
            _POOL_PID = os.getpid()
        return _POOL
