"""Seeds derived from the run's seed, so every random choice is reproducible and independent."""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=1 << 16)
def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (``derive_seed(seed, "train", round, site)``)."""
    text = ":".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
