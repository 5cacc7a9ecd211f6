"""The inline backend's memoized accountant pieces leave Opacus's epsilons exactly as they were."""

from __future__ import annotations

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp
from opacus.accountants.analysis.prv import prvs

import flowerbed.simulations.engine.inline_privacy  # noqa: F401  (installs the memoizations)


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def _opacus_epsilons(method: str, histories: list[list[tuple[float, float, int]]]) -> list[float]:
    """Epsilons with Opacus's own ``TruncatedPrivacyRandomVariable.<method>`` put back for the call."""
    cls = prvs.TruncatedPrivacyRandomVariable
    patched = getattr(cls, method)
    try:
        setattr(cls, method, getattr(cls, f"opacus_{method}"))
        return [_prv_epsilon(h, 1e-5) for h in histories]
    finally:
        setattr(cls, method, patched)


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


def test_truncated_floor_evaluated_once_gives_the_same_epsilon_as_opacus():
    cls = prvs.TruncatedPrivacyRandomVariable
    assert cls.cdf is not cls.opacus_cdf
    histories = [[(1.0, 0.25, 4 * c)] for c in (1, 2, 3, 7)] + [[(1.1, 0.21, 5), (0.9, 0.3, 2)]]
    fast = [_prv_epsilon(h, 1e-5) for h in histories]
    assert fast == _opacus_epsilons("cdf", histories)


def test_truncated_cdf_equals_opacus_where_the_floor_matters():
    prv = prvs.PoissonSubsampledGaussianPRV(0.25, 1.0)
    for t_min in (-10.0, -0.1, 0.05):  # cdf(t_min) is 0, then 0.42, then 0.66
        truncated = prvs.TruncatedPrivacyRandomVariable(prv, t_min, 20.0)
        points = np.linspace(t_min - 1, 21, 97)
        assert np.array_equal(truncated.cdf(points), truncated.opacus_cdf(points))
        assert all(truncated.cdf(float(t)) == truncated.opacus_cdf(float(t)) for t in points)


def test_reused_mean_integrals_give_the_same_epsilon_as_opacus():
    cls = prvs.TruncatedPrivacyRandomVariable
    assert cls.mean is not cls.opacus_mean
    histories = [[(1.0, 0.25, 4 * c)] for c in range(1, 9)]
    histories += [[(0.7, 0.01, 100 * c)] for c in (1, 5, 20)] + [[(1.1, 0.05, 20 * c)] for c in (1, 3, 10)]
    histories += [[(1.1, 0.21, 5), (0.9, 0.3, 2)]]
    fast = [_prv_epsilon(h, 1e-5) for h in histories]
    again = [_prv_epsilon(h, 1e-5) for h in histories]  # the inner integrals are cache hits now
    assert fast == again == _opacus_epsilons("mean", histories)


def test_reused_mean_equals_opacus_mean_to_quadrature_tolerance():
    prv = prvs.PoissonSubsampledGaussianPRV(0.25, 1.0)
    for t_min, t_max in ((-10.0, 20.0), (-0.5, 3.0), (-2.0, 150.0), (-0.1, 20.0)):  # the last: cdf(t_min) = 0.42
        truncated = prvs.TruncatedPrivacyRandomVariable(prv, t_min, t_max)
        assert abs(truncated.mean() - truncated.opacus_mean()) < 1e-9
