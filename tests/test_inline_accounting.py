"""The inline backend's memoized RDP orders leave Opacus's epsilons exactly as they were."""

from __future__ import annotations

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp

import flowerbed.simulations.inline_privacy  # noqa: F401  (installs the memoization)


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def test_memoized_rdp_gives_the_same_epsilon_as_opacus():
    assert hasattr(rdp._compute_rdp, "cache_info")
    history = [(1.1, 0.21, 5), (1.1, 0.21, 5), (0.9, 0.3, 2)]
    memoized = _prv_epsilon(history, 1e-5)
    again = _prv_epsilon(history, 1e-5)  # every order a cache hit now
    memo = rdp._compute_rdp
    try:
        rdp._compute_rdp = memo.__wrapped__
        plain = _prv_epsilon(history, 1e-5)
    finally:
        rdp._compute_rdp = memo
    assert memoized == again == plain
    assert rdp._compute_rdp.cache_info().hits > 0
